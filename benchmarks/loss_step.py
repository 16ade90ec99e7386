"""The TIPDistillationLoss step against the retention ratio: time and peak memory.

One step = the no-grad scoring pass over every token + the TIP selection + the backward over the selected rows
(``out = loss_fn(h_s, W_s, h_t, W_t, mask); out.loss.backward()``), at ratios 1.0, 0.5, 0.2, 0.1. A ``none`` row
is the plain all-token step, ``tk.fused_linear_divergence(..., reduction="mean").backward()`` (no scoring pass,
no selection). Peak memory: a fresh process per cell; time: all cells in one process, interleaved round by round (so
load from other processes on a shared machine hits every ratio alike and the ratios stay comparable):

* CPU (torch backend): peak = the resident set's peak during the first step minus the resident set once the
  inputs exist (it includes the 4·(N·D_s + V·D_s) bytes of the gradients), with glibc's mmap threshold fixed at
  1 MiB so freed tiles leave the resident set at once (``benchmarks.harness.memory.step_peak``); time = median
  of ``--repeats`` rounds (wall clock).
* CUDA (triton backend): a warm-up step (compilation), then ``torch.cuda.max_memory_allocated`` over one step
  minus the allocation before it; time = median of ``--repeats`` rounds timed with CUDA events.

``vs 1.0`` is the time over the same rule's ratio-1.0 step (the GPU goal: ≤ 0.6 at ratio 0.2);
``ideal`` the GEMM floor's ratio ``(scoring + ρ·backward) / (scoring + backward)`` (docs/design.md §7); ``of floor``
the floor's time over the measured one at the device's dense matmul rate in the same dtype.
Everything it measures with comes from ``benchmarks/harness``: this script only picks the cells.

    PYTHONPATH=. python benchmarks/loss_step.py                       # CPU: B=4, L=1024, V=32768, D=512 (≈4 min)
    PYTHONPATH=. python benchmarks/loss_step.py --device cuda         # triton, B=8, L=1024, V=151936, D=4096, bf16
    PYTHONPATH=. python benchmarks/loss_step.py --quick --out /tmp/ls.md --json /tmp/ls.json   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from benchmarks.harness.inputs import SHORT_DTYPES, clear_grads, dtype_of, make_inputs  # noqa: E402
from benchmarks.harness.memory import MIB, step_peak  # noqa: E402
from benchmarks.harness.report import (  # noqa: E402
    RATIO_COLUMNS, env_markdown, markdown_table, parse_csv, ratio_rows, write_json, write_text,
)
from benchmarks.harness.runner import alternate, run_json_worker  # noqa: E402
from benchmarks.harness.timing import dense_matmul_tflops, time_call, timeit  # noqa: E402
from benchmarks.harness.variants import tip_step  # noqa: E402

RATIOS = (1.0, 0.5, 0.2, 0.1)
DEFAULTS = {  # (batch, seq, vocab, d_s, d_t, dtype)
    "cpu": (4, 1024, 32768, 512, 512, "fp32"),
    "cuda": (8, 1024, 151936, 4096, 4096, "bf16"),
    "quick": (2, 64, 2003, 64, 48, "fp32"),
}


def log(msg: str) -> None:
    print(f"[loss_step] {msg}", file=sys.stderr, flush=True)


def worker(a) -> dict:
    """One cell's peak memory in this (fresh) process (and its median time over ``repeats`` steps when > 0)."""
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    inputs = make_inputs(a.batch * a.seq, a.v, a.ds, a.dt, dtype_of(a.dtype), device)
    step = tip_step(a.backend, a.rule, a.ratio, inputs, a.batch, a.seq)
    selected = [0]
    peak = step_peak(lambda: selected.__setitem__(0, step()), device, reset=lambda: clear_grads(inputs))
    out = {"rule": a.rule, "ratio": a.ratio, "backend": a.backend, "n": a.batch * a.seq, "selected": selected[0],
           "peak_extra_bytes": int(peak.extra), "peak_method": peak.method}
    if a.repeats:
        out["time_s"] = timeit(step, device=device, warmup=0, repeats=a.repeats)
    return out


def timing_worker(a, cells) -> dict:
    """All cells' steps timed in one process, alternating round by round (cell 1, cell 2, …, then again). Also
    measures the dense matmul rate of the device in this dtype (the GEMM floor's denominator)."""
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    inputs = make_inputs(a.batch * a.seq, a.v, a.ds, a.dt, dtype_of(a.dtype), device)
    steps = [tip_step(a.backend, rule, ratio, inputs, a.batch, a.seq) for rule, ratio in cells]
    rate = dense_matmul_tflops(device, dtype_of(a.dtype), n=256 if a.quick else (8192 if device.type == "cuda"
                                                                                  else 1024), warmup=1, repeats=5)
    for step in (steps if device.type == "cuda" else steps[:1]):  # compilation on CUDA; process warm-up on CPU
        time_call(step, device)
    times = alternate([lambda s=s: time_call(s, device) for s in steps], a.repeats,
                      on_round=lambda r: log(f"timing round {r + 1}/{a.repeats}"))
    return {"rate_tflops": rate, "time_s": times}


def run(args):
    """Peak memory: a fresh process per cell. Time: one process, cells interleaved. Returns (results, rate)."""
    cells = [(rule, r) for rule in args.rules for r in args.ratios] + ([("none", 1.0)] if args.baseline else [])
    common = ["--device", args.device, "--backend", args.backend, "--batch", str(args.batch), "--seq",
              str(args.seq), "--v", str(args.v), "--ds", str(args.ds), "--dt", str(args.dt), "--dtype", args.dtype,
              "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    results = []
    t_start = time.perf_counter()
    for i, (rule, ratio) in enumerate(cells, 1):
        log(f"memory cell {i}/{len(cells)}: rule={rule} ratio={ratio:g} ({time.perf_counter() - t_start:.0f} s)")
        results.append(run_json_worker([os.path.abspath(__file__), "--worker", "--rule", rule, "--ratio",
                                        str(ratio), "--repeats", "0"] + common))
    log(f"timing {len(cells)} cells × {args.repeats} rounds in one process ({time.perf_counter() - t_start:.0f} s)")
    timing = run_json_worker([os.path.abspath(__file__), "--worker-timing", json.dumps(cells), "--repeats",
                              str(args.repeats)] + common)
    for rec, t in zip(results, timing["time_s"]):
        rec["time_s"] = t
    return results, timing["rate_tflops"]


def rows_of(results: list, rate_tflops, args) -> list:
    rows = ratio_rows(results, rate_tflops, args.ds, args.dt, args.v, time_key="time_s", peak_key="peak_extra_bytes")
    for row in rows:
        if row["rule"] == "none":
            row["rule"] = "none (fused_linear_divergence, all tokens)"
    return rows


HEADERS = [c if c != "peak" else "extra peak" for c in RATIO_COLUMNS]


def report(results: list, rate_tflops, args) -> str:
    n = args.batch * args.seq
    grads = (n * args.ds + args.v * args.ds) * 4 / MIB
    head = (f"# TIP loss step vs retention ratio ({args.backend} backend, {args.device})\n\n"
            f"B={args.batch}, L={args.seq} (N={n} tokens, all valid), V={args.v}, D_s={args.ds}, D_t={args.dt}, "
            f"{args.dtype}. One step = `TIPDistillationLoss(rule, ratio, compute_metrics=False)` forward (scoring "
            f"pass over every token + selection + selected rows' loss) + `loss.backward()`; `none` = "
            f"`tk.fused_linear_divergence(..., reduction='mean').backward()` over all tokens. Fresh process per cell; "
            f"time = median of {args.repeats} steps; extra peak = peak over the inputs "
            f"({results[0]['peak_method']}; on the CPU it includes the {grads:.0f} MiB of fp32 gradients).\n\n"
            f"`vs 1.0` = time over the same rule's ratio-1.0 step; `ideal` = the GEMM floor's ratio "
            f"(scoring + ρ·backward)/(scoring + backward) (docs/design.md §7); `of floor` = floor time / measured "
            f"time at the measured dense {args.dtype} matmul rate ({rate_tflops:.2f} TFLOP/s).")
    return "\n\n".join([head, env_markdown(args.device), markdown_table(rows_of(results, rate_tflops, args),
                                                                            RATIO_COLUMNS, HEADERS)]) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--backend", default=None, help="default: triton on CUDA, torch on the CPU")
    p.add_argument("--rules", default="soft_or,entropy_topk", help="comma-separated TIP rules")
    p.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS))
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the all-token `none` row")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--v", type=int, default=None)
    p.add_argument("--ds", type=int, default=None)
    p.add_argument("--dt", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=SHORT_DTYPES)
    p.add_argument("--repeats", type=int, default=None, help="timed steps per cell (default 3 on CPU, 10 on CUDA)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, one rule, 1 repeat (smoke test, seconds)")
    p.add_argument("--out", default=None, help="Markdown report file (default: print only)")
    p.add_argument("--json", default=None, help="write the per-cell records here")
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-timing", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rule", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ratio", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.backend = a.backend or ("triton" if a.device.startswith("cuda") else "torch")
    key = "quick" if a.quick else ("cuda" if a.device.startswith("cuda") else "cpu")
    for name, value in zip(("batch", "seq", "v", "ds", "dt", "dtype"), DEFAULTS[key]):
        if getattr(a, name) is None:
            setattr(a, name, value)
    if a.repeats is None:
        a.repeats = 1 if a.quick else (10 if a.device.startswith("cuda") else 3)
    a.rules = parse_csv(a.rules)[:1] if a.quick and not a.worker else parse_csv(a.rules)
    a.ratios = parse_csv(a.ratios, float)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.worker_timing:
        print(json.dumps(timing_worker(args, [tuple(c) for c in json.loads(args.worker_timing)])))
        return 0
    t0 = time.perf_counter()
    results, rate = run(args)
    text = report(results, rate, args)
    text += f"\nFinished in {time.perf_counter() - t0:.0f} s.\n"
    print(text)
    write_text(args.out, text)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
