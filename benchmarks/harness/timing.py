"""Timing: one clock around one call, medians over repeats after warm-up, phase marks inside one run, and the
GEMM floor with the dense matmul rate that prices it.

The clock is CUDA events around the region on CUDA (after a synchronize) and the host's ``perf_counter``
elsewhere. Every figure the benchmarks print is a median.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch

from .memory import free_memory

PHASES = ("scoring", "forward", "backward", "step")


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


def timeit(fn: Callable, *, device, warmup: int = 1, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(max(0, warmup)):
        time_call(fn, device)
    return statistics.median(time_call(fn, device) for _ in range(max(1, repeats)))


def pick_repeats(first_s: float, max_repeats: int, target_s: float, min_repeats: int = 3) -> int:
    """How many timed repeats fit in about ``target_s`` when one call took ``first_s`` (at least
    ``min(min_repeats, max_repeats)``, at most ``max_repeats``)."""
    if first_s <= 0:
        return max_repeats
    return int(max(min(min_repeats, max_repeats), min(max_repeats, target_s / first_s)))


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


# ------------------------------------------------------------------------------------------ GEMM floor


def gemm_floor_flops(n: int, v: int, d_s: int, d_t: int, ratio: float = 1.0, phase: str = "step") -> float:
    """Matmul FLOPs of ``n`` tokens, vocabulary ``v``, hidden sizes ``d_s``/``d_t`` (docs/design.md §4).

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


def copy_bandwidth_tbs(device, nbytes: int = 2**31, warmup: int = 3, repeats: int = 10) -> float:
    """Measured device-to-device copy bandwidth (TB/s, bytes read plus bytes written, median) of ``nbytes``."""
    device = torch.device(device)
    a = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    b = torch.empty_like(a)
    seconds = timeit(lambda: b.copy_(a), device=device, warmup=warmup, repeats=repeats)
    del a, b
    free_memory(device)
    return 2.0 * nbytes / seconds / 1e12
