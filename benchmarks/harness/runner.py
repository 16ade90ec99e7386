"""Where a measurement runs: a fresh process per cell (a subprocess returning JSON, or a fork), rounds that
alternate between variants in one process, the whole run's time budget and a per-cell deadline, and the test
suite in a subprocess.

A fresh process isolates a cell from every other (peak RSS, allocator caches, compiled kernels); alternation
makes load from other processes on a shared machine hit every variant alike, so their ratios stay comparable.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .memory import RssPeak, is_oom, malloc_for_memory, malloc_for_speed

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env_with_repo(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def run_json_worker(args: Sequence[str], *, env: Optional[Dict[str, str]] = None,
                    timeout: Optional[float] = None) -> Dict[str, object]:
    """Run ``python <args…>`` in a fresh process (repository root on ``PYTHONPATH``) and parse its last stdout
    line as JSON.

    ``env`` adds variables to the inherited environment. Raises RuntimeError with the tail of stderr when the
    process fails or prints no JSON.
    """
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO_ROOT,
                         env=_env_with_repo(env), timeout=timeout, check=False)
    lines = [line for line in out.stdout.strip().splitlines() if line.strip()]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"worker {' '.join(args)} exited with {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def _fork_entry(conn, fn, args, threads) -> None:
    import traceback

    try:
        try:  # die with the parent (a killed benchmark leaves no cell running)
            import ctypes

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


def alternate(calls: Sequence[Callable[[], float]], rounds: int,
              on_round: Optional[Callable[[int], None]] = None) -> List[float]:
    """Median seconds of each of ``calls`` (each returns its own seconds) over ``rounds`` rounds that call them in
    turn: call 1, call 2, …, then again."""
    times: List[List[float]] = [[] for _ in calls]
    for r in range(max(1, rounds)):
        if on_round is not None:
            on_round(r)
        for i, call in enumerate(calls):
            times[i].append(call())
    return [statistics.median(t) for t in times]


def load_average() -> str:
    """The machine's load average over 1, 5 and 15 minutes (``/proc/loadavg``), e.g. ``"1.52 1.40 1.33"``."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def rotating_rounds(names: Sequence[str], rounds: int, run: Callable[[str], dict], label: str) -> List[dict]:
    """``rounds`` rounds of ``run(name)`` over ``names``, the order rotated by one each round (round r starts at
    ``names[r]``): per round ``{name: run(name), "load_before": …, "load_after": …}`` (:func:`load_average`), with
    a progress line per call on stderr starting with ``label``."""
    out = []
    for r in range(rounds):
        order = list(names[r % len(names):]) + list(names[: r % len(names)])
        got = {"load_before": load_average()}
        for name in order:
            print(f"{label} round {r + 1}/{rounds}: {name} (load {load_average()})", file=sys.stderr, flush=True)
            got[name] = run(name)
        got["load_after"] = load_average()
        out.append(got)
    return out


def round_figures(rounds: Sequence[dict], name: str, base: str) -> Dict[str, object]:
    """Figures of variant ``name`` over :func:`rotating_rounds` of :func:`step_cell` results, against ``base``:
    ``time`` (median of every timed step, s), ``ratios`` (per round, median time over ``base``'s), ``ratio``
    (their median), ``peak`` (median extra peak, bytes) and ``mem`` (``peak`` over ``base``'s)."""
    ratios = [statistics.median(r[name]["times"]) / statistics.median(r[base]["times"]) for r in rounds]
    peak = statistics.median(r[name]["peak_extra_bytes"] for r in rounds)
    base_peak = statistics.median(r[base]["peak_extra_bytes"] for r in rounds)
    return {"time": statistics.median(t for r in rounds for t in r[name]["times"]), "ratios": ratios,
            "ratio": statistics.median(ratios), "peak": peak, "mem": peak / max(base_peak, 1)}


def step_cell(name: str, step: Callable, inputs: Sequence[torch.Tensor], repeats: int) -> Dict[str, object]:
    """In a fresh process: the peak extra RSS of the first ``step(*inputs)`` (forward + backward, returns the loss;
    ``inputs[0]``, ``inputs[1]`` are leaves whose ``.grad`` it fills), then the time of ``repeats`` more steps.
    Returns ``variant``, ``peak_extra_bytes``, ``peak_method``, ``times`` (s), ``loss`` and the first step's
    gradient norms ``grad_norm_h``, ``grad_norm_w``."""
    hs, ws = inputs[0], inputs[1]
    malloc_for_memory()
    with RssPeak() as peak:
        loss = step(*inputs)
    norms = (float(hs.grad.norm()), float(ws.grad.norm()))
    malloc_for_speed()
    times = []
    for _ in range(repeats):
        hs.grad = ws.grad = None
        t0 = time.perf_counter()
        step(*inputs)
        times.append(time.perf_counter() - t0)
    return {"variant": name, "peak_extra_bytes": peak.extra, "peak_method": peak.method, "times": times,
            "loss": float(loss.detach()), "grad_norm_h": norms[0], "grad_norm_w": norms[1]}


# ------------------------------------------------------------------------------------------------- budgets


class Budget:
    """Wall-clock budget of the whole run, from its creation (``seconds=None``: unbounded)."""

    def __init__(self, seconds: Optional[float]):
        self.t0 = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def exhausted(self, reserve: float = 0.0) -> bool:
        return self.left() <= reserve

    def cell_timeout(self, limit: float, reserve: float = 5.0, least: float = 5.0) -> float:
        """``limit``, shortened to what the budget has left minus ``reserve`` (at least ``least``)."""
        return limit if self.seconds is None else max(least, min(limit, self.left() - reserve))


class CellTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: Optional[float]):
    """Raise CellTimeout in the main thread after ``seconds`` (interrupts Python code, e.g. a long compile)."""
    usable = (seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
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


# ------------------------------------------------------------------------------------------------- failures


def describe_error(err: BaseException, limit: int = 160) -> str:
    """A one-line cell text: "OOM" for allocation failures, else ``error: Type: message`` (shortened)."""
    if is_oom(err):
        return "OOM"
    msg = " ".join(str(err).split())
    text = f"{type(err).__name__}: {msg}" if msg else type(err).__name__
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return "error: " + text.replace("|", "/")


def failure_text(err: BaseException) -> str:
    """A failed cell's text (``timeout (…)``, ``OOM`` or ``error: …``); the traceback of anything unexpected (not
    an OOM, not a timeout) goes to stderr."""
    if isinstance(err, CellTimeout):
        return f"timeout ({err})"
    if not is_oom(err):
        traceback.print_exception(type(err), err, err.__traceback__)
    return describe_error(err)


class Attempt:
    """``with Attempt(cleanup) as a: measure()``: an exception inside is caught and kept as ``a.text`` (the cell's
    text, :func:`failure_text`) and ``a.oom``; ``cleanup()`` runs after, failure or not. The exception itself is
    dropped (its frames hold tensors)."""

    def __init__(self, cleanup: Optional[Callable] = None):
        self.cleanup, self.text, self.oom = cleanup, None, False

    def __enter__(self):
        return self

    def __exit__(self, typ, err, tb) -> bool:
        caught = isinstance(err, Exception)
        try:
            if caught:
                self.text, self.oom = failure_text(err), is_oom(err)
        finally:
            if self.cleanup is not None:
                self.cleanup()
        return caught


# ------------------------------------------------------------------------------------------------- tests


def run_pytest(extra_args: Sequence[str], *, timeout: float, logfile: str,
               log: Callable[[str], None] = print, paths: Sequence[str] = ("tests",)) -> str:
    """``pytest -q tests`` (or ``paths``; without the benchmark smoke tests) in a subprocess group killed after
    ``timeout``; the whole output goes to ``logfile``. Returns a Markdown summary: the command, the result, first
    failures."""
    import importlib.util

    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *paths,
           "--ignore=tests/test_benchmarks_smoke.py"]
    workers = min(8, os.cpu_count() or 1)
    if workers > 1 and importlib.util.find_spec("xdist") is not None:  # Triton's compiles are CPU-bound
        cmd += ["-n", str(workers)]
    cmd += list(extra_args)
    log(f"[tests] {' '.join(cmd)} (timeout {timeout:.0f} s)")
    t0 = time.monotonic()
    with open(logfile, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env_with_repo(), stdout=f, stderr=subprocess.STDOUT,
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
    if rc != 0:
        text += ["", "```", *[ln[:300] for ln in lines[-15:] if ln.strip()], "```"]
    log(f"[tests] {status} after {took:.0f} s: {summary}")
    return "\n".join(text)


class Skips:
    """Which cells of a grid to skip, and why: every cell once the budget is spent; after an OOM at a shape, that
    variant's cells at shapes at least as large; after a compile/run failure of a compiled variant, its later
    cells."""

    def __init__(self, budget: Budget, reserve: float = 10.0):
        self.budget, self.reserve = budget, reserve
        self.oom_at: Dict[str, List[tuple]] = {}
        self.broken: Dict[str, str] = {}
        self.for_budget = 0

    def reason(self, name: str, shape: tuple) -> Optional[str]:
        if name in self.broken:
            return f"skipped ({self.broken[name]})"
        smaller = [s for s in self.oom_at.get(name, []) if all(a <= b for a, b in zip(s, shape))]
        if smaller:
            return "skipped (OOM at " + ", ".join(f"{k}={x}" for k, x in zip(("N", "V"), smaller[0])) + ")"
        if self.budget.exhausted(self.reserve):
            self.for_budget += 1
            return "skipped (time budget)"
        return None

    def failed(self, name: str, shape: tuple, oom: bool, compiled: bool) -> bool:
        """Record a failure; True when the variant is now broken (a compiled variant's non-OOM failure)."""
        if oom:
            self.oom_at.setdefault(name, []).append(shape)
        elif compiled:
            self.broken[name] = "compile/run failed at " + ", ".join(f"{k}={x}" for k, x in zip(("N", "V"), shape))
            return True
        return False
