"""In-process measurement cells: time (median of device events) and peak memory of one loss, scoring pass or step
on given inputs, with warm-up, a repeat count sized to a time target, and a per-cell deadline.

Each returns plain numbers (seconds, bytes) and raises on failure (an OOM, a compile error, a
:class:`~benchmarks.harness.runner.CellTimeout`): the caller turns the exception into the cell's text.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from .inputs import clear_grads
from .memory import marks_for, tensor_bytes
from .runner import deadline
from .timing import PhaseTimer, pick_repeats, sync, time_call

TRAIN_PHASES = ("forward", "backward", "step")


def _first_seconds(once: Callable, warmup: int, cell_timeout: Optional[float], check=None) -> float:
    """Mean seconds of the warm-up calls (at least one); ``check(last output)`` after them."""
    t0 = time.perf_counter()
    with deadline(cell_timeout):
        for _ in range(max(1, warmup)):
            out = once()
        if check is not None:
            check(out)
    return (time.perf_counter() - t0) / max(1, warmup)


def measure_train(loss: Callable, inputs, device, phases, *, warmup: int, max_repeats: int, target_s: float,
                  cell_timeout: Optional[float]) -> Dict[str, dict]:
    """Forward / backward / step of ``loss(*inputs)`` in one loop (events between the phases).

    Returns ``{phase: {"time": s, "peak": bytes beyond inputs and gradients}}`` for the ``phases`` asked.
    """
    device = torch.device(device)
    backward = "backward" in phases or "step" in phases
    grad_bytes = tensor_bytes(*inputs[:2]) if backward else 0

    def once(timer=None, mem=None):
        marks = [m for m in (timer, mem) if m is not None]
        clear_grads(inputs)
        if timer is not None:
            timer.start()
        if mem is not None:
            mem.begin()
        value = loss(*inputs)
        for m in marks:
            m.mark("forward")
        if backward:
            value.backward()
            for m in marks:
                m.mark("backward")
        return value.detach()

    def finite(value):
        if not torch.isfinite(value).item():  # also waits for the device
            raise FloatingPointError(f"non-finite loss {value.item()}")

    first = _first_seconds(once, warmup, cell_timeout, finite)
    mem = marks_for(device)
    try:
        once(mem=mem)
    finally:
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
    clear_grads(inputs)
    peaks = {"forward": mem.phase.get("forward"), "backward": mem.phase.get("backward", 0) - grad_bytes,
             "step": mem.since_begin - grad_bytes}
    return {p: {"time": statistics.median(samples[p]), "peak": None if peaks[p] is None else max(0, peaks[p])}
            for p in phases if p in TRAIN_PHASES and samples[p]}


def measure_scoring(score: Callable, inputs, device, *, warmup: int, max_repeats: int, target_s: float,
                    cell_timeout: Optional[float]) -> dict:
    """``{"time": median s, "peak": bytes}`` of the no-grad ``score(*inputs)`` (student tensors detached)."""
    device = torch.device(device)
    h_s, w_s, h_t, w_t = inputs
    args = (h_s.detach(), w_s.detach(), h_t, w_t)

    def once():
        with torch.no_grad():
            return score(*args)

    first = _first_seconds(once, warmup, cell_timeout, lambda out: sync(device))
    mem = marks_for(device)
    try:
        mem.begin()
        out = once()
        mem.mark("scoring")
        del out
    finally:
        mem.close()
    with deadline(cell_timeout):
        times = [time_call(once, device) for _ in range(pick_repeats(first, max_repeats, target_s))]
    return {"time": statistics.median(times), "peak": mem.phase["scoring"]}


def measure_step(step: Callable[[], int], inputs, device, *, warmup: int = 1, repeats: int = 5,
                 target_s: float = 2.0, cell_timeout: Optional[float] = None) -> dict:
    """Time and peak memory of a step closure (e.g. :func:`~benchmarks.harness.variants.tip_step`) that returns
    the tokens it differentiated.

    Returns ``{"time": median s, "peak": bytes beyond inputs and gradients, "selected": tokens}``.
    """
    selected = [0]

    def run():
        return time_call(lambda: selected.__setitem__(0, step()), device)

    with deadline(cell_timeout):
        first = statistics.mean(run() for _ in range(max(1, warmup)))
    mem = marks_for(device)
    try:
        clear_grads(inputs)
        mem.begin()
        selected[0] = step()
        mem.mark("step")
    finally:
        mem.close()
    with deadline(cell_timeout):
        times = [run() for _ in range(pick_repeats(first, repeats, target_s, min_repeats=min(3, repeats)))]
    clear_grads(inputs)
    return {"time": statistics.median(times), "peak": max(0, mem.phase["step"] - tensor_bytes(*inputs[:2])),
            "selected": int(selected[0])}
