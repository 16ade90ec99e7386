"""The Triton backend against the float64 reference (docs/design.md §8), on CPU under the Triton interpreter.

Rule (elementwise, ``check_elementwise`` in tests/_harness.py): the backend's error against the float64 truth is at
most the error of the reference computed in the input dtype, plus a tolerance (fp32 5e-4, 16-bit 1e-2; relative to
the magnitude of the truth).
Shapes are small and odd (the interpreter is slow); blocks are 16 wide so every loop runs several tiles.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

from tests._harness import (  # noqa: E402
    DEVICE, TOL, NumelRecorder, Problem, check_elementwise as check, check_jsd, check_stats, f64, make_problem,
    problem_to, reference as ref, slow, triton_backend as tb)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: inf arithmetic in masked lanes

# small tiles: several vocab tiles, hidden chunks, hidden blocks, vocab splits and backward vocabulary chunks
# (bwd_chunk_mib: 512 bytes, 16-32 columns for the 6-13 selected rows) even at these sizes
SMALL = dict(block_n=16, block_v=16, block_d=16, block_dh=16, split_v=2, bwd_block_n=16, bwd_block_v=16,
             bwd_chunk_mib=2**-11)
TILES = dict(SMALL, bwd_strategy="tiles")
VARIANTS = ("linear", "teacher_logits", "student_logits", "student_only", "strided")


# ----------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_stats(variant, dtype):
    prob = make_problem(variant, dtype)
    check_stats(prob, tb.forward_stats(prob, config=SMALL), TOL[dtype])


@pytest.mark.parametrize("vocab,ds,dt,n", [(50, 40, 33, 13), (16, 16, 16, 16), (1, 24, 19, 3)])
def test_forward_stats_shapes(vocab, ds, dt, n):
    prob = make_problem("linear", vocab=vocab, ds=ds, dt=dt, n=n, seed=1)
    check_stats(prob, tb.forward_stats(prob, config=SMALL), TOL[torch.float32])


def test_forward_stats_default_config_and_splits():
    prob = make_problem("linear", vocab=50, ds=40, dt=33, seed=2)
    check_stats(prob, tb.forward_stats(prob), 5e-4)  # default (large) blocks, automatic splits
    for split in (1, 3, 99):
        check_stats(prob, tb.forward_stats(prob, config={**SMALL, "split_v": split}), 5e-4)


@pytest.mark.parametrize("group_n", [1, 4, 64])
def test_grouped_program_order(group_n):
    """Forward, JSD pass and both students' dS kernels in grouped program order (docs/design.md §4): 6 row blocks in
    groups of 1 / 4 (the last group of 2) / all, 3 vocabulary splits and 6 dS vocabulary tiles per chunk."""
    cfg = dict(SMALL, group_n=group_n, split_v=3, bwd_chunk_mib=1.0)
    for variant in ("linear", "student_logits"):
        prob = make_problem(variant, n=83, vocab=83, seed=12)
        out = tb.forward_stats(prob, config=cfg)
        check_stats(prob, out, 5e-4)
        jsd, kl_pm = tb.jsd_forward(prob, out["student_lse"], out["teacher_lse"], 0.3, config=cfg)
        check_jsd(prob, jsd, kl_pm, 0.3, 5e-4)
        grad = grad_rows_for(prob.num_rows, seed=4)
        got = tb.backward(prob, "jsd", grad, {**out, "kl_pm": kl_pm}, 0.3, config=cfg)
        check_backward(prob, "jsd", 0.3, grad, got, 5e-4)


def test_group_n_is_validated():
    for bad in (0, None, 2.0, True):
        with pytest.raises(ValueError, match="group_n"):
            tb.config.validate({"group_n": bad})
    assert tb.config.validate({"group_n": 3}) == {"group_n": 3}


def test_forward_stats_fp16_and_fp64():
    check_stats(make_problem("linear", torch.float16), tb.forward_stats(make_problem("linear", torch.float16),
                                                                          config=SMALL), 1e-2)
    p64 = make_problem("teacher_logits", torch.float64)
    check_stats(p64, tb.forward_stats(p64, config=SMALL), 5e-4)


@pytest.mark.parametrize("variant", ["linear", "teacher_logits"])
def test_extreme_logits(variant):
    """Logits scaled by ~100: one-hot-like distributions, large LSEs; everything finite and accurate."""
    prob = make_problem(variant, scale=100.0, temperature=0.7, seed=3)
    out = tb.forward_stats(prob, config=SMALL)
    for v in out.values():
        assert torch.isfinite(v.double()).all()
    check_stats(prob, out, 5e-4)
    j, kl_pm = tb.jsd_forward(prob, out["student_lse"], out["teacher_lse"], 0.3, config=SMALL)
    check_jsd(prob, j, kl_pm, 0.3, 5e-4)
    saved = {**out, "kl_pm": kl_pm}
    grad = torch.linspace(-1, 1, prob.num_rows, device=DEVICE)
    operand = max(prob.student_weight.abs().max().item(), prob.student_hidden.abs().max().item())
    atol = 2.0 ** -23 * out["student_lse"].abs().max().item() / prob.temperature * operand
    for kind in ("entropy", "reverse_kl", "forward_kl", "jsd"):
        got = tb.backward(prob, kind, grad, saved, 0.3, config=SMALL)
        # log p = s - LSE is only good to ulp(LSE) (the LSE is saved in fp32; here |LSE| ~ 800, ulp 6e-5),
        # which is not small against the ~0 gradients of near one-hot rows: allow that much, times the operand
        check_backward(prob, kind, 0.3, grad, got, 5e-4, atol=atol)


def test_minus_inf_logits():
    """Masked vocabulary entries (-inf logits) drop out: same as a very negative finite logit."""
    prob = make_problem("student_logits", seed=4)
    z = prob.student_logits.clone()
    z[:, 5:9] = float("-inf")
    z[2, :30] = float("-inf")
    masked = Problem(student_logits=z, teacher_logits=prob.teacher_hidden @ prob.teacher_weight.t(),
                     labels=prob.labels, temperature=prob.temperature)
    finite = Problem(student_logits=z.clamp_min(-1e4), teacher_logits=masked.teacher_logits,
                     labels=prob.labels, temperature=prob.temperature)
    out = tb.forward_stats(masked, config=SMALL)
    truth = ref.forward_stats(f64(finite))
    for k in ("student_lse", "entropy", "reverse_kl", "teacher_entropy"):
        assert torch.isfinite(out[k]).all(), k
        torch.testing.assert_close(out[k].double(), truth[k], rtol=5e-4, atol=5e-4)
    # forward KL(q || p) is +inf where p = 0 and q > 0: must not be NaN
    assert not torch.isnan(out["forward_kl"]).any()


# ----------------------------------------------------------------------------------------------- jsd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("variant", ["linear", "teacher_logits", "student_logits"])
def test_jsd_forward(variant, beta, dtype):
    prob = make_problem(variant, dtype, seed=5)
    out = tb.forward_stats(prob, config=SMALL)
    jsd, kl_pm = tb.jsd_forward(prob, out["student_lse"], out["teacher_lse"], beta, config=SMALL)
    sj = check_jsd(prob, jsd, kl_pm, beta, TOL[dtype])
    if beta == 0.0:
        assert torch.all(kl_pm == 0)
        check("jsd=forward_kl", jsd, ref.forward_stats(f64(prob))["forward_kl"], sj, TOL[dtype])
    if beta == 1.0:
        check("jsd=reverse_kl", jsd, ref.forward_stats(f64(prob))["reverse_kl"], sj, TOL[dtype])


# ----------------------------------------------------------------------------------------------- backward


KINDS = [("entropy", 0.5), ("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0)]


def saved_for(prob, beta):
    out = tb.forward_stats(prob, config=SMALL)
    if prob.has_teacher:
        out["kl_pm"] = tb.jsd_forward(prob, out["student_lse"], out["teacher_lse"], beta, config=SMALL)[1]
    return out


def grad_rows_for(n, seed=0):
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    g[::2] = 0.0  # half the rows skipped
    return g.to(DEVICE)


def check_backward(prob, kind, beta, grad, got, tol, atol=0.0):
    truth = ref.backward(f64(prob), kind, grad, {}, beta)
    same = ref.backward(prob, kind, grad, {}, beta)
    names = ("d_student", "d_weight", "d_bias")
    for name, g, t, s, like in zip(names, got, truth, same,
                                   (prob.student_hidden if prob.student_is_linear else prob.student_logits,
                                    prob.student_weight, prob.student_bias)):
        if like is None:
            assert g is None, name
            continue
        assert g.dtype == like.dtype and g.shape == like.shape, name
        check(f"{kind}({beta}) {name}", g, t, s, tol, relative_to_max=True, atol=atol)
    zero = grad == 0
    assert torch.all(got[0][zero] == 0), "rows with zero upstream gradient must get exactly zero"


@pytest.mark.parametrize("dtype", [torch.float32, slow(torch.bfloat16)])  # bf16: CI only
@pytest.mark.parametrize("variant,config", [
    ("linear", SMALL), ("student_logits", SMALL), ("teacher_logits", SMALL), ("strided", SMALL),
    # the linear student's other backward: per-(row block, hidden block) kernels, no gradient-logit buffer
    ("linear", TILES), slow("teacher_logits", TILES), slow("strided", TILES),
], ids=["linear", "student_logits", "teacher_logits", "strided", "linear-tiles", "teacher_logits-tiles",
        "strided-tiles"])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_backward(kind, beta, variant, config, dtype):
    prob = make_problem(variant, dtype, seed=6)
    grad = grad_rows_for(prob.num_rows)
    got = tb.backward(prob, kind, grad, saved_for(prob, beta), beta, config=config)
    check_backward(prob, kind, beta, grad, got, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, slow(torch.bfloat16)])  # bf16: CI only
@pytest.mark.parametrize("chunk_mib", [1e-9, slow(2**-8), 1.0])
def test_backward_matmul_chunks(chunk_mib, dtype):
    # 1e-9: 16-column chunks (one tile each) and two row passes (16 + 5 rows, d W accumulated across them);
    # 2**-8: 48 + 35 columns (fp32); 1.0: one chunk. Every row selected, a bias: the same gradients
    prob = make_problem("linear", dtype, seed=11, n=21, vocab=83)
    grad = torch.randn(prob.num_rows, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    got = tb.backward(prob, "jsd", grad, saved_for(prob, 0.3), 0.3, config=dict(SMALL, bwd_chunk_mib=chunk_mib))
    check_backward(prob, "jsd", 0.3, grad, got, TOL[dtype])
    if dtype == torch.float32:
        tiles = tb.backward(prob, "jsd", grad, saved_for(prob, 0.3), 0.3, config=TILES)
        for a, b in zip(got, tiles):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_backward_entropy_student_only():
    prob = make_problem("student_only", seed=7, vocab=50, ds=40)
    grad = grad_rows_for(prob.num_rows, seed=1)
    got = tb.backward(prob, "entropy", grad, saved_for(prob, 0.5), config=SMALL)
    check_backward(prob, "entropy", 0.5, grad, got, 5e-4)


def test_backward_default_config():
    prob = make_problem("linear", seed=8, vocab=50, ds=40, dt=33)
    grad = grad_rows_for(prob.num_rows, seed=2)
    saved = tb.forward_stats(prob)
    got = tb.backward(prob, "reverse_kl", grad, saved)
    check_backward(prob, "reverse_kl", 0.5, grad, got, 5e-4)


def test_backward_skips_zero_rows():
    """Rows with zero upstream gradient are never read: NaN hidden states there do not leak."""
    prob = make_problem("linear", seed=9)
    grad = grad_rows_for(prob.num_rows, seed=3)
    saved = saved_for(prob, 0.5)
    poisoned = problem_to(prob)
    poisoned.student_hidden = prob.student_hidden.clone()
    poisoned.student_hidden[grad == 0] = float("nan")
    poisoned.teacher_hidden = prob.teacher_hidden.clone()
    poisoned.teacher_hidden[grad == 0] = float("nan")
    for cfg in (SMALL, TILES):
        got = tb.backward(poisoned, "reverse_kl", grad, saved, config=cfg)
        check_backward(prob, "reverse_kl", 0.5, grad, got, 5e-4)

    zero = torch.zeros_like(grad)
    dh, dw, db = tb.backward(prob, "reverse_kl", zero, saved, config=SMALL)
    assert torch.all(dh == 0) and torch.all(dw == 0) and torch.all(db == 0)


def test_backward_fp64_inputs():
    prob = make_problem("linear", torch.float64, seed=10)
    grad = grad_rows_for(prob.num_rows, seed=4)
    got = tb.backward(prob, "jsd", grad, saved_for(prob, 0.3), 0.3, config=SMALL)
    assert all(g.dtype == torch.float64 for g in got)
    check_backward(prob, "jsd", 0.3, grad, got, 5e-4)


# ----------------------------------------------------------------------------------------------- empty


@pytest.mark.parametrize("variant", ["linear", "student_logits"])
def test_empty(variant):
    prob = make_problem(variant, n=0)
    out = tb.forward_stats(prob, config=SMALL)
    assert set(out) == set(ref.forward_stats(prob))
    assert all(v.shape == (0,) for v in out.values())
    assert out["student_argmax"].dtype == torch.int64
    jsd, kl_pm = tb.jsd_forward(prob, out["student_lse"], out["teacher_lse"], 0.3, config=SMALL)
    assert jsd.shape == kl_pm.shape == (0,)
    ds, dw, db = tb.backward(prob, "reverse_kl", torch.zeros(0, device=DEVICE), out, config=SMALL)
    if prob.student_is_linear:
        assert ds.shape == prob.student_hidden.shape
        assert torch.all(dw == 0) and dw.shape == prob.student_weight.shape and torch.all(db == 0)
    else:
        assert ds.shape == prob.student_logits.shape and dw is None and db is None


@pytest.mark.parametrize("strategy", ["matmul", slow("tiles")])
def test_backward_never_allocates_n_by_v(strategy):
    """Forward + backward of the triton backend create no tensor as large as N·V (N=64, V=512, D=8, fp32): the
    matmul strategy's gradient-logit buffer is bounded by bwd_chunk_mib (16 KiB here: 64 columns)."""
    n, v, d = 64, 512, 8
    prob = make_problem("linear", n=n, vocab=v, ds=d, dt=d, pad=0, seed=12)
    cfg = dict(SMALL, bwd_strategy=strategy, bwd_chunk_mib=2**-6)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    with NumelRecorder() as rec:
        saved = tb.forward_stats(prob, config=cfg)
        got = tb.backward(prob, "reverse_kl", grad, saved, config=cfg)
    check_backward(prob, "reverse_kl", 0.5, grad, got, 5e-4)
    largest_input = 4 * max(v * d, n * d)  # bytes of the weight (and its gradient) or the hidden states
    # compared in bytes: the interpreter copies kernel arguments as byte storages (aten.set_ / copy_ of uint8)
    assert any("mm" in op for _, op, _ in rec.sizes) == (strategy == "matmul")
    biggest = max(rec.sizes, key=lambda sz: sz[2])
    assert biggest[2] <= max(largest_input, 2**-6 * 2**20) < 4 * n * v, biggest
