"""Peak-memory probes: what a call allocates at its peak beyond what existed before it.

CUDA: the caching allocator's statistics (``max_memory_allocated`` after a ``reset_peak_memory_stats``, minus
``memory_allocated`` before: tensors, not the cache). CPU: the process's resident set (``VmHWM`` after a reset
through ``/proc/self/clear_refs``, or a sampling thread where that is refused), with glibc's mmap threshold fixed
at 1 MiB during the measurement so freed tensors leave the resident set at once (:func:`malloc_for_memory`).
"""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

MIB = 2**20


def free_memory(device=None) -> None:
    gc.collect()
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()


def tensor_bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def is_oom(err: BaseException) -> bool:
    if isinstance(err, getattr(torch.cuda, "OutOfMemoryError", ())) or isinstance(err, MemoryError):
        return True
    text = str(err)
    return "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text


# ------------------------------------------------------------------------------------------------- CPU


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


# ------------------------------------------------------------------------------------------------- one call


def _cuda_peak(call: Callable, device: torch.device):
    """(base, peak, output) of ``call()`` in CUDA allocator bytes."""
    free_memory(device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = call()
    torch.cuda.synchronize(device)
    return base, torch.cuda.max_memory_allocated(device), out


def peak_extra_bytes(fn: Callable, device) -> int:
    """Bytes allocated by ``fn()`` at its peak beyond what was allocated before it.

    CUDA: the allocator's statistics; CPU: the peak resident set minus the one before (:class:`RssPeak`; it
    includes allocator slack, so treat small figures as noise).
    """
    device = torch.device(device)
    if device.type == "cuda":
        base, peak, out = _cuda_peak(fn, device)
        del out
        return max(0, peak - base)
    with RssPeak() as p:
        out = fn()
    del out
    return p.extra


@dataclass
class Peak:
    """One call's memory: ``base`` before it, ``peak`` during it (bytes), ``extra`` = peak − base, ``method``."""

    base: int
    peak: int
    method: str

    @property
    def extra(self) -> int:
        return max(0, self.peak - self.base)


def step_peak(fn: Callable, device, *, cuda_warmup: bool = True, reset: Optional[Callable] = None) -> Peak:
    """Peak memory of one ``fn()``: the benchmarks' one recipe for a step's peak.

    CUDA: one untimed warm-up call first (compilation, autotuning; unless ``cuda_warmup=False``), then the
    allocator's peak over the next call. CPU: the first call itself under :class:`RssPeak`, glibc's mmap threshold
    at 1 MiB during it (:func:`malloc_for_memory`) and back to the speed policy after. ``reset()`` (e.g. dropping
    the previous call's gradients) runs just before the measured call, outside it.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if cuda_warmup:
            fn()
            torch.cuda.synchronize(device)
        if reset is not None:
            reset()
        base, peak, out = _cuda_peak(fn, device)
        del out
        return Peak(base, peak, "torch.cuda.max_memory_allocated")
    if reset is not None:
        reset()
    malloc_for_memory()
    try:
        with RssPeak() as p:
            out = fn()
        del out
    finally:
        malloc_for_speed()
    return Peak(p.base, p.peak, f"peak RSS ({p.method}, glibc mmap threshold 1 MiB)")


# ------------------------------------------------------------------------------------------------- phases


class MemoryMarks:
    """Peak allocation per phase of one run: ``begin()``, then ``mark("forward")`` after each phase (CUDA).

    Each phase's figure is its peak minus the allocation at the phase's start; ``since_begin`` the peak of the
    whole run minus the allocation at ``begin``.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.phase: Dict[str, int] = {}
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
        torch.cuda.reset_peak_memory_stats(self.device)

    def close(self) -> None:
        pass


class CpuMarks:
    """The CPU counterpart of :class:`MemoryMarks`: peak resident set per phase (call ``close()`` at the end)."""

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


def marks_for(device):
    device = torch.device(device)
    return MemoryMarks(device) if device.type == "cuda" else CpuMarks()
