"""Cost of ``tk.set_options(deterministic=True)``: time on vs off, same process, interleaved.

One step is the fused reverse KL (or the TIP loss), forward + backward, from hidden states. Rounds alternate
off/on so that machine load hits both alike; each figure is the median over rounds. The script also checks
that the deterministic runs are bitwise identical to each other.

    python benchmarks/deterministic_cost.py                       # CPU, torch backend, N=2048 V=16384 D=512
    python benchmarks/deterministic_cost.py --n 512 --v 4096 --rounds 5            # a quick look
    python benchmarks/deterministic_cost.py --device cuda --backends torch,triton   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

import tipkernels as tk  # noqa: E402
from benchmarks.harness.inputs import dtype_of, make_inputs  # noqa: E402
from benchmarks.harness.report import env_markdown, markdown_table, write_text  # noqa: E402
from benchmarks.harness.runner import alternate  # noqa: E402
from benchmarks.harness.timing import time_call  # noqa: E402


def step(op, backend, hs, ws, ht, wt):
    h, w = hs.detach().requires_grad_(True), ws.detach().requires_grad_(True)
    if op == "kl":
        loss = tk.fused_linear_divergence(h, w, ht, wt, reduction="mean", backend=backend)
    else:
        loss = tk.TIPDistillationLoss(rule="soft_or", ratio=0.5, backend=backend, compute_metrics=False)(
            h.reshape(1, *h.shape), w, ht.reshape(1, *ht.shape), wt, None).loss
    loss.backward()
    return loss.detach(), h.grad, w.grad


def measure(op, backend, inputs, device, rounds):
    step(op, backend, *inputs)  # warm-up (and Triton compilation)
    with tk.set_options(deterministic=True):
        step(op, backend, *inputs)
    det_outputs = []

    def timed(flag):
        def call():
            with tk.set_options(deterministic=flag):
                return time_call(lambda: (det_outputs if flag else []).append(step(op, backend, *inputs)), device)
        return call

    off, on = alternate([timed(False), timed(True)], rounds)
    bitwise = all(all(torch.equal(a, b) for a, b in zip(det_outputs[0], o)) for o in det_outputs[1:])
    return {"op": op, "backend": backend, "off (ms)": f"{off * 1e3:.1f}", "on (ms)": f"{on * 1e3:.1f}",
            "on / off": f"{on / off:.3f}", "deterministic runs bitwise equal": "yes" if bitwise else "NO"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default=None, help="comma-separated (default: torch on CPU, torch,triton on CUDA)")
    p.add_argument("--ops", default="kl,tip", help="kl (fused reverse KL) and/or tip (TIP loss, soft_or 0.5)")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--v", type=int, default=16384)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        # torch.use_deterministic_algorithms needs it for cuBLAS; it must be set before the first cuBLAS call.
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    dtype = dtype_of(args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    backends = args.backends.split(",") if args.backends else (["torch", "triton"] if device.type == "cuda"
                                                               else ["torch"])
    inputs = tuple(t.detach() for t in make_inputs(args.n, args.v, args.d, args.d, dtype, device))
    rows = [measure(op, be, inputs, device, args.rounds) for be in backends for op in args.ops.split(",")]
    text = (f"N={args.n} V={args.v} D_s=D_t={args.d} {dtype}, median of {args.rounds} interleaved rounds\n\n"
            + markdown_table(rows, list(rows[0])) + "\n\n" + env_markdown(device))
    print(text)
    write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
