"""The GPU plan: the measurements one short lease on a CUDA machine should bring back, in order of value, each
cell bounded in time and the report rewritten after every cell (run it through ``benchmarks/gpu_plan.sh``).

    bash benchmarks/gpu_plan.sh --out "$OUT"            # on the GPU machine (at most ~7 minutes)
    bash benchmarks/gpu_plan.sh --dry-run-cpu --out /tmp/plan   # the same sequence, small shapes, interpreter

Sections (the report ``plan.md`` and ``plan.json`` in ``--out``):

1. the matmul rate and the copy bandwidth (the roofline's denominators);
2. compiled correctness of every triton strategy (``fused``, ``cublas``, ``fused_grad``) against the torch backend:
   the mean reverse KL and JSD(0.5), value and gradients, at the goal shape, two odd shapes and an ``N·V > 2³¹``
   case;
3. the goal-shape step (forward, backward), scoring pass and peak memory per strategy, the roofline's predictions
   beside (benchmarks/harness/roofline.py);
4. TRL's ChunkedDivergenceFunction and Liger's fused linear JSD (β = 1: reverse KL, equal semantics) at the goal
   shape, where importable (``gpu_plan.sh`` installs carried wheels first), else a note;
5. the TIP loss step at ρ = 1.0 and 0.2 (``gpu_suite.tip_section``);
6. a targeted compiled pytest (the strategy tests, the triton tests' fast subset), then the kernel compile table of
   ``benchmarks/inspect_kernels.py``: every strategy's kernels at the goal shape, compiled for sm_90 (the hook:
   ``inspect_kernels_section``);
7. everything else: ``benchmarks/gpu_suite.py`` (its grid, no tests) in the time left, its report in ``suite/``: the
   triton backend (auto strategy) and the sparse (top-k) teacher against the chunked top-k baseline.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

import tipkernels as tk  # noqa: E402
from benchmarks import gpu_suite  # noqa: E402
from benchmarks.harness import cells, roofline, variants  # noqa: E402
from benchmarks.harness.inputs import clear_grads, make_inputs  # noqa: E402
from benchmarks.harness.memory import free_memory  # noqa: E402
from benchmarks.harness.report import (  # noqa: E402
    RATIO_COLUMNS, Report, env_markdown, fmt_mib, fmt_ms, markdown_table, ratio_rows, write_json)
from benchmarks.harness.runner import REPO_ROOT, Attempt, Budget, describe_error, run_pytest  # noqa: E402
from benchmarks.harness.timing import copy_bandwidth_tbs, dense_matmul_tflops  # noqa: E402

#: The triton strategies (``tk.set_options(triton_config=...)``; docs/design.md §4), written once in the variants.
STRATEGIES = variants.TRITON_STRATEGIES
GPU = dict(goal=(8192, 151936, 4096, 4096), odd=[(1031, 50257, 1000, 768), (131, 32003, 4096, 2560)],
           big=(16384, 151936, 128, 128), matmul_n=8192, copy_bytes=2**31, warmup=1, repeats=5, target_s=0.5,
           tip_shape="8,1024,151936",
           suite_args=["--variants", "triton,topk_triton@20,topk_triton@64,topk_triton@128,topk_chunked@20,"
                       "topk_chunked@128"], budget=400.0, cell_timeout=90.0, tests_timeout=120.0)
CPU = dict(goal=(16, 131, 16, 16), odd=[(13, 37, 24, 19), (29, 101, 40, 19)], big=(33, 257, 16, 16),
           matmul_n=256, copy_bytes=2**24, warmup=1, repeats=1, target_s=0.01, tip_shape="2,8,131",
           suite_args=["--quick", "--n", "16", "--v", "131", "--variants", "triton,torch,topk_triton@20", "--skip-tip", "--phases",
                       "scoring,step"],
           budget=140.0, cell_timeout=30.0, tests_timeout=40.0,
           pytest_k="selection or bad_strategy or chunk_shape")  # the interpreter is too slow for more here
#: Correctness: largest error over the largest entry of the torch backend's result (16-bit inputs: 2e-2).
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-3}


def log(msg: str = "") -> None:
    print(msg, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="folder of the results (default $OUT, else benchmarks/results/plan)")
    ap.add_argument("--dry-run-cpu", action="store_true", help="small shapes on the CPU (Triton's interpreter)")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default 400 on a GPU, 110 dry)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    args = ap.parse_args(argv)
    args.out = args.out or os.environ.get("OUT") or os.path.join(REPO_ROOT, "benchmarks", "results", "plan")
    args.shapes = CPU if args.dry_run_cpu else GPU
    args.budget_s = args.budget_s or args.shapes["budget"]
    args.device = torch.device("cpu" if args.dry_run_cpu else "cuda")
    args.dtype_t = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    return args


def _loss(kind: str):
    beta = 0.5 if kind == "jsd" else 1.0

    def loss(h_s, w_s, h_t, w_t, backend="triton"):
        return tk.fused_linear_divergence(h_s, w_s, h_t, w_t, divergence=kind, beta=beta, reduction="mean",
                                          backend=backend)
    return loss


def _value_and_grads(loss, inputs, backend):
    clear_grads(inputs)
    value = loss(*inputs, backend=backend)
    value.backward()
    out = {"value": value.detach().float().reshape(1), "d_hidden": inputs[0].grad.float(),
           "d_weight": inputs[1].grad.float()}
    clear_grads(inputs)
    return out


def correctness(args, budget: Budget, rows: list, write) -> None:
    """Section 2: each strategy's value and gradients against the torch backend's, shape by shape."""
    sh = args.shapes
    shapes = [("goal", sh["goal"]), *[(f"odd{i + 1}", s) for i, s in enumerate(sh["odd"])], ("N·V>2^31", sh["big"])]
    for label, (n, v, ds, dt) in shapes:
        for kind in ("reverse_kl", "jsd"):
            if kind == "jsd" and label != "goal" and label != "odd1":
                continue
            row = {"shape": f"{label} N={n} V={v} D_s={ds} D_t={dt}", "loss": kind}
            if budget.exhausted(reserve=30):
                rows.append({**row, "torch": "skipped (time budget)"})
                write()
                continue
            log(f"[correctness] {row['shape']} {kind} …")
            inputs = truth = None
            with Attempt(lambda: free_memory(args.device)) as cell:
                inputs = make_inputs(n, v, ds, dt, args.dtype_t, args.device, seed=3)
                truth = _value_and_grads(_loss(kind), inputs, "torch")
            row["torch"] = cell.text or "reference"
            for name, over in STRATEGIES.items():
                if truth is None:
                    row[name] = "–"
                    continue
                with Attempt(lambda: free_memory(args.device)) as cell:
                    t0 = time.monotonic()
                    with tk.set_options(triton_config=over):
                        got = _value_and_grads(_loss(kind), inputs, "triton")
                    errs = {k: float((got[k] - t).abs().max() / t.abs().max().clamp_min(1e-30)) for k, t in truth.items()}
                    worst = max(errs.values())
                    ok = worst <= TOLERANCE[args.dtype_t]
                    row[name] = (f"{'ok' if ok else 'FAIL'} {worst:.1e} "
                                 f"(value {errs['value']:.0e}, d_h {errs['d_hidden']:.0e}, d_W {errs['d_weight']:.0e};"
                                 f" {time.monotonic() - t0:.1f} s)")
                if cell.text:
                    row[name] = cell.text
            log("    " + "; ".join(f"{k}: {row[k]}" for k in ("torch", *STRATEGIES)))
            rows.append(row)
            del inputs, truth
            free_memory(args.device)
            write()


def goal_measure(args, budget: Budget, results: dict, write) -> None:
    """Section 3: per strategy, forward/backward/step and the scoring pass at the goal shape."""
    n, v, ds, dt = args.shapes["goal"]
    inputs = make_inputs(n, v, ds, dt, args.dtype_t, args.device)
    sh = args.shapes
    for name, over in STRATEGIES.items():
        if budget.exhausted(reserve=30):
            results[name] = {"text": "skipped (time budget)"}
            continue
        log(f"[goal] {name} …")
        kw = dict(warmup=sh["warmup"], max_repeats=sh["repeats"], target_s=sh["target_s"],
                  cell_timeout=budget.cell_timeout(sh["cell_timeout"]))
        res = {}
        with tk.set_options(triton_config=over):
            with Attempt(lambda: (clear_grads(inputs), free_memory(args.device))) as cell:
                res.update(cells.measure_train(variants.backend_loss("triton"), inputs, args.device,
                                               list(cells.TRAIN_PHASES), **kw))
            if name != "fused_grad":  # the scoring pass has no gradient: fused_grad's is cublas's
                with Attempt(lambda: free_memory(args.device)) as cell2:
                    res["scoring"] = cells.measure_scoring(
                        lambda hs, ws, ht, wt: tk.token_stats(hs, ws, ht, wt, backend="triton"), inputs, args.device,
                        **kw)
                cell.text = cell.text or cell2.text
        results[name] = {**res, **({"text": cell.text} if cell.text else {})}
        log("    " + "; ".join(f"{p}: {fmt_ms(r['time'])} +{fmt_mib(r['peak'])}" for p, r in res.items()
                               if isinstance(r, dict) and r.get("time")) + (f" {cell.text}" if cell.text else ""))
        write()
    del inputs
    free_memory(args.device)


def peers(args, budget: Budget, results: dict, notes: list, write) -> None:
    """Section 4: TRL and Liger at the goal shape (reverse KL, mean), where importable."""
    n, v, ds, dt = args.shapes["goal"]
    sh = args.shapes
    inputs = None
    for name in ("trl", "liger"):
        var = variants.build_variant(name, args.device)
        notes.extend(f"{name}: {x}" for x in var.notes)
        if var.unavailable or budget.exhausted(reserve=30):
            results[name] = {"text": var.unavailable or "skipped (time budget)"}
            write()
            continue
        if inputs is None:
            inputs = make_inputs(n, v, ds, dt, args.dtype_t, args.device)
        log(f"[peers] {name} …")
        with Attempt(lambda: (clear_grads(inputs), free_memory(args.device))) as cell:
            results[name] = cells.measure_train(var.loss, inputs, args.device, list(cells.TRAIN_PHASES),
                                                warmup=sh["warmup"], max_repeats=sh["repeats"],
                                                target_s=sh["target_s"],
                                                cell_timeout=budget.cell_timeout(sh["cell_timeout"]))
        if cell.text:
            results[name] = {"text": cell.text}
        write()
    free_memory(args.device)


def inspect_kernels_section(args, budget: Budget) -> str:
    """The hook for ``benchmarks/inspect_kernels.py`` (the compile table of the kernels): run when it exists."""
    script = os.path.join(REPO_ROOT, "benchmarks", "inspect_kernels.py")
    if not os.path.exists(script):
        return "benchmarks/inspect_kernels.py is not in this checkout: no compile table (hook left in gpu_plan.py)."
    timeout = budget.cell_timeout(60.0, reserve=20, least=5)
    n, v, ds, dt = args.shapes["goal"]
    cmd = ["benchmarks/inspect_kernels.py", "--n", str(n), "--v", str(v), "--d", str(ds), "--d-teacher", str(dt),
           "--dtype", args.dtype, "--kinds", "reverse_kl", "--strategies", ",".join(STRATEGIES),
           "--bwd-strategies", "matmul",
           "--jobs", str(min(8, os.cpu_count() or 1))]
    try:
        proc = subprocess.run([sys.executable, *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
        return f"`python {' '.join(cmd)}` (exit {proc.returncode}):\n\n" + proc.stdout[-6000:] + (
            f"\n\n```\n{proc.stderr[-1500:]}\n```" if proc.returncode else "")
    except subprocess.TimeoutExpired:
        return f"benchmarks/inspect_kernels.py: timed out after {timeout:.0f} s"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        log("CUDA is not available here; use --dry-run-cpu")
        return 2
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    budget, sh = Budget(args.budget_s), args.shapes
    n, v, ds, dt = sh["goal"]
    report = Report(os.path.join(args.out, "plan.md"), "tipkernels GPU plan" + (" (dry run, CPU)" if
                    args.dry_run_cpu else ""), env_markdown(args.device))
    raw = {"args": {k: str(x) for k, x in vars(args).items()}}
    state = {"rate": None, "bw": None, "correct": [], "goal": {}, "peers": {}, "tip": [], "notes": []}

    def write() -> None:
        raw.update({k: x for k, x in state.items()})
        write_json(os.path.join(args.out, "plan.json"), raw)

    def section(key: str, title: str, body) -> None:
        report.set(key, f"## {title}\n\nrunning…")
        try:
            report.set(key, f"## {title}\n\n{body()}")
        except Exception as err:  # noqa: BLE001 - a section fails alone
            report.set(key, f"## {title}\n\n{describe_error(err)}")
        write()
        log(f"[plan] {title} done at {budget.elapsed():.0f} s")

    def rates() -> str:
        state["rate"] = dense_matmul_tflops(args.device, args.dtype_t, n=sh["matmul_n"], warmup=2, repeats=5)
        state["bw"] = copy_bandwidth_tbs(args.device, sh["copy_bytes"], warmup=2, repeats=5)
        return (f"{sh['matmul_n']}³ {args.dtype} matmul: **{state['rate']:.4g} TFLOP/s**; copy of "
                f"{sh['copy_bytes'] / 2**30:.3g} GiB: **{state['bw']:.4g} TB/s** (read + write)")

    def roof(measured=None) -> str:  # against the measured rates (an H200's where unmeasured)
        kw = dict(tflops=state["rate"] or roofline.H200_TFLOPS, tbs=state["bw"] or roofline.H200_TBS)
        return roofline.table(n, v, ds, dt, measured=measured, **kw)

    section("rates", "1. Matmul rate and copy bandwidth", rates)

    def correct() -> str:
        correctness(args, budget, state["correct"], write)
        return (f"Largest error over the largest entry of the torch backend's result (value, d h_s, d W_s), "
                f"{args.dtype}, pass ≤ {TOLERANCE[args.dtype_t]:g}:\n\n"
                + markdown_table(state["correct"], ["shape", "loss", "torch", *STRATEGIES]))
    section("correct", "2. Compiled correctness against the torch backend", correct)

    def goal() -> str:
        goal_measure(args, budget, state["goal"], write)
        rows, measured = [], {}
        for name, res in state["goal"].items():
            rows.append({"strategy": name, **{p: (f"{fmt_ms(r['time'])} +{fmt_mib(r['peak'])}"
                                                  if isinstance(r, dict) and r.get("time") else "–")
                                              for p, r in ((p, res.get(p)) for p in roofline.PHASES)},
                         "note": res.get("text", "")})
            measured.update({(name, p): r["time"] for p, r in res.items() if isinstance(r, dict) and r.get("time")})
        if "scoring" in state["goal"].get("cublas", {}):
            measured[("fused_grad", "scoring")] = state["goal"]["cublas"]["scoring"]["time"]
        return ("Median time +peak beyond inputs and gradients (mean reverse KL, "
                f"{args.dtype}):\n\n" + markdown_table(rows, ["strategy", *roofline.PHASES, "note"])
                + "\n\n" + roof(measured))
    section("goal", f"3. Goal shape N={n}, V={v}, D_s={ds}, D_t={dt}: step, scoring, peak per strategy", goal)

    def peer() -> str:
        peers(args, budget, state["peers"], state["notes"], write)
        rows = [{"variant": k, **{p: (f"{fmt_ms(r[p]['time'])} +{fmt_mib(r[p]['peak'])}" if p in r else r.get(
            "text", "–")) for p in cells.TRAIN_PHASES}} for k, r in state["peers"].items()]
        return (markdown_table(rows, ["variant", *cells.TRAIN_PHASES]) + "\n\n"
                + "\n".join(f"- {x}" for x in state["notes"]))
    section("peers", "4. TRL and Liger at the goal shape (reverse KL = JSD β=1, mean)", peer)

    def tip() -> str:
        suite_args = gpu_suite.parse_args(["--device", str(args.device), "--tip-rules", "entropy_topk",
                                           "--tip-ratios", "1.0,0.2", "--tip-shape", sh["tip_shape"], "--d", str(ds),
                                           "--d-teacher", str(dt), "--dtype", args.dtype, "--warmup",
                                           str(sh["warmup"]), "--repeats", str(sh["repeats"]), "--target-s",
                                           str(sh["target_s"]), "--cell-timeout", str(sh["cell_timeout"])]
                                          + (["--quick"] if args.dry_run_cpu else []))
        suite_args.tip_backend = "triton"
        gpu_suite.tip_section(suite_args, budget, state["tip"], write)
        batch, seq, vocab = suite_args.tip_shape
        return (f"TIPDistillationLoss step (entropy_topk), B={batch}, L={seq}, V={vocab}:\n\n"
                + markdown_table(ratio_rows(state["tip"], state["rate"], ds, dt, vocab), RATIO_COLUMNS))
    section("tip", "5. TIP loss at ρ = 1.0 and 0.2", tip)

    def tests() -> str:
        paths = ["tests/backends/test_triton_cublas.py", "tests/backends/test_triton.py"]
        extra = ["-x", "-m", "not slow"] + (["-k", sh["pytest_k"]] if "pytest_k" in sh else [])
        text = run_pytest(extra, paths=paths, logfile=os.path.join(args.out, "pytest.log"),
                          timeout=budget.cell_timeout(sh["tests_timeout"], reserve=20, least=20), log=log)
        return text + "\n\n### Kernel compile table\n\n" + inspect_kernels_section(args, budget)
    section("tests", "6. Targeted compiled pytest and the kernel compile table", tests)

    def rest() -> str:
        left = budget.left() - 10
        if left < 20:
            return f"skipped ({left + 10:.0f} s left)"
        suite_out = os.path.join(args.out, "suite")
        code = gpu_suite.main(["--device", str(args.device), "--skip-tests", "--out", suite_out, "--budget-s",
                               f"{left:.0f}", "--d", str(ds), "--d-teacher", str(dt), *sh["suite_args"]])
        return f"`benchmarks/gpu_suite.py` exit {code}; report in `suite/`."
    section("rest", "7. Everything else (benchmarks/gpu_suite.py)", rest)
    report.set("end", f"Finished in {budget.elapsed():.0f} s.")
    log(f"[plan] report: {os.path.join(args.out, 'plan.md')} ({budget.elapsed():.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
