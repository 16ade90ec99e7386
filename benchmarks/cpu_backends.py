"""CPU, 2 cores: the materialised reference vs the chunked torch backend (each gradient strategy) vs TRL's and
Liger-Kernel's chunked losses, at equal semantics, side by side in one run.

Mean reverse KL KL(p_s || q_t) over N tokens, forward + backward from hidden states (fp32), gradients of the
student's hidden states and lm_head weight:

- ``reference``: tipkernels' materialised logits + plain autograd (the naive baseline).
- ``torch-fused``: the chunked torch backend, strategy "fused_grad" (the gradient formed in the forward's sweep).
- ``torch-recompute``: the same backend, strategy "recompute" (the backward recomputes both models' logits).
- ``trl``: ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` with beta=1 (reverse KL), mean over rows.
- ``liger``: ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(beta=1, weight_hard_loss=0, weight_soft_loss=1,
  compiled=False)``: reverse KL, mean over tokens (it still evaluates its weight-0 hard CE term); optional extra
  ``bench`` (``pip install liger-kernel==0.8.5``), skipped when absent.

Each measurement is a fresh process: its peak memory is the peak resident set during the first step minus the
resident set once the inputs exist (glibc's mmap threshold 1 MiB for that step, so freed buffers leave the
resident set at once); its time is the median of the ``--repeats`` following steps. Variants are run in
alternating rounds (the order rotates each round); the table gives each variant's median over all its timed steps
and the median over rounds of its ratio to the reference of the same round. Every variant's loss and gradient norms
are printed beside the reference's (equal semantics check). The machine is shared: ``uptime``'s load is recorded.

    python benchmarks/cpu_backends.py --out benchmarks/results/cpu-backends.md      # both shapes (≈ 30 min)
    python benchmarks/cpu_backends.py --shapes 512x8192x256 --rounds 1 --repeats 1 --out /tmp/x.md  # a quick look

Goals (docs/design.md §2): the torch backend's time ≤ 0.8× the reference's and below every peer; its extra peak
memory ≤ 10% of the reference's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from benchmarks.harness import runner  # noqa: E402
from benchmarks.harness.inputs import make_inputs  # noqa: E402
from benchmarks.harness.memory import MIB  # noqa: E402
from benchmarks.harness.report import (  # noqa: E402
    env_markdown, fmt_mib, fmt_ms, markdown_table, write_json, write_text)

VARIANTS = ("reference", "torch-fused", "torch-recompute", "trl", "liger")
DEFAULT_SHAPES = "4096x32768x512,2048x65536x1024"


def make_step(variant: str, n: int, v: int):
    """A function (hs, ws, ht, wt) -> loss that runs forward + backward of the mean reverse KL."""
    if variant.startswith("torch") or variant == "reference":
        import tipkernels as tk
        from benchmarks.harness.lib import chunked as torch_backend

        if variant.startswith("torch"):
            torch_backend.STRATEGY = "fused_grad" if variant == "torch-fused" else "recompute"
        backend = "reference" if variant == "reference" else "torch"

        def step(hs, ws, ht, wt):
            loss = tk.fused_linear_divergence(hs, ws, ht, wt, divergence="reverse_kl", reduction="mean",
                                              backend=backend)
            loss.backward()
            return loss
        return step
    if variant == "trl":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        def step(hs, ws, ht, wt):
            div, _entropy = ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, 1.0, 1.0)
            loss = div.mean()
            loss.backward()
            return loss
        return step
    if variant == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, compiled=False)
        labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1))

        def step(hs, ws, ht, wt):
            loss = fn(hs, ws, ht, wt, labels)
            loss.backward()
            return loss
        return step
    raise ValueError(f"unknown variant {variant!r}")


def available(variant: str) -> bool:
    if variant == "liger":
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except ImportError:
            return False
    if variant == "trl":
        try:
            import trl.kernels.chunked_divergence  # noqa: F401
        except ImportError:
            return False
    return True


def worker(args) -> dict:
    """In a fresh process: peak memory of the first step, then the time of ``repeats`` steps."""
    if args.threads:
        torch.set_num_threads(args.threads)
    n, v, d = args.shape
    inputs = make_inputs(n, v, d, d, torch.float32, "cpu", logit_scale=1.0)
    return runner.step_cell(args.worker, make_step(args.worker, n, v), inputs, args.repeats)


def run_variant(name: str, shape, args) -> dict:
    return runner.run_json_worker([os.path.abspath(__file__), "--worker", name, "--shapes",
                                   "x".join(map(str, shape)), "--repeats", str(args.repeats),
                                   "--threads", str(args.threads)])


def measure(shape, variants, args) -> dict:
    rounds = runner.rotating_rounds(variants, args.rounds, lambda name: run_variant(name, shape, args),
                                    f"[cpu_backends] {shape}")
    return {"shape": shape, "rounds": rounds}


def summarise(res: dict, variants) -> list:
    rounds = res["rounds"]
    ref = rounds[0]["reference"]
    rows = []
    for name in variants:
        f = runner.round_figures(rounds, name, "reference")
        x = rounds[0][name]
        rows.append({
            "variant": name, "time (median)": fmt_ms(f["time"]), "× reference (median of rounds)":
            f"{f['ratio']:.2f}", "ratios per round": " ".join(f"{q:.2f}" for q in f["ratios"]),
            "extra peak": fmt_mib(f["peak"]), "% of reference's": f"{100 * f['mem']:.1f}%",
            "loss": f"{x['loss']:.6f}", "‖d h‖ / ref": f"{x['grad_norm_h'] / ref['grad_norm_h']:.6f}",
            "‖d W‖ / ref": f"{x['grad_norm_w'] / ref['grad_norm_w']:.6f}",
            "_ratio": f["ratio"], "_mem": f["mem"],
        })
    return rows


def report(all_res: list, variants, args) -> str:
    cols = ["variant", "time (median)", "× reference (median of rounds)", "ratios per round", "extra peak",
            "% of reference's", "loss", "‖d h‖ / ref", "‖d W‖ / ref"]
    parts = ["# CPU backends: reverse KL forward + backward, fp32, 2 cores\n\n" + __doc__.split("\n\n")[1],
             env_markdown("cpu")]
    for res in all_res:
        n, v, d = res["shape"]
        rows = summarise(res, variants)
        loads = "; ".join(f"round {i + 1}: {r['load_before']} → {r['load_after']}" for i, r in enumerate(res["rounds"]))
        parts.append(f"## N={n}, V={v}, D_s=D_t={d}\n\n{args.rounds} alternating rounds × {args.repeats} timed "
                     f"steps per process; one fp32 [N, V] tensor is {n * v * 4 / MIB:.0f} MiB; the extra peak "
                     f"includes the fp32 gradients ({4 * (n * d + v * d) / MIB:.0f} MiB). Load average (1, 5, 15 "
                     f"min) before → after each round: {loads}.")
        parts.append(markdown_table(rows, cols))
        fused = next(r for r in rows if r["variant"] == "torch-fused")
        peers = [r for r in rows if r["variant"] in ("trl", "liger")]
        goals = [
            {"goal": "torch-fused time ≤ 0.8× reference", "measured": f"{fused['_ratio']:.2f}×",
             "met": "yes" if fused["_ratio"] <= 0.8 else "no"},
            {"goal": "torch-fused below every peer", "measured": ", ".join(
                f"{p['variant']} {p['_ratio']:.2f}×" for p in peers) or "no peer installed",
             "met": "yes" if all(fused["_ratio"] < p["_ratio"] for p in peers) else "no"},
            {"goal": "torch-fused extra peak ≤ 10% of reference's", "measured": f"{100 * fused['_mem']:.1f}%",
             "met": "yes" if fused["_mem"] <= 0.10 else "no"},
        ]
        parts.append(markdown_table(goals, ["goal", "measured", "met"]))
    return "\n\n".join(parts) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated NxVxD")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--out", default=None, help="write the Markdown report here (and the raw results beside it, .json)")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    if args.worker:
        args.shape = shapes[0]
        print(json.dumps(worker(args)))
        return 0
    variants = [v for v in args.variants.split(",") if available(v)]
    skipped = sorted(set(args.variants.split(",")) - set(variants))
    if skipped:
        print(f"[cpu_backends] not installed, skipped: {skipped}", file=sys.stderr)
    all_res = [measure(shape, variants, args) for shape in shapes]
    text = report(all_res, variants, args)
    print(text)
    if args.out:
        write_text(args.out, text)
        write_json(os.path.splitext(args.out)[0] + ".json", all_res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
