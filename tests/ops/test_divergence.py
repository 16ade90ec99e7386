"""tk.fused_linear_divergence: values and gradients of every divergence against float64 truth on materialised
logits (the pass rule: tests/_harness.py), every backend, reduction, weighting, dtype and input variant; TRL's β
convention; gradients reach the student only; zero weights and empty inputs."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import tipkernels as tk

from tests._harness import (ALL_BACKENDS, BACKENDS, DEVICE, DIV_IDS, DIVS, DTYPES, INTERPRETED, PAD, assert_close64,
                            assert_rule, axis, gradient_floors, grid, leaf, make_case, noncontig, run_divergence,
                            run_entropy, shape_for, truth_divergence, upstream)


@grid("backend,kind,beta,reduction,weighting,dtype", axis(ALL_BACKENDS), axis(DIVS, DIV_IDS),
      axis(["none", "sum", "mean"]), axis(["unweighted", "weights"]), axis(DTYPES, ["fp32", "bf16"]),
      drop=lambda backend, kind, beta, reduction, weighting, dtype: INTERPRETED and backend == "triton" and (
          reduction == "sum" or dtype == torch.bfloat16 and weighting == "weights"),
      slow=lambda backend, kind, beta, reduction, weighting, dtype: backend == "reference" or dtype == torch.bfloat16)
def test_fused_linear_divergence(backend, kind, beta, reduction, weighting, dtype):
    """Padded teacher (huge padding rows), biases on both, T=0.7; weights include zeros."""
    n, v, ds, dt = shape_for(backend)
    case = make_case(n, v, ds, dt, dtype=dtype, seed=2)
    weights = None
    if weighting == "weights":
        weights = torch.rand(case.lead, generator=torch.Generator().manual_seed(5)).to(DEVICE) * 2
        weights[::3] = 0
    go = upstream(reduction, case.lead)
    args = (kind, beta, 0.7, reduction, weights, go)
    fast = run_divergence(case, backend, *args)
    assert_rule(fast, run_divergence(case, "reference", *args), truth_divergence(case, *args), dtype,
                f"{backend} {kind}({beta}) {reduction}")
    assert fast["value"].dtype == torch.float32
    if weights is not None:
        # Rows of weight 0 get exactly no gradient.
        assert torch.all(fast["d_hidden"][weights == 0] == 0)


@grid("backend,kind,beta,variant", axis(ALL_BACKENDS),
      axis([("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)], ["rkl", "fkl", "jsd0.3"]),
      axis(["T2.5", "teacher_logits", "BLD", "noncontig", "no_bias", "unpadded", "scaled_x100", "fp64"]),
      drop=lambda backend, kind, beta, variant: backend == "triton" and variant == "fp64")  # fp32 accuracy only
def test_fused_linear_divergence_variants(backend, kind, beta, variant):
    n, v, ds, dt = shape_for(backend)
    kw = dict(seed=3)
    temperature, layout, dtype = 0.7, None, torch.float32
    if variant == "T2.5":
        temperature = 2.5
    elif variant == "teacher_logits":
        kw["teacher"] = "logits"
    elif variant == "BLD":
        n, kw["lead"] = (14, (2, 7)) if backend == "triton" else (27, (3, 9))
    elif variant == "noncontig":
        layout = noncontig
    elif variant == "no_bias":
        kw.update(student_bias=False, teacher_bias=False)
    elif variant == "unpadded":
        kw["pad"] = 0
    elif variant == "scaled_x100":
        kw["scale"] = 10.0  # hidden x10, weight x10: logits x100
    elif variant == "fp64":
        dtype = torch.float64
    case = make_case(n, v, ds, dt, dtype=dtype, **kw)
    if variant == "BLD":
        assert case.hs.dim() == 3
    go = upstream("none", case.lead)
    args = (kind, beta, temperature, "none", None, go)
    fast = run_divergence(case, backend, *args, layout=layout)
    truth = truth_divergence(case, *args)
    floors = gradient_floors(go, temperature, case.hs, case.ws) if variant == "scaled_x100" else None
    if dtype == torch.float64:
        assert_close64(fast, truth, what=variant)
    else:
        assert_rule(fast, run_divergence(case, "reference", *args), truth, dtype, f"{backend} {variant}", floors)
    for key in ("d_hidden", "d_weight"):
        assert torch.isfinite(fast[key]).all()
    assert fast["d_hidden"].shape == case.hs.shape


@pytest.mark.parametrize("layout", ["BLD", "BLD_noncontig"])
def test_multi_dim_tokens(layout):
    """[B, L, D] inputs, contiguous or a transposed view of [L, B, D], give [B, L] outputs and gradients."""
    case = make_case(28, 37, 24, 19, lead=(4, 7), seed=4)
    flat = replace(case, lead=(28,), hs=case.hs.reshape(28, -1), ht=case.ht.reshape(28, -1))
    go = upstream("none", case.lead)
    args = ("jsd", 0.3, 0.7, "none", None, go)
    lay = noncontig if layout == "BLD_noncontig" else None
    got = run_divergence(case, "torch", *args, layout=lay)
    ref = run_divergence(flat, "torch", "jsd", 0.3, 0.7, "none", None, go.reshape(28))
    assert got["value"].shape == (4, 7) and got["d_hidden"].shape == (4, 7, 24)
    torch.testing.assert_close(got["value"].reshape(28), ref["value"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["d_hidden"].reshape(28, -1), ref["d_hidden"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["d_weight"], ref["d_weight"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", ["divergence", "entropy", "stats"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_teacher_rows_change_nothing(backend, op, dtype):
    """A teacher lm_head with extra rows (holding huge values) gives exactly the unpadded results."""
    n, v, ds, dt = shape_for(backend)
    padded = make_case(n, v, ds, dt, dtype=dtype, seed=6, pad=PAD)
    plain = replace(padded, wt=padded.wt[:v].clone(), bt=padded.bt[:v].clone())
    if op == "stats":
        a = tk.token_stats(padded.hs, padded.ws, padded.ht, padded.wt, teacher_bias=padded.bt, backend=backend)
        b = tk.token_stats(plain.hs, plain.ws, plain.ht, plain.wt, teacher_bias=plain.bt, backend=backend)
        for name, t in a.as_dict().items():
            torch.testing.assert_close(t, getattr(b, name), rtol=1e-6, atol=1e-6, msg=name)
        return
    go = upstream("none", padded.lead)
    kinds = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)] if op == "divergence" else [None]
    for kind, beta in [k if k else (None, None) for k in kinds]:
        if op == "divergence":
            a = run_divergence(padded, backend, kind, beta, 1.0, "none", None, go)
            b = run_divergence(plain, backend, kind, beta, 1.0, "none", None, go)
        else:
            a = run_entropy(padded, backend, 1.0, "none", go)
            b = run_entropy(plain, backend, 1.0, "none", go)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6, msg=f"{kind} {key}")
            assert torch.isfinite(a[key]).all()


def test_jsd_beta_convention():
    """TRL's convention: m = β q + (1-β) p; JSD(β)/β -> KL(q||p) as β -> 0, JSD(β)/(1-β) -> KL(p||q) as β -> 1,
    while β = 0 and β = 1 exactly are forward and reverse KL (special-cased, not continuous)."""
    case = make_case(13, 37, 24, 19, dtype=torch.float64, seed=10)
    run = lambda div, beta=0.5: tk.fused_linear_divergence(  # noqa: E731
        case.hs, case.ws, case.ht, case.wt, student_bias=case.bs, teacher_bias=case.bt, divergence=div, beta=beta,
        backend="torch")
    fkl, rkl = run("forward_kl"), run("reverse_kl")
    assert torch.equal(run("jsd", 0.0), fkl) and torch.equal(run("jsd", 1.0), rkl)
    # First-order limits: JSD(β)/β - KL(q||p) = O(β·χ²(q||p)), so the relative gap shrinks linearly with ε
    # (about 600·ε on these inputs, whose χ² is large where the student gives tiny mass to teacher tokens).
    for eps in (1e-6, 1e-7, 1e-8):
        gap_f = ((run("jsd", eps) / eps - fkl) / fkl).abs().max().item()
        gap_r = ((run("jsd", 1 - eps) / eps - rkl) / rkl).abs().max().item()
        assert gap_f <= 1e3 * eps and gap_r <= 1e3 * eps, (eps, gap_f, gap_r)
    mid = run("jsd", 0.5)
    assert (mid <= math.log(2) + 1e-12).all() and (mid >= 0).all()


@pytest.mark.parametrize("teacher", ["linear", "logits"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradients_only_reach_the_student(backend, teacher):
    n, v, ds, dt = shape_for(backend)
    case = make_case(n, v, ds, dt, teacher=teacher, seed=14)
    hs, ws, bs = leaf(case.hs), leaf(case.ws), leaf(case.bs)
    ht, wt, bt, tl = leaf(case.ht), leaf(case.wt), leaf(case.bt), leaf(case.tl)
    for kind, beta in DIVS:
        out = tk.fused_linear_divergence(hs, ws, ht, wt, teacher_logits=tl, student_bias=bs, teacher_bias=bt,
                                         divergence=kind, beta=beta, reduction="mean", backend=backend)
        assert out.requires_grad
        out.backward()
    for t in (ht, wt, bt, tl):
        assert t is None or t.grad is None
    for t in (hs, ws, bs):
        assert t.grad is not None and t.grad.abs().sum() > 0
    stats = tk.token_stats(hs, ws, ht, wt, teacher_logits=tl, student_bias=bs, teacher_bias=bt, backend=backend)
    assert not any(t.requires_grad for t in stats.as_dict().values())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_zero_weights_and_empty_inputs(backend):
    n, v, ds, dt = shape_for(backend)
    case = make_case(n, v, ds, dt, seed=15)
    for reduction in ("none", "sum", "mean"):
        hs, ws, bs = leaf(case.hs), leaf(case.ws), leaf(case.bs)
        out = tk.fused_linear_divergence(hs, ws, case.ht, case.wt, teacher_bias=case.bt, student_bias=bs,
                                         weights=torch.zeros(case.lead, device=DEVICE), reduction=reduction,
                                         backend=backend)
        out.sum().backward()
        assert torch.all(out == 0) and not torch.isnan(out).any()
        for t in (hs, ws, bs):
            assert t.grad is not None and torch.all(t.grad == 0)
    empty = make_case(1, v, ds, dt, seed=16)
    hs = leaf(empty.hs[:0])
    for reduction, shape in (("none", (0,)), ("mean", ())):
        out = tk.fused_linear_divergence(hs, empty.ws, empty.ht[:0], empty.wt, reduction=reduction, backend=backend)
        assert out.shape == shape and not torch.isnan(out).any()
    st = tk.token_stats(empty.hs[:0], empty.ws, empty.ht[:0], empty.wt, backend=backend)
    assert st.reverse_kl.shape == (0,)
