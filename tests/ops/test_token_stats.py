"""tk.token_stats: every field against the float64 truth on materialised logits, on every backend (the pass rule:
tests/_harness.py)."""

from __future__ import annotations

import math

import torch

import tipkernels as tk

from tests._harness import (ALL_BACKENDS, DTYPES, TOL, axis, grid, make_case, reference, scaled_err, shape_for,
                            truth_student, truth_teacher)


@grid("backend,teacher,dtype", axis(ALL_BACKENDS), axis(["linear", "logits", "none"]),
      axis(DTYPES + [torch.float64], ["fp32", "bf16", "fp64"]),
      drop=lambda backend, teacher, dtype: backend == "triton" and dtype == torch.float64)  # fp32 accuracy only
def test_token_stats_all_fields(backend, teacher, dtype):
    n, v, ds, dt = shape_for(backend)
    temperature = 0.7
    case = make_case(n, v, ds, dt, teacher=teacher, labels=True, dtype=dtype, seed=1)

    def stats(c, be):
        return tk.token_stats(c.hs, c.ws, c.ht, c.wt, student_bias=c.bs, labels=c.labels, temperature=temperature,
                              backend=be, **c.teacher_kwargs)

    got, same = stats(case, backend), stats(case, "reference")
    s = truth_student(case, temperature)[1].detach()
    logp = torch.log_softmax(s, -1)
    lab = case.labels.reshape(-1)
    truth = {
        "student_lse": torch.logsumexp(s, -1),
        "entropy": reference.entropy(s),
        "entropy_norm": reference.entropy(s) / math.log(v),
        "label_logprob": torch.where(lab != -100, logp.gather(1, lab.clamp_min(0)[:, None])[:, 0], 0.0),
    }
    argmax_truth = {"student_argmax": s}
    if teacher != "none":
        u = truth_teacher(case, temperature)
        truth.update(teacher_lse=torch.logsumexp(u, -1), teacher_entropy=reference.entropy(u),
                     reverse_kl=reference.reverse_kl(s, u), forward_kl=reference.forward_kl(s, u))
        argmax_truth["teacher_argmax"] = u
    else:
        for name in ("teacher_lse", "teacher_entropy", "reverse_kl", "forward_kl", "teacher_argmax"):
            assert getattr(got, name) is None, name
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name, t in truth.items():
        g, r = getattr(got, name), getattr(same, name)
        assert g.shape == case.lead and g.dtype == out_dtype, (name, g.shape, g.dtype)
        assert not g.requires_grad
        e_fast, e_ref = scaled_err(g, t.reshape(case.lead), 1.0), scaled_err(r, t.reshape(case.lead), 1.0)
        assert e_fast <= e_ref + TOL[dtype], f"{name}: {e_fast:.3g} > {e_ref:.3g} + {TOL[dtype]}"
    assert torch.all(got.label_logprob.reshape(-1)[lab == -100] == 0)
    for name, logits in argmax_truth.items():
        idx = getattr(got, name)
        assert idx.dtype == torch.int64 and idx.shape == case.lead
        picked = logits.gather(1, idx.reshape(-1, 1))[:, 0]
        slack = TOL[dtype] * max(1.0, logits.abs().max().item())
        assert (picked >= logits.max(-1).values - slack).all(), name
        if dtype == torch.float64:
            assert torch.equal(idx.reshape(-1), logits.argmax(-1))
