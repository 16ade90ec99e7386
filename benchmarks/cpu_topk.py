"""CPU, 2 cores: a teacher seen through its top-K log-probabilities (served elsewhere) against the dense teacher,
and against the chunked PyTorch top-K forward KL that VeOmni/verl-style trainers write, side by side in one run.

Mean forward KL over N tokens, forward + backward from the student's hidden states and lm_head (fp32):

- ``dense``: ``tk.fused_linear_divergence(h_s, W_s, h_t, W_t, divergence="forward_kl", backend="torch")``: the
  teacher's hidden states and lm_head are given, its logits are recomputed in the fused sweep (the full KL).
- ``topk_torch@K``: ``tk.fused_linear_divergence(h_s, W_s, teacher_topk=(ids, logprobs), divergence="forward_kl",
  tail="bucket", backend="torch")``: the student's full-vocabulary log-sum-exp plus the K gathered logits; the K ids
  and one bin for the rest of the vocabulary.
- ``topk_chunked@K``: the baseline (``benchmarks.harness.variants.chunked_topk_forward_kl``): student logits in
  512-row chunks, ``log_softmax`` in fp32, gathered at the K ids, ``Σ_k q_k (log q_k − log p_k)``, each chunk under
  ``torch.utils.checkpoint``.

The teacher's top-K (ids and log-probabilities ``[N, K]``) is what a server sends: it is computed before the
measurement, once per process (vocabulary-chunked, ``tipkernels.opd.topk_teacher.topk_logprobs``), and is neither
timed nor counted. Each measurement is a fresh process: the extra peak is the peak resident set during the first
step minus the resident set once the inputs exist (glibc's mmap threshold 1 MiB for that step, so freed buffers
leave the resident set at once; the gradients of h_s and W_s are included); the time is the median of the
``--repeats`` following steps. Variants run in alternating rounds (the order rotates); the table gives each
variant's median time and its median per-round ratio to the dense teacher's. The loss values differ by design: the
bucket KL is a lower bound of the full one, the baseline drops the tail term. The machine is shared: ``uptime``'s
load is recorded.

    PYTHONPATH=. python benchmarks/cpu_topk.py --out benchmarks/results/cpu-topk.md       # N=2048 V=32768 D=512
    PYTHONPATH=. python benchmarks/cpu_topk.py --shape 256x4096x64 --ks 20 --rounds 1 --repeats 1   # a quick look
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

from benchmarks.harness import runner, variants  # noqa: E402
from benchmarks.harness.inputs import make_inputs  # noqa: E402
from benchmarks.harness.memory import MIB  # noqa: E402
from benchmarks.harness.report import (  # noqa: E402
    env_markdown, fmt_mib, fmt_ms, markdown_table, write_json, write_text)

DEFAULT_SHAPE = "2048x32768x512"
DEFAULT_KS = "20,64,128"


def make_loss(name: str):
    """``loss(h_s, W_s, h_t, W_t) -> scalar``: ``dense`` or a sparse variant of the harness's registry."""
    if name == "dense":
        return variants.backend_loss("torch", "forward_kl")
    var = variants.build_variant(name, "cpu")
    if var.loss is None:
        raise ValueError(f"{name}: {var.unavailable}")
    return var.loss


def worker(args) -> dict:
    """In a fresh process: the teacher's top-K (not measured), the peak memory of the first step, then the time of
    ``repeats`` steps."""
    if args.threads:
        torch.set_num_threads(args.threads)
    n, v, d = args.shape
    inputs = make_inputs(n, v, d, d, torch.float32, "cpu", logit_scale=2.0)
    ht, wt = inputs[2], inputs[3]
    topk = variants.parse_topk(args.worker)
    if topk is not None:
        variants.teacher_topk_of(ht, wt, topk[1])  # the served teacher's message: before the measurement
    loss_fn = make_loss(args.worker)

    def step(*x):
        loss = loss_fn(*x)
        loss.backward()
        return loss
    return runner.step_cell(args.worker, step, inputs, args.repeats)


def run_variant(name: str, args) -> dict:
    return runner.run_json_worker([os.path.abspath(__file__), "--worker", name, "--shape",
                                   "x".join(map(str, args.shape)), "--repeats", str(args.repeats),
                                   "--threads", str(args.threads)])


def measure(names, args) -> list:
    return runner.rotating_rounds(names, args.rounds, lambda name: run_variant(name, args), "[cpu_topk]")


def report(rounds: list, names, args, command: str) -> str:
    n, v, d = args.shape
    rows = []
    for name in names:
        f = runner.round_figures(rounds, name, "dense")
        x = rounds[0][name]
        rows.append({"variant": name, "time (median)": fmt_ms(f["time"]),
                     "× dense (median of rounds)": f"{f['ratio']:.2f}",
                     "ratios per round": " ".join(f"{q:.2f}" for q in f["ratios"]), "extra peak": fmt_mib(f["peak"]),
                     "% of dense's": f"{100 * f['mem']:.1f}%", "loss": f"{x['loss']:.6f}",
                     "‖d h‖": f"{x['grad_norm_h']:.4g}", "‖d W‖": f"{x['grad_norm_w']:.4g}"})
    cols = ["variant", "time (median)", "× dense (median of rounds)", "ratios per round", "extra peak",
            "% of dense's", "loss", "‖d h‖", "‖d W‖"]
    loads = "; ".join(f"round {i + 1}: {r['load_before']} → {r['load_after']}" for i, r in enumerate(rounds))
    return "\n\n".join([
        "# CPU: a top-K teacher vs the dense teacher vs the chunked top-K baseline (forward KL, fp32, 2 cores)",
        __doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2], env_markdown("cpu"),
        f"Command: `{command}`",
        f"## N={n}, V={v}, D_s=D_t={d}\n\n{args.rounds} alternating rounds × {args.repeats} timed steps per process; "
        f"one fp32 [N, V] tensor is {n * v * 4 / MIB:.0f} MiB; the extra peak includes the fp32 gradients "
        f"({4 * (n * d + v * d) / MIB:.0f} MiB). Load average (1, 5, 15 min) before → after each round: {loads}.",
        markdown_table(rows, cols)]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default=DEFAULT_SHAPE, help="NxVxD")
    p.add_argument("--ks", default=DEFAULT_KS, help=f"comma-separated K, each one of {variants.TOPK_KS}")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--out", default=None, help="write the Markdown report here (and the raw results beside it, .json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = tuple(int(x) for x in args.shape.split("x"))
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    ks = [int(k) for k in args.ks.split(",")]
    bad = [k for k in ks if k not in variants.TOPK_KS]
    if bad:
        p.error(f"--ks {bad}: the registry has K in {variants.TOPK_KS}")
    names = ["dense"] + [f"topk_{impl}@{k}" for k in ks for impl in ("torch", "chunked")]
    rounds = measure(names, args)
    command = "PYTHONPATH=. python benchmarks/cpu_topk.py " + " ".join(a for a in (argv or sys.argv[1:]))
    text = report(rounds, names, args, command.strip())
    print(text)
    if args.out:
        write_text(args.out, text)
        write_json(os.path.splitext(args.out)[0] + ".json", {"shape": args.shape, "rounds": rounds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
