"""The torch backend's two gradient strategies against each other and against float64 truth (docs/design.md §2, §8).

"fused_grad" forms the gradient in the forward's sweep (reduction "sum"/"mean"); "recompute" recomputes logit tiles
in backward. Both must pass the pass rule of docs/design.md §8 (``err <= err(reference in the input dtype) + TOL``) for values and the
gradients of h_s, W_s and the bias, and agree with each other, across dtypes, every divergence (JSD at β = 0, 0.5,
1), weights with zeros, a padded teacher, teacher logits, a temperature, and odd shapes split into several row
blocks and ragged row sub-blocks.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import tipkernels as tk
from tipkernels.ops import core

from tests._harness import (
    DEVICE, TOL, assert_close64, assert_rule, axis, build_problem, grid, make_case, run_kind, torch_backend,
    truth_kind, upstream,
)

KINDS = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0), ("entropy", 0.0)]
KIND_IDS = ["rkl", "fkl", "jsd0", "jsd0.5", "jsd1", "ent"]
N, V, DS, DT = 29, 101, 40, 19
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


@pytest.fixture
def strategy(monkeypatch, request):
    """Force a strategy; fused_grad in blocks of 7 rows, sub-blocks of 3 and matmul pieces of 16 vocabulary columns
    (several blocks and pieces, ragged ends)."""
    name, workers = request.param
    monkeypatch.setattr(torch_backend, "STRATEGY", name)
    monkeypatch.setattr(torch_backend, "FUSED_WORKERS", workers)
    monkeypatch.setattr(torch_backend, "FUSED_VOCAB_CHUNK", 16)
    monkeypatch.setattr(torch_backend, "fused_rows", lambda n, v, itemsize=4: (min(7, n), min(3, n)))
    calls = []
    real = torch_backend.fused_value_and_grad

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_backend, "fused_value_and_grad", spy)
    return name, calls


STRATEGIES = [("recompute", 1), ("fused_grad", 1), ("fused_grad", 2)]
STRATEGY_IDS = ["recompute", "fused", "fused-2workers"]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=STRATEGY_IDS, indirect=True)
@grid("kind,beta,reduction,weighting,teacher,dtype", axis(KINDS, KIND_IDS), axis(["sum", "mean"]),
      axis(["unweighted", "weights"]), axis(["linear", "logits"]), axis(DTYPES, ["fp32", "bf16", "fp64"]),
      drop=lambda kind, beta, reduction, weighting, teacher, dtype: kind == "entropy" and (
          weighting == "weights" or teacher == "logits"))
def test_strategy_matches_float64_truth(strategy, kind, beta, reduction, weighting, teacher, dtype):
    name, calls = strategy
    case = make_case(N, V, DS, DT, seed=5, teacher=teacher, dtype=dtype)
    temperature = 0.7
    weights = None
    if weighting == "weights":
        weights = torch.rand(N, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
        weights[::4] = 0  # rows of weight 0: no gradient, values still counted (as 0)
        weights = weights.to(DEVICE)
    go = upstream(reduction, case.lead)
    got = run_kind(case, "torch", kind, beta, temperature, reduction, weights, go)
    assert bool(calls) == (name == "fused_grad"), f"strategy {name} not taken ({len(calls)} fused calls)"
    truth = truth_kind(case.cast(torch.float64), kind, beta, temperature, reduction,
                       None if weights is None else weights.double(), go)
    if dtype == torch.float64:
        assert_close64(got, truth, what=name)
        return
    same = run_kind(case, "reference", kind, beta, temperature, reduction, weights, go)
    assert_rule(got, same, truth, dtype, what=f"{name} {kind}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind,beta", KINDS, ids=KIND_IDS)
def test_strategies_agree(monkeypatch, kind, beta, dtype):
    """fused_grad (default sizes and forced small blocks) and recompute give the same value and gradients."""
    case = make_case(53, 211, 33, 17, seed=9, dtype=dtype, lead=(1, 53))
    weights = torch.rand(1, 53, generator=torch.Generator().manual_seed(3), dtype=dtype).to(DEVICE)
    weights[0, ::5] = 0
    w = None if kind == "entropy" else weights
    go = upstream("mean", case.lead)
    out = {}
    for name, rows in (("recompute", None), ("fused_grad", None), ("fused_grad", (5, 2))):
        monkeypatch.setattr(torch_backend, "STRATEGY", name)
        if rows is not None:  # small blocks, 3 workers taking ragged 50-column matmul pieces
            monkeypatch.setattr(torch_backend, "fused_rows", lambda n, v, itemsize=4, r=rows: r)
            monkeypatch.setattr(torch_backend, "FUSED_VOCAB_CHUNK", 50)
            monkeypatch.setattr(torch_backend, "FUSED_WORKERS", 3)
        out[(name, rows)] = run_kind(case, "torch", kind, beta, 1.3, "mean", w, go)
    ref = out[("recompute", None)]
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for key, got in out.items():
        assert_close64(got, ref, tol=tol, what=str(key))


def test_strategy_selected_in_one_place(monkeypatch):
    """grad_strategy: fused_grad only for a known upstream gradient and a linear student (soft-capped only for a row
    function); "recompute" forces."""
    case = make_case(5, 11, 4, 3, seed=1)
    prob, _ = build_problem(case.hs, case.ws, case.ht, case.wt, require_teacher=True)
    logits_prob, _ = build_problem(None, None, student_logits=case.hs @ case.ws.t(),
                                              teacher_logits=case.ht @ case.wt[:11].t(), require_teacher=True)
    assert torch_backend.grad_strategy(prob, True) == "fused_grad"
    assert torch_backend.grad_strategy(prob, False) == "recompute"
    assert torch_backend.grad_strategy(logits_prob, True) == "recompute"
    capped = replace(prob, student_cap=5.0)  # a row function reads the capped logits before overwriting them
    assert torch_backend.grad_strategy(capped, True) == "recompute"
    assert torch_backend.grad_strategy(capped, True, row_function=True) == "fused_grad"
    assert torch_backend.grad_strategy(capped, False, row_function=True) == "recompute"
    monkeypatch.setattr(torch_backend, "STRATEGY", "recompute")
    assert torch_backend.grad_strategy(prob, True) == "recompute"
    assert torch_backend.grad_strategy(capped, True, row_function=True) == "recompute"
    monkeypatch.setattr(torch_backend, "STRATEGY", "fast")
    with pytest.raises(ValueError, match="STRATEGY"):
        torch_backend.grad_strategy(prob, True)


def test_fused_only_when_the_upstream_gradient_is_known(monkeypatch):
    """reduction "none", no grad, or differentiable weights keep the recompute path; mean/sum take fused_grad."""
    calls = []
    real = torch_backend.fused_value_and_grad
    monkeypatch.setattr(torch_backend, "fused_value_and_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    case = make_case(9, 23, 6, 5, seed=4)

    def go(reduction, grad=True, wgrad=False):
        hs = case.hs.detach().clone().requires_grad_(grad)
        w = torch.ones(9, requires_grad=wgrad)
        out = tk.fused_linear_divergence(hs, case.ws, case.ht, case.wt, weights=w, reduction=reduction,
                                         backend="torch")
        if out.requires_grad:
            out.sum().backward()
        n = len(calls)
        calls.clear()
        return n

    assert go("mean") == 1 and go("sum") == 1
    assert go("none") == 0 and go("mean", grad=False) == 0 and go("mean", wgrad=True) == 0
    with torch.no_grad():
        go("mean")
    assert not calls


def test_backward_scales_stored_gradients_and_retains():
    """The incoming scalar scales the stored gradients; a retained graph gives the same gradients twice."""
    case = make_case(17, 41, 8, 6, seed=6)
    hs, ws = case.hs.detach().clone().requires_grad_(), case.ws.detach().clone().requires_grad_()
    loss = tk.fused_linear_divergence(hs, ws, case.ht, case.wt, reduction="sum", backend="torch")
    assert loss.grad_fn.name() == "FusedReducedBackward"
    (loss * 1.0).backward(retain_graph=True)
    g1 = hs.grad.clone(), ws.grad.clone()
    hs.grad = ws.grad = None
    (loss * -2.5).backward()
    torch.testing.assert_close(hs.grad, -2.5 * g1[0])
    torch.testing.assert_close(ws.grad, -2.5 * g1[1])


def test_non_finite_rows_take_the_safe_path(monkeypatch):
    """Teacher logits of -inf (probability exactly 0): fused_grad's fast rows detect them and redo those rows on
    the safe path, giving what recompute gives: forward KL and JSD finite, never NaN; reverse KL +inf on those
    rows exactly as recompute has it (NaN patterns included)."""
    case = make_case(12, 30, 7, 5, seed=8, teacher="logits")
    tl = case.tl.clone()
    tl[3, 4] = float("-inf")
    tl[5, :10] = float("-inf")
    out = {}
    for name in ("recompute", "fused_grad"):
        monkeypatch.setattr(torch_backend, "STRATEGY", name)
        for kind, beta in (("forward_kl", 0.5), ("jsd", 0.5), ("reverse_kl", 0.5)):
            hs, ws = case.hs.detach().clone().requires_grad_(), case.ws.detach().clone().requires_grad_()
            w = torch.ones(12)
            w[7] = 0
            with tk.set_options(check_finite=False):
                loss = tk.fused_linear_divergence(hs, ws, teacher_logits=tl, divergence=kind, beta=beta,
                                                  weights=w, reduction="sum", backend="torch")
                per_row = tk.fused_linear_divergence(hs.detach(), ws.detach(), teacher_logits=tl,
                                                     divergence=kind, beta=beta, backend="torch")
            loss.backward()
            out[(name, kind)] = (loss.detach(), hs.grad, ws.grad)
            if kind == "reverse_kl":
                assert torch.isinf(per_row[[3, 5]]).all() and torch.isfinite(per_row[[0, 1, 2, 4]]).all()
    for kind in ("forward_kl", "jsd", "reverse_kl"):
        a, b = out[("recompute", kind)], out[("fused_grad", kind)]
        for x, y in zip(a, b):
            if kind != "reverse_kl":
                assert torch.isfinite(y).all(), kind
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_cache_sizes_and_tiles():
    """Cache sizes come from the machine (positive, L2 <= LLC); tile and block shapes respect their budgets."""
    l2, llc = torch_backend.cache_sizes()
    assert 0 < l2 <= llc
    budget = torch_backend.tile_budget_bytes()
    assert 16 * 2**20 <= budget <= 64 * 2**20
    rows, cols = torch_backend.tile_shape(10**6, 32768)
    assert rows * cols * 4 * torch_backend._TILE_TEMPORARIES <= budget
    for vocab in (101, 32768, 151936):
        block, sub = torch_backend.fused_rows(10**6, vocab)
        assert 1 <= sub <= block <= 512
        assert 2 * block * vocab * 4 <= max(64 * 2**20, 2 * 64 * vocab * 4)
        assert 3 * sub * vocab * 4 <= max(2 * l2, 3 * vocab * 4)
        fwd_cols, grad_cols = torch_backend.fused_vocab_chunks(vocab)
        assert 1 <= fwd_cols <= grad_cols <= vocab
        assert fwd_cols == min(vocab, max(128, min(4096, l2 // 2048)))  # [256, cols] fits half the L2
        assert grad_cols == min(vocab, 4 * fwd_cols)
    assert torch_backend._parse_size("32768K") == 32 * 2**20 and torch_backend._parse_size("1 MiB") == 2**20


def test_row_upstream_is_reduce_gradient():
    """The per-row gradient fused_grad uses equals autograd's gradient of ``reduce``."""
    g = torch.Generator().manual_seed(0)
    for reduction in ("sum", "mean"):
        for weights in (None, torch.rand(3, 4, generator=g, dtype=torch.float64)):
            v = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True)
            core.reduce(v, torch.Size([3, 4]), reduction, weights).backward()
            got = core.row_upstream(12, reduction, weights, torch.float64, v.device)
            torch.testing.assert_close(got, v.grad, rtol=1e-15, atol=0)
    assert TOL[torch.float32] == 5e-4  # the rule's tolerances are the shared ones


def test_compiled_update_matches_eager(monkeypatch):
    """The opt-in compiled reverse-KL update (COMPILE_ELEMENTWISE) gives the eager update's values and gradients,
    both worker threads calling it; a failing compiler falls back to the eager update with a warning."""
    case = make_case(40, 97, 12, 9, seed=12)
    monkeypatch.setattr(torch_backend, "fused_rows", lambda n, v, itemsize=4: (16, 4))  # ragged: 16 = 4·4, 8
    monkeypatch.setattr(torch_backend, "FUSED_WORKERS", 2)

    def run():
        hs, ws = case.hs.detach().clone().requires_grad_(), case.ws.detach().clone().requires_grad_()
        loss = tk.fused_linear_divergence(hs, ws, case.ht, case.wt, reduction="mean", backend="torch")
        loss.backward()
        return {"value": loss.detach(), "d_hidden": hs.grad, "d_weight": ws.grad}

    eager = run()
    monkeypatch.setattr(torch_backend, "COMPILE_ELEMENTWISE", True)
    monkeypatch.setattr(torch_backend, "_COMPILED", {})
    compiled = run()
    assert torch_backend._COMPILED.get((4, 97, torch.float32)) is not None, "the compiled update was not built"
    assert_close64(compiled, eager, tol=2e-5, what="compiled")

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(torch_backend, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="eager update"):
        fallback = run()
    assert torch_backend._COMPILED[(4, 97, torch.float32)] is None
    assert_close64(fallback, eager, tol=1e-12, what="fallback")


def test_backward_hands_over_stored_gradients():
    """The first backward returns the stored gradient tensors themselves (fp32 inputs, incoming gradient 1): the
    leaf's .grad is that tensor, not a clone, so no second gradient-sized buffer is allocated."""
    case = make_case(17, 41, 8, 6, seed=7)
    hs, ws = case.hs.detach().clone().requires_grad_(), case.ws.detach().clone().requires_grad_()
    loss = tk.fused_linear_divergence(hs, ws, case.ht, case.wt, reduction="mean", backend="torch")
    stored = [t.data_ptr() for t in loss.grad_fn.grads if t is not None]
    loss.backward()
    assert [hs.grad.data_ptr(), ws.grad.data_ptr()] == stored


def test_fused_grad_forms_only_the_wanted_gradients(monkeypatch):
    """A frozen lm_head (and bias): fused_grad forms no ``[V, D]`` weight gradient, and the hidden-state gradient
    equals the recompute strategy's."""
    seen = []
    real = torch_backend.fused_value_and_grad

    def spy(*args):
        out = real(*args)
        seen.append(out[2] is None and out[3] is None)
        return out

    monkeypatch.setattr(torch_backend, "fused_value_and_grad", spy)
    case = make_case(N, V, DS, DT, seed=5)
    grads = {}
    for strategy in ("fused_grad", "recompute"):
        monkeypatch.setattr(torch_backend, "STRATEGY", strategy)
        hs = case.hs.detach().clone().requires_grad_()
        loss = tk.fused_linear_divergence(hs, case.ws, case.ht, case.wt, student_bias=case.bs, teacher_bias=case.bt,
                                          reduction="mean", backend="torch")
        loss.backward()
        grads[strategy] = hs.grad
    assert seen == [True]
    torch.testing.assert_close(grads["fused_grad"], grads["recompute"], rtol=1e-5, atol=1e-7)


def test_run_pieces_slots_and_errors():
    """fused_grad's work sharing: every piece runs once, no slot is held by two threads at once, grad mode is off
    in the workers, and an exception in a piece reaches the caller."""
    import threading

    held, seen, lock = set(), [], threading.Lock()

    def piece(p, slot):
        with lock:
            assert slot not in held and 0 <= slot < 3
            held.add(slot)
        assert not torch.is_grad_enabled()
        torch.ones(1000).sum()  # a torch op on the worker
        with lock:
            held.discard(slot)
            seen.append(p)

    torch_backend._run_pieces(3, piece, list(range(50)))
    assert sorted(seen) == list(range(50))
    seen.clear()
    torch_backend._run_pieces(1, piece, [7, 8])
    assert seen == [7, 8]

    def failing(p, slot):
        if p == 5:
            raise RuntimeError("piece 5 failed")

    with pytest.raises(RuntimeError, match="piece 5 failed"):
        torch_backend._run_pieces(2, failing, list(range(10)))
