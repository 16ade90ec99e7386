"""Models whose logits are ``c·tanh(a·(h·Wᵀ+b)/c)``: the OPD loop reads the scale and soft-cap from each model's config
(as TRL does) and its loss equals the loss on the models' real (materialised, float64) logits; transforms it cannot
express are refused, naming them."""

from __future__ import annotations

import pytest
import torch

import tipkernels as tk
from tipkernels.opd import logit_transform, sequence_tip_loss
from tipkernels.opd.models import lm_head, position_ids, tip_loss_for

from tests._harness import TINY_LM, gemma2_model, granite_model, model_logprobs64


def _cohere(vocab, logit_scale, seed=2):
    from transformers import CohereConfig, CohereForCausalLM

    cfg = CohereConfig(vocab_size=vocab, logit_scale=logit_scale, **TINY_LM)
    torch.manual_seed(seed)
    return CohereForCausalLM(cfg).eval()


def _batch(vocab, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (3, 9), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :2] = 0  # left padding
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, 4:] = True
    return ids, attn, resp


def test_logit_transform_reads_configs_like_trl():
    assert logit_transform(gemma2_model(40, 5.0)) == (1.0, 5.0)
    assert logit_transform(granite_model(40, 4.0)) == (0.25, None)  # Granite divides
    assert logit_transform(_cohere(40, 0.0625)) == (0.0625, None)
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=40, **TINY_LM))
    assert logit_transform(llama) == (1.0, None)
    llama.config.lm_head_multiplier = 3.0  # Falcon-H1's name: multiplies
    assert logit_transform(llama) == (3.0, None)
    llama.config.model_type, llama.config.lm_head_multiplier, llama.config.logits_scaling = "hyperclovax", None, 2.0
    assert logit_transform(llama) == (2.0, None)  # HyperCLOVA X multiplies by logits_scaling


@pytest.mark.parametrize("name,value,match", [
    ("output_multiplier_scale", 2.0, "output_multiplier_scale"), ("logit_scale", 0.0, "logit_scale"),
    ("logit_scale", -1.0, "logit_scale"), ("final_logit_softcapping", 0.0, "final_logit_softcapping"),
])
def test_inexpressible_transforms_are_refused(name, value, match):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=40, **TINY_LM))
    setattr(llama.config, name, value)
    with pytest.raises(ValueError, match=match):
        lm_head(llama, "student")


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("jsd", 0.3)])
def test_loop_loss_equals_loss_on_real_logits(divergence, beta):
    """Gemma 2 student (soft-capped at 5, saturating) against a Granite teacher (logits / 4, V_t > V): the loop's
    loss and gradient equal those of the models' own logits."""
    vocab = 40
    student, teacher = gemma2_model(vocab, 5.0), granite_model(vocab + 3, 4.0)
    ids, attn, resp = _batch(vocab)
    loss_fn = tk.TIPDistillationLoss(rule="all", divergence=divergence, beta=beta, backend="torch")
    out = sequence_tip_loss(loss_fn, student, teacher, ids, attn, resp)

    ls, lt = model_logprobs64(student, ids, attn, vocab), model_logprobs64(teacher, ids, attn, vocab)
    with torch.no_grad():
        raw = student(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn)).logits
    assert (raw.abs() > 4.9).float().mean() > 0.05  # the cap saturates
    mask = resp[:, 1:] & attn[:, :-1].bool()
    want = tk.backends.reference.divergence(ls[mask], lt[mask], divergence, beta).mean()
    assert abs(float(out.loss.detach()) - float(want)) < 1e-5 * max(1.0, float(want))

    # gradients in the student's lm_head: the loop's against autograd through the model's own logits
    out.loss.backward()
    got = student.lm_head.weight.grad.clone()
    student.zero_grad()
    logits = student(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn)).logits
    ls_g = torch.log_softmax(logits.double()[:, :-1], -1)
    tk.backends.reference.divergence(ls_g[mask], lt[mask], divergence, beta).mean().backward()
    truth = student.lm_head.weight.grad
    assert (got.double() - truth).abs().max() <= 1e-4 * truth.abs().max()


def test_loss_with_other_transforms_is_refused():
    student, teacher = gemma2_model(40, 5.0), granite_model(40, 4.0)
    fn = tk.TIPDistillationLoss(rule="all", backend="torch")
    adapted = tip_loss_for(fn, student, teacher)
    assert adapted is not fn and (adapted.student_softcap, adapted.teacher_logit_scale) == (5.0, 0.25)
    assert fn.student_softcap is None  # the caller's loss is untouched
    assert tip_loss_for(adapted, student, teacher) is adapted
    with pytest.raises(ValueError, match="logit transforms"):
        tip_loss_for(tk.TIPDistillationLoss(student_softcap=30.0), student, teacher)


def test_trainer_loss_carries_the_models_transforms(tmp_path):
    """OPDTrainer builds its loss with each model's scale and cap, read from the configs."""
    from tipkernels.opd import OPDTrainer
    from tipkernels.opd.demo import build_tokenizer

    from tests._harness import PROMPTS, opd_config, opd_models

    tok = build_tokenizer()
    student, teacher = opd_models(tok)
    student.config.final_logit_softcapping = 12.0
    teacher.config.logit_scale = 0.5
    trainer = OPDTrainer(student, teacher, tok, PROMPTS, opd_config(tmp_path, rule="all", steps=1))
    fn = trainer.loss_fn
    assert (fn.student_logit_scale, fn.student_softcap, fn.teacher_logit_scale, fn.teacher_softcap) == \
        (1.0, 12.0, 0.5, None)
