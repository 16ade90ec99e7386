"""Per-model logit transforms ``c·tanh(a·z/c)/T`` (docs/design.md §1): values and gradients of every divergence,
the entropy, token_stats and the TIP loss against the float64 truth (the pass rule: tests/_harness.py), with
soft-caps small enough that tanh saturates and scales != 1 on both models; the checks of the four keywords; and
equality with TRL's ``ChunkedDivergenceFunction``."""

from __future__ import annotations

import math

import pytest
import torch

import tipkernels as tk

from dataclasses import replace

from tests._harness import (BACKENDS, DEVICE, DIV_IDS, DIVS, DTYPES, HAS_TRITON_BACKEND, TOL, assert_rule, axis, f64,
                            grid, make_case, make_problem, reference, run_divergence, run_entropy, scaled_err,
                            shape_for, transform64, truth_divergence, truth_entropy, truth_student, truth_teacher,
                            torch_backend, triton_backend, upstream)

# Logits of std ~8 (make_case scale 2): times 2.5 they reach ~±20 and more, so a cap of 5 saturates (tanh ≈ ±1).
CAPPED = dict(student_logit_scale=2.5, student_softcap=5.0, teacher_logit_scale=1.5, teacher_softcap=4.0)
VARIANTS = {
    "capped": CAPPED,
    "scale_only": dict(student_logit_scale=0.3, teacher_logit_scale=1.7),
    "student_cap": dict(student_logit_scale=1.5, student_softcap=4.0, teacher_logit_scale=0.5),
    "teacher_cap": dict(student_logit_scale=0.8, teacher_softcap=3.0),
}


def _case(backend, dtype, transforms, seed=4, **kw):
    n, v, ds, dt = shape_for(backend)
    return make_case(n, v, ds, dt, dtype=dtype, seed=seed, scale=2.0, transforms=transforms, **kw)


def test_caps_saturate():
    """The capped case really reaches tanh's flat region on both models (else the tests below prove little)."""
    case = _case("torch", torch.float64, CAPPED)
    s = truth_student(case, 1.0)[1].detach() / 5.0
    u = truth_teacher(case, 1.0) / 4.0
    assert (s.abs() > 0.999).float().mean() > 0.05 and (u.abs() > 0.99).float().mean() > 0.02


@grid("backend,kind,beta,variant,dtype", axis(BACKENDS), axis(DIVS, DIV_IDS), axis(list(VARIANTS)),
      axis(DTYPES, ["fp32", "bf16"]),
      drop=lambda backend, kind, beta, variant, dtype: dtype == torch.bfloat16 and variant != "capped")
def test_divergence_transforms(backend, kind, beta, variant, dtype):
    """Padded teacher with huge padding rows, biases on both, T = 0.7; gradients in h_s, W_s, b_s."""
    case = _case(backend, dtype, VARIANTS[variant])
    go = upstream("none", case.lead)
    args = (kind, beta, 0.7, "none", None, go)
    fast = run_divergence(case, backend, *args)
    assert_rule(fast, run_divergence(case, "reference", *args), truth_divergence(case, *args), dtype,
                f"{backend} {kind}({beta}) {variant}")


@grid("backend,variant,dtype", axis(BACKENDS), axis(["capped", "scale_only"]), axis(DTYPES, ["fp32", "bf16"]))
def test_entropy_transforms(backend, variant, dtype):
    case = _case(backend, dtype, VARIANTS[variant], teacher="none")
    go = upstream("mean", case.lead)
    fast = run_entropy(case, backend, 1.3, "mean", go)
    assert_rule(fast, run_entropy(case, "reference", 1.3, "mean", go), truth_entropy(case, 1.3, "mean", go), dtype,
                f"{backend} entropy {variant}")


@grid("backend,teacher", axis(BACKENDS), axis(["linear", "logits"]))
def test_token_stats_transforms(backend, teacher):
    """Every field, teacher as lm_head or as (padded, transformed) logits, labels."""
    temperature, dtype = 0.7, torch.float32
    case = _case(backend, dtype, CAPPED, teacher=teacher, labels=True)

    def stats(be):
        return tk.token_stats(case.hs, case.ws, case.ht, case.wt, student_bias=case.bs, labels=case.labels,
                              temperature=temperature, backend=be, **case.teacher_kwargs)

    got, same = stats(backend), stats("reference")
    s = truth_student(case, temperature)[1].detach()
    u = truth_teacher(case, temperature)
    lab = case.labels.reshape(-1)
    logp = torch.log_softmax(s, -1)
    truth = dict(student_lse=torch.logsumexp(s, -1), entropy=reference.entropy(s),
                 teacher_lse=torch.logsumexp(u, -1), teacher_entropy=reference.entropy(u),
                 reverse_kl=reference.reverse_kl(s, u), forward_kl=reference.forward_kl(s, u),
                 label_logprob=torch.where(lab != -100, logp.gather(1, lab.clamp_min(0)[:, None])[:, 0], 0.0))
    for name, t in truth.items():
        e_fast = scaled_err(getattr(got, name), t.reshape(case.lead), 1.0)
        e_ref = scaled_err(getattr(same, name), t.reshape(case.lead), 1.0)
        assert e_fast <= e_ref + TOL[dtype], f"{name}: {e_fast:.3g} > {e_ref:.3g} + {TOL[dtype]}"
    for name, logits in (("student_argmax", s), ("teacher_argmax", u)):
        picked = logits.gather(1, getattr(got, name).reshape(-1, 1))[:, 0]
        assert (picked >= logits.max(-1).values - 1e-4 * logits.abs().max()).all(), name


def test_reference_is_the_formula():
    """The float64 reference forms exactly ``c·tanh(a·z/c)/T`` (scale, cap, temperature), per model."""
    case = _case("torch", torch.float64, CAPPED)
    prob, _ = tk.inputs.build_problem(case.hs, case.ws, case.ht, case.wt, student_bias=case.bs,
                                      teacher_bias=case.bt, temperature=0.7, **CAPPED)
    z = case.hs @ case.ws.t() + case.bs
    assert torch.allclose(reference.student_logits(prob), 5.0 * torch.tanh(2.5 * z / 5.0) / 0.7, rtol=1e-14)
    zt = case.ht @ case.wt[: case.vocab].t() + case.bt[: case.vocab]
    assert torch.allclose(reference.teacher_logits(prob), 4.0 * torch.tanh(1.5 * zt / 4.0) / 0.7, rtol=1e-14)
    assert torch.equal(transform64(z, 0.7, 2.5, None), 2.5 * z / 0.7)


def test_identity_transform_is_today():
    """Scale 1 and no cap give bitwise the values of a call without the keywords."""
    case = _case("torch", torch.float32, {})
    kw = dict(student_bias=case.bs, teacher_bias=case.bt, temperature=0.7, divergence="jsd", backend="torch")
    a = tk.fused_linear_divergence(case.hs, case.ws, case.ht, case.wt, **kw)
    b = tk.fused_linear_divergence(case.hs, case.ws, case.ht, case.wt, student_logit_scale=1.0,
                                   student_softcap=None, teacher_logit_scale=1, teacher_softcap=None, **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("jsd", 0.3)])
def test_tip_loss_transforms(backend, divergence, beta):
    """TIPDistillationLoss(rule="all") with transforms = the mean divergence over the masked tokens, in float64."""
    case = _case(backend, torch.float32, CAPPED, lead=(1, shape_for(backend)[0]))
    mask = torch.ones(case.lead, dtype=torch.bool, device=DEVICE)
    mask[0, ::3] = False
    loss_fn = tk.TIPDistillationLoss(rule="all", ratio=1.0, divergence=divergence, beta=beta, temperature=0.7,
                                     backend=backend, **CAPPED)
    assert "student_softcap=5.0" in repr(loss_fn)
    hs, ws, bs = (t.detach().clone().requires_grad_() for t in (case.hs, case.ws, case.bs))
    out = loss_fn(hs, ws, case.ht, case.wt, mask, student_bias=bs, teacher_bias=case.bt)
    out.loss.backward()
    (h64, w64, b64), s = truth_student(case, 0.7)
    u = truth_teacher(case, 0.7)
    sel = mask.reshape(-1)
    truth = reference.divergence(s[sel], u[sel], divergence, beta).mean()
    g = torch.autograd.grad(truth, (h64, w64, b64))
    assert abs(out.loss.item() - truth.item()) <= TOL[torch.float32] * max(1.0, abs(truth.item()))
    for got, t in zip((hs.grad, ws.grad, bs.grad), g):
        assert scaled_err(got, t, 0.0) <= TOL[torch.float32]


@pytest.mark.parametrize("name,value,err", [
    ("student_logit_scale", 0.0, ValueError), ("student_logit_scale", -1.0, ValueError),
    ("teacher_logit_scale", math.inf, ValueError), ("teacher_logit_scale", math.nan, ValueError),
    ("student_softcap", 0.0, ValueError), ("teacher_softcap", -3.0, ValueError),
    ("teacher_softcap", math.inf, ValueError), ("student_softcap", math.nan, ValueError),
    ("student_logit_scale", True, TypeError), ("teacher_softcap", False, TypeError),
    ("student_softcap", "30", TypeError), ("teacher_logit_scale", "1", TypeError),
    ("student_logit_scale", None, TypeError),
])
def test_bad_transform_values(name, value, err):
    case = _case("torch", torch.float32, {})
    ops = [
        lambda: tk.fused_linear_divergence(case.hs, case.ws, case.ht, case.wt, backend="torch", **{name: value}),
        lambda: tk.token_stats(case.hs, case.ws, case.ht, case.wt, backend="torch", **{name: value}),
        lambda: tk.TIPDistillationLoss(**{name: value}),
    ]
    for op in ops:
        with pytest.raises(err, match=name):
            op()
    ent_name = name.split("_", 1)[1]  # logit_scale / softcap
    with pytest.raises(err, match=ent_name):
        tk.fused_linear_entropy(case.hs, case.ws, backend="torch", **{ent_name: value})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_trl_chunked_divergence(backend, beta, seed):
    """fused_linear_divergence(divergence="jsd", beta) equals TRL's ChunkedDivergenceFunction (its per-token
    divergence, same β convention and transform order) in values and in gradients for h_s and W_s, fp32, random
    scales and caps; both within the float64 rule of the same truth."""
    trl_kernels = pytest.importorskip("trl.kernels.chunked_divergence")
    g = torch.Generator().manual_seed(100 + seed)
    rand = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
    tf = dict(student_logit_scale=rand(0.3, 3.0), student_softcap=rand(3.0, 8.0),
              teacher_logit_scale=rand(0.3, 3.0), teacher_softcap=rand(3.0, 8.0) if seed == 0 else None)
    case = _case(backend, torch.float32, tf, seed=seed, pad=0)  # TRL takes equal vocabularies
    go = upstream("none", case.lead)
    temperature = 0.8

    hs, ws, bs = (t.detach().clone().requires_grad_() for t in (case.hs, case.ws, case.bs))
    ours = tk.fused_linear_divergence(hs, ws, case.ht, case.wt, student_bias=bs, teacher_bias=case.bt,
                                      divergence="jsd", beta=beta, temperature=temperature, backend=backend, **tf)
    (ours.double() * go).sum().backward()

    th, tw, tb = (t.detach().clone().requires_grad_() for t in (case.hs, case.ws, case.bs))
    theirs, _entropy = trl_kernels.ChunkedDivergenceFunction.apply(
        th, tw, tb, case.ht, case.wt, case.bt, beta, temperature, tf["student_logit_scale"], tf["student_softcap"],
        tf["teacher_logit_scale"], tf["teacher_softcap"])
    (theirs.double() * go).sum().backward()

    truth = truth_divergence(case, "jsd", beta, temperature, "none", None, go)
    truth.pop("d_bias")
    for name, a, b in (("value", ours, theirs), ("d_hidden", hs.grad, th.grad), ("d_weight", ws.grad, tw.grad)):
        floor = 1.0 if name == "value" else 0.0
        e_ours, e_trl = scaled_err(a.detach(), truth[name], floor), scaled_err(b.detach(), truth[name], floor)
        assert e_ours <= e_trl + TOL[torch.float32], f"{name}: ours {e_ours:.3g} vs TRL {e_trl:.3g}"
        assert scaled_err(a.detach(), b.detach(), floor) <= 2 * TOL[torch.float32], name


# Small Triton blocks: several vocabulary tiles, hidden chunks and vocabulary splits at the interpreter's sizes.
_SMALL = dict(block_n=16, block_v=16, block_d=16, block_dh=16, split_v=2, bwd_block_n=16, bwd_block_v=16,
              bwd_chunk_mib=2**-11)


@pytest.mark.skipif(not HAS_TRITON_BACKEND, reason="triton is not installed")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: inf arithmetic in masked lanes
@pytest.mark.parametrize("strategy", ["matmul", "tiles"])
@pytest.mark.parametrize("variant,kind,beta", [
    (variant, kind, beta) for variant in ("linear", "teacher_logits", "student_logits")
    for kind, beta in (("entropy", 0.5), ("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3), ("jsd", 1.0))
] + [("student_only", "entropy", 0.5)])
def test_triton_backward_strategies(strategy, variant, kind, beta):
    """Both backward strategies of the Triton backend (per-tile kernels, and gradient logits + cuBLAS), every
    student/teacher form, capped and scaled on both models, against the float64 reference's autograd."""
    prob = replace(make_problem(variant, seed=6, scale=3.0), **tk.inputs.check_transforms(**CAPPED))
    config = dict(_SMALL, bwd_strategy=strategy)
    saved = triton_backend.forward_stats(prob, config=config)
    if prob.has_teacher:
        saved["kl_pm"] = triton_backend.jsd_forward(prob, saved["student_lse"], saved["teacher_lse"], beta,
                                                    config=config)[1]
    grad = torch.randn(prob.num_rows, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grad[::3] = 0.0
    got = triton_backend.backward(prob, kind, grad, saved, beta, config=config)
    truth = reference.backward(f64(prob), kind, grad.double(), {}, beta)
    same = reference.backward(prob, kind, grad, {}, beta)
    for name, g, t, r in zip(("d_student", "d_weight", "d_bias"), got, truth, same):
        if t is None:
            assert g is None, name
            continue
        e, e_ref = scaled_err(g, t, 0.0), scaled_err(r, t, 0.0)
        assert e <= e_ref + TOL[torch.float32], f"{name}: {e:.3g} > {e_ref:.3g} + {TOL[torch.float32]}"


@grid("variant,kind,beta", axis(list(VARIANTS)), axis(DIVS, DIV_IDS))
@pytest.mark.parametrize("strategy", ["fused_grad", "recompute"])
def test_torch_strategies_with_transforms(monkeypatch, strategy, variant, kind, beta):
    """The torch backend's two gradient strategies on a weighted mean with zero weights, against the float64 truth:
    fused_grad folds the student's scale into the upstream gradient and transforms the teacher's block; a
    soft-capped student always takes the recompute path (its 1 − tanh² needs the logits fused_grad overwrites)."""
    monkeypatch.setattr(torch_backend, "STRATEGY", strategy)
    monkeypatch.setattr(torch_backend, "fused_rows", lambda n, v, itemsize=4: (min(7, n), min(3, n)))
    calls = []
    real = torch_backend.fused_value_and_grad
    monkeypatch.setattr(torch_backend, "fused_value_and_grad", lambda *a: calls.append(1) or real(*a))
    transforms = VARIANTS[variant]
    case = _case("torch", torch.float32, transforms)
    weights = torch.rand(case.lead, generator=torch.Generator().manual_seed(3))
    weights.view(-1)[::4] = 0
    go = upstream("mean", case.lead)
    args = (kind, beta, 0.7, "mean", weights, go)
    fast = run_divergence(case, "torch", *args)
    assert_rule(fast, run_divergence(case, "reference", *args), truth_divergence(case, *args), torch.float32,
                f"torch {strategy} {kind}({beta}) {variant}")
    fused = strategy == "fused_grad" and "student_softcap" not in transforms
    assert bool(calls) == fused, (strategy, variant, calls)
