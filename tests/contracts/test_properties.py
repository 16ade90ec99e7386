"""Property-based tests (hypothesis) of every public function on every backend against the float64 truth.

Hypothesis draws shapes (N, V, D_s ≠ D_t, [N] or [B, L] token dims), dtypes (fp32, bf16; fp64 for the torch and
reference backends), temperatures, biases, padded teacher vocabularies (padding rows hold huge values, so any
leak shows), masks with empty rows, weights with zeros, ratios, budgets and rules. Values and gradients must pass
docs/design.md §8's rule (``tests/_harness.assert_rule``: error against the float64 truth at most the same-dtype reference's
plus TOL[dtype]). Shapes stay tiny (N ≤ 16, V ≤ 40, D ≤ 24): the Triton kernels run in the interpreter here.

Profiles (tests/conftest.py): ``HYPOTHESIS_PROFILE=ci`` (default: 40 derandomized examples per test, reproducible)
or ``deep`` (200 random examples per test).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

import tipkernels as tk
from tipkernels.selection import RULES

from tests._harness import (DEVICE, TOL, assert_rule, gradient_floors, make_case, reference, run_divergence,
                            run_entropy, run_from_logits, scaled_err, truth_divergence, truth_entropy,
                            truth_from_logits, truth_student, truth_teacher, upstream)

pytestmark = pytest.mark.slow  # 40 hypothesis examples per test (the "ci" profile), on every backend

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
DIVS = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.0), ("jsd", 1.0)]
#: Gradients are judged relative to max(their own largest entry, FLOOR_SHARE · gradient_floors): drawn shapes such
#: as V = 2 at T = 0.25 give near-one-hot rows (1 - p_max ~ 1e-6) whose true gradients are ~1e-4 of the O(|go|/T)
#: scale, and the fused backward recomputes log p = s - LSE from the fp32 LSE (absolute error ~eps32·|LSE|), a
#: few times the error of fp32 log_softmax there. Found by this file: torch/triton entropy d_hidden 2.4e-3 vs the
#: fp32 reference's 4.8e-4 relative to a gradient of 6e-4 (N=1, V=2, D=2, T=0.25).
FLOOR_SHARE = 1e-2


def floors_for(case, go, temperature):
    fl = gradient_floors(go, temperature, case.hs.double(), case.ws.double())
    return {k: FLOOR_SHARE * v for k, v in fl.items()}


@st.composite
def setups(draw, *, fp64=True):
    """(backend, dtype, shape kwargs for make_case, temperature, seed)."""
    backend = draw(st.sampled_from(["torch", "triton", "reference"]))
    names = ["fp32", "bf16"] + (["fp64"] if fp64 and backend != "triton" else [])
    dtype = DTYPES[draw(st.sampled_from(names))]
    n = draw(st.integers(1, 16))
    lead = (n,)
    if n > 1 and draw(st.booleans()):
        b = draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
        lead = (b, n // b)
    shape = dict(n=n, vocab=draw(st.integers(2, 40)), ds=draw(st.integers(1, 24)), dt=draw(st.integers(1, 24)),
                 lead=lead, pad=draw(st.sampled_from([0, 1, 5])), student_bias=draw(st.booleans()),
                 teacher_bias=draw(st.booleans()))
    temperature = draw(st.sampled_from([0.25, 0.7, 1.0, 2.5]))
    return backend, dtype, shape, temperature, draw(st.integers(0, 2**16))


def case_of(shape, dtype, seed, **kw):
    s = dict(shape)
    return make_case(s.pop("n"), s.pop("vocab"), s.pop("ds"), s.pop("dt"), dtype=dtype, seed=seed, **s, **kw)


def divergences():
    return st.sampled_from(DIVS) | st.tuples(st.just("jsd"), st.floats(0.05, 0.95))


# ================================================================================================= ops


@given(setups(), divergences(), st.sampled_from(["none", "sum", "mean"]), st.booleans(),
       st.sampled_from(["linear", "logits"]))
def test_fused_linear_divergence(setup, div, reduction, weighted, teacher):
    backend, dtype, shape, temperature, seed = setup
    kind, beta = div
    case = case_of(shape, dtype, seed, teacher=teacher)
    weights = None
    if weighted:
        weights = torch.rand(case.lead, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        weights.view(-1)[::3] = 0
    go = upstream(reduction, case.lead, seed)
    args = (kind, beta, temperature, reduction, weights, go)
    fast = run_divergence(case, backend, *args)
    assert_rule(fast, run_divergence(case, "reference", *args), truth_divergence(case, *args), dtype,
                f"{backend} {kind}({beta:.3g}) {reduction}", floors_for(case, go, temperature))
    assert fast["value"].shape == (case.lead if reduction == "none" else ())
    assert fast["d_hidden"].shape == case.hs.shape and fast["d_hidden"].dtype == dtype
    if reduction == "none" and weights is None:
        assert (fast["value"] >= 0).all()
    if weights is not None:
        assert torch.all(fast["d_hidden"][weights == 0] == 0)


@given(setups(), st.sampled_from(["none", "sum", "mean"]))
def test_fused_linear_entropy(setup, reduction):
    backend, dtype, shape, temperature, seed = setup
    case = case_of(shape, dtype, seed, teacher="none")
    go = upstream(reduction, case.lead, seed)
    fast = run_entropy(case, backend, temperature, reduction, go)
    assert_rule(fast, run_entropy(case, "reference", temperature, reduction, go),
                truth_entropy(case, temperature, reduction, go), dtype, f"{backend} entropy {reduction}",
                floors_for(case, go, temperature))
    if reduction == "none":
        assert (fast["value"] >= 0).all() and (fast["value"] <= math.log(case.vocab) + 1e-3).all()


@given(setups(), divergences(), st.sampled_from(["none", "mean"]), st.sampled_from([1.0, 10.0]))
def test_divergence_from_logits(setup, div, reduction, scale):
    backend, dtype, shape, temperature, seed = setup
    kind, beta = div
    g = torch.Generator().manual_seed(seed)
    v, pad = shape["vocab"], shape["pad"]
    s = (torch.randn(*shape["lead"], v, generator=g, dtype=torch.float64) * 2 * scale).to(dtype).to(DEVICE)
    u = torch.randn(*shape["lead"], v + pad, generator=g, dtype=torch.float64) * 2 * scale
    u[..., v:] = 1e4  # padded teacher logits: cut off, never scored
    u = u.to(dtype).to(DEVICE)
    go = upstream(reduction, s.shape[:-1], seed)
    args = (kind, beta, temperature, reduction, go)
    fast = run_from_logits(s, u, backend, *args)
    # logits ~20 (scale 10): judge gradients on |go|/T (see tests/_harness.gradient_floors), else on FLOOR_SHARE of it
    floors = {"d_logits": (1.0 if scale > 1 else FLOOR_SHARE) * go.abs().max().item() / temperature}
    assert_rule(fast, run_from_logits(s, u, "reference", *args), truth_from_logits(s, u, *args), dtype,
                f"{backend} logits {kind}({beta:.3g})", floors)
    assert fast["d_logits"].shape == s.shape and fast["d_logits"].dtype == dtype


@given(setups(), st.sampled_from(["linear", "logits", "none"]), st.booleans())
def test_token_stats(setup, teacher, labels):
    backend, dtype, shape, temperature, seed = setup
    case = case_of(shape, dtype, seed, teacher=teacher, labels=labels and shape["n"] >= 3)
    kw = dict(student_bias=case.bs, labels=case.labels, temperature=temperature, backend=backend, **case.teacher_kwargs)
    got = tk.token_stats(case.hs, case.ws, case.ht, case.wt, **kw)
    same = tk.token_stats(case.hs, case.ws, case.ht, case.wt, **{**kw, "backend": "reference"})
    s = truth_student(case, temperature)[1].detach()
    truth = {"student_lse": torch.logsumexp(s, -1), "entropy": reference.entropy(s),
             "entropy_norm": reference.entropy(s) / math.log(case.vocab)}
    if teacher != "none":
        u = truth_teacher(case, temperature)
        truth.update(teacher_lse=torch.logsumexp(u, -1), teacher_entropy=reference.entropy(u),
                     reverse_kl=reference.reverse_kl(s, u), forward_kl=reference.forward_kl(s, u))
    if case.labels is not None:
        lab = case.labels.reshape(-1)
        picked = torch.log_softmax(s, -1).gather(1, lab.clamp_min(0)[:, None])[:, 0]
        truth["label_logprob"] = torch.where(lab != -100, picked, torch.zeros_like(picked))
    else:
        assert got.label_logprob is None
    for name, t in truth.items():
        g, r = getattr(got, name), getattr(same, name)
        assert g.shape == case.lead, name
        e_fast, e_ref = scaled_err(g, t.reshape(case.lead), 1.0), scaled_err(r, t.reshape(case.lead), 1.0)
        assert e_fast <= e_ref + TOL[dtype], f"{backend} {name}: {e_fast:.3g} > {e_ref:.3g} + {TOL[dtype]}"
    for name in ("reverse_kl", "forward_kl", "entropy", "entropy_norm"):
        if getattr(got, name) is not None:
            assert (getattr(got, name) >= 0).all(), name
    picked = s.gather(1, got.student_argmax.reshape(-1, 1))[:, 0]
    assert (picked >= s.max(-1).values - TOL[dtype] * max(1.0, s.abs().max().item())).all()


# ========================================================================================== selection


@st.composite
def stats_and_masks(draw):
    """Random TokenStats [B, L] (entropy_norm in [0, 1], KLs ≥ 0, with ties and zeros) and a mask with empty rows."""
    b, length = draw(st.integers(1, 5)), draw(st.integers(0, 12))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    levels = draw(st.sampled_from([0, 4]))  # 0: continuous values; 4: few distinct values (ties)

    def field(scale):
        x = torch.rand(b, length, generator=g, dtype=torch.float64)
        if levels:
            x = torch.floor(x * levels) / levels
        return (x * scale).float().to(DEVICE)

    stats = tk.TokenStats(entropy_norm=field(1.0), reverse_kl=field(3.0), forward_kl=field(2.0))
    mask = torch.rand(b, length, generator=g) < draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    if b > 1:
        mask[0] = False  # an empty sequence
    return stats, mask.to(DEVICE), seed


def _floor_budget(m: int, ratio: float) -> int:
    return int(math.floor(m * ratio + 1e-9))


@given(stats_and_masks(), st.sampled_from(RULES), st.sampled_from([0.1, 0.3, 0.5, 0.75, 1.0]),
       st.sampled_from(["per_sequence", "per_batch"]))
def test_select_tokens(data, rule, ratio, budget):
    """Selection ⊆ valid; exactly ⌊ρ·m⌋ per group (fewer only for entropy_sample, never an h = 0 token); the
    deterministic rules keep the top scores (no unselected valid token scores higher than a selected one of its
    group); weights are 1 on the selection and 0 elsewhere; scores 0 where masked."""
    stats, mask, seed = data
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    sel = tk.select_tokens(stats, mask, rule=rule, ratio=ratio, budget=budget, generator=gen)
    assert sel.mask.shape == mask.shape and sel.mask.dtype == torch.bool
    assert not (sel.mask & ~mask).any()
    assert torch.equal(sel.weights, sel.mask.float())
    assert torch.all(sel.scores[~mask] == 0)
    groups = [(mask[i], sel.mask[i], sel.scores[i]) for i in range(mask.shape[0])] if budget == "per_sequence" \
        else [(mask.reshape(-1), sel.mask.reshape(-1), sel.scores.reshape(-1))]
    for valid, kept, scores in groups:
        m, k = int(valid.sum()), int(kept.sum())
        if rule == "all":
            assert torch.equal(kept, valid)
            continue
        want = _floor_budget(m, ratio)
        if rule == "entropy_sample":
            positive = int(((scores > 0) & valid).sum())
            assert k == min(want, positive)
            assert not (kept & (scores <= 0)).any()
        else:
            assert k == want, (rule, m, k, want)
        if rule in ("entropy_topk", "divergence", "soft_or", "q3") and 0 < k < m:
            assert scores[kept].min() >= scores[valid & ~kept].max()


@given(stats_and_masks(), st.one_of(st.none(), st.floats(0.0, 1.0)), st.one_of(st.none(), st.floats(0.0, 3.0)))
def test_quadrants(data, h_thr, d_thr):
    """Quadrant = 1 + 2·[h ≤ h_thr] + [δ ≤ δ_thr] on valid tokens, 0 elsewhere; None thresholds are the valid
    tokens' medians (torch.quantile, linear interpolation)."""
    stats, mask, _ = data
    quad = tk.quadrants(stats, mask, entropy_threshold=h_thr, divergence_threshold=d_thr)
    assert quad.shape == mask.shape and torch.all(quad[~mask] == 0)
    if not mask.any():
        return
    h, d = stats.entropy_norm.double(), stats.reverse_kl.double()
    ht = torch.quantile(h[mask], 0.5).item() if h_thr is None else h_thr
    dt = torch.quantile(d[mask], 0.5).item() if d_thr is None else d_thr
    want = 1 + 2 * (h <= ht + 1e-7).long() + (d <= dt + 1e-7).long()
    # away from the thresholds (fp32 medians vs float64 ones), the formula holds exactly
    clear = mask & ((h - ht).abs() > 1e-6) & ((d - dt).abs() > 1e-6)
    assert torch.equal(quad[clear], want[clear])
    assert set(quad[mask].unique().tolist()) <= {1, 2, 3, 4}


# ============================================================================================ the loss


@given(setups(fp64=False), st.sampled_from(RULES), st.sampled_from([0.25, 0.5, 1.0]),
       st.sampled_from([("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)]),
       st.sampled_from(["per_sequence", "per_batch"]))
def test_tip_distillation_loss(setup, rule, ratio, div, budget):
    """loss = Σ_sel w·div / Σ_sel w over the selection it reports, the float64 truth within the rule in value and
    gradients; the selection is what select_tokens makes of the reported stats (deterministic rules); the stats
    are token_stats' on valid tokens."""
    backend, dtype, shape, temperature, seed = setup
    kind, beta = div
    n = shape["n"]
    lead = shape["lead"] if len(shape["lead"]) == 2 else (1, n)
    case = case_of({**shape, "lead": lead}, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(lead, generator=g) < 0.8).to(DEVICE)
    loss_fn = tk.TIPDistillationLoss(rule=rule, ratio=ratio, divergence=kind, beta=beta, temperature=temperature,
                                     budget=budget, backend=backend)
    hs, ws, bs = (None if t is None else t.detach().clone().requires_grad_(True) for t in (case.hs, case.ws, case.bs))
    out = loss_fn(hs, ws, case.ht, case.wt, mask, student_bias=bs, teacher_bias=case.bt,
                  generator=torch.Generator(device=DEVICE).manual_seed(seed))
    assert out.loss.shape == () and out.loss.requires_grad and torch.isfinite(out.loss)
    out.loss.backward()
    sel = out.selection
    assert not (sel.mask & ~mask).any()
    weights = sel.weights.to(DEVICE)
    fast = {"value": out.loss.detach(), "d_hidden": hs.grad, "d_weight": ws.grad}
    if bs is not None:
        fast["d_bias"] = bs.grad
    go = torch.tensor(1.0, dtype=torch.float64, device=DEVICE)
    args = (kind, beta, temperature, "mean", weights, go)
    assert_rule(fast, run_divergence(case, "reference", *args), truth_divergence(case, *args), dtype,
                f"{backend} TIP {rule} {ratio} {kind}", floors_for(case, go, temperature))
    if not sel.mask.any():
        assert out.loss.item() == 0 and torch.all(hs.grad == 0)
    # the reported stats are token_stats' (valid tokens) and the selection is reproducible from them
    ref = tk.token_stats(case.hs, case.ws, case.ht, case.wt, student_bias=case.bs, teacher_bias=case.bt,
                         temperature=temperature, backend=backend)
    for name in ("entropy_norm", "reverse_kl", "forward_kl"):
        torch.testing.assert_close(getattr(out.stats, name)[mask], getattr(ref, name)[mask], rtol=1e-5, atol=1e-5)
    if rule not in ("random", "entropy_sample"):
        again = tk.select_tokens(out.stats, mask, rule=rule, ratio=ratio, budget=budget)
        assert torch.equal(again.mask, sel.mask)
