"""CPU: a top-k teacher's step (forward + backward, mean reverse KL from hidden states, fp32) against the dense
teacher's, the torch backend, alternated in fresh processes (benchmarks/TUNING.md, c9).

- ``dense``: the teacher as hidden states and lm_head (``fused_grad``: both models' logits in the sweep);
- ``bucket``: ``teacher_topk`` with ``tail="bucket"`` (default strategy: the bin maths in the student's sweep);
- ``bucket-recompute``: the same with the strategy forced to "recompute" (the "lse" row kind + the gather: the
  path before c8);
- ``renormalize``: ``tail="renormalize"`` (the gather only, no LSE).

The top-k ids and log-probabilities are the dense teacher's (its log-softmax's K largest). Each process times
``--repeats`` steps after one warm-up step; the table gives each variant's median over all rounds and the median
over rounds of its ratio to ``dense`` of the same round, with ``uptime``'s load before and after.

    python benchmarks/cpu_topk_fused.py                       # N=1024, V=32768, D=256, K=20, 5 rounds
    python benchmarks/cpu_topk_fused.py --shape 256x8192x64 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

VARIANTS = ("dense", "bucket", "bucket-recompute", "renormalize")


def child(variant: str, n: int, v: int, d: int, k: int, repeats: int) -> None:
    import torch

    import tipkernels as tk
    from benchmarks.harness.inputs import make_inputs
    from benchmarks.harness.lib import chunked as torch_backend

    hs, ws, ht, wt = make_inputs(n, v, d, d, torch.float32, "cpu", seed=0)
    with torch.no_grad():
        lp, ids = torch.log_softmax(ht @ wt.t(), -1).topk(k, -1)
    if variant == "bucket-recompute":
        torch_backend.STRATEGY = "recompute"

    def step():
        hs.grad = ws.grad = None
        if variant == "dense":
            loss = tk.fused_linear_divergence(hs, ws, ht, wt, reduction="mean", backend="torch")
        else:
            tail = "renormalize" if variant == "renormalize" else "bucket"
            loss = tk.fused_linear_divergence(hs, ws, teacher_topk=(ids, lp), tail=tail, reduction="mean",
                                              backend="torch")
        loss.backward()
        return float(loss)

    loss = step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"variant": variant, "times": times, "loss": loss,
                      "grad_norm": float(ws.grad.norm())}))


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1024x32768x256", help="NxVxD")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    n, v, d = (int(x) for x in args.shape.split("x"))
    if args.child:
        return child(args.child, n, v, d, args.k, args.repeats)
    variants = args.variants.split(",")
    print(f"N={n} V={v} D={d} K={args.k}, {args.rounds} rounds x {args.repeats} repeats; load before: {load()}")
    per = {x: [] for x in variants}
    ratios = {x: [] for x in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        got = {}
        for x in order:
            out = subprocess.run([sys.executable, __file__, "--child", x, "--shape", args.shape, "--k", str(args.k),
                                  "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            got[x] = statistics.median(rec["times"])
            per[x] += rec["times"]
            print(f"round {r} {x:17s} {got[x]:7.2f} s  loss {rec['loss']:.6f}  |dW| {rec['grad_norm']:.6f}",
                  flush=True)
        if "dense" in got:
            for x in variants:
                ratios[x].append(got[x] / got["dense"])
    print(f"load after: {load()}")
    print("| variant | median s | median ratio to dense |\n|---|---|---|")
    for x in variants:
        ratio = f"{statistics.median(ratios[x]):.2f}" if ratios[x] else "-"
        print(f"| {x} | {statistics.median(per[x]):.2f} | {ratio} |")


if __name__ == "__main__":
    main()
