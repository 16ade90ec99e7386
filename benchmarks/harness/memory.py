"""Shared helpers of the benchmark scripts: timing, peak memory, the GEMM floor, the report's header and tables.

Timing is the median of repeated runs: CUDA events around the region on CUDA (after a synchronize), the host's
``perf_counter`` on the CPU. Peak memory is what a call allocates beyond what existed before it: the CUDA
caching allocator's statistics on CUDA, the process's resident set (``VmHWM`` after a reset through
``/proc/self/clear_refs``, or a sampling thread where that is refused) on the CPU.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20

PHASES = ("scoring", "forward", "backward", "step")


# ------------------------------------------------------------------------------------------------- timing


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable, device) -> float:
    """Seconds of one ``fn()``: CUDA events around it on CUDA (after a sync), the wall clock elsewhere. Its
    output is released after the clock stops."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    del out
    return seconds


def timeit(fn: Callable, *, device, warmup: int = 1, repeats: int = 5,
           setup: Optional[Callable] = None) -> float:
    """Median seconds of ``fn()`` (or ``fn(setup())`` when ``setup`` is given; setup is not timed)."""

    def call():
        if setup is None:
            return time_call(fn, device)
        arg = setup()
        return time_call(lambda: fn(arg), device)

    for _ in range(max(0, warmup)):
        call()
    return statistics.median(call() for _ in range(max(1, repeats)))


class PhaseTimer:
    """Marks inside one run (``mark("forward")`` after the forward, …); durations between consecutive marks.

    CUDA events on CUDA (read after one synchronize at the end), ``perf_counter`` on the CPU.
    """

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self.marks: List[tuple] = []

    def start(self) -> None:
        self.marks = []
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._add("start")

    def mark(self, name: str) -> None:
        self._add(name)

    def _add(self, name: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def durations(self) -> Dict[str, float]:
        if self.cuda:
            self.marks[-1][1].synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            out[name] = a.elapsed_time(b) / 1e3 if self.cuda else b - a
        return out


# ------------------------------------------------------------------------------------------------- memory


def free_memory(device=None) -> None:
    gc.collect()
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> Optional[int]:
    """Resident set size of this process (None where /proc is absent)."""
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssPeak:
    """Peak resident set size over a region: VmHWM after a reset, and a sampling thread as a fallback.

    ``with RssPeak() as p: work()`` then ``p.extra`` is the peak minus the RSS on entry (bytes).
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.base = 0
        self.peak = 0
        self.method = ""

    def __enter__(self):
        gc.collect()
        self.base = rss_bytes() or 0
        self.peak = self.base
        self.hwm_ok = _reset_hwm()
        self.method = "VmHWM" if self.hwm_ok else "sampled VmRSS"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = rss_bytes() or 0
            if rss > self.peak:
                self.peak = rss
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if self.hwm_ok:
            hwm = _proc_status_kib("VmHWM")
            if hwm is not None:
                self.peak = max(self.peak, hwm * 1024)
        return False

    @property
    def extra(self) -> int:
        return max(0, self.peak - self.base)


def peak_extra_bytes(fn: Callable, device, setup: Optional[Callable] = None) -> int:
    """Bytes allocated by ``fn()`` (or ``fn(setup())``) at its peak beyond what was allocated before it.

    CUDA: ``max_memory_allocated`` after a ``reset_peak_memory_stats`` minus ``memory_allocated`` before (the
    caching allocator's view: tensors, not the cache). CPU: the peak resident set minus the one before
    (:class:`RssPeak`); it includes allocator slack, so treat small figures as noise.
    """
    device = torch.device(device)
    arg = setup() if setup is not None else None
    if device.type == "cuda":
        free_memory(device)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn(arg) if setup is not None else fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out, arg
        return max(0, peak - base)
    with RssPeak() as p:
        out = fn(arg) if setup is not None else fn()
    del out, arg
    return p.extra


class MemoryMarks:
    """Peak allocation per phase of one run: ``begin()``, then ``mark("forward")`` after each phase.

    Each phase's figure is its peak minus the allocation at the phase's start; ``since_begin`` the peak of the
    whole run minus the allocation at ``begin`` (CUDA only; on the CPU see :class:`RssPeak`).
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.phase: Dict[str, int] = {}
        self.end_alloc: Dict[str, int] = {}
        self.since_begin = 0

    def begin(self) -> None:
        free_memory(self.device)
        torch.cuda.synchronize(self.device)
        self.base = self._last = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def mark(self, name: str) -> None:
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.phase[name] = max(0, peak - self._last)
        self.since_begin = max(self.since_begin, peak - self.base)
        self._last = torch.cuda.memory_allocated(self.device)
        self.end_alloc[name] = self._last - self.base
        torch.cuda.reset_peak_memory_stats(self.device)


def is_oom(err: BaseException) -> bool:
    if isinstance(err, getattr(torch.cuda, "OutOfMemoryError", ())) or isinstance(err, MemoryError):
        return True
    text = str(err)
    return "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text


def describe_error(err: BaseException, limit: int = 160) -> str:
    """A one-line cell text: "OOM" for allocation failures, else ``error: Type: message`` (shortened)."""
    if is_oom(err):
        return "OOM"
    msg = " ".join(str(err).split())
    text = f"{type(err).__name__}: {msg}" if msg else type(err).__name__
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return "error: " + text.replace("|", "/")


# ------------------------------------------------------------------------------------------ inputs


def make_inputs(n: int, v: int, d_s: int, d_t: int, dtype: torch.dtype, device, seed: int = 0,
                logit_scale: float = 2.0) -> Tuple[torch.Tensor, ...]:
    """Random student/teacher hidden states and lm_heads (never zeros): logits of standard deviation ≈ scale.

    The student's tensors require grad; the teacher's do not.
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, std=1.0):
        t = torch.randn(*shape, generator=g, device=device, dtype=dtype)
        return t.mul_(std) if std != 1.0 else t

    h_s = randn(n, d_s).requires_grad_(True)
    w_s = randn(v, d_s, std=logit_scale / math.sqrt(d_s)).requires_grad_(True)
    h_t = randn(n, d_t)
    w_t = randn(v, d_t, std=logit_scale / math.sqrt(d_t))
    return h_s, w_s, h_t, w_t



# ------------------------------------------------------------------------------------------ GEMM floor


def gemm_floor_flops(n: int, v: int, d_s: int, d_t: int, ratio: float = 1.0, phase: str = "step") -> float:
    """Matmul FLOPs of DESIGN §5 for ``n`` tokens, vocabulary ``v``, hidden sizes ``d_s``/``d_t``.

    scoring / forward: ``2·N·V·(D_s + D_t)`` (both models' logits, once). backward (of the ``ρ·N`` selected rows):
    ``ρ·N·V·(2D_s + 2D_t + 4D_s)`` (recompute both logit tiles, then ``dh_s`` and ``dW_s``). step: both.
    """
    scoring = 2.0 * n * v * (d_s + d_t)
    backward = ratio * n * v * (2 * d_s + 2 * d_t + 4 * d_s)
    if phase in ("scoring", "forward"):
        return scoring
    if phase == "backward":
        return backward
    if phase == "step":
        return scoring + backward
    raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")


def dense_matmul_tflops(device, dtype: torch.dtype = torch.bfloat16, n: int = 8192, warmup: int = 3,
                        repeats: int = 10) -> float:
    """Measured rate (TFLOP/s, median) of an ``n×n×n`` matmul on random data in ``dtype``."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = timeit(lambda: torch.matmul(a, b, out=out), device=device, warmup=warmup, repeats=repeats)
    del a, b, out
    free_memory(device)
    return 2.0 * n**3 / seconds / 1e12


# ------------------------------------------------------------------------------------------ environment


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def slug(text: str) -> str:
    s = re.sub(r"\(.*?\)", "", text)
    s = re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")
    return s or "device"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + (" (with local changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv)


def env_header(device) -> List[tuple]:
    """(key, value) pairs describing the run: device, driver/CUDA, versions, the command, the date, the commit."""
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - absent or broken triton is itself the information
        triton_version = "not importable"
    rows = [("device", device_name(device))]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rows += [
            ("driver / CUDA (torch)", f"{_driver_version()} / {torch.version.cuda}"),
            ("SMs / memory", f"{props.multi_processor_count} / {props.total_memory / 2**30:.1f} GiB"),
        ]
    rows += [
        ("torch / triton", f"{torch.__version__} / {triton_version}"),
        ("python", platform.python_version()),
        ("host threads", str(torch.get_num_threads())),
        ("commit", _git_commit()),
        ("command", f"`{command_line()}`"),
        ("date (UTC)", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")),
    ]
    return rows


def env_markdown(device) -> str:
    return markdown_table([{"key": k, "value": v} for k, v in env_header(device)], ["key", "value"])


# ------------------------------------------------------------------------------------------ formatting


def markdown_table(rows: Iterable[Dict[str, object]], columns: Sequence[str],
                   headers: Optional[Sequence[str]] = None) -> str:
    """A Markdown table of ``rows`` (dicts) in ``columns`` order; missing entries print as ``–``."""
    headers = list(headers) if headers is not None else list(columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c, "–")
            cells.append(("–" if value is None else str(value)).replace("\n", " "))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt_ms(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    ms = seconds * 1e3
    return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"


def fmt_mib(nbytes: Optional[float]) -> str:
    if nbytes is None:
        return "–"
    mib = nbytes / MIB
    if mib >= 10240:
        return f"{mib / 1024:.1f} GiB"
    return f"{mib:.0f} MiB" if mib >= 10 else f"{mib:.1f} MiB"


def fmt_pct(x: Optional[float]) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.0f}%"


# ------------------------------------------------------------------------------------------ fresh processes


def run_json_worker(args: Sequence[str], *, env: Optional[Dict[str, str]] = None,
                    timeout: Optional[float] = None) -> Dict[str, object]:
    """Run ``python <args…>`` in a fresh process (repository root on ``PYTHONPATH``) and parse its last stdout
    line as JSON: one measurement cell isolated from every other (peak RSS, allocator caches, compiled kernels).

    ``env`` adds variables to the inherited environment. Raises RuntimeError with the tail of stderr when the
    process fails or prints no JSON.
    """
    import json

    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
    full_env.update(env or {})
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO_ROOT, env=full_env,
                         timeout=timeout, check=False)
    lines = [line for line in out.stdout.strip().splitlines() if line.strip()]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"worker {' '.join(args)} exited with {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def parse_csv(text: str, cast: Callable = str) -> list:
    """``"1,0.5, 0.2"`` → ``[cast("1"), cast("0.5"), cast("0.2")]`` (empty items dropped)."""
    return [cast(x.strip()) for x in str(text).split(",") if x.strip()]


def _fork_entry(conn, fn, args, threads) -> None:
    import traceback

    try:
        try:  # die with the parent (a killed benchmark leaves no cell running)
            import ctypes
            import signal

            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if threads:
            torch.set_num_threads(threads)
        conn.send(("ok", fn(*args)))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()[-3000:]}"))
    finally:
        conn.close()


def run_in_fork(fn: Callable, *args, threads: int = 1, timeout: Optional[float] = None):
    """``fn(*args)`` in a forked child process; returns its (picklable) result. Linux only.

    A fresh process per measurement cell without re-importing torch (a few seconds per cell). The child uses
    ``threads`` intra-op threads: a process forked after its parent ran a parallel region must not use OpenMP's
    thread pool (it hangs), so keep 1 unless the parent has run no torch op. Meant for peak-memory cells, not for
    timing. Raises RuntimeError with the child's traceback on failure, TimeoutError past ``timeout``.
    """
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_fork_entry, args=(child, fn, args, threads), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            proc.kill()
            raise TimeoutError(f"forked cell {getattr(fn, '__name__', fn)} ran past {timeout} s")
        status, payload = parent.recv()
    except EOFError:
        status, payload = "error", f"the forked cell died (exit code {proc.join(5) or proc.exitcode})"
    finally:
        parent.close()
        proc.join(10)
    if status != "ok":
        raise RuntimeError(payload)
    return payload


# ------------------------------------------------------------------------------------------ glibc malloc

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _mallopt(param: int, value: int) -> bool:
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except (OSError, AttributeError):
        return False


def malloc_for_memory(threshold: int = MIB) -> bool:
    """glibc: every allocation ≥ ``threshold`` gets its own mmap, so a freed tensor leaves the resident set at once.

    With glibc's default (a dynamic threshold that rises to the largest freed block, up to 32 MiB), freed tiles
    stay in the heap and the peak RSS overstates the peak of live tensors by a few hundred MiB at these shapes.
    Call before a peak-RSS measurement on the CPU (the CUDA allocator's statistics need nothing). False where not
    glibc.
    """
    return _mallopt(_M_MMAP_THRESHOLD, threshold)


def malloc_for_speed() -> bool:
    """glibc: the steady state of its default policy (blocks up to 32 MiB from the heap, kept after free), for
    timing after a :func:`malloc_for_memory` measurement (an mmap per tensor costs page faults on every call)."""
    return _mallopt(_M_MMAP_THRESHOLD, 32 * MIB) and _mallopt(_M_TRIM_THRESHOLD, 64 * MIB)
