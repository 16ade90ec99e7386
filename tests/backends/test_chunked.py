"""The chunked PyTorch backend ("torch"): the tile shape, many ragged row and vocabulary chunks against the
float64 truth, and no [N, V]-sized allocation forward or backward."""

from __future__ import annotations

import pytest
import torch

import tipkernels as tk

from tests._harness import (DEVICE, DIV_IDS, DIVS, PAD, NumelRecorder, assert_close64, assert_rule, leaf, logits_case,
                            make_case, run_divergence, run_entropy, run_from_logits, slow, torch_backend,
                            truth_divergence, truth_entropy, truth_from_logits, upstream)


def test_tile_shape_independent_of_n(monkeypatch):
    ts, temps = torch_backend.tile_shape, torch_backend._TILE_TEMPORARIES
    for budget in (32, 1536, 2**16, 64 * 2**20, 2**31):
        for vocab in (1, 37, 101, 8192, 32768, 152064):
            rows, cols = ts(10**12, vocab, budget)
            assert 1 <= cols <= vocab and rows >= 1
            if budget >= 4 * temps:
                assert rows * cols * 4 * temps <= budget, (budget, vocab, rows, cols)
            for n in (rows, rows + 1, 2 * rows + 3, 10**6, 10**9):
                if n >= rows:  # fewer rows than a tile holds give a tile of n rows (checked below)
                    assert ts(n, vocab, budget) == (rows, cols), (budget, vocab, n)
            for n in (1, 2, 5):
                assert ts(n, vocab, budget) == (min(n, rows), cols)
    monkeypatch.setattr(torch_backend, "CHUNK_BUDGET_BYTES", 1536)
    assert ts(10**6, 101) == ts(10**6, 101, 1536)  # the module budget is read at call time


@pytest.mark.parametrize("tiles", [slow("tiles_3x16"), "tiny_budget"])
@pytest.mark.parametrize("kind,beta", DIVS, ids=DIV_IDS)
def test_chunked_divergence(kind, beta, tiles, request):
    """Several row and vocab chunks with ragged ends (N=29, V=101): fp64 equal to the truth, fp32 by the rule."""
    request.getfixturevalue(tiles)
    for dtype in (torch.float64, torch.float32):
        case = make_case(29, 101, 40, 19, dtype=dtype, seed=11, labels=True)
        weights = torch.rand(case.lead, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        weights[5:9] = 0
        go = upstream("none", case.lead)
        args = (kind, beta, 0.7, "none", weights, go)
        fast = run_divergence(case, "torch", *args)
        truth = truth_divergence(case, *args)
        if dtype == torch.float64:
            assert_close64(fast, truth, what=tiles)
        else:
            assert_rule(fast, run_divergence(case, "reference", *args), truth, dtype, tiles)
        got = tk.token_stats(case.hs, case.ws, case.ht, case.wt, student_bias=case.bs, teacher_bias=case.bt,
                             labels=case.labels, temperature=0.7, backend="torch")
        want = tk.token_stats(case.hs, case.ws, case.ht, case.wt, student_bias=case.bs, teacher_bias=case.bt,
                              labels=case.labels, temperature=0.7, backend="reference")
        for name, t in want.as_dict().items():
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(getattr(got, name), t, rtol=tol, atol=tol, msg=name)
    rows, cols = torch_backend.tile_shape(29, 101)  # the patched shape: several chunks, ragged last ones
    assert rows < 29 and cols < 101 and 101 % cols != 0 and (rows == 1 or 29 % rows != 0)


def test_chunked_entropy_and_logits(tiles_3x16):
    case = make_case(29, 101, 40, 19, teacher="none", dtype=torch.float64, seed=12)
    go = upstream("mean", case.lead)
    assert_close64(run_entropy(case, "torch", 2.5, "mean", go), truth_entropy(case, 2.5, "mean", go))
    s, u = logits_case("torch", torch.float64, seed=13)
    go = upstream("none", s.shape[:-1])
    for kind, beta in DIVS:
        args = (kind, beta, 0.7, "none", go)
        assert_close64(run_from_logits(s, u, "torch", *args), truth_from_logits(s, u, *args), what=kind)
    assert tiles_3x16, "the patched tile_shape was not used"


@pytest.mark.parametrize("strategy", ["recompute", "fused_grad"])
@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("jsd", 0.3)], ids=["rkl", "jsd0.3"])
def test_torch_backend_never_allocates_n_by_v(monkeypatch, kind, beta, strategy):
    """Forward + backward records no op output as large as N·V (N=64, V=512, D=8: V·D = N·V/8), under either
    gradient strategy (fused_grad holds two ``[rows, V]`` blocks: 2 rows here)."""
    n, v, d = 64, 512, 8
    tile_elems = 1024
    monkeypatch.setattr(torch_backend, "STRATEGY", strategy)
    monkeypatch.setattr(torch_backend, "CHUNK_BUDGET_BYTES", tile_elems * 4 * torch_backend._TILE_TEMPORARIES)
    monkeypatch.setattr(torch_backend, "FUSED_BLOCK_BYTES", 2 * tile_elems * 4)
    monkeypatch.setattr(torch_backend, "FUSED_WORKERS", 1)  # every op on this thread, where the recorder sees it
    rows, cols = torch_backend.tile_shape(n, v)
    assert rows * cols <= tile_elems and rows < n
    assert torch_backend.fused_rows(n, v)[0] * v <= tile_elems
    case = make_case(n, v, d, d, seed=17)
    largest_input = max((v + PAD) * d, n * d)  # weights (and their gradients), hidden states
    assert largest_input * 4 <= n * v

    def record(backend):
        hs, ws, bs = leaf(case.hs), leaf(case.ws), leaf(case.bs)
        with NumelRecorder() as rec:
            out = tk.fused_linear_divergence(hs, ws, case.ht, case.wt, student_bias=bs, teacher_bias=case.bt,
                                             divergence=kind, beta=beta, reduction="mean", backend=backend)
            out.backward()
        assert ws.grad is not None
        return rec.sizes

    sizes = record("torch")
    ops = {op for _, op, _ in sizes}
    assert any("addmm" in op or "mm" in op for op in ops), "backward GEMMs were not recorded"
    biggest = max(sizes)
    assert biggest[0] <= max(largest_input, tile_elems), f"{biggest} exceeds inputs {largest_input}, tile {tile_elems}"
    assert biggest[0] < n * v
    # the same probe sees the materialised logits of the reference: the check can fail
    assert max(record("reference"))[0] >= n * v
