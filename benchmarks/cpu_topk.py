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
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from benchmarks.harness import variants  # noqa: E402
from benchmarks.harness.inputs import make_inputs  # noqa: E402
from benchmarks.harness.memory import MIB, RssPeak, malloc_for_memory, malloc_for_speed  # noqa: E402
from benchmarks.harness.report import env_markdown, fmt_mib, fmt_ms, markdown_table  # noqa: E402

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
    hs, ws, ht, wt = inputs
    topk = variants.parse_topk(args.worker)
    if topk is not None:
        variants.teacher_topk_of(ht, wt, topk[1])  # the served teacher's message: before the measurement
    loss_fn = make_loss(args.worker)
    malloc_for_memory()
    with RssPeak() as peak:
        loss = loss_fn(*inputs)
        loss.backward()
    norms = (float(hs.grad.norm()), float(ws.grad.norm()))
    malloc_for_speed()
    times = []
    for _ in range(args.repeats):
        hs.grad = ws.grad = None
        t0 = time.perf_counter()
        loss_fn(*inputs).backward()
        times.append(time.perf_counter() - t0)
    return {"variant": args.worker, "peak_extra_bytes": peak.extra, "peak_method": peak.method, "times": times,
            "loss": float(loss.detach()), "grad_norm_h": norms[0], "grad_norm_w": norms[1]}


def run_variant(name: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--shape", "x".join(map(str, args.shape)),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                         env=dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(xs):
    xs = sorted(xs)
    k = len(xs)
    return 0.5 * (xs[(k - 1) // 2] + xs[k // 2])


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def measure(names, args) -> list:
    rounds = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        got = {"load_before": _load()}
        for name in order:
            print(f"[cpu_topk] round {r + 1}/{args.rounds}: {name} (load {_load()})", file=sys.stderr, flush=True)
            got[name] = run_variant(name, args)
        got["load_after"] = _load()
        rounds.append(got)
    return rounds


def report(rounds: list, names, args, command: str) -> str:
    n, v, d = args.shape
    dense_peak = _median([r["dense"]["peak_extra_bytes"] for r in rounds])
    rows = []
    for name in names:
        times = [t for r in rounds for t in r[name]["times"]]
        ratios = [_median(r[name]["times"]) / _median(r["dense"]["times"]) for r in rounds]
        peak = _median([r[name]["peak_extra_bytes"] for r in rounds])
        x = rounds[0][name]
        rows.append({"variant": name, "time (median)": fmt_ms(_median(times)),
                     "× dense (median of rounds)": f"{_median(ratios):.2f}",
                     "ratios per round": " ".join(f"{q:.2f}" for q in ratios), "extra peak": fmt_mib(peak),
                     "% of dense's": f"{100 * peak / max(dense_peak, 1):.1f}%", "loss": f"{x['loss']:.6f}",
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
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump({"shape": args.shape, "rounds": rounds}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
