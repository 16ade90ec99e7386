"""Reference (materialised logits) vs the chunked torch backend on the CPU: time and peak memory (docs/design.md §3).

Reverse KL, forward + backward, fused from hidden states (fp32). Each variant runs in a fresh process: its peak
memory is the peak resident set during the first forward+backward minus the resident set once the inputs exist
(glibc's mmap threshold fixed at 1 MiB for that step, so freed tiles leave the resident set at once:
``benchmarks.common.malloc_for_memory``); its time is the median of the following runs (glibc's steady-state
thresholds). Printed as ratios torch / reference from one run.

    python benchmarks/cpu_backends.py                               # N=4096, V=32768, D_s=D_t=512 (≈1 min)
    python benchmarks/cpu_backends.py --n 1024 --v 8192 --repeats 2 --out /tmp/x.md   # a quick look

Goal (docs/design.md §3): the torch backend's extra peak memory ≤ 10% of the reference's, its time ≤ 1.5× the reference's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

import tipkernels as tk  # noqa: E402
from benchmarks.harness.memory import MIB, RssPeak, malloc_for_memory, malloc_for_speed  # noqa: E402
from benchmarks.harness.report import env_markdown, fmt_mib, fmt_ms, markdown_table  # noqa: E402

VARIANTS = ("reference", "torch")


def make_inputs(n: int, v: int, d_s: int, d_t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, d_s, generator=g).requires_grad_()
    ws = (torch.randn(v, d_s, generator=g) / d_s ** 0.5).requires_grad_()
    ht = torch.randn(n, d_t, generator=g)
    wt = torch.randn(v, d_t, generator=g) / d_t ** 0.5
    return hs, ws, ht, wt


def step(backend: str, hs, ws, ht, wt) -> float:
    """One forward + backward of the mean reverse KL; returns the loss (and leaves the gradients)."""
    hs.grad = ws.grad = None
    loss = tk.fused_linear_divergence(hs, ws, ht, wt, divergence="reverse_kl", reduction="mean", backend=backend)
    loss.backward()
    return float(loss)


def worker(args) -> dict:
    """Runs in a fresh process: peak memory of the first step, then the median time of ``repeats`` steps."""
    torch.set_num_threads(args.threads) if args.threads else None
    inputs = make_inputs(args.n, args.v, args.ds, args.dt)
    malloc_for_memory()  # freed tiles leave the resident set at once: the peak of live tensors, not heap slack
    with RssPeak() as peak:
        loss = step(args.worker, *inputs)
    malloc_for_speed()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step(args.worker, *inputs)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"backend": args.worker, "peak_extra_bytes": peak.extra, "peak_method": peak.method,
            "median_s": times[len(times) // 2], "loss": loss}


def run_variant(name: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--n", str(args.n), "--v", str(args.v),
           "--ds", str(args.ds), "--dt", str(args.dt), "--repeats", str(args.repeats),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(results: dict, args) -> str:
    ref, fast = results["reference"], results["torch"]
    mem_ratio = fast["peak_extra_bytes"] / max(ref["peak_extra_bytes"], 1)
    time_ratio = fast["median_s"] / ref["median_s"]
    rows = [{"backend": r["backend"], "time": fmt_ms(r["median_s"]), "extra peak": fmt_mib(r["peak_extra_bytes"]),
             "loss": f"{r['loss']:.6f}"} for r in (ref, fast)]
    goals = [
        {"goal": "torch extra peak ≤ 10% of reference", "measured": f"{100 * mem_ratio:.1f}%",
         "met": "yes" if mem_ratio <= 0.10 else "no"},
        {"goal": "torch time ≤ 1.5× reference", "measured": f"{time_ratio:.2f}×",
         "met": "yes" if time_ratio <= 1.5 else "no"},
    ]
    logits = args.n * args.v * 4 / MIB
    return "\n\n".join([
        f"# Reference vs torch backend on the CPU: reverse KL forward + backward\n\n"
        f"N={args.n}, V={args.v}, D_s={args.ds}, D_t={args.dt}, fp32 (one fp32 [N, V] logits tensor is "
        f"{logits:.0f} MiB); peak = resident set during the first step minus the inputs' baseline, one fresh "
        f"process per backend ({ref['peak_method']}, glibc mmap threshold 1 MiB; the torch figure includes the "
        f"{4 * (args.n * args.ds + args.v * args.ds) / MIB:.0f} MiB of fp32 gradients); time = median of "
        f"{args.repeats} further steps.",
        env_markdown("cpu"),
        markdown_table(rows, ["backend", "time", "extra peak", "loss"]),
        markdown_table(goals, ["goal", "measured", "met"]),
    ]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--v", type=int, default=32768)
    p.add_argument("--ds", type=int, default=512)
    p.add_argument("--dt", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--out", default=None, help="write the Markdown report here too")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    results = {}
    for name in VARIANTS:
        print(f"[cpu_backends] {name} ...", file=sys.stderr, flush=True)
        results[name] = run_variant(name, args)
    text = report(results, args)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
