"""One command for a CUDA machine: the correctness suite compiled on the GPU, then the benchmarks of docs/design.md §4.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/gpu_suite.py --out "$OUT"        # everything (≈10 min)
    python benchmarks/gpu_suite.py --skip-tests --n 8192 --v 151936 --variants triton,liger
    python benchmarks/gpu_suite.py --device cpu --quick --skip-tests --out /tmp/x      # smoke run of every path

Sections, each written to the report as soon as it is done (a run cut short still leaves its file):

1. ``pytest -q -x tests`` in a subprocess with a timeout (``--skip-tests`` to skip), summary line in the report.
2. The measured dense bf16 matmul rate (the GEMM floor's denominator).
3. Reverse KL, fused linear: forward, backward and full step (time: median of device events; peak memory beyond
   inputs and gradients), plus the no-grad scoring pass, for the variants ``triton``, ``torch``, ``reference``
   (materialised logits), ``compiled`` (torch.compile of the torch backend), ``compiled_ref`` (torch.compile of
   the materialised reference formula) and ``liger`` (LigerFusedLinearJSD, jsd_beta=1 = reverse KL, where
   importable); each cell also as the fraction of the GEMM floor reached.
4. The TIP loss step (scoring + selection + selected backward) per rule and ratio, with the time relative to the
   ratio-1.0 step.

With ``--tune``, section 1b runs ``benchmarks/tune_triton.py`` at the goal shape first (``--tune-budget-s``) and the
triton cells then use the tuned table (``tuned_configs.json`` and ``tuning.md`` beside the report).

Every cell runs in try/except: an allocation failure prints ``OOM``, anything else ``error: …``, and the run goes
on. ``--budget-s`` bounds the whole run: cells that would start after it are reported as skipped. Cells run in
priority order (the goal shape N=8192, V=151936 first), the tables are printed in grid order.

Liger-Kernel is pure Python: where it is not installed, a ``liger_kernel-*.whl`` found in ``.whl/`` (or given by
``--liger-wheel``) is unpacked to a temporary folder and imported from there.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import inspect
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

import tipkernels as tk  # noqa: E402
from benchmarks.common import (  # noqa: E402
    MIB, REPO_ROOT, MemoryMarks, PhaseTimer, RssPeak, dense_matmul_tflops,
    describe_error, device_name, env_markdown, fmt_mib, fmt_ms, fmt_pct, free_memory, gemm_floor_flops, is_oom,
    make_inputs, markdown_table, rss_bytes, slug, time_call,
)

ALL_VARIANTS = ("triton", "torch", "reference", "compiled", "compiled_ref", "liger")
TRAIN_PHASES = ("forward", "backward", "step")
ALL_PHASES = ("scoring",) + TRAIN_PHASES
SCORING_VARIANTS = ("triton", "torch", "reference")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GOAL_SHAPE = (8192, 151936)  # (N, V) of issue #3's goals

VARIANT_LABELS = {
    "triton": "tk.fused_linear_divergence(backend='triton')",
    "torch": "tk.fused_linear_divergence(backend='torch') (chunked PyTorch)",
    "reference": "tk.fused_linear_divergence(backend='reference') (materialised [N, V] logits, autograd)",
    "compiled": "torch.compile of a function calling tk.fused_linear_divergence(backend='torch')",
    "compiled_ref": "torch.compile of the materialised reference formula (log_softmax of both logits, KL)",
    "liger": "liger_kernel LigerFusedLinearJSD(jsd_beta=1.0) = reverse KL; computes its gradients inside forward",
}


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------- budget


class Budget:
    """Wall-clock budget of the whole run, from the script's start."""

    def __init__(self, seconds: Optional[float]):
        self.t0 = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def exhausted(self, reserve: float = 0.0) -> bool:
        return self.left() <= reserve


class CellTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: Optional[float]):
    """Raise CellTimeout in the main thread after ``seconds`` (interrupts Python code, e.g. a long compile)."""
    usable = (seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
              and threading_is_main())
    if not usable:
        yield
        return

    def handler(signum, frame):
        raise CellTimeout(f"took longer than {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def threading_is_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------------------------------- inputs


def tensor_bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


# ------------------------------------------------------------------------------------------------ variants


def _liger_module(wheel: Optional[str] = None):
    """LigerFusedLinearJSD, importing liger_kernel from a wheel in .whl/ when it is not installed."""
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
        return LigerFusedLinearJSD
    except ImportError as first:
        wheels = [wheel] if wheel else sorted(glob.glob(os.path.join(REPO_ROOT, ".whl", "liger_kernel-*.whl")))
        if not wheels:
            raise ImportError(f"liger_kernel is not installed ({first}) and no liger_kernel-*.whl in .whl/") from first
        target = tempfile.mkdtemp(prefix="liger_")
        with zipfile.ZipFile(wheels[-1]) as z:
            z.extractall(target)
        sys.path.insert(0, target)
        for name in [m for m in sys.modules if m == "liger_kernel" or m.startswith("liger_kernel.")]:
            del sys.modules[name]
        from liger_kernel.transformers import LigerFusedLinearJSD
        return LigerFusedLinearJSD


def _reference_formula(h_s, w_s, h_t, w_t):
    """Mean reverse KL on materialised logits, as a trainer would write it (the compiled baseline)."""
    s = (h_s @ w_s.t()).float()
    u = (h_t @ w_t.t()).float()
    logp = torch.log_softmax(s, dim=-1)
    logq = torch.log_softmax(u, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def _set_dynamo_limits() -> None:
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))


@dataclass
class Variant:
    name: str
    loss: Optional[Callable] = None          # (h_s, w_s, h_t, w_t) -> scalar loss, differentiable in h_s, w_s
    score: Optional[Callable] = None         # (h_s, w_s, h_t, w_t) -> anything, no grad
    unavailable: Optional[str] = None        # why it cannot run here (every cell prints this)
    compiled: bool = False
    notes: List[str] = field(default_factory=list)
    oom_at: List[Tuple[int, int]] = field(default_factory=list)   # (n, v) where it ran out of memory
    broken: Optional[str] = None             # set after a compile failure/timeout: later cells are skipped
    compile_reported: bool = False


def build_variant(name: str, device: torch.device, liger_wheel: Optional[str] = None) -> Variant:
    v = Variant(name)
    if name in ("triton", "torch", "reference"):
        if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            v.unavailable = "n/a (needs CUDA)"
            return v
        v.loss = lambda hs, ws, ht, wt: tk.fused_linear_divergence(hs, ws, ht, wt, divergence="reverse_kl",
                                                                    reduction="mean", backend=name)
        v.score = lambda hs, ws, ht, wt: tk.token_stats(hs, ws, ht, wt, backend=name)
        return v
    if name == "compiled":
        _set_dynamo_limits()

        def torch_backend_loss(hs, ws, ht, wt):
            return tk.fused_linear_divergence(hs, ws, ht, wt, divergence="reverse_kl", reduction="mean",
                                              backend="torch")

        v.loss = torch.compile(torch_backend_loss)
        v.compiled = True
        return v
    if name == "compiled_ref":
        _set_dynamo_limits()
        v.loss = torch.compile(_reference_formula)
        v.compiled = True
        return v
    if name == "liger":
        if device.type != "cuda":
            v.unavailable = "n/a (needs CUDA)"
            return v
        try:
            cls = _liger_module(liger_wheel)
        except Exception as err:  # noqa: BLE001 - report, do not fail the run
            v.unavailable = "not importable"
            v.notes.append(f"liger: {describe_error(err, 300)}")
            return v
        module = cls(jsd_beta=1.0, temperature=1.0)
        takes_labels = "shift_labels" in inspect.signature(module.forward).parameters
        if takes_labels:
            v.loss = lambda hs, ws, ht, wt: module(hs, ws, ht, wt, None)
        else:
            v.loss = lambda hs, ws, ht, wt: module(hs, ws, ht, wt)
        try:
            import liger_kernel
            v.notes.append(f"liger_kernel {getattr(liger_kernel, '__version__', '?')} from "
                           f"{os.path.dirname(liger_kernel.__file__)}")
        except Exception:  # noqa: BLE001
            pass
        return v
    raise ValueError(f"unknown variant {name!r}; expected one of {ALL_VARIANTS}")


def compile_counters() -> str:
    try:
        from torch._dynamo.utils import counters
        breaks = sum(counters["graph_break"].values())
        frames = counters["stats"].get("unique_graphs", 0)
        return f"{frames} graph(s), {breaks} graph break(s)"
    except Exception:  # noqa: BLE001
        return "graph counters unavailable"


# ---------------------------------------------------------------------------------------------- measuring


class CpuMarks:
    """The CPU counterpart of :class:`benchmarks.common.MemoryMarks`: peak resident set per phase."""

    def __init__(self):
        self.phase: Dict[str, int] = {}
        self.since_begin = 0
        self._peak = None

    def begin(self) -> None:
        gc.collect()
        self.base = self._last = rss_bytes() or 0
        self._peak = RssPeak().__enter__()

    def mark(self, name: str) -> None:
        self._peak.__exit__(None, None, None)
        peak = self._peak.peak
        self.phase[name] = max(0, peak - self._last)
        self.since_begin = max(self.since_begin, peak - self.base)
        self._last = rss_bytes() or 0
        self._peak = RssPeak().__enter__()

    def close(self) -> None:
        if self._peak is not None:
            self._peak.__exit__(None, None, None)
            self._peak = None


def marks_for(device: torch.device):
    return MemoryMarks(device) if device.type == "cuda" else CpuMarks()


def pick_repeats(first_s: float, max_repeats: int, target_s: float, min_repeats: int = 3) -> int:
    if first_s <= 0:
        return max_repeats
    return int(max(min(min_repeats, max_repeats), min(max_repeats, target_s / first_s)))


def measure_train(variant: Variant, inputs, device: torch.device, phases, *, warmup: int, max_repeats: int,
                  target_s: float, cell_timeout: Optional[float]) -> Dict[str, dict]:
    """Forward / backward / step of ``variant.loss`` in one loop (events between the phases).

    Returns {phase: {"time": s, "peak": bytes beyond inputs and gradients}}. Raises on failure.
    """
    h_s, w_s, h_t, w_t = inputs
    backward = "backward" in phases or "step" in phases
    grad_bytes = tensor_bytes(h_s, w_s) if backward else 0

    def once(timer=None, mem=None):
        h_s.grad = None
        w_s.grad = None
        if timer:
            timer.start()
        if mem:
            mem.begin()
        loss = variant.loss(h_s, w_s, h_t, w_t)
        if timer:
            timer.mark("forward")
        if mem:
            mem.mark("forward")
        if backward:
            loss.backward()
            if timer:
                timer.mark("backward")
            if mem:
                mem.mark("backward")
        return loss.detach()

    t_first = time.perf_counter()
    with deadline(cell_timeout):
        for _ in range(max(1, warmup)):
            value = once()
        if not torch.isfinite(value).item():  # also waits for the device
            raise FloatingPointError(f"non-finite loss {value.item()}")
    first = (time.perf_counter() - t_first) / max(1, warmup)

    mem = marks_for(device)
    try:
        once(mem=mem)
    finally:
        if isinstance(mem, CpuMarks):
            mem.close()

    timer = PhaseTimer(device)
    samples: Dict[str, List[float]] = {"forward": [], "backward": [], "step": []}
    with deadline(cell_timeout):
        for _ in range(pick_repeats(first, max_repeats, target_s)):
            once(timer=timer)
            d = timer.durations()
            samples["forward"].append(d["forward"])
            if backward:
                samples["backward"].append(d["backward"])
                samples["step"].append(d["forward"] + d["backward"])
    h_s.grad = None
    w_s.grad = None

    out = {}
    for phase in phases:
        if phase not in TRAIN_PHASES or not samples[phase]:
            continue
        if phase == "forward":
            peak = mem.phase.get("forward")
        elif phase == "backward":
            peak = mem.phase.get("backward", 0) - grad_bytes
        else:
            peak = mem.since_begin - grad_bytes
        out[phase] = {"time": statistics.median(samples[phase]), "peak": max(0, peak) if peak is not None else None}
    return out


def measure_scoring(variant: Variant, inputs, device: torch.device, *, warmup: int, max_repeats: int,
                    target_s: float, cell_timeout: Optional[float]) -> dict:
    h_s, w_s, h_t, w_t = inputs
    hs, ws = h_s.detach(), w_s.detach()

    def once():
        with torch.no_grad():
            return variant.score(hs, ws, h_t, w_t)

    t_first = time.perf_counter()
    with deadline(cell_timeout):
        for _ in range(max(1, warmup)):
            out = once()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        del out
    first = (time.perf_counter() - t_first) / max(1, warmup)
    mem = marks_for(device)
    try:
        mem.begin()
        out = once()
        mem.mark("scoring")
        del out
    finally:
        if isinstance(mem, CpuMarks):
            mem.close()
    timer = PhaseTimer(device)
    times = []
    with deadline(cell_timeout):
        for _ in range(pick_repeats(first, max_repeats, target_s)):
            timer.start()
            out = once()
            timer.mark("scoring")
            times.append(timer.durations()["scoring"])
            del out
    return {"time": statistics.median(times), "peak": mem.phase["scoring"]}


# ------------------------------------------------------------------------------------------------- TIP step


def tip_step_cell(device, *, backend: str, rule: str, ratio: float, batch: int, seq: int, d_s: int, d_t: int,
                  vocab: int, dtype: torch.dtype, warmup: int = 1, repeats: int = 5, target_s: float = 2.0,
                  inputs=None, seed: int = 0, cell_timeout: Optional[float] = None) -> dict:
    """Time and peak memory of one TIP loss step (scoring + selection + selected backward), or the all-token
    fused_linear_divergence step when ``rule == "none"``.

    Returns {"time": median s, "peak": bytes beyond inputs and gradients, "selected": tokens differentiated,
    "n": tokens}. Used by this suite on CUDA and by ``bench_loss_step.py`` on the CPU. Raises on failure.
    """
    device = torch.device(device)
    if inputs is None:
        inputs = make_inputs(batch * seq, vocab, d_s, d_t, dtype, device, seed=seed)
    h_s, w_s, h_t, w_t = inputs
    n = batch * seq
    hs3, ht3 = h_s.view(batch, seq, d_s), h_t.view(batch, seq, d_t)
    mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
    grad_bytes = tensor_bytes(h_s, w_s)
    selected = [n]
    if rule == "none":
        def step():
            loss = tk.fused_linear_divergence(h_s, w_s, h_t, w_t, divergence="reverse_kl", reduction="mean",
                                              backend=backend)
            loss.backward()
    else:
        from tipkernels.loss import TIPDistillationLoss
        try:
            loss_fn = TIPDistillationLoss(rule=rule, ratio=ratio, backend=backend, compute_metrics=False)
        except TypeError:  # an older signature without compute_metrics
            loss_fn = TIPDistillationLoss(rule=rule, ratio=ratio, backend=backend)

        def step():
            out = loss_fn(hs3, w_s, ht3, w_t, mask)
            out.loss.backward()
            selected[0] = out.selection.mask

    def run():
        h_s.grad = None
        w_s.grad = None
        return time_call(step, device)

    with deadline(cell_timeout):
        first = statistics.mean(run() for _ in range(max(1, warmup)))
    mem = marks_for(device)
    try:
        mem.begin()
        run()
        mem.mark("step")
    finally:
        if isinstance(mem, CpuMarks):
            mem.close()
    with deadline(cell_timeout):
        times = [run() for _ in range(pick_repeats(first, repeats, target_s, min_repeats=min(3, repeats)))]
    h_s.grad = None
    w_s.grad = None
    sel = selected[0]
    n_sel = int(sel.sum()) if isinstance(sel, torch.Tensor) else int(sel)
    return {"time": statistics.median(times), "peak": max(0, mem.phase["step"] - grad_bytes), "selected": n_sel,
            "n": n}


def tip_rows(results: List[dict], rate_tflops: Optional[float], d_s: int, d_t: int, vocab: int) -> List[dict]:
    """Table rows for TIP step results (dicts with rule, ratio, time/peak/selected or text)."""
    base = {r["rule"]: r["time"] for r in results if r.get("time") and r["ratio"] == 1.0}
    rows = []
    for r in results:
        row = {"rule": r["rule"], "ratio": f"{r['ratio']:g}", "tokens": f"{r.get('selected', '–')}/{r.get('n', '–')}"}
        if r.get("time") is None:
            row["time"] = r.get("text", "–")
        else:
            row["time"] = fmt_ms(r["time"])
            row["peak"] = fmt_mib(r["peak"])
            b = base.get(r["rule"])
            row["vs 1.0"] = f"{r['time'] / b:.2f}" if b else "–"
            ideal = gemm_floor_flops(1, 1, d_s, d_t, r["ratio"], "step") / gemm_floor_flops(1, 1, d_s, d_t, 1.0,
                                                                                              "step")
            row["ideal vs 1.0"] = f"{ideal:.2f}" if r["rule"] != "none" else "–"
            if rate_tflops:
                flops = gemm_floor_flops(r["n"], vocab, d_s, d_t, r["ratio"], "step")
                row["of floor"] = fmt_pct(flops / (rate_tflops * 1e12) / r["time"])
        rows.append(row)
    return rows


TIP_COLUMNS = ["rule", "ratio", "tokens", "time", "vs 1.0", "ideal vs 1.0", "of floor", "peak"]


# ------------------------------------------------------------------------------------------------- suite


def parse_list(text: str, cast=str) -> list:
    return [cast(x) for x in str(text).split(",") if x.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (smoke test of every path)")
    ap.add_argument("--n", default=None, help="token counts, comma-separated (default 1024,4096,8192,16384)")
    ap.add_argument("--v", default=None, help="vocabulary sizes (default 128256,151936)")
    ap.add_argument("--d", type=int, default=None, help="student hidden size (default 4096)")
    ap.add_argument("--d-teacher", type=int, default=None, help="teacher hidden size (default: --d)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(ALL_VARIANTS)}")
    ap.add_argument("--phases", default=",".join(ALL_PHASES), help=f"subset of {','.join(ALL_PHASES)}")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="most timed repeats per cell (fewer for slow cells)")
    ap.add_argument("--target-s", type=float, default=None, help="aim for about this much timed work per cell")
    ap.add_argument("--matmul-n", type=int, default=None, help="size of the square matmul for the rate")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--tests-timeout", type=float, default=240.0)
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments (space-separated)")
    ap.add_argument("--skip-divergence", action="store_true", help="skip section 3")
    ap.add_argument("--skip-tip", action="store_true", help="skip section 4")
    ap.add_argument("--tip-rules", default="entropy_topk,soft_or")
    ap.add_argument("--tip-ratios", default="1.0,0.5,0.2,0.1")
    ap.add_argument("--tip-shape", default=None, help="B,L,V for the TIP step (default 8,1024,151936)")
    ap.add_argument("--tip-backend", default=None, help="default: triton on CUDA, torch on the CPU")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget of the whole run; later cells are skipped (default 540 on CUDA)")
    ap.add_argument("--cell-timeout", type=float, default=None, help="per cell (compile included), default 150 s")
    ap.add_argument("--liger-wheel", default=None, help="a liger_kernel wheel to import when not installed")
    ap.add_argument("--tune", action="store_true",
                    help="section 1b: tune the triton configs at the goal shape (benchmarks/tune_triton.py) and "
                         "benchmark with the tuned table")
    ap.add_argument("--tune-budget-s", type=float, default=240.0, help="time for the tuning search")
    ap.add_argument("--out", default=None, help="folder of the report (default benchmarks/results)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.quick:
        defaults = dict(n="48,80", v="997,1531", d=48, warmup=1, repeats=2, target_s=0.05, matmul_n=256,
                        tip_shape="2,40,997", cell_timeout=120.0)
    else:
        defaults = dict(n="1024,4096,8192,16384", v="128256,151936", d=4096, warmup=1 if cuda else 1,
                        repeats=10 if cuda else 3, target_s=1.0 if cuda else 5.0, matmul_n=8192 if cuda else 1024,
                        tip_shape="8,1024,151936", cell_timeout=150.0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.budget_s is None and cuda and not args.quick:
        args.budget_s = 540.0
    args.n = parse_list(args.n, int)
    args.v = parse_list(args.v, int)
    args.d_teacher = args.d_teacher or args.d
    if args.variants is None:
        args.variants = ",".join(ALL_VARIANTS if cuda else ("torch", "reference", "compiled", "compiled_ref"))
    args.variants = parse_list(args.variants)
    args.phases = parse_list(args.phases)
    for name in args.variants:
        if name not in ALL_VARIANTS:
            ap.error(f"unknown variant {name!r}; expected some of {','.join(ALL_VARIANTS)}")
    for name in args.phases:
        if name not in ALL_PHASES:
            ap.error(f"unknown phase {name!r}; expected some of {','.join(ALL_PHASES)}")
    args.tip_rules = parse_list(args.tip_rules)
    args.tip_ratios = parse_list(args.tip_ratios, float)
    args.tip_shape = parse_list(args.tip_shape, int)
    if len(args.tip_shape) != 3:
        ap.error("--tip-shape is B,L,V")
    args.tip_backend = args.tip_backend or ("triton" if cuda else "torch")
    args.device = device
    args.dtype_t = DTYPES[args.dtype]
    return args


class Report:
    """The Markdown report: sections in order, rewritten to disk after every change."""

    def __init__(self, path: str, title: str, header: str):
        self.path = path
        self.title = title
        self.header = header
        self.sections: Dict[str, str] = {}

    def set(self, key: str, text: str) -> None:
        self.sections[key] = text
        self.write()

    def text(self) -> str:
        return "\n\n".join([f"# {self.title}", self.header] + list(self.sections.values())) + "\n"

    def write(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(self.text())
        os.replace(tmp, self.path)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def run_tests(args, budget: Budget, out_dir: str) -> str:
    timeout = args.tests_timeout
    if budget.seconds is not None:
        timeout = max(10.0, min(timeout, budget.left() - 60.0))
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "tests",
           "--ignore=tests/test_benchmarks_smoke.py"]
    workers = min(8, os.cpu_count() or 1)
    if workers > 1 and _importable("xdist"):  # Triton's compiles are CPU-bound: spread the tests over the cores
        cmd += ["-n", str(workers)]
    cmd += args.pytest_args.split()
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log(f"[tests] {' '.join(cmd)} (timeout {timeout:.0f} s)")
    t0 = time.monotonic()
    logfile = os.path.join(out_dir, "pytest.log")
    with open(logfile, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    took = time.monotonic() - t0
    with open(logfile, errors="replace") as f:
        lines = f.read().splitlines()
    summary_re = re.compile(r"\b\d+ (passed|failed|error|errors|skipped|deselected)\b|no tests ran")
    summary = next((ln.strip("= ").strip() for ln in reversed(lines) if summary_re.search(ln)), None)
    failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:40]
    status = "timed out" if rc is None else ("passed" if rc == 0 else f"exit code {rc}")
    text = [f"`{' '.join(os.path.basename(c) if i == 0 else c for i, c in enumerate(cmd))}`", "",
            f"- result: **{status}** after {took:.0f} s" + (f" — {summary}" if summary else "")]
    if failures:
        text.append("- first failures:")
        text += [f"  - `{ln[:300]}`" for ln in failures]
    if rc not in (0,):
        tail = [ln for ln in lines[-15:] if ln.strip()]
        text += ["", "```", *[ln[:300] for ln in tail], "```"]
    log(f"[tests] {status} after {took:.0f} s: {summary}")
    return "\n".join(text)


def run_tuning(args, budget: Budget, out_dir: str) -> str:
    """Tune at the goal shape (N=8192, V=151936; ``--quick``: the tuner's tiny shape); write ``tuned_configs.json``
    and ``tuning.md`` to ``out_dir`` and put the table first in ``$TIPKERNELS_TRITON_CONFIGS`` for this process."""
    from benchmarks import tune_triton
    from tipkernels.backends import triton as triton_backend

    table, notes = os.path.join(out_dir, "tuned_configs.json"), os.path.join(out_dir, "tuning.md")
    seconds = args.tune_budget_s if budget.seconds is None else max(0.0, min(args.tune_budget_s, budget.left() - 60))
    argv = ["--device", str(args.device), "--dtype", args.dtype, "--out", table, "--notes", notes,
            "--budget-s", f"{seconds:.0f}"]
    argv += ["--quick"] if args.quick else ["--n", str(GOAL_SHAPE[0]), "--v", str(GOAL_SHAPE[1]), "--d", str(args.d),
                                            "--d-teacher", str(args.d_teacher)]
    log(f"[tune] tune_triton.py {' '.join(argv)}")
    if tune_triton.main(argv) != 0:
        return "the tuner refused to run (see the log)"
    old = os.environ.get(triton_backend.config.TUNED_CONFIGS_ENV)
    os.environ[triton_backend.config.TUNED_CONFIGS_ENV] = table + (os.pathsep + old if old else "")
    with open(notes) as f:
        text = f.read()
    body = text[text.index("Shape:"):]  # without its title and environment table (the report has them)
    return (f"`{table}` is used by every later triton cell (copy its entries into `tipkernels/backends/triton/tuned_configs.json` "
            f"to keep them).\n" + body)


def ordered_grid(args) -> List[Tuple[int, int]]:
    grid = [(n, v) for v in args.v for n in args.n]
    first = [c for c in grid if c == GOAL_SHAPE]
    return first + [c for c in grid if c != GOAL_SHAPE]


def cell_text(res: Optional[dict], floor_s: Optional[float]) -> str:
    if res is None:
        return "–"
    if "text" in res:
        return res["text"]
    parts = [fmt_ms(res["time"])]
    if floor_s:
        parts.append(f"({fmt_pct(floor_s / res['time'])})")
    if res.get("peak") is not None:
        parts.append(f"+{fmt_mib(res['peak'])}")
    return " ".join(parts)


def divergence_tables(args, results: Dict[tuple, dict], rate: Optional[float]) -> str:
    """One table per phase: rows (V, N), a column per variant: time (fraction of floor) +peak."""
    out = []
    d_s, d_t = args.d, args.d_teacher
    for phase in [p for p in ALL_PHASES if p in args.phases]:
        variants = [v for v in args.variants if phase != "scoring" or v in SCORING_VARIANTS]
        if not variants:
            continue
        rows = []
        for v in args.v:
            for n in args.n:
                flops = gemm_floor_flops(n, v, d_s, d_t, 1.0, phase)
                floor_s = flops / (rate * 1e12) if rate else None
                row = {"V": v, "N": n, "floor": fmt_ms(floor_s) if floor_s else f"{flops / 1e12:.2f} TFLOP"}
                for name in variants:
                    row[name] = cell_text(results.get((name, phase, n, v)), floor_s)
                if "triton" in variants and "liger" in variants:
                    a, b = results.get(("triton", phase, n, v)), results.get(("liger", phase, n, v))
                    if a and b and a.get("time") and b.get("time"):
                        row["liger/triton"] = f"{b['time'] / a['time']:.2f}×"
                rows.append(row)
        cols = ["V", "N", "floor"] + variants + (["liger/triton"] if "triton" in variants and "liger" in variants
                                                 else [])
        title = {"scoring": "Scoring pass (tk.token_stats, no grad)", "forward": "Forward (with grad enabled)",
                 "backward": "Backward", "step": "Full step (forward + backward)"}[phase]
        out.append(f"### {title}\n\n" + markdown_table(rows, cols))
    return "\n\n".join(out)


def goals_table(args, results: Dict[tuple, dict], rate: Optional[float], tip_results: List[dict]) -> str:
    n, v = GOAL_SHAPE
    rows = []

    def res(name, phase):
        r = results.get((name, phase, n, v))
        return r if r and r.get("time") else None

    def frac(name, phase):
        r = res(name, phase)
        if r is None or not rate:
            return None
        return gemm_floor_flops(n, v, args.d, args.d_teacher, 1.0, phase) / (rate * 1e12) / r["time"]

    f = frac("triton", "step")
    rows.append({"goal": "full step ≥ 60% of floor (triton)", "measured": fmt_pct(f) if f is not None else "–",
                 "met": "–" if f is None else ("yes" if f >= 0.6 else "no")})
    a, b = res("triton", "step"), res("liger", "step")
    speed = b["time"] / a["time"] if a and b else None
    rows.append({"goal": "full step ≥ 1.5× faster than Liger", "measured": f"{speed:.2f}×" if speed else "–",
                 "met": "–" if speed is None else ("yes" if speed >= 1.5 else "no")})
    peak = a["peak"] if a else None
    rows.append({"goal": "full step extra peak ≤ 256 MiB (triton)", "measured": fmt_mib(peak),
                 "met": "–" if peak is None else ("yes" if peak <= 256 * MIB else "no")})
    f = frac("triton", "scoring")
    rows.append({"goal": "scoring ≥ 70% of floor (triton)", "measured": fmt_pct(f) if f is not None else "–",
                 "met": "–" if f is None else ("yes" if f >= 0.7 else "no")})
    for rule in args.tip_rules:
        t1 = next((r["time"] for r in tip_results if r["rule"] == rule and r["ratio"] == 1.0 and r.get("time")), None)
        t2 = next((r["time"] for r in tip_results if r["rule"] == rule and r["ratio"] == 0.2 and r.get("time")), None)
        q = t2 / t1 if t1 and t2 else None
        rows.append({"goal": f"TIP step ratio 0.2 / ratio 1.0 ≤ 0.6 ({rule})",
                     "measured": f"{q:.2f}" if q else "–", "met": "–" if q is None else ("yes" if q <= 0.6 else "no")})
    shape = f"N={n}, V={v}, D_s={args.d}, D_t={args.d_teacher}"
    return f"Goals of issue #3 at {shape} (TIP step: B·L={args.tip_shape[0]}×{args.tip_shape[1]}, " \
           f"V={args.tip_shape[2]}):\n\n" + markdown_table(rows, ["goal", "measured", "met"])


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    device = args.device
    if device.type == "cuda" and not torch.cuda.is_available():
        log("CUDA is not available here; use --device cpu")
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    out_dir = args.out or os.path.join(REPO_ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    name = device_name(device)
    base = slug(name) + ("-quick" if args.quick else "")
    path = os.path.join(out_dir, base + ".md")
    json_path = os.path.join(out_dir, base + ".json")
    report = Report(path, f"tipkernels benchmarks on {name}", env_markdown(device))
    log(f"[suite] device {name}; report → {path}; budget "
        f"{'none' if budget.seconds is None else f'{budget.seconds:.0f} s'}")
    raw: Dict[str, object] = {"device": name, "args": {k: str(v) for k, v in vars(args).items()}}

    def dump_json():
        with open(json_path, "w") as f:
            json.dump(raw, f, indent=1, default=str)

    # 1. correctness suite
    if args.skip_tests:
        report.set("tests", "## 1. Correctness suite\n\nskipped (`--skip-tests`)")
    else:
        report.set("tests", "## 1. Correctness suite\n\nrunning…")
        try:
            report.set("tests", "## 1. Correctness suite\n\n" + run_tests(args, budget, out_dir))
        except Exception as err:  # noqa: BLE001
            report.set("tests", f"## 1. Correctness suite\n\n{describe_error(err)}")

    # 1b. tuning (the later triton cells use the table it writes)
    if args.tune:
        report.set("tune", "## 1b. Tuning\n\nrunning…")
        try:
            report.set("tune", "## 1b. Tuning\n\n" + run_tuning(args, budget, out_dir))
        except Exception as err:  # noqa: BLE001
            report.set("tune", f"## 1b. Tuning\n\n{describe_error(err)}")
        free_memory(device)

    # 2. dense matmul rate
    rate = None
    try:
        log(f"[matmul] {args.matmul_n}³ {args.dtype} …")
        rate = dense_matmul_tflops(device, args.dtype_t, n=args.matmul_n, warmup=2 if args.quick else 3,
                                   repeats=3 if args.quick else 10)
        text = f"{args.matmul_n}×{args.matmul_n}×{args.matmul_n} {args.dtype} matmul on random data, median: " \
               f"**{rate:.1f} TFLOP/s** (the GEMM floor's denominator)"
        log(f"[matmul] {rate:.1f} TFLOP/s")
    except Exception as err:  # noqa: BLE001
        text = f"matmul rate: {describe_error(err)}; floors are given in TFLOP instead"
        log(f"[matmul] {text}")
    raw["matmul_tflops"] = rate
    report.set("matmul", "## 2. Dense matmul rate\n\n" + text)
    free_memory(device)

    results: Dict[tuple, dict] = {}
    tip_results: List[dict] = []
    notes: List[str] = []

    def write_divergence(status: str = "") -> None:
        body = [f"## 3. Reverse KL, fused linear (D_s={args.d}, D_t={args.d_teacher}, {args.dtype})", "",
                "Cell: median time (fraction of the GEMM floor at the measured matmul rate) +peak memory beyond "
                "inputs and gradients. Floors (docs/design.md §4): scoring/forward `2·N·V·(D_s+D_t)`, backward "
                "`N·V·(2D_s+2D_t+4D_s)`, step both. The backward's peak is counted from the memory held after "
                "the forward.", ""]
        body.append(markdown_table([{"variant": k, "what": VARIANT_LABELS[k]} for k in args.variants],
                                   ["variant", "what"]))
        body += ["", divergence_tables(args, results, rate)]
        if notes:
            body += ["", "Notes:", ""] + [f"- {x}" for x in notes]
        if status:
            body += ["", status]
        report.set("divergence", "\n".join(body))
        report.set("goals", "## Goals\n\n" + goals_table(args, results, rate, tip_results))
        raw["divergence"] = [{"variant": k[0], "phase": k[1], "n": k[2], "v": k[3], **r} for k, r in results.items()]
        dump_json()

    # 3. divergence grid
    if not args.skip_divergence:
        variants = {}
        for vname in args.variants:
            try:
                variants[vname] = build_variant(vname, device, args.liger_wheel)
            except Exception as err:  # noqa: BLE001
                variants[vname] = Variant(vname, unavailable=describe_error(err))
            notes.extend(variants[vname].notes)
        train_phases = [p for p in args.phases if p in TRAIN_PHASES]
        skipped = 0
        for n, v in ordered_grid(args):
            inputs = None
            for vname in args.variants:
                var = variants[vname]
                wanted = list(train_phases) + (["scoring"] if "scoring" in args.phases and vname in SCORING_VARIANTS
                                               else [])
                if not wanted:
                    continue

                def put(text, phases=wanted):
                    for p in phases:
                        results[(vname, p, n, v)] = {"text": text}

                if var.unavailable:
                    put(var.unavailable)
                    continue
                if var.broken:
                    put(f"skipped ({var.broken})")
                    continue
                smaller = [(n2, v2) for n2, v2 in var.oom_at if n2 <= n and v2 <= v]
                if smaller:
                    put(f"skipped (OOM at N={smaller[0][0]}, V={smaller[0][1]})")
                    continue
                if budget.exhausted(reserve=10.0):
                    put("skipped (time budget)")
                    skipped += 1
                    continue
                if inputs is None:
                    try:
                        free_memory(device)
                        inputs = make_inputs(n, v, args.d, args.d_teacher, args.dtype_t, device)
                    except Exception as err:  # noqa: BLE001
                        inputs_error = f"inputs: {describe_error(err)}"
                        for other in args.variants:
                            for p in ALL_PHASES:
                                results.setdefault((other, p, n, v), {"text": inputs_error})
                        err = None
                        break
                timeout = args.cell_timeout
                if budget.seconds is not None:
                    timeout = max(5.0, min(timeout, budget.left() - 5.0))
                log(f"[divergence] {vname:12s} N={n:6d} V={v:6d} {'+'.join(wanted)} …")
                t0 = time.monotonic()
                for group in ([train_phases] if train_phases else []) + ([["scoring"]] if "scoring" in wanted
                                                                         else []):
                    try:
                        if group == ["scoring"]:
                            res = {"scoring": measure_scoring(var, inputs, device, warmup=args.warmup,
                                                              max_repeats=args.repeats, target_s=args.target_s,
                                                              cell_timeout=timeout)}
                        else:
                            res = measure_train(var, inputs, device, group, warmup=args.warmup,
                                                max_repeats=args.repeats, target_s=args.target_s,
                                                cell_timeout=timeout)
                        for p, r in res.items():
                            results[(vname, p, n, v)] = r
                    except Exception as err:  # noqa: BLE001 - one cell's failure must not end the run
                        text = describe_error(err)
                        if isinstance(err, CellTimeout):
                            text = f"timeout ({err})"
                        put(text, group)
                        if is_oom(err):
                            var.oom_at.append((n, v))
                        elif var.compiled:
                            var.broken = f"compile/run failed at N={n}, V={v}"
                            notes.append(f"{vname} at N={n}, V={v}: {text}")
                            if not isinstance(err, CellTimeout):
                                traceback.print_exc()
                            with contextlib.suppress(Exception):
                                torch._dynamo.reset()
                        else:
                            if not is_oom(err):
                                traceback.print_exc()
                        err = None  # drop the traceback's frames (and their tensors)
                    finally:
                        if inputs is not None:
                            inputs[0].grad = None
                            inputs[1].grad = None
                        free_memory(device)
                if var.compiled and var.broken is None and not var.compile_reported:
                    var.compile_reported = True
                    notes.append(f"{vname}: first cell (N={n}, V={v}) including compilation took "
                                 f"{time.monotonic() - t0:.0f} s; {compile_counters()}")
                log("    " + "; ".join(f"{p}: {cell_text(results.get((vname, p, n, v)), None)}" for p in wanted))
                write_divergence()
            del inputs
            free_memory(device)
        write_divergence(f"{skipped} cell(s) skipped for the time budget." if skipped else "")

    # 4. TIP loss step
    if not args.skip_tip:
        batch, seq, vocab = args.tip_shape
        d_s, d_t = args.d, args.d_teacher
        header = (f"## 4. TIP loss step (TIPDistillationLoss forward + backward, backend={args.tip_backend}, "
                  f"B={batch}, L={seq}, V={vocab}, D_s={d_s}, D_t={d_t}, {args.dtype})\n\n"
                  "`vs 1.0`: time over the same rule's ratio-1.0 step (goal ≤ 0.6 at ratio 0.2); `ideal vs 1.0`: "
                  "the GEMM floor's ratio (scoring + ρ·backward); `none`: tk.fused_linear_divergence over all "
                  "tokens (no scoring pass, no selection).\n\n")
        inputs = None
        try:
            free_memory(device)
            inputs = make_inputs(batch * seq, vocab, d_s, d_t, args.dtype_t, device, seed=1)
        except Exception as err:  # noqa: BLE001
            report.set("tip", header + f"inputs: {describe_error(err)}")
        if inputs is not None:
            cells = [(rule, ratio) for rule in args.tip_rules for ratio in args.tip_ratios] + [("none", 1.0)]
            for rule, ratio in cells:
                entry = {"rule": rule, "ratio": ratio, "n": batch * seq}
                if budget.exhausted(reserve=10.0):
                    entry["text"] = "skipped (time budget)"
                else:
                    log(f"[tip] {rule} ratio={ratio:g} …")
                    timeout = args.cell_timeout
                    if budget.seconds is not None:
                        timeout = max(5.0, min(timeout, budget.left() - 5.0))
                    try:
                        entry.update(tip_step_cell(device, backend=args.tip_backend, rule=rule, ratio=ratio,
                                                   batch=batch, seq=seq, d_s=d_s, d_t=d_t, vocab=vocab,
                                                   dtype=args.dtype_t, warmup=args.warmup, repeats=args.repeats,
                                                   target_s=args.target_s, inputs=inputs, cell_timeout=timeout))
                    except Exception as err:  # noqa: BLE001
                        entry["text"] = f"timeout ({err})" if isinstance(err, CellTimeout) else describe_error(err)
                        if not is_oom(err) and not isinstance(err, CellTimeout):
                            traceback.print_exc()
                        err = None
                    finally:
                        inputs[0].grad = None
                        inputs[1].grad = None
                        free_memory(device)
                    log(f"    {fmt_ms(entry.get('time')) if entry.get('time') else entry.get('text')}")
                tip_results.append(entry)
                report.set("tip", header + markdown_table(tip_rows(tip_results, rate, d_s, d_t, vocab), TIP_COLUMNS))
                report.set("goals", "## Goals\n\n" + goals_table(args, results, rate, tip_results))
                raw["tip"] = tip_results
                dump_json()
            del inputs
            free_memory(device)

    report.set("goals", "## Goals\n\n" + goals_table(args, results, rate, tip_results))
    report.set("end", f"Finished in {budget.elapsed():.0f} s.")
    dump_json()
    log("")
    log(report.text())
    log(f"[suite] report written to {path} (raw numbers: {json_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
