"""pytest-benchmark microbenchmarks of every op and backend: forward, backward and full step.

    pytest benchmarks/test_bench_ops.py --benchmark-only                       # CPU: N=512, V=8192, D=256 (≈1 min)
    pytest benchmarks/test_bench_ops.py --benchmark-only --benchmark-group-by=group   # backends side by side
    pytest benchmarks/test_bench_ops.py --benchmark-only -k "torch and step" --bench-shape 2048,32768,512
    pytest benchmarks/test_bench_ops.py --benchmark-only --benchmark-json=runs/bench.json   # on CUDA: triton too

Ops: ``token_stats`` (the no-grad scoring pass), ``fused_linear_divergence`` (reverse KL, forward KL, JSD),
``fused_linear_entropy``, ``divergence_from_logits`` (reverse KL on given logits), ``TIPDistillationLoss``
(ratios 1.0 and 0.2) and ``select_tokens``. Phases: ``forward`` (graph built, no backward), ``backward`` (the
forward runs in the untimed setup) and ``step`` (both). Backends: ``reference`` (materialised logits), ``torch``
(chunked) and, on CUDA, ``triton`` (the interpreter on the CPU is far too slow to benchmark, so triton cases are
skipped without a GPU). Each case is in the benchmark group ``<op>[-<phase>]``; on CUDA the peak memory beyond
the inputs of one call is stored in ``extra_info["peak_mib"]``. Timing uses ``benchmark.pedantic`` with a
``torch.cuda.synchronize`` inside the timed call on CUDA.
"""

from __future__ import annotations

import pytest
import torch

import tipkernels as tk
from benchmarks.harness.inputs import make_inputs
from benchmarks.harness.memory import MIB, peak_extra_bytes
from benchmarks.harness.timing import sync

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
BACKENDS = ["reference", "torch"] + (["triton"] if CUDA else [])
PHASES = ["forward", "backward", "step"]
DIVERGENCES = ["reverse_kl", "forward_kl", "jsd"]


@pytest.fixture(scope="module")
def shape(request):
    text = request.config.getoption("--bench-shape")
    if text:
        n, v, d = (int(x) for x in text.split(","))
        return n, v, d
    return (4096, 151936, 4096) if CUDA else (512, 8192, 256)


@pytest.fixture(scope="module")
def rounds(request):
    return request.config.getoption("--bench-rounds") or (20 if CUDA else 5)


@pytest.fixture(scope="module")
def inputs(shape):
    """Student (requires grad) and teacher hidden states and lm_heads; logits of standard deviation ≈ 2."""
    n, v, d = shape
    return make_inputs(n, v, d, d, DTYPE, DEVICE)


def _record(benchmark, shape, backend, fn):
    n, v, d = shape
    benchmark.extra_info.update({"N": n, "V": v, "D": d, "dtype": str(DTYPE).replace("torch.", ""),
                                 "backend": backend, "device": DEVICE.type})
    if CUDA:
        benchmark.extra_info["peak_mib"] = round(peak_extra_bytes(fn, DEVICE) / MIB, 1)


def _run_phases(benchmark, phase, forward, params, rounds):
    """Time ``forward()`` (returns a scalar loss), its backward, or both, with ``pedantic`` rounds."""
    def clear():
        for p in params:
            p.grad = None

    if phase == "forward":
        def target():
            with torch.enable_grad():
                out = forward()
            sync(DEVICE)
            return out
        benchmark.pedantic(target, setup=clear, rounds=rounds, warmup_rounds=1)
    elif phase == "backward":
        def setup():
            clear()
            loss = forward()
            sync(DEVICE)
            return (loss,), {}

        def target(loss):
            loss.backward()
            sync(DEVICE)
        benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1)
    else:
        def target():
            clear()
            forward().backward()
            sync(DEVICE)
        benchmark.pedantic(target, rounds=rounds, warmup_rounds=1)


def _skip_unavailable(backend):
    if backend == "triton" and not CUDA:
        pytest.skip("triton is benchmarked on CUDA only")


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_stats(benchmark, backend, inputs, shape, rounds):
    _skip_unavailable(backend)
    h_s, w_s, h_t, w_t = inputs
    benchmark.group = "token_stats"

    def fn():
        out = tk.token_stats(h_s, w_s, h_t, w_t, backend=backend)
        sync(DEVICE)
        return out
    _record(benchmark, shape, backend, fn)
    stats = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
    assert torch.isfinite(stats.reverse_kl).all()


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_divergence(benchmark, backend, divergence, phase, inputs, shape, rounds):
    _skip_unavailable(backend)
    h_s, w_s, h_t, w_t = inputs
    benchmark.group = f"fused_linear_divergence[{divergence}]-{phase}"

    def forward():
        return tk.fused_linear_divergence(h_s, w_s, h_t, w_t, divergence=divergence, reduction="mean",
                                          backend=backend)
    _record(benchmark, shape, backend, lambda: forward().backward())
    _run_phases(benchmark, phase, forward, (h_s, w_s), rounds)


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_entropy(benchmark, backend, phase, inputs, shape, rounds):
    _skip_unavailable(backend)
    h_s, w_s, _, _ = inputs
    benchmark.group = f"fused_linear_entropy-{phase}"

    def forward():
        return tk.fused_linear_entropy(h_s, w_s, reduction="mean", backend=backend)
    _record(benchmark, shape, backend, lambda: forward().backward())
    _run_phases(benchmark, phase, forward, (h_s, w_s), rounds)


@pytest.fixture(scope="module")
def logits(inputs):
    h_s, w_s, h_t, w_t = inputs
    with torch.no_grad():
        s = (h_s @ w_s.t()).requires_grad_()
        u = h_t @ w_t.t()
    return s, u


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_divergence_from_logits(benchmark, backend, phase, logits, shape, rounds):
    _skip_unavailable(backend)
    s, u = logits
    benchmark.group = f"divergence_from_logits-{phase}"

    def forward():
        return tk.divergence_from_logits(s, u, divergence="reverse_kl", reduction="mean", backend=backend)
    _record(benchmark, shape, backend, lambda: forward().backward())
    _run_phases(benchmark, phase, forward, (s,), rounds)


@pytest.mark.parametrize("ratio", [1.0, 0.2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tip_loss_step(benchmark, backend, ratio, inputs, shape, rounds):
    """TIPDistillationLoss forward (scoring + selection + selected rows) + backward, rule soft_or."""
    _skip_unavailable(backend)
    h_s, w_s, h_t, w_t = inputs
    n = shape[0]
    batch = 4 if n % 4 == 0 else 1
    hs3, ht3 = h_s.view(batch, n // batch, -1), h_t.view(batch, n // batch, -1)
    mask = torch.ones(batch, n // batch, dtype=torch.bool, device=DEVICE)
    loss_fn = tk.TIPDistillationLoss(rule="soft_or", ratio=ratio, backend=backend, compute_metrics=False)
    benchmark.group = f"TIPDistillationLoss[ratio={ratio:g}]-step"

    def forward():
        return loss_fn(hs3, w_s, ht3, w_t, mask).loss
    _record(benchmark, shape, backend, lambda: forward().backward())
    _run_phases(benchmark, "step", forward, (h_s, w_s), rounds)


@pytest.mark.parametrize("rule", ["entropy_topk", "soft_or", "q3", "entropy_sample"])
def test_select_tokens(benchmark, rule, shape, rounds):
    n = shape[0]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    b = 4 if n % 4 == 0 else 1
    stats = tk.TokenStats(entropy_norm=torch.rand(b, n // b, generator=g, device=DEVICE),
                          reverse_kl=torch.rand(b, n // b, generator=g, device=DEVICE),
                          forward_kl=torch.rand(b, n // b, generator=g, device=DEVICE))
    mask = torch.rand(b, n // b, generator=g, device=DEVICE) > 0.1
    benchmark.group = "select_tokens"
    benchmark.extra_info.update({"rule": rule, "tokens": n, "device": DEVICE.type})

    def fn():
        sel = tk.select_tokens(stats, mask, rule=rule, ratio=0.2, generator=g)
        sync(DEVICE)
        return sel
    sel = benchmark.pedantic(fn, rounds=max(rounds, 20), warmup_rounds=1)
    assert int(sel.mask.sum()) > 0
