"""tipkernels.opd.trl.TIPDistillationTrainer: TRL's stable ``DistillationTrainer`` with the TIP loss.

Tiny Llama models and datasets are built in code (no downloads); CPU, torch backend. With ``rule="all"`` the
loss and the student's gradients must be TRL's own (its chunked generalised JSD over the same hidden states).
"""

import warnings

import pytest
import torch

import tipkernels as tk
from tipkernels.opd.demo import build_tokenizer

from tests._harness import PROMPTS, opd_models as models

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402  (a TRL dependency)

from tipkernels.opd.trl import DistillationConfig, DistillationTrainer, TIPDistillationTrainer  # noqa: E402

ROWS = [{"prompt": p} for p in PROMPTS]


def _args(tmp, **kw):
    base = dict(output_dir=str(tmp), per_device_train_batch_size=4, max_steps=2, beta=0.5, max_completion_length=5,
                learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                disable_tqdm=True, seed=0)
    base.update(kw)
    return DistillationConfig(**base)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """TRL's trainer and ours over the same student and teacher (equal vocab_size: TRL insists)."""
    tok = build_tokenizer()
    tok.padding_side = "left"
    student, teacher = models(tok, teacher_extra_rows=0)
    tmp = tmp_path_factory.mktemp("trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp / "a"),
                                  train_dataset=Dataset.from_list(ROWS), processing_class=tok)
        tip = TIPDistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp / "b"),
                                     train_dataset=Dataset.from_list(ROWS), processing_class=tok,
                                     tip_loss=tk.TIPDistillationLoss(rule="all", divergence="jsd", beta=0.5,
                                                                     backend="torch"))
    return tok, student, trl, tip


def _batch(tok, tool_mask=False):
    """What TRL's _generate_and_score_completions hands compute_loss: left-padded prompts, right-padded
    completions (different lengths), the generated-token count; optionally a tool mask (0 on tool results)."""
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:4]]
    comps = [tok(c)["input_ids"] + [tok.eos_token_id] for c in ("13", "0135", "", "147")]
    P, C = max(map(len, prompts)), max(map(len, comps))
    out = {k: torch.zeros((4, n), dtype=torch.long) for k, n in
           (("prompt_ids", P), ("prompt_mask", P), ("completion_ids", C), ("completion_mask", C))}
    out["prompt_ids"].fill_(tok.pad_token_id)
    out["completion_ids"].fill_(tok.pad_token_id)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        out["prompt_ids"][i, P - len(p):], out["prompt_mask"][i, P - len(p):] = torch.tensor(p), 1
        out["completion_ids"][i, :len(c)], out["completion_mask"][i, :len(c)] = torch.tensor(c), 1
    loss_mask = out["completion_mask"]
    if tool_mask:
        out["tool_mask"] = torch.ones_like(loss_mask)
        out["tool_mask"][1, 1:3] = 0
        loss_mask = loss_mask * out["tool_mask"]
    # TRL's count over the whole generation batch (here: two micro-batches' worth), before the process split
    out["num_items_in_batch"] = loss_mask.sum() * 2
    return out


def _loss_and_grads(trainer, student, inputs):
    student.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(student, dict(inputs))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None}
    entropy = trainer._metrics["train"]["entropy"][-1]
    return loss.detach(), grads, entropy


@pytest.mark.parametrize("beta,temperature,tool_mask", [(0.0, 1.0, False), (0.5, 1.0, False), (1.0, 1.0, False),
                                                        (0.5, 2.0, True), (0.3, 0.7, True)])
def test_rule_all_equals_trl_distillation_loss_and_gradients(pair, beta, temperature, tool_mask):
    tok, student, trl, tip = pair
    student.train()
    trl.beta, trl.temperature = beta, temperature
    tip.tip_loss = tk.TIPDistillationLoss(rule="all", divergence="jsd", beta=beta, temperature=temperature,
                                          backend="torch")
    inputs = _batch(tok, tool_mask)
    want, want_g, want_h = _loss_and_grads(trl, student, inputs)
    got, got_g, got_h = _loss_and_grads(tip, student, inputs)
    assert want > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert got_g.keys() == want_g.keys() and len(want_g) > 0
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-4, atol=1e-7, msg=n)
    assert abs(got_h - want_h) < 1e-5 * want_h  # TRL's logged student entropy, from the TIP scoring pass


def test_normalises_the_selected_sum_by_num_items_in_batch(pair):
    """Selection: Σ_selected D / num_items_in_batch, i.e. the selected tokens keep TRL's per-token weight."""
    tok, student, _, tip = pair
    student.train()
    inputs = _batch(tok)
    n = inputs["num_items_in_batch"].double()
    seen = []
    tip.tip_loss = tk.TIPDistillationLoss(rule="entropy_topk", ratio=0.5, divergence="reverse_kl", backend="torch")
    hook = tip.tip_loss.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        with torch.no_grad():
            got = tip.compute_loss(student, dict(inputs))
            tip.tip_loss.rule = "all"
            everything = tip.compute_loss(student, dict(inputs))
    finally:
        hook.remove()
    sel, full = seen
    n_sel, n_valid = int(sel.selection.mask.sum()), int(inputs["completion_mask"].sum())
    assert 0 < n_sel < n_valid and int(full.selection.mask.sum()) == n_valid
    # the TIP loss is the mean over its selected rows; the trainer turns it into TRL's sum / num_items_in_batch
    torch.testing.assert_close(got.double() * n, sel.loss.double() * n_sel, rtol=1e-6, atol=0)
    want = (sel.stats.reverse_kl.double() * sel.selection.mask).sum()
    torch.testing.assert_close(got.double() * n, want, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(everything.double() * n, full.loss.double() * n_valid, rtol=1e-6, atol=0)
    assert 0 < got < everything  # a subset of the same non-negative terms over the same denominator


def test_no_lm_head_forward_no_full_logits(pair):
    """The loss takes hidden states and lm_head weights: neither model's lm_head module ever runs, so no
    [tokens, vocab] logits tensor is formed by a model forward (the torch backend works in vocabulary chunks)."""
    tok, student, trl, tip = pair
    tip.tip_loss = tk.TIPDistillationLoss(rule="soft_or", ratio=0.5, divergence="jsd", beta=0.5, backend="torch")

    def refuse(mod, args):
        raise AssertionError("an lm_head forward ran: full logits were materialised")

    hooks = [m.get_output_embeddings().register_forward_pre_hook(refuse) for m in (student, trl.teacher_model)]
    try:
        loss = tip.compute_loss(student, dict(_batch(tok, tool_mask=True)))
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    assert loss > 0 and student.get_output_embeddings().weight.grad is not None
    student.zero_grad(set_to_none=True)


def test_tip_metrics_reach_trl_logs(pair):
    tok, student, _, tip = pair
    student.train()
    tip.tip_loss = tk.TIPDistillationLoss(rule="soft_or", ratio=0.5, divergence="jsd", beta=0.5, backend="torch")
    tip._metrics["train"].clear()
    for _ in range(2):
        tip.compute_loss(student, dict(_batch(tok)))
    logs = {"loss": 1.0}
    tip.state.global_step = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tip.log(logs)
    rec = tip.state.log_history[-1]
    assert 0 < rec["tip/selected_fraction"] < 1
    quads = [rec[f"tip/q{q}_selected"] for q in range(1, 5)]
    assert all(0 <= s <= 1 for s in quads) and abs(sum(quads) - 1) < 1e-6
    assert 0 < rec["tip/entropy_norm"] <= 1 and rec["entropy"] > 0
    assert not tip._metrics["train"]  # TRL's log() empties its store


def test_default_loss_maps_trl_config(pair):
    tok, student, trl, _ = pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = TIPDistillationTrainer(model=student, teacher_model=trl.teacher_model,
                                   args=_args(trl.args.output_dir + "-d", beta=0.2, temperature=0.8),
                                   train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    assert (t.tip_loss.divergence, t.tip_loss.beta, t.tip_loss.temperature) == ("jsd", 0.2, 0.8)
    assert (t.tip_loss.rule, t.tip_loss.ratio) == ("soft_or", 0.5)
    with pytest.warns(UserWarning, match="temperature"):
        TIPDistillationTrainer(model=student, teacher_model=trl.teacher_model, args=_args(trl.args.output_dir),
                               train_dataset=Dataset.from_list(ROWS), processing_class=tok,
                               tip_loss=tk.TIPDistillationLoss(divergence="jsd", beta=0.5, temperature=2.0))
    with pytest.raises(TypeError, match="tip_loss"):
        TIPDistillationTrainer(model=student, teacher_model=trl.teacher_model, args=_args(trl.args.output_dir),
                               train_dataset=Dataset.from_list(ROWS), processing_class=tok, tip_loss="all")


@pytest.mark.slow
def test_tip_distillation_trainer_trains(tmp_path):
    tok = build_tokenizer()
    tok.padding_side = "left"
    student, teacher = models(tok, teacher_extra_rows=0)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = TIPDistillationTrainer(
            model=student, teacher_model=teacher, args=_args(tmp_path, gradient_accumulation_steps=2),
            train_dataset=Dataset.from_list(ROWS), processing_class=tok,
            tip_loss=tk.TIPDistillationLoss(rule="soft_or", ratio=0.5, divergence="jsd", beta=0.5, backend="torch"))
        result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 2 and all(0 < r["tip/selected_fraction"] < 1 for r in logs)
    assert all("completions/mean_length" in r and "entropy" in r for r in logs)  # TRL's own logging still there
    assert any(not torch.equal(p, before[n]) for n, p in student.named_parameters())


@pytest.mark.slow
def test_example_runs(tmp_path):
    import os
    import subprocess
    import sys

    from tests._harness import ROOT

    res = subprocess.run([sys.executable, str(ROOT / "examples" / "trl_distillation.py"), "--steps", "2",
                          "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "'tip/selected_fraction'" in res.stdout and "'loss'" in res.stdout
