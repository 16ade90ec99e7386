"""The Triton backend's cuBLAS-chunk strategy and its gradient in the forward's sweep (docs/design.md §2, §4) against
the float64 reference, on CPU under the Triton interpreter.

Rule (``check_elementwise``, as tests/backends/test_triton.py): error against the float64 truth at most the error of
the reference computed in the input dtype, plus TOL (fp32 5e-4, 16-bit 1e-2, relative to the truth's magnitude);
for the op-level fused_grad tests ``assert_rule`` on the value and every gradient. Chunks are forced small (rows in
ragged chunks of 5, vocabulary chunks of 16 columns, two column splits, fused_grad blocks of 7 rows) so every loop
runs several times.
"""

from dataclasses import replace

import pytest
import torch

triton = pytest.importorskip("triton")

import tipkernels as tk  # noqa: E402
from tests._harness import (  # noqa: E402
    DEVICE, TOL, assert_close64, assert_rule, axis, check_elementwise as check, check_jsd, check_stats, f64, grid,
    make_case, make_problem, reference as ref, run_kind, slow, triton_backend as tb, truth_kind, upstream)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: inf arithmetic in masked lanes

from tipkernels.backends.triton import cublas, strategy  # noqa: E402

CFG = dict(strategy="cublas", epi_block_n=16, epi_block_v=16, split_v=2, block_n=16, block_v=16, block_d=16,
           block_dh=16, bwd_block_n=16, bwd_block_v=16)
VARIANTS = ("linear", "teacher_logits", "student_logits", "student_only", "strided")
CAPS = dict(student_scale=1.3, student_cap=4.0, teacher_scale=0.8, teacher_cap=5.0)


@pytest.fixture
def small_chunks(monkeypatch):
    """cuBLAS chunks of 5 rows x 16 columns (N=13: 5 + 5 + 3 rows; V=37: 16 + 16 + 5 columns)."""
    calls = []

    def shape(cfg, n, vocab, n_buffers):
        calls.append((n, vocab, n_buffers))
        return min(5, n), 16

    monkeypatch.setattr(cublas, "chunk_shape", shape)
    return calls


def capped(prob):
    return replace(prob, **{k: v for k, v in CAPS.items()
                            if prob.has_teacher or not k.startswith("teacher")})


# ----------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("transform", ["identity", "capped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_stats(small_chunks, variant, dtype, transform):
    prob = make_problem(variant, dtype)
    prob = capped(prob) if transform == "capped" else prob
    check_stats(prob, tb.forward_stats(prob, config=CFG), TOL[dtype])
    assert small_chunks, "the cuBLAS-chunk strategy was not taken"


@pytest.mark.parametrize("vocab,ds,dt,n", [(50, 40, 33, 13), (16, 16, 16, 16), (1, 24, 19, 3), (83, 8, 12, 21)])
def test_forward_stats_shapes_and_default_chunks(vocab, ds, dt, n):
    """Odd shapes with the default chunk shape (one chunk) and a 2**-12 MiB budget (many chunks); fp64 and fp16."""
    prob = make_problem("linear", vocab=vocab, ds=ds, dt=dt, n=n, seed=1)
    for mib in (128, 2**-12):
        check_stats(prob, tb.forward_stats(prob, config=dict(CFG, cublas_chunk_mib=mib)), TOL[torch.float32])
    for dtype in (torch.float64, torch.float16):
        p = make_problem("linear", dtype, vocab=vocab, ds=ds, dt=dt, n=n, seed=1)
        check_stats(p, tb.forward_stats(p, config=CFG), TOL[torch.float32 if dtype == torch.float64 else dtype])


def test_default_splits(small_chunks):
    """``split_v`` None (the default): the epilogue grid picks its splits (the fused kernels' grouped-order rule,
    ``group_n``, is not its); forward, JSD pass and the fused_grad sweep."""
    cfg = {k: v for k, v in CFG.items() if k != "split_v"}
    prob = make_problem("linear", seed=7)
    out = tb.forward_stats(prob, config=cfg)
    check_stats(prob, out, TOL[torch.float32])
    jsd, kl_pm = tb.jsd_forward(prob, out["student_lse"], out["teacher_lse"], 0.3, config=cfg)
    check_jsd(prob, jsd, kl_pm, 0.3, TOL[torch.float32])
    values, *_ = cublas.fused_value_and_grad(prob, "reverse_kl", 0.5, torch.ones(prob.num_rows, device=DEVICE),
                                             config=cfg)
    check("reverse_kl", values, ref.forward_stats(f64(prob))["reverse_kl"], ref.forward_stats(prob)["reverse_kl"],
          TOL[torch.float32])


def test_chunk_shape_bounds_the_buffers():
    cfg = dict(cublas_chunk_mib=128, epi_block_v=256)
    rows, cols = cublas.chunk_shape(cfg, 8192, 151936, 2)
    assert (rows, cols) == (8192, 2048) and 2 * 4 * rows * cols <= 128 * 2**20
    rows, cols = cublas.chunk_shape(cfg, 65536, 151936, 2)
    assert cols == 512 and 2 * 4 * rows * cols <= 128 * 2**20 and rows == 32768
    assert cublas.chunk_shape(cfg, 64, 1000, 1) == (64, 1024)  # the whole (padded) vocabulary


def test_extreme_logits_and_minus_inf(small_chunks):
    prob = make_problem("linear", scale=100.0, temperature=0.7, seed=3)
    out = tb.forward_stats(prob, config=CFG)
    assert all(torch.isfinite(v.double()).all() for v in out.values())
    check_stats(prob, out, 5e-4)
    logit_prob = make_problem("student_logits", seed=4)
    z = logit_prob.student_logits.clone()
    z[:, 5:9] = float("-inf")
    masked = replace(logit_prob, student_logits=z)
    finite = replace(logit_prob, student_logits=z.clamp_min(-1e4))
    got, truth = tb.forward_stats(masked, config=CFG), ref.forward_stats(f64(finite))
    for k in ("student_lse", "entropy", "reverse_kl", "teacher_entropy"):
        torch.testing.assert_close(got[k].double(), truth[k], rtol=5e-4, atol=5e-4)
    assert not torch.isnan(got["forward_kl"]).any()


@pytest.mark.parametrize("dtype", [torch.float32, slow(torch.bfloat16)])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("variant", ["linear", "teacher_logits", "student_logits", "capped"])
def test_jsd_forward(small_chunks, variant, beta, dtype):
    prob = make_problem("linear" if variant == "capped" else variant, dtype, seed=5)
    prob = capped(prob) if variant == "capped" else prob
    out = tb.forward_stats(prob, config=CFG)
    jsd, kl_pm = tb.jsd_forward(prob, out["student_lse"], out["teacher_lse"], beta, config=CFG)
    check_jsd(prob, jsd, kl_pm, beta, TOL[dtype])
    if beta == 0.0:
        assert torch.all(kl_pm == 0)


# ----------------------------------------------------------------------------------------------- backward


KINDS = [("entropy", 0.5), ("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0),
         ("lse", 0.5)]


def check_backward(prob, kind, beta, grad, got, tol):
    truth = ref.backward(f64(prob), kind, grad, {}, beta)
    same = ref.backward(prob, kind, grad, {}, beta)
    for name, g, t, s, like in zip(("d_student", "d_weight", "d_bias"), got, truth, same,
                                   (prob.student_hidden, prob.student_weight, prob.student_bias)):
        if like is None:
            assert g is None, name
            continue
        assert g.dtype == like.dtype and g.shape == like.shape, name
        check(f"{kind}({beta}) {name}", g, t, s, tol, relative_to_max=True)
    assert torch.all(got[0][grad == 0] == 0), "rows with zero upstream gradient must get exactly zero"


def saved_for(prob, beta):
    out = tb.forward_stats(prob, config=CFG)
    if prob.has_teacher:
        out["kl_pm"] = tb.jsd_forward(prob, out["student_lse"], out["teacher_lse"], beta, config=CFG)[1]
    return out


@grid("kind,beta,variant,dtype", axis(KINDS, ["ent", "rkl", "fkl", "jsd0", "jsd0.3", "jsd1", "lse"]),
      axis(["linear", "teacher_logits", "strided", "capped"]), axis([torch.float32, torch.bfloat16], ["fp32", "bf16"]),
      slow=lambda kind, beta, variant, dtype: dtype == torch.bfloat16 or (
          variant in ("strided", "capped") and kind not in ("reverse_kl", "jsd")))
def test_backward_recompute(small_chunks, kind, beta, variant, dtype):
    """The recompute backward with cuBLAS chunk logits, a Triton dS kernel and cuBLAS gradient products."""
    prob = make_problem("linear" if variant == "capped" else variant, dtype, seed=6)
    prob = capped(prob) if variant == "capped" else prob
    grad = torch.randn(prob.num_rows, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    grad[::2] = 0.0
    saved = saved_for(prob, beta)
    small_chunks.clear()
    got = tb.backward(prob, kind, grad, saved, beta, config=CFG)
    check_backward(prob, kind, beta, grad, got, TOL[dtype])
    assert small_chunks, "the cuBLAS-chunk backward was not taken"


# ------------------------------------------------------------------------ gradient in the forward's sweep


SWEEP_KINDS = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0), ("entropy", 0.0)]
SWEEP_IDS = ["rkl", "fkl", "jsd0", "jsd0.5", "jsd1", "ent"]
N, V, DS, DT = 29, 101, 40, 19


SWEEP_CFG = dict(CFG, grad_strategy="fused_grad")


@pytest.fixture
def sweep(monkeypatch):
    """fused_grad in blocks of 7 rows (cuBLAS chunks of 11 x 32 for the value-only paths); returns the list of kinds
    the sweep ran. Tests force the strategy with ``tk.set_options(triton_config=dict(SWEEP_CFG, ...))``."""
    monkeypatch.setattr(cublas, "sweep_rows", lambda cfg, prob: min(7, prob.num_rows))
    monkeypatch.setattr(cublas, "chunk_shape", lambda cfg, n, vocab, k: (min(11, n), 32))
    calls = []
    real = cublas.fused_value_and_grad

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(cublas, "fused_value_and_grad", spy)
    return calls


def _fast(kind, beta, reduction, weighting, teacher, dtype, dw):
    """The fast subset: fp32 with the fp32 accumulator, mean, a linear teacher; bf16 accumulated in bf16 once."""
    if reduction != "mean" or teacher != "linear":
        return False
    if dtype == torch.float32:
        return dw == "fp32"
    return dw == "dtype" and weighting == "weights" and kind in ("reverse_kl", "jsd") and beta == 0.5


@grid("kind,beta,reduction,weighting,teacher,dtype,dw", axis(SWEEP_KINDS, SWEEP_IDS), axis(["sum", "mean"]),
      axis(["unweighted", "weights"]), axis(["linear", "logits"]),
      axis([torch.float32, torch.bfloat16], ["fp32", "bf16"]), axis(["fp32", "dtype"], ["dw32", "dw-dtype"]),
      drop=lambda kind, beta, reduction, weighting, teacher, dtype, dw: (
          kind == "entropy" and (weighting == "weights" or teacher == "logits")) or (
          reduction == "sum" and weighting == "weights"),
      slow=lambda *values: not _fast(*values))
def test_fused_grad_matches_float64_truth(sweep, kind, beta, reduction, weighting, teacher, dtype, dw):
    case = make_case(N, V, DS, DT, seed=5, teacher=teacher, dtype=dtype)
    weights = None
    if weighting == "weights":
        weights = torch.rand(N, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
        weights[::4] = 0
        weights = weights.to(DEVICE)
    go = upstream(reduction, case.lead)
    with tk.set_options(triton_config=dict(SWEEP_CFG, sweep_dw=dw)):
        got = run_kind(case, "triton", kind, beta, 0.7, reduction, weights, go)
    assert sweep, "fused_grad was not taken"
    truth = truth_kind(case.cast(torch.float64), kind, beta, 0.7, reduction,
                       None if weights is None else weights.double(), go)
    same = run_kind(case, "reference", kind, beta, 0.7, reduction, weights, go)
    assert_rule(got, same, truth, dtype, what=f"fused_grad {kind}")


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("jsd", 0.3), ("entropy", 0.0)])
def test_fused_grad_transforms(sweep, kind, beta):
    """Scales and soft-caps on both models (the student's cap: its ``1 − tanh²`` formed from the held logits)."""
    case = make_case(N, V, DS, DT, seed=7, transforms=dict(student_logit_scale=1.3, student_softcap=4.0,
                                                          teacher_logit_scale=0.8, teacher_softcap=5.0))
    go = upstream("mean", case.lead)
    with tk.set_options(triton_config=SWEEP_CFG):
        got = run_kind(case, "triton", kind, beta, 0.9, "mean", None, go)
    assert sweep == [kind]
    truth = truth_kind(case.cast(torch.float64), kind, beta, 0.9, "mean", None, go)
    same = run_kind(case, "reference", kind, beta, 0.9, "mean", None, go)
    assert_rule(got, same, truth, torch.float32, what=f"fused_grad capped {kind}")


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("jsd", 0.3)])
def test_strategies_agree(monkeypatch, kind, beta):
    """fused kernels, cuBLAS chunks (recompute) and fused_grad (one block; blocks of 7) give the same value and
    gradients in fp32."""
    case = make_case(31, 67, 21, 13, seed=9, lead=(1, 31))
    weights = torch.rand(1, 31, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    weights[0, ::5] = 0
    go = upstream("mean", case.lead)
    out = {}
    for name, over, rows in (("fused", dict(strategy="fused"), None), ("cublas", dict(strategy="cublas"), None),
                             ("fused_grad", dict(strategy="cublas", grad_strategy="fused_grad"), None),
                             ("fused_grad-7", dict(strategy="cublas", grad_strategy="fused_grad"), 7)):
        if rows is not None:
            monkeypatch.setattr(cublas, "sweep_rows", lambda cfg, prob, r=rows: min(r, prob.num_rows))
        with tk.set_options(triton_config=dict(CFG, **over)):
            out[name] = run_kind(case, "triton", kind, beta, 1.3, "mean", weights, go)
    for name, got in out.items():
        assert_close64(got, out["fused"], tol=2e-5, what=name)


def test_strategy_selection(monkeypatch):
    """forward_choice / grad_choice: "auto" keeps the fused kernels off CUDA; the config forces either; fused_grad
    needs a known upstream gradient and a linear student."""
    prob = make_problem("linear")
    logits = make_problem("student_logits")
    cfg = lambda **kw: {**tb.config.resolve(prob), **kw}  # noqa: E731
    assert strategy.forward_choice(prob, cfg()) == "fused"  # CPU
    assert strategy.forward_choice(prob, cfg(strategy="cublas")) == "cublas"
    assert strategy.grad_choice(prob, cfg(), True) == "recompute"
    assert strategy.grad_choice(prob, cfg(grad_strategy="fused_grad"), True) == "fused_grad"
    assert strategy.grad_choice(prob, cfg(grad_strategy="fused_grad"), False) == "recompute"
    assert strategy.grad_choice(logits, cfg(grad_strategy="fused_grad"), True) == "recompute"
    with tk.set_options(triton_config={"grad_strategy": "fused_grad"}):
        assert tb.grad_strategy(prob, True) == "fused_grad"
    # on CUDA, "auto" by shape (the device is only read, so a meta-device problem stands in for one)
    big = replace(prob, student_hidden=torch.empty(4096, 4096, device="meta"),
                  student_weight=torch.empty(151936, 4096, device="meta"), student_bias=None, teacher_hidden=None,
                  teacher_weight=None, teacher_bias=None, labels=None)
    monkeypatch.setattr(type(big), "device", property(lambda self: torch.device("cuda")), raising=False)
    c = {**cfg(), "sweep_mib": 256}
    assert strategy.forward_choice(big, c) == "cublas"
    assert strategy.grad_choice(big, c, True) == "recompute"  # 256 MiB holds 441 rows < 512
    assert strategy.grad_choice(big, {**c, "sweep_mib": 1024}, True) == "fused_grad"  # 1766 rows
    small = replace(big, student_hidden=torch.empty(64, 4096, device="meta"))
    assert strategy.forward_choice(small, c) == "fused"


@pytest.mark.parametrize("bad", [dict(strategy="cuBLAS"), dict(grad_strategy="fused"), dict(sweep_dw="bf16"),
                                 dict(cublas_chunk_mib=0), dict(sweep_mib=-1), dict(epi_block_v=100)])
def test_bad_strategy_options(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        tk.set_options(triton_config=bad)


@pytest.mark.slow  # ~70 s in the interpreter (many tiny chunks)
def test_never_allocates_n_by_v():
    """The cuBLAS-chunk forward and backward and the fused_grad sweep create no tensor as large as N·V (N=64, V=512,
    D=8, fp32): chunks bounded by ``cublas_chunk_mib``, the sweep's blocks by ``sweep_mib`` (16 KiB each here)."""
    from tests._harness import NumelRecorder

    n, v, d = 64, 512, 8
    prob = make_problem("linear", n=n, vocab=v, ds=d, dt=d, pad=0, seed=12)
    cfg = dict(CFG, cublas_chunk_mib=2**-6, sweep_mib=2**-6)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    with NumelRecorder() as rec:
        saved = tb.forward_stats(prob, config=cfg)
        got = tb.backward(prob, "reverse_kl", grad, saved, config=cfg)
        values, dh, dw, db = tb.fused_value_and_grad(prob, "reverse_kl", 0.5, grad, config=cfg)
    check_backward(prob, "reverse_kl", 0.5, grad, got, 5e-4)
    check_backward(prob, "reverse_kl", 0.5, grad, (dh, dw, db), 5e-4)
    check("values", values, ref.forward_stats(f64(prob))["reverse_kl"], ref.forward_stats(prob)["reverse_kl"], 5e-4)
    largest_input = 4 * max(v * d, n * d)
    biggest = max(rec.sizes, key=lambda sz: sz[2])
    assert biggest[2] <= max(largest_input, 2**-6 * 2**20) < 4 * n * v, biggest
