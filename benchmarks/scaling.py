"""Scaling of time and peak memory against the token count N and the vocabulary V, per backend.

The op is the fused reverse KL, ``tk.fused_linear_divergence(h_s, W_s, h_t, W_t, reduction="mean")``, forward +
backward (``--op step``, default) or the no-grad scoring pass ``tk.token_stats`` (``--op scoring``), for the
backends ``reference`` (materialised ``[N, V]`` logits), ``torch`` (chunked) and ``triton`` (CUDA only). Two
sweeps from one run: N at a fixed V, and V at a fixed N. Each point:

* CPU: a forked process per point (peak resident set of its first call minus the inputs, glibc's mmap threshold
  fixed at 1 MiB so freed tiles leave the resident set at once; then the median time of ``--repeats`` calls,
  wall clock). The materialised reference grows as N·V, the chunked backends stay flat.
* CUDA: in one process, ``torch.cuda.max_memory_allocated`` beyond the inputs after a warm-up call, CUDA events.

Peak figures exclude the inputs but include the gradients the step produces (``4·(N·D_s + V·D_s)`` bytes in fp32).

    PYTHONPATH=. python benchmarks/scaling.py                         # CPU, D=512 (≈3 min on 2 cores)
    PYTHONPATH=. python benchmarks/scaling.py --device cuda           # D=4096, bf16, V up to 151936, N up to 16384
    PYTHONPATH=. python benchmarks/scaling.py --quick --out-dir /tmp/s  # seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

import tipkernels as tk  # noqa: E402
from benchmarks.harness.inputs import SHORT_DTYPES, clear_grads, dtype_of, make_inputs  # noqa: E402
from benchmarks.harness.memory import MIB, free_memory, step_peak  # noqa: E402
from benchmarks.harness.report import (  # noqa: E402
    env_markdown, fmt_mib, fmt_ms, markdown_table, parse_csv, pyplot, save_figure, style_axis,
    write_json, write_text,
)
from benchmarks.harness.runner import describe_error, run_in_fork  # noqa: E402
from benchmarks.harness.timing import timeit  # noqa: E402
from benchmarks.harness.variants import backend_loss, loss_step  # noqa: E402

PRESETS = {  # n sweep, fixed v; v sweep, fixed n; d; dtype; backends
    "cpu": dict(ns="512,1024,2048,4096", v=32768, vs="8192,16384,32768,65536", n=2048, d=512, dtype="fp32",
                backends="reference,torch", repeats=2),
    "cuda": dict(ns="1024,2048,4096,8192,16384", v=151936, vs="32000,65536,128256,151936", n=8192, d=4096,
                 dtype="bf16", backends="reference,torch,triton", repeats=10),
    "quick": dict(ns="64,128", v=2048, vs="1024,2048", n=64, d=64, dtype="fp32", backends="reference,torch",
                  repeats=1),
}


def log(msg: str) -> None:
    print(f"[scaling] {msg}", file=sys.stderr, flush=True)


def measure_point(cfg: dict) -> dict:
    """One (backend, N, V) point: peak memory beyond the inputs, then the median time."""
    device = torch.device(cfg["device"])
    inputs = make_inputs(cfg["n"], cfg["v"], cfg["d"], cfg["d"], dtype_of(cfg["dtype"]), device)
    if cfg["op"] == "scoring":
        fn = lambda: tk.token_stats(*inputs, backend=cfg["backend"])  # noqa: E731
    else:
        fn = loss_step(backend_loss(cfg["backend"]), inputs)
    peak = step_peak(fn, device, reset=lambda: clear_grads(inputs))
    seconds = timeit(fn, device=device, warmup=1 if device.type == "cuda" else 0, repeats=cfg["repeats"])
    return {"backend": cfg["backend"], "n": cfg["n"], "v": cfg["v"], "time_s": seconds, "peak_bytes": peak.extra}


def run(args) -> List[dict]:
    points = [("n", n, args.v) for n in args.ns] + [("v", args.n, v) for v in args.vs]
    cells = [(sweep, b, n, v) for sweep, n, v in points for b in args.backends]
    out = []
    t0 = time.perf_counter()
    for i, (sweep, backend, n, v) in enumerate(cells, 1):
        cfg = {"device": args.device, "backend": backend, "n": n, "v": v, "d": args.d, "dtype": args.dtype,
               "op": args.op, "repeats": args.repeats}
        try:
            if args.device == "cuda":
                rec = measure_point(cfg)
            else:
                rec = run_in_fork(measure_point, cfg, threads=args.threads or torch.get_num_threads(),
                                  timeout=args.timeout)
        except Exception as err:  # noqa: BLE001 - an OOM or a failure is a cell's result
            rec = {"backend": backend, "n": n, "v": v, "error": describe_error(err)}
        finally:
            if args.device == "cuda":
                free_memory(args.device)
        rec["sweep"] = sweep
        out.append(rec)
        text = rec.get("error") or f"{fmt_ms(rec['time_s'])}, {fmt_mib(rec['peak_bytes'])}"
        log(f"{i}/{len(cells)} {backend} N={n} V={v}: {text} ({time.perf_counter() - t0:.0f} s so far)")
    return out


def table(records: List[dict], sweep: str, backends) -> str:
    key = "n" if sweep == "n" else "v"
    rows = {}
    for r in records:
        if r["sweep"] != sweep:
            continue
        row = rows.setdefault(r[key], {key.upper(): r[key]})
        row[r["backend"]] = r.get("error") or f"{fmt_ms(r['time_s'])} / {fmt_mib(r['peak_bytes'])}"
    cols = [key.upper()] + list(backends)
    return markdown_table([rows[k] for k in sorted(rows)], cols)


def plot(records: List[dict], args, path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.2))
    for col, sweep in enumerate(("n", "v")):
        for b in args.backends:
            pts = sorted((r[sweep], r["time_s"], r["peak_bytes"] / MIB) for r in records
                         if r["sweep"] == sweep and r["backend"] == b and "error" not in r)
            if pts:
                x, t, m = zip(*pts)
                axes[0][col].plot(x, [1e3 * s for s in t], "o-", label=b)
                axes[1][col].plot(x, m, "o-", label=b)
        fixed = f"V={args.v}" if sweep == "n" else f"N={args.n}"
        for row, ylabel in enumerate(("time (ms)", "peak beyond inputs (MiB)")):
            style_axis(axes[row][col], f"{sweep.upper()} ({fixed}, D={args.d}, {args.dtype})", ylabel, log_x=True,
                       log_y=True)
    fig.suptitle(f"{'reverse KL forward+backward' if args.op == 'step' else 'scoring pass'} on {args.device}",
                 fontsize=10)
    save_figure(fig, path, dpi=64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (smoke run)")
    p.add_argument("--op", default="step", choices=("step", "scoring"))
    p.add_argument("--backends", default=None, help="comma-separated (default: reference,torch[,triton on CUDA])")
    p.add_argument("--ns", default=None, help="token counts of the N sweep")
    p.add_argument("--v", type=int, default=None, help="vocabulary of the N sweep")
    p.add_argument("--vs", default=None, help="vocabularies of the V sweep")
    p.add_argument("--n", type=int, default=None, help="token count of the V sweep")
    p.add_argument("--d", type=int, default=None, help="hidden size of student and teacher")
    p.add_argument("--dtype", default=None, choices=SHORT_DTYPES)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads per CPU point (0: torch's default)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per CPU point")
    p.add_argument("--out-dir", default=None, help="Markdown, PNG and JSON go here (default runs/scaling-<device>)")
    a = p.parse_args(argv)
    preset = PRESETS["quick" if a.quick else a.device]
    for key, value in preset.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.ns, a.vs, a.backends = parse_csv(a.ns, int), parse_csv(a.vs, int), parse_csv(a.backends)
    if a.out_dir is None:
        a.out_dir = os.path.join("runs", f"scaling-{a.device}" + ("-quick" if a.quick else ""))
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    records = run(args)
    what = ("`tk.fused_linear_divergence(reduction='mean')` forward + backward" if args.op == "step"
            else "`tk.token_stats` (no grad)")
    text = "\n\n".join([
        f"# Scaling against N and V ({args.device})\n\n{what}, D_s=D_t={args.d}, {args.dtype}; each cell: median "
        f"time of {args.repeats} calls / peak memory beyond the inputs (gradients included).",
        env_markdown(args.device),
        f"## N sweep (V={args.v})", table(records, "n", args.backends),
        f"## V sweep (N={args.n})", table(records, "v", args.backends),
    ]) + f"\n\nFinished in {time.perf_counter() - t0:.0f} s.\n"
    print(text)
    write_text(os.path.join(args.out_dir, "scaling.md"), text)
    write_json(os.path.join(args.out_dir, "scaling.json"), records)
    try:
        plot(records, args, os.path.join(args.out_dir, "scaling.png"))
    except ImportError as err:
        log(f"no plot: {err}")
    log(f"wrote {args.out_dir}/scaling.md, scaling.json, scaling.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
