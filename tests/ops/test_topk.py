"""A teacher seen through its top-k log-probabilities (docs/design.md §1): values and gradients of every divergence,
both tails, against the float64 truth of the bins on materialised logits, on every backend (the pass rule:
tests/_harness.py); K = 1, K = V (the bucket equals the dense divergence), -inf log-probabilities, padding ids,
token_stats, the memory probe, determinism and every validation error."""

from __future__ import annotations

import math

import pytest
import torch

import tipkernels as tk

from tests._harness import (ALL_BACKENDS, DEVICE, DIV_IDS, DIVS, DTYPES, HAS_TRITON_BACKEND, NumelRecorder,
                            assert_close64, assert_rule, axis, bin_divergence64, f64, grid, leaf, make_case,
                            make_problem, make_topk, reference, run_topk, shape_for, topk_bins64, torch_backend,
                            triton_backend, truth_student, truth_topk, upstream)

TAILS = ["bucket", "renormalize"]
TEMPERATURE = 0.7


def _limit(kind, beta) -> bool:
    """JSD at β = 0 / 1 (routed to the KLs by one rule, ``effective_kind``): left to CI where another case covers it."""
    return kind == "jsd" and beta in (0.0, 1.0)


def _case(backend, dtype, seed=3, lead=None, transforms=None):
    n, v, ds, dt = shape_for(backend)
    return make_case(n, v, ds, dt, seed=seed, lead=lead, teacher="none", dtype=dtype, transforms=transforms)


def _check(backend, case, ids, lp, kind, beta, tail, dtype, reduction="none", weights=None, what=""):
    go = upstream(reduction, case.lead)
    truth = truth_topk(case, ids, lp, kind, beta, tail, TEMPERATURE, reduction, weights, go)
    fast = run_topk(case, backend, ids, lp, kind, beta, tail, TEMPERATURE, reduction, weights, go)
    if dtype == torch.float64:
        assert_close64(fast, truth, what=what)
    else:
        same = run_topk(case, "reference", ids, lp, kind, beta, tail, TEMPERATURE, reduction, weights, go)
        assert_rule(fast, same, truth, dtype, what=what)
    return fast, truth


@grid("backend,kind,beta,tail,dtype", axis(ALL_BACKENDS), axis(DIVS, DIV_IDS), axis(TAILS),
      axis(DTYPES, ["fp32", "bf16"]),
      slow=lambda backend, kind, beta, tail, dtype: (backend == "triton" and (dtype != torch.float32 or beta == 0.0))
      or (backend == "reference" and dtype != torch.float32))
def test_topk_divergence(backend, kind, beta, tail, dtype):
    """Padding ids, K = 5 of an odd vocabulary, [B, L] token dims, biases; values and d h, d W, d b."""
    n = shape_for(backend)[0]
    case = _case(backend, dtype, lead=(1, n))
    ids, lp, _ = make_topk(case, 5)
    _check(backend, case, ids, lp, kind, beta, tail, dtype, what=f"{backend} {kind} {beta} {tail}")


@grid("backend,kind,beta,tail", axis(["torch", "reference"]), axis(DIVS, DIV_IDS), axis(TAILS))
def test_topk_divergence_fp64(backend, kind, beta, tail):
    """fp64 in, fp64 out: equal to the truth to 1e-10 (a scale and a soft-cap on the student, weighted mean)."""
    case = _case(backend, torch.float64, transforms=dict(student_logit_scale=1.5, student_softcap=4.0))
    ids, lp, _ = make_topk(case, 6, dtype=torch.float64)
    w = torch.rand(case.lead, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    w[::3] = 0
    _check(backend, case, ids, lp, kind, beta, tail, torch.float64, reduction="mean", weights=w)


@grid("backend,kind,beta,tail", axis(ALL_BACKENDS), axis(DIVS, DIV_IDS), axis(TAILS),
      slow=lambda backend, kind, beta, tail: _limit(kind, beta) or (backend == "triton" and kind != "reverse_kl"))
def test_topk_k1_and_reductions(backend, kind, beta, tail):
    """K = 1 (renormalize: every divergence is 0, a single bin), reduction "sum"."""
    case = _case(backend, torch.float32, seed=4)
    ids, lp, _ = make_topk(case, 1)
    fast, truth = _check(backend, case, ids, lp, kind, beta, tail, torch.float32, reduction="sum")
    if tail == "renormalize":  # both sides are 1 on the one bin (JSD's mixture log rounds to ~1e-7)
        assert abs(fast["value"].item()) <= (1e-6 if kind == "jsd" and 0 < beta < 1 else 0.0)
        assert all(torch.all(fast[k] == 0) for k in ("d_hidden", "d_weight", "d_bias"))


@grid("backend,kind,beta", axis(ALL_BACKENDS), axis(DIVS, DIV_IDS),
      slow=lambda backend, kind, beta: _limit(kind, beta) or (backend == "triton" and kind == "jsd"))
def test_topk_covering_the_vocabulary_is_the_dense_divergence(backend, kind, beta):
    """K = V with the teacher's full log-softmax: the rest is empty on both sides and the bucket divergence is the
    dense one (values and gradients, same backend, fp32), whatever the order of the ids."""
    case = _case(backend, torch.float32, seed=6)
    ids, lp, dense = make_topk(case, case.vocab, pad=False)
    go = upstream("none", case.lead)
    got = run_topk(case, backend, ids, lp, kind, beta, "bucket", TEMPERATURE, "none", None, go)
    hs, ws, bs = leaf(case.hs), leaf(case.ws), leaf(case.bs)
    # the dense teacher's logits are its log-softmax; the temperature must not rescale them: pass T times them
    teacher = (dense * TEMPERATURE).to(torch.float32).reshape(*case.lead, -1).to(DEVICE)
    out = tk.fused_linear_divergence(hs, ws, teacher_logits=teacher, student_bias=bs, divergence=kind, beta=beta,
                                     temperature=TEMPERATURE, backend=backend)
    (out.double() * go).sum().backward()
    want = {"value": out.detach(), "d_hidden": hs.grad, "d_weight": ws.grad, "d_bias": bs.grad}
    for key, t in want.items():
        scale = max(t.abs().max().item(), 1.0 if key == "value" else 0.0)
        assert (got[key].double() - t.double()).abs().max().item() <= 2e-5 * scale, key


@grid("backend,kind,beta,tail", axis(ALL_BACKENDS), axis(DIVS, DIV_IDS), axis(TAILS),
      slow=lambda backend, kind, beta, tail: (_limit(kind, beta) and backend != "torch")
      or (backend == "triton" and kind != "forward_kl"))
def test_topk_neg_inf_logprobs(backend, kind, beta, tail):
    """Ids the teacher gives no mass (log-probability -inf): KL(q‖p), JSD finite and exact; KL(p‖q) is +inf on those
    rows (the student has mass where the teacher has none) and exact elsewhere, with finite gradients there."""
    case = _case(backend, torch.float32, seed=7)
    ids, lp, _ = make_topk(case, 4, neg_inf=True)
    eff = "forward_kl" if kind == "jsd" and beta == 0.0 else ("reverse_kl" if kind == "jsd" and beta == 1.0 else kind)
    if eff != "reverse_kl":
        _check(backend, case, ids, lp, kind, beta, tail, torch.float32)
        return
    inf_rows = torch.isneginf(lp).any(-1).reshape(-1)
    values = tk.fused_linear_divergence(case.hs, case.ws, teacher_topk=(ids, lp), student_bias=case.bs,
                                        divergence=kind, beta=beta, tail=tail, temperature=TEMPERATURE,
                                        backend=backend).reshape(-1)
    assert torch.all(torch.isposinf(values[inf_rows]))
    keep = (~inf_rows).nonzero().squeeze(1)
    sub = make_case(keep.numel(), case.vocab, case.hs.shape[-1], 1, seed=7, teacher="none")
    sub.hs, sub.ws, sub.bs = case.hs[keep], case.ws, case.bs
    fast, _ = _check(backend, sub, ids[keep], lp[keep], kind, beta, tail, torch.float32, reduction="sum")
    # weight 0 on the +inf rows: the same sum and gradients (no 0·inf anywhere), d hidden 0 on those rows
    weights = (~inf_rows).float().reshape(case.lead)
    got = run_topk(case, backend, ids, lp, kind, beta, tail, TEMPERATURE, "sum", weights, upstream("sum", case.lead))
    assert torch.allclose(got["value"], fast["value"], rtol=1e-6)
    assert torch.all(got["d_hidden"][inf_rows] == 0)
    for key in ("d_weight", "d_bias"):
        assert torch.allclose(got[key], fast[key], rtol=1e-5, atol=1e-7), key
    assert torch.allclose(got["d_hidden"][keep], fast["d_hidden"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
def test_topk_token_stats(backend, tail):
    """The student's fields exact (as the dense op's), the KLs the bins', the documented teacher fields."""
    case = _case(backend, torch.float32, seed=8, lead=(1, shape_for(backend)[0]))
    ids, lp, _ = make_topk(case, 5)
    got = tk.token_stats(case.hs, case.ws, teacher_topk=(ids, lp), tail=tail, student_bias=case.bs,
                         temperature=TEMPERATURE, backend=backend)
    plain = tk.token_stats(case.hs, case.ws, student_bias=case.bs, temperature=TEMPERATURE, backend=backend)
    for name in ("student_lse", "entropy", "entropy_norm", "student_argmax"):
        assert torch.equal(getattr(got, name), getattr(plain, name)), name
    s = truth_student(case, TEMPERATURE)[1].detach()
    p, q = topk_bins64(s, ids, lp, tail)
    for name, kind in (("reverse_kl", "reverse_kl"), ("forward_kl", "forward_kl")):
        want = bin_divergence64(p, q, kind, 0.5).reshape(case.lead)
        assert getattr(got, name).dtype == torch.float32
        assert (getattr(got, name).double() - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item()), name
    assert torch.all(got.teacher_lse == 0) and torch.all(torch.isnan(got.teacher_entropy))
    key = torch.where(ids >= 0, lp.double(), torch.full_like(lp, -math.inf, dtype=torch.float64))
    want_arg = ids.gather(-1, key.argmax(-1, keepdim=True))[..., 0]
    assert torch.equal(got.teacher_argmax, want_arg)
    # selection reads the bins' divergences: q3 from the forward one
    mask = torch.ones(case.lead, dtype=torch.bool, device=DEVICE)
    sel = tk.select_tokens(got, mask, rule="q3", ratio=0.5)
    assert int(sel.count) == case.lead[1] // 2


def test_topk_teacher_argmax_padding_and_neg_inf():
    """A row of padding only has teacher_argmax -1; a row whose ids all have -inf picks its first valid id."""
    case = _case("torch", torch.float32, seed=9)
    ids, lp, _ = make_topk(case, 3, pad=False)
    ids[0] = -1
    ids[1, 0] = -1
    lp[1] = -math.inf
    st = tk.token_stats(case.hs, case.ws, teacher_topk=(ids, lp), student_bias=case.bs, backend="torch")
    assert st.teacher_argmax[0] == -1 and st.teacher_argmax[1] == ids[1, 1]
    assert torch.isfinite(st.forward_kl[0]) and st.forward_kl[0] == 0  # nothing known: both bins hold everything


def test_topk_never_allocates_n_by_v(monkeypatch):
    """Forward + backward on the torch backend record no op output as large as N·V (N=64, V=512, D=8, K=16), for
    both tails and the bucket's two strategies (fused_grad's block: 8 rows); the gather's chunk ``[rows, K, D]``
    is bounded by its budget (rows · K · D · 4 bytes)."""
    from tipkernels.ops import topk as topk_mod  # the budget knob of the gather

    n, v, d, k = 64, 512, 8, 16
    tile = 4096  # logits per tile of the LSE pass: N·V / 8
    monkeypatch.setattr(torch_backend, "CHUNK_BUDGET_BYTES", tile * 4 * torch_backend._TILE_TEMPORARIES)
    monkeypatch.setattr(torch_backend, "FUSED_BLOCK_BYTES", 2 * tile * 4)  # bucket: fused_grad, blocks of 8 rows
    monkeypatch.setattr(torch_backend, "FUSED_WORKERS", 1)  # every op on this thread, where the recorder sees it
    monkeypatch.setattr(topk_mod, "GATHER_BUDGET_BYTES", 16 * k * d * 4)
    assert torch_backend.fused_rows(n, v)[0] * v <= tile
    case = make_case(n, v, d, d, seed=17, teacher="none")
    ids, lp, _ = make_topk(case, k)
    largest_input = v * d
    assert largest_input * 4 <= n * v
    swept = []
    real = torch_backend.fused_value_and_grad
    monkeypatch.setattr(torch_backend, "fused_value_and_grad", lambda *a, **kw: swept.append(1) or real(*a, **kw))
    for tail, strategy in [("bucket", "auto"), ("bucket", "recompute"), ("renormalize", "auto")]:
        monkeypatch.setattr(torch_backend, "STRATEGY", strategy)
        swept.clear()
        hs, ws, bs = leaf(case.hs), leaf(case.ws), leaf(case.bs)
        with NumelRecorder() as rec:
            out = tk.fused_linear_divergence(hs, ws, teacher_topk=(ids, lp), student_bias=bs, tail=tail,
                                             reduction="mean", backend="torch")
            out.backward()
        assert bool(swept) == (tail == "bucket" and strategy == "auto"), (tail, strategy)
        biggest = max(rec.sizes)
        assert biggest[0] <= max(largest_input, tile, 16 * k * d) < n * v, (tail, strategy, biggest)
    with NumelRecorder() as rec:
        tk.fused_linear_divergence(case.hs, case.ws, teacher_topk=(ids, lp), backend="reference")
    assert max(rec.sizes)[0] >= n * v  # the probe sees the reference's materialised logits


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON_BACKEND, reason="needs triton installed (a hard dependency: never skipped in CI)")
def test_topk_triton_never_allocates_n_by_v(monkeypatch):
    """The same probe on the triton backend (bucket: its LSE kernels and the torch gather), with the matmul
    backward's gradient-logit buffer bounded by ``bwd_chunk_mib`` (16 KiB here). Compared in bytes: the interpreter
    copies kernel arguments as byte storages."""
    from tipkernels.ops import topk as topk_mod

    n, v, d, k = 64, 512, 8, 16
    monkeypatch.setattr(topk_mod, "GATHER_BUDGET_BYTES", 16 * k * d * 4)
    case = make_case(n, v, d, d, seed=17, teacher="none")
    ids, lp, _ = make_topk(case, k)
    hs, ws, bs = leaf(case.hs), leaf(case.ws), leaf(case.bs)
    with tk.set_options(triton_config=dict(bwd_strategy="matmul", bwd_chunk_mib=2**-6)), NumelRecorder() as rec:
        out = tk.fused_linear_divergence(hs, ws, teacher_topk=(ids, lp), student_bias=bs, reduction="mean",
                                         backend="triton")
        out.backward()
    assert ws.grad is not None and any("mm" in op for _, op, _ in rec.sizes)
    biggest = max(rec.sizes, key=lambda sz: sz[2])
    assert biggest[2] <= max(4 * v * d, 2**-6 * 2**20, 4 * 16 * k * d) < 4 * n * v, biggest


def test_topk_deterministic_gradients():
    """Two runs give bitwise-equal values and gradients (the sparse backward's order is fixed)."""
    case = _case("torch", torch.float32, seed=10)
    ids, lp, _ = make_topk(case, 5)
    go = upstream("none", case.lead)
    runs = [run_topk(case, "torch", ids, lp, "jsd", 0.3, "bucket", 1.0, "none", None, go) for _ in range(2)]
    with tk.set_options(deterministic=True):
        runs.append(run_topk(case, "torch", ids, lp, "jsd", 0.3, "bucket", 1.0, "none", None, go))
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]) and torch.equal(runs[0][key], runs[2][key]), key


# ------------------------------------------------- the bucket's gradient in fused_grad's sweep (torch, CPU)


def _fused_spy(monkeypatch, workers=1):
    """fused_grad's sweep in blocks of 7 rows, sub-blocks of 3, matmul pieces of 16 columns (several of each, ragged
    ends) on ``workers`` threads; returns the list of the row functions it was called with."""
    monkeypatch.setattr(torch_backend, "FUSED_WORKERS", workers)
    monkeypatch.setattr(torch_backend, "FUSED_VOCAB_CHUNK", 16)
    monkeypatch.setattr(torch_backend, "fused_rows", lambda n, v, itemsize=4: (min(7, n), min(3, n)))
    calls = []
    real = torch_backend.fused_value_and_grad

    def spy(prob, kind, *args, **kwargs):
        calls.append(kind)
        return real(prob, kind, *args, **kwargs)

    monkeypatch.setattr(torch_backend, "fused_value_and_grad", spy)
    return calls


FUSED_CASES = [("mean", False, None), ("sum", True, None), ("mean", True, dict(student_logit_scale=1.5)),
               ("sum", False, dict(student_logit_scale=1.5, student_softcap=3.0))]


@grid("kind,beta,dtype,reduction,weighted,transforms,workers", axis(DIVS, DIV_IDS),
      axis(DTYPES + [torch.float64], ["fp32", "bf16", "fp64"]),
      axis(FUSED_CASES, ["mean", "sum-weights", "mean-weights-scale", "sum-scale-softcap"]), axis([1, 2]),
      slow=lambda kind, beta, dtype, reduction, weighted, transforms, workers: _limit(kind, beta)
      or (workers == 2 and dtype != torch.float32))
def test_topk_bucket_fused_grad(monkeypatch, kind, beta, dtype, reduction, weighted, transforms, workers):
    """tail="bucket", reduction "sum"/"mean" on the torch backend: the sweep's row function (values, d h, d W, d b)
    against the float64 truth (fp64: to 1e-10; else the pass rule), with padding ids, -inf log-probabilities (not
    for KL(p‖q): +inf there, test_topk_neg_inf_logprobs), weights with zeros, a logit scale, a soft-cap and the
    temperature; the row function was what ran."""
    calls = _fused_spy(monkeypatch, workers)
    c = _case("torch", dtype, seed=6, transforms=transforms)
    rkl = kind == "reverse_kl" or (kind == "jsd" and beta == 1.0)  # -inf log-probs make it +inf (test above)
    ids, lp, _ = make_topk(c, 5, neg_inf=not rkl, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    w = None
    if weighted:
        w = torch.rand(c.lead, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(DEVICE)
        w[::4] = 0
    _check("torch", c, ids, lp, kind, beta, "bucket", dtype, reduction=reduction, weights=w,
           what=f"fused {kind} {beta} {dtype} {reduction} {transforms}")
    assert calls and all(callable(k) for k in calls), calls


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)],
                         ids=["rkl", "fkl", "jsd0.3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_topk_bucket_fused_equals_recompute(monkeypatch, kind, beta, dtype):
    """The sweep's row function and the recompute path ("lse" row kind + gather) give the same value and
    gradients (fp32: to a few ulps of the largest entry; fp64: to 1e-13), weighted mean, a scaled and soft-capped
    student."""
    calls = _fused_spy(monkeypatch, 2)
    c = _case("torch", dtype, seed=9, transforms=dict(student_logit_scale=1.5, student_softcap=4.0))
    ids, lp, _ = make_topk(c, 6, dtype=dtype)
    w = torch.rand(c.lead, generator=torch.Generator().manual_seed(1), dtype=dtype).to(DEVICE)
    go = upstream("mean", c.lead)
    runs = {}
    for strategy in ("recompute", "auto"):
        monkeypatch.setattr(torch_backend, "STRATEGY", strategy)
        runs[strategy] = run_topk(c, "torch", ids, lp, kind, beta, "bucket", TEMPERATURE, "mean", w, go)
        assert bool(calls) == (strategy == "auto"), strategy
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    for key, want in runs["recompute"].items():
        got = runs["auto"][key]
        assert got.dtype == want.dtype, key
        assert (got.double() - want.double()).abs().max() <= tol * max(1.0, want.abs().max().item()), key


def test_topk_bucket_fused_only_where_the_strategy_says(monkeypatch):
    """The row function runs only for tail="bucket" with a reduction, a wanted gradient and the strategy
    "fused_grad" (a soft-capped student included, unlike the dense kinds): not for "none", "renormalize", no grad,
    differentiable weights or STRATEGY="recompute" (where the loss is the same one, it equals the fused value)."""
    calls = _fused_spy(monkeypatch)
    c = _case("torch", torch.float32, seed=2)
    ids, lp, _ = make_topk(c, 4)

    def value(**kw):
        calls.clear()
        hs = leaf(c.hs)
        args = dict(teacher_topk=(ids, lp), student_bias=c.bs, reduction="mean", backend="torch")
        args.update(kw)
        out = tk.fused_linear_divergence(hs, c.ws, **args)
        return out.detach(), bool(calls)

    fused, took = value()
    assert took
    for kw in (dict(reduction="none"), dict(tail="renormalize"),
               dict(weights=torch.ones(c.lead, requires_grad=True))):
        got, took = value(**kw)
        assert not took, kw
        if "weights" in kw:  # the same loss by the recompute path
            torch.testing.assert_close(got, fused, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert not value()[1]
    capped, took = value(student_softcap=5.0)
    assert took
    monkeypatch.setattr(torch_backend, "STRATEGY", "recompute")
    torch.testing.assert_close(value(student_softcap=5.0)[0], capped, rtol=1e-5, atol=1e-7)
    got, took = value()
    assert not took
    torch.testing.assert_close(got, fused, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not HAS_TRITON_BACKEND, reason="needs triton installed (a hard dependency: never skipped in CI)")
def test_topk_bucket_row_function_only_where_the_backend_takes_it(monkeypatch):
    """A backend whose fused sweep takes dense kinds only (triton: no ``fused_row_functions``) keeps the "lse" row
    kind and the gather for a reduced bucket, even where its ``grad_strategy`` answers "fused_grad"."""
    assert not getattr(triton_backend, "fused_row_functions", False)
    monkeypatch.setattr(triton_backend, "grad_strategy", lambda prob, known, **kw: "fused_grad")
    calls = []
    monkeypatch.setattr(triton_backend, "fused_value_and_grad", lambda *a, **kw: calls.append(a[1]))
    case = _case("triton", torch.float32, seed=12)
    ids, lp, _ = make_topk(case, 4)
    _check("triton", case, ids, lp, "forward_kl", 0.5, "bucket", torch.float32, reduction="mean")
    assert not calls


# ------------------------------------------------------------------------------------------ validation


def _bad(fn=tk.fused_linear_divergence, **kw):
    case = make_case(6, 11, 4, 4, seed=11, lead=(2, 3), teacher="none")
    ids = torch.tensor([[0, 1, 2]] * 6).reshape(2, 3, 3)
    lp = torch.full((2, 3, 3), -2.0)
    args = dict(teacher_topk=(ids, lp))
    args.update(kw)
    return lambda: fn(case.hs, case.ws, **args), ids, lp


@pytest.mark.parametrize("fn", [tk.fused_linear_divergence, tk.token_stats], ids=["divergence", "stats"])
def test_topk_validation(fn):
    ids = torch.tensor([[0, 1, 2]] * 6).reshape(2, 3, 3)
    lp = torch.full((2, 3, 3), -2.0)

    def raises(err, match, topk=None, **kw):
        call = _bad(fn, teacher_topk=topk if topk is not None else (ids, lp), **kw)[0]
        with pytest.raises(err, match=match):
            call()

    raises(ValueError, "out of range", (ids.clone().index_fill_(2, torch.tensor([1]), 11), lp))
    raises(ValueError, "out of range", (ids.clone().index_fill_(2, torch.tensor([1]), -2), lp))
    dup = ids.clone()
    dup[1, 2, 2] = 0
    raises(ValueError, "repeat", (dup, lp))
    raises(TypeError, "ids must be an integer", (ids.float(), lp))
    raises(TypeError, "logprobs must be a floating", (ids, lp.long()))
    high = lp.clone()
    high[0, 1, 0] = 0.01
    raises(ValueError, r"log-probabilities \(<= 0\)", (ids, high))
    nan = lp.clone()
    nan[1, 0, 2] = math.nan
    raises(ValueError, "NaN", (ids, nan))
    raises(ValueError, "sum to probability", (ids, torch.full((2, 3, 3), -0.5)))
    raises(ValueError, "one shape", (ids, lp[..., :2]))
    raises(ValueError, "token dims", (ids[:, :2], lp[:, :2]))
    raises(ValueError, "K = 0", (ids[..., :0], lp[..., :0]))
    raises(TypeError, "TeacherTopK or an", ids)
    raises(TypeError, "must be a torch.Tensor", ([0, 1], lp))
    raises(ValueError, "either densely", teacher_logits=torch.zeros(2, 3, 11))
    raises(ValueError, "unknown tail", tail="drop")
    # padding ids are not checked for their log-probabilities, and may repeat
    pad = ids.clone()
    pad[0, 0, 1:] = -1
    odd = lp.clone()
    odd[0, 0, 1:] = math.nan
    _bad(fn, teacher_topk=(pad, odd))[0]()


def test_topk_validation_dense_teacher_hidden():
    case = make_case(4, 11, 4, 4, seed=11)
    ids, lp = torch.tensor([[0, 1]] * 4), torch.full((4, 2), -1.0)
    with pytest.raises(ValueError, match="teacher_hidden, teacher_weight"):
        tk.fused_linear_divergence(case.hs, case.ws, case.ht, case.wt, teacher_topk=(ids, lp))
    loss = tk.TIPDistillationLoss(rule="all")
    with pytest.raises(ValueError, match="either densely"):
        loss(case.hs[None], case.ws, case.ht[None], case.wt, teacher_topk=(ids[None], lp[None]))
    with pytest.raises(ValueError, match="unknown tail"):
        tk.TIPDistillationLoss(tail="none")


@grid("backend,kind,beta,tail,rule", axis(ALL_BACKENDS), axis([("reverse_kl", 0.5), ("jsd", 0.3)], ["rkl", "jsd0.3"]),
      axis(TAILS), axis(["soft_or", "q3"]),
      slow=lambda backend, kind, beta, tail, rule: (rule == "soft_or") != (kind == "reverse_kl")
      or (backend == "triton" and kind != "reverse_kl"))
def test_topk_tip_loss(backend, kind, beta, tail, rule):
    """TIPDistillationLoss(tail=...)(..., teacher_topk=): the selection is made from the bins' divergences, the loss
    is the weighted mean over the selected tokens; value and d h, d W, d b against the float64 truth."""
    n = shape_for(backend)[0]
    case = _case(backend, torch.float32, seed=12, lead=(1, n))
    ids, lp, _ = make_topk(case, 5)
    mask = torch.ones(case.lead, dtype=torch.bool, device=DEVICE)
    mask[0, 2] = False
    loss_fn = tk.TIPDistillationLoss(rule=rule, ratio=0.5, divergence=kind, beta=beta, temperature=TEMPERATURE,
                                     backend=backend, tail=tail)
    hs, ws, bs = leaf(case.hs), leaf(case.ws), leaf(case.bs)
    out = loss_fn(hs, ws, mask=mask, student_bias=bs, teacher_topk=(ids, lp))
    out.loss.backward()
    w = out.selection.weights.double()
    assert int(out.selection.count) == (n - 1) // 2
    # the statistics are the bins' (of the loss's tail); the selection follows from them
    (h64, w64, b64), s = truth_student(case, TEMPERATURE)
    p, q = topk_bins64(s, ids, lp, tail)
    for name in ("reverse_kl", "forward_kl"):
        want = bin_divergence64(p.detach(), q, name, 0.5).reshape(case.lead) * mask
        assert (getattr(out.stats, name).double() - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
    values = bin_divergence64(p, q, kind, beta).reshape(case.lead)
    truth = (values * w).sum() / w.sum()
    truth.backward()
    assert abs(out.loss.item() - truth.item()) <= 5e-4 * max(1.0, abs(truth.item()))
    for got, want in ((hs.grad, h64.grad), (ws.grad, w64.grad), (bs.grad, b64.grad)):
        assert (got.double() - want).abs().max() <= 5e-4 * want.abs().max(), (got - want).abs().max()


LSE_BACKENDS = [("torch", None), ("reference", None)] + (
    [("triton", "matmul"), ("triton", "tiles")] if HAS_TRITON_BACKEND else [])


@pytest.mark.parametrize("backend,strategy", LSE_BACKENDS, ids=[f"{b}-{s}" if s else b for b, s in LSE_BACKENDS])
@pytest.mark.parametrize("variant", ["linear", "student_logits"])
def test_lse_row_kind_backward(backend, strategy, variant):
    """The backends' "lse" kind: ``d Ls / d s_j = p_j`` through the transform, against autograd on float64
    materialised logits (a soft-capped, scaled student; zero upstream rows skipped)."""
    from dataclasses import replace

    prob = replace(make_problem(variant, seed=4), student_scale=1.5, student_cap=5.0, teacher_hidden=None,
                   teacher_weight=None, teacher_bias=None, teacher_logits=None, labels=None)
    grad = torch.randn(prob.num_rows, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    grad[::4] = 0
    be = {"torch": torch_backend, "reference": reference, "triton": triton_backend}[backend]
    kw = {} if strategy is None else dict(config=dict(block_n=16, block_v=16, block_d=16, block_dh=16,
                                                      bwd_block_n=16, bwd_block_v=16, bwd_strategy=strategy))
    saved = {"student_lse": be.forward_stats(prob, **kw)["student_lse"]}
    got = be.backward(prob, "lse", grad, saved, 0.5, **kw)
    want = reference.backward(f64(prob), "lse", grad.double(), {}, 0.5)
    for g, w, name in zip(got, want, ("d_student", "d_weight", "d_bias")):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        assert (g.double() - w).abs().max() <= 2e-5 * w.abs().max(), name
    assert torch.all(got[0][::4] == 0)  # rows of zero upstream gradient get none


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
def test_topk_confident_models_keep_finite_divergences(backend, tail):
    """Rows 0-2: a student whose top-k mass rounds to 1 in fp32 (a logit margin of 40); rows 3-5: a moderate one.
    Even rows: a served teacher whose top log-probability is 0.0 (``Q`` rounds above 1); odd rows: one with a rest of
    ~1e-3. Unfloored, a rest rounded to 0 against one that is not makes a KL +inf; with both rests at least their
    floors (4·eps·|Ls| and eps of fp32) every divergence and gradient is finite and equals the float64 bins with
    those floors."""
    n, v, d = 6, 50, 4
    g = torch.Generator().manual_seed(13)
    ws = torch.randn(v, d, generator=g) * 0.1
    ws[7] = torch.tensor([10.0, 0.0, 0.0, 0.0])
    hs = torch.randn(n, d, generator=g) * 0.1
    hs[:3, 0], hs[3:, 0] = 4.0, 0.1
    ids = torch.tensor([[7, 3, 9, 11]] * n)
    lp = torch.tensor([[0.0, -25.0, -26.0, -27.0], [-1e-3, -25.0, -26.0, -27.0]] * 3)
    case = make_case(n, v, d, 1, seed=13, teacher="none")
    case.hs, case.ws, case.bs = hs.to(DEVICE), ws.to(DEVICE), torch.zeros(v, device=DEVICE)
    ids, lp = ids.to(DEVICE), lp.to(DEVICE)
    s = truth_student(case, 1.0)[1].detach()
    eps = torch.finfo(torch.float32).eps
    floors = (4 * eps * torch.logsumexp(s, -1).abs().clamp_min(1), eps)
    for kind, beta in DIVS:
        got = run_topk(case, backend, ids, lp, kind, beta, tail, 1.0, "none", None, upstream("none", case.lead))
        for key, t in got.items():
            assert torch.isfinite(t).all(), (kind, beta, key)
        want = bin_divergence64(*topk_bins64(s, ids, lp, tail, floors), kind, beta)
        assert (got["value"].double() - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()), (kind, beta)
