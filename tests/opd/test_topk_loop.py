"""The OPD loop with a top-k teacher (a teacher served elsewhere): the same code path as the dense teacher, the loss
called with ``teacher_topk=``, checked against the float64 bins of the models' materialised logits.

With K = V the bucket's rest is empty and the top-k loss is the dense one exactly: the trainer then takes the same
steps with either teacher, which is the test that the two share one loop.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import tipkernels as tk
from tipkernels.opd import HFTopKTeacher, OPDConfig, OPDTrainer, run_demo, sequence_tip_loss
from tipkernels.opd.cli import main as cli_main
from tipkernels.opd.rollout import generate

from tests._harness import (PROMPTS, bin_divergence64, model_logprobs64, opd_config as config,
                            opd_models as models, save_cli_inputs, topk_bins64)


def _rollouts(student, tok):
    torch.manual_seed(0)
    roll = generate(student, tok, PROMPTS, max_new_tokens=6, temperature=1.0)
    assert (roll.attention_mask[:, 0] == 0).any() and (roll.response_mask.sum(1) < 6).any()
    return roll


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_sparse_loss_matches_float64_bins(tok, divergence, tail):
    student, teacher_model = models(tok)  # the teacher's lm_head has 3 padding rows
    V = student.get_output_embeddings().weight.shape[0]
    roll = _rollouts(student, tok)
    ids, attn, resp = roll.input_ids, roll.attention_mask, roll.response_mask
    k = 4
    loss_fn = tk.TIPDistillationLoss(rule="all", divergence=divergence, backend="torch", tail=tail)
    out = sequence_tip_loss(loss_fn, student, HFTopKTeacher(teacher_model, k, vocab_size=V), ids, attn, resp)

    # the truth: float64 log-softmax of both models' real logits; the teacher's true top-k over the student's V
    mask = resp[:, 1:] & attn[:, :-1].bool()
    ls = model_logprobs64(student, ids, attn, V)[mask]
    top = model_logprobs64(teacher_model, ids, attn, V)[mask].topk(k, -1)
    want = bin_divergence64(*topk_bins64(ls, top.indices, top.values, tail), divergence, 0.5)
    assert torch.equal(out.selection.mask, mask)
    assert abs(float(out.loss.detach()) - float(want.mean())) < 1e-5 * max(1.0, float(want.mean()))
    field = out.stats.reverse_kl if divergence == "reverse_kl" else out.stats.forward_kl
    torch.testing.assert_close(field[mask].double(), want, rtol=1e-5, atol=1e-6)
    # the student's entropy stays the full-vocabulary one
    ent = -(ls.exp() * ls).sum(-1)
    torch.testing.assert_close(out.stats.entropy[mask].double(), ent, rtol=1e-5, atol=1e-6)
    # gradients reach the student (body and lm_head)
    out.loss.backward()
    assert student.lm_head.weight.grad is not None and float(student.lm_head.weight.grad.norm()) > 0


def test_trainer_with_full_topk_takes_the_dense_steps(tok, tmp_path):
    """K = V, bucket: the rest is empty, so the top-k teacher is the dense teacher; two trainers from the same seed
    sample the same rollouts and take the same steps (one loop, the loss's teacher argument the only difference)."""
    runs = []
    for sparse in (False, True):
        student, teacher = models(tok)
        V = student.get_output_embeddings().weight.shape[0]
        t = HFTopKTeacher(teacher, V, vocab_size=V) if sparse else teacher
        trainer = OPDTrainer(student, t, tok, PROMPTS, config(tmp_path / str(sparse), steps=2, rule="soft_or"))
        runs.append((trainer.train(), student))
    (dense_hist, dense_student), (sparse_hist, sparse_student) = runs
    for a, b in zip(dense_hist, sparse_hist):
        assert a["valid_tokens"] == b["valid_tokens"] and a["selected_tokens"] == b["selected_tokens"]
        for key in ("loss", "reverse_kl", "forward_kl", "entropy", "grad_norm", "q3_selected"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
        # a top-k teacher gives no entropy: the metric is left out rather than logged as NaN
        assert "teacher_entropy" in a and not [k for k in b if k.startswith("teacher_entropy")]
    for p, q in zip(dense_student.parameters(), sparse_student.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_trainer_with_a_served_teacher_trains(tok, tmp_path):
    """A callable returning the top-3 (renormalised tail): steps run, the loss is finite and the step's metrics are
    all there; the callable sees each micro-batch's whole sequences."""
    student, teacher_model = models(tok)
    V = student.get_output_embeddings().weight.shape[0]
    inner = HFTopKTeacher(teacher_model, 3, vocab_size=V)
    seen = []

    def served(input_ids, attention_mask):
        seen.append(tuple(input_ids.shape))
        return inner(input_ids, attention_mask)

    trainer = OPDTrainer(student, served, tok, PROMPTS, config(tmp_path, steps=2, tail="renormalize"))
    assert trainer.loss_fn.tail == "renormalize"
    hist = trainer.train()
    assert len(hist) == 2 and len(seen) == 2 and all(len(s) == 2 and s[0] == 4 for s in seen)
    assert all(math.isfinite(r["loss"]) and r["selected_tokens"] > 0 for r in hist)
    assert {"reverse_kl", "forward_kl", "q1_valid"} <= set(hist[-1])
    assert all(math.isfinite(v) for v in hist[-1].values())


def test_loop_refuses_bad_top_k_teachers(tok, tmp_path):
    student, teacher_model = models(tok)
    roll = _rollouts(student, tok)
    loss_fn = tk.TIPDistillationLoss(rule="all", backend="torch")
    ids, attn, resp = roll.input_ids, roll.attention_mask, roll.response_mask
    B, T = ids.shape

    def call(out):
        return sequence_tip_loss(loss_fn, student, lambda i, a: out, ids, attn, resp)

    with pytest.raises(ValueError, match=f"\\[B, T-1, K\\] = \\[{B}, {T - 1}, K\\]"):
        call(tk.TeacherTopK(torch.zeros(B, T, 2, dtype=torch.long), torch.zeros(B, T, 2)))
    with pytest.raises(TypeError, match="must return a TeacherTopK"):
        call(torch.zeros(B, T - 1, 2))
    with pytest.raises(ValueError, match="out of range"):  # the loss checks the ids against the student's V
        call(tk.TeacherTopK(torch.full((B, T - 1, 1), 10 ** 4), torch.zeros(B, T - 1, 1)))
    with pytest.raises(ValueError, match="top-k teacher .* has none: use teacher_parallel='replicate'"):
        OPDTrainer(student, HFTopKTeacher(teacher_model, 2), tok, PROMPTS,
                   config(tmp_path, parallel="ddp", teacher_parallel="fsdp"))
    with pytest.raises(ValueError, match="OPDConfig.tail"):
        OPDConfig(tail="drop")
    with pytest.raises(ValueError, match="teacher_topk must be an int in \\[1, 13\\]"):
        run_demo(quick=True, teacher_topk=20, output_dir=str(tmp_path / "demo"), progress=False)


def test_cli_opd_teacher_topk(tok, tmp_path, capsys):
    s_dir, t_dir, prompts = save_cli_inputs(tmp_path, tok, *models(tok))
    out_dir = tmp_path / "run"
    argv = ["opd", "--student", str(s_dir), "--teacher", str(t_dir), "--prompts", str(prompts), "--steps", "1",
            "--batch-size", "2", "--max-new-tokens", "4", "--output-dir", str(out_dir), "--no-progress",
            "--device", "cpu", "--teacher-topk", "4", "--tail", "renormalize"]
    assert cli_main(argv) == 0
    rec = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(rec["loss"]) and rec["step"] == 1

    def err(args):
        capsys.readouterr()
        assert cli_main(args) == 2
        return capsys.readouterr().err

    assert "--teacher-topk must be ≥ 1" in err(argv[:-4] + ["--teacher-topk", "0"])
    assert "k must be an int in [1, 13]" in err(argv[:-4] + ["--teacher-topk", "14"])


@pytest.mark.slow
def test_demo_quick_with_a_top_k_teacher(tmp_path):
    res = run_demo(quick=True, steps=3, teacher_topk=4, output_dir=str(tmp_path / "demo"), progress=False,
                   log=lambda *_: None)
    run = next(iter(res["entries"].values()))["per_seed"][0]
    assert math.isfinite(run["kl_end"]) and run["tokens_trained"] > 0
