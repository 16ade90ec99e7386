"""One command for a CUDA machine: the correctness suite compiled on the GPU, then the benchmarks.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/gpu_suite.py --out "$OUT"        # everything (≈10 min)
    python benchmarks/gpu_suite.py --skip-tests --n 8192 --v 151936 --variants triton,trl,liger
    python benchmarks/gpu_suite.py --device cpu --quick --skip-tests --out /tmp/x      # smoke run of every path

Sections, each written to the report when done: 1. ``pytest tests`` in a subprocess (``--skip-tests``); 1b. with
``--tune``, ``benchmarks/tune_triton.py`` at the goal shape (later triton cells use its table); 2. the dense matmul
rate (the GEMM floor's denominator); 3. reverse KL, fused linear: forward, backward, step and the no-grad scoring
pass (median time, peak beyond inputs and gradients, fraction of the floor) per variant of
``benchmarks/harness/variants.py`` (the sparse-teacher cells ``topk_triton@K``, ``topk_torch@K``,
``topk_chunked@K`` for K in 20, 64, 128 run when named: ``--variants triton,topk_triton@20,topk_triton@64,
topk_triton@128,topk_chunked@64``); 4. the TIP loss step per rule and ratio. Every cell fails alone (``OOM``,
``error: …``, ``timeout``); ``--budget-s`` bounds the run; the goal shape N=8192, V=151936 runs first.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from benchmarks import tune_triton  # noqa: E402
from benchmarks.harness import cells, roofline, variants  # noqa: E402
from benchmarks.harness.inputs import SHORT_DTYPES, clear_grads, dtype_of, make_inputs  # noqa: E402
from benchmarks.harness.memory import MIB, free_memory  # noqa: E402
from benchmarks.harness.report import (  # noqa: E402
    RATIO_COLUMNS, Report, cell_text, device_name, env_markdown, fmt_mib, fmt_ms, fmt_pct, grid_table,
    markdown_table, parse_csv, ratio_rows, slug, write_json,
)
from benchmarks.harness.runner import REPO_ROOT, Attempt, Budget, Skips, describe_error, run_pytest  # noqa: E402
from benchmarks.harness.timing import dense_matmul_tflops, gemm_floor_flops  # noqa: E402

ALL_VARIANTS = variants.NAMES
ALL_PHASES = ("scoring",) + cells.TRAIN_PHASES
GOAL_SHAPE = (8192, 151936)
TITLES = {"scoring": "Scoring pass (tk.token_stats, no grad)", "forward": "Forward (with grad enabled)",
          "backward": "Backward", "step": "Full step (forward + backward)"}


def log(msg: str = "") -> None:
    print(msg, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--quick", action="store_true", help="tiny shapes and few repeats (smoke test of every path)")
    add("--n", default=None, help="token counts, comma-separated (default 1024,4096,8192,16384)")
    add("--v", default=None, help="vocabulary sizes (default 128256,151936)")
    add("--d", type=int, default=None, help="student hidden size (default 4096)")
    add("--d-teacher", type=int, default=None, help="teacher hidden size (default: --d)")
    add("--dtype", default="bf16", choices=SHORT_DTYPES)
    add("--variants", default=None, help=f"comma-separated subset of {','.join(ALL_VARIANTS)}")
    add("--phases", default=",".join(ALL_PHASES), help=f"subset of {','.join(ALL_PHASES)}")
    add("--warmup", type=int, default=None)
    add("--repeats", type=int, default=None, help="most timed repeats per cell (fewer for slow cells)")
    add("--target-s", type=float, default=None, help="aim for about this much timed work per cell")
    add("--matmul-n", type=int, default=None, help="size of the square matmul for the rate")
    add("--skip-tests", action="store_true")
    add("--tests-timeout", type=float, default=240.0)
    add("--pytest-args", default="", help="extra pytest arguments (space-separated)")
    add("--skip-divergence", action="store_true", help="skip section 3")
    add("--skip-tip", action="store_true", help="skip section 4")
    add("--tip-rules", default="entropy_topk,soft_or")
    add("--tip-ratios", default="1.0,0.5,0.2,0.1")
    add("--tip-shape", default=None, help="B,L,V for the TIP step (default 8,1024,151936)")
    add("--tip-backend", default=None, help="default: triton on CUDA, torch on the CPU")
    add("--budget-s", type=float, default=None, help="wall-clock budget of the run (default 540 on CUDA)")
    add("--cell-timeout", type=float, default=None, help="per cell (compile included), default 150 s")
    add("--liger-wheel", default=None, help="a liger_kernel wheel to import when not installed")
    add("--tune", action="store_true", help="section 1b: tune the triton configs at the goal shape first")
    add("--tune-budget-s", type=float, default=240.0, help="time for the tuning search")
    add("--out", default=None, help="folder of the report (default benchmarks/results)")
    args = ap.parse_args(argv)
    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    defaults = (dict(n="48,80", v="997,1531", d=48, warmup=1, repeats=2, target_s=0.05, matmul_n=256,
                     tip_shape="2,40,997", cell_timeout=120.0) if args.quick else
                dict(n="1024,4096,8192,16384", v="128256,151936", d=4096, warmup=1, repeats=10 if cuda else 3,
                     target_s=1.0 if cuda else 5.0, matmul_n=8192 if cuda else 1024, tip_shape="8,1024,151936",
                     cell_timeout=150.0))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.budget_s is None and cuda and not args.quick:
        args.budget_s = 540.0
    args.n, args.v = parse_csv(args.n, int), parse_csv(args.v, int)
    args.d_teacher = args.d_teacher or args.d
    args.variants = parse_csv(args.variants or ",".join(
        variants.DENSE_NAMES if cuda else ("torch", "reference", "compiled", "compiled_ref", "trl")))
    args.phases = parse_csv(args.phases)
    for flag, names, known in (("variant", args.variants, ALL_VARIANTS), ("phase", args.phases, ALL_PHASES)):
        for name in names:
            if name not in known:
                ap.error(f"unknown {flag} {name!r}; expected some of {','.join(known)}")
    args.tip_rules, args.tip_ratios = parse_csv(args.tip_rules), parse_csv(args.tip_ratios, float)
    args.tip_shape = parse_csv(args.tip_shape, int)
    if len(args.tip_shape) != 3:
        ap.error("--tip-shape is B,L,V")
    args.tip_backend = args.tip_backend or ("triton" if cuda else "torch")
    args.dtype_t = dtype_of(args.dtype)
    return args


def divergence_tables(args, results: dict, rate) -> str:
    """One table per phase: rows (V, N), a column per variant: time (fraction of floor) +peak."""
    out = []
    for phase in [p for p in ALL_PHASES if p in args.phases]:
        names = [v for v in args.variants if phase != "scoring" or v in variants.SCORING]
        if names:
            floor = lambda n, v, p=phase: gemm_floor_flops(n, v, args.d, args.d_teacher, 1.0, p)  # noqa: E731
            pair = ("triton", "liger") if "triton" in names and "liger" in names else None
            table = grid_table(results, phase, names, args.n, args.v, floor, rate, pair)
            out.append(f"### {TITLES[phase]}\n\n{table}")
    return "\n\n".join(out)


def goals_table(args, results: dict, rate, tip: list) -> str:
    n, v = GOAL_SHAPE
    res = {(k[0], k[1]): r for k, r in results.items() if k[2:] == GOAL_SHAPE and r.get("time")}
    frac = {p: gemm_floor_flops(n, v, args.d, args.d_teacher, 1.0, p) / (rate * 1e12) / res[("triton", p)]["time"]
            for p in ("step", "scoring") if rate and ("triton", p) in res}
    triton, liger = res.get(("triton", "step"), {}), res.get(("liger", "step"), {})
    speed, peak = liger["time"] / triton["time"] if triton and liger else None, triton.get("peak")
    goals = [("full step ≥ 60% of floor (triton)", frac.get("step"), fmt_pct, lambda x: x >= 0.6),
             ("full step ≥ 1.5× faster than Liger", speed, lambda x: f"{x:.2f}×", lambda x: x >= 1.5),
             ("full step extra peak ≤ 256 MiB (triton)", peak, fmt_mib, lambda x: x <= 256 * MIB),
             ("scoring ≥ 70% of floor (triton)", frac.get("scoring"), fmt_pct, lambda x: x >= 0.7)]
    for rule in args.tip_rules:
        t = {r["ratio"]: r["time"] for r in tip if r["rule"] == rule and r.get("time")}
        goals.append((f"TIP step ratio 0.2 / ratio 1.0 ≤ 0.6 ({rule})", t[0.2] / t[1.0] if 0.2 in t and 1.0 in t
                      else None, lambda x: f"{x:.2f}", lambda x: x <= 0.6))
    rows = [{"goal": g, "measured": fmt(x), "met": "yes" if ok(x) else "no"} if x is not None else
            {"goal": g, "measured": "–", "met": "–"} for g, x, fmt, ok in goals]
    return (f"Goals at N={n}, V={v}, D_s={args.d}, D_t={args.d_teacher} (TIP step: B·L={args.tip_shape[0]}×"
            f"{args.tip_shape[1]}, V={args.tip_shape[2]}):\n\n" + markdown_table(rows, ["goal", "measured", "met"]))


def roofline_section(args, results: dict, rate) -> str:
    """The roofline's predictions per strategy at the goal shape, the measured variants beside (the triton variant
    runs the strategy "auto" picks; triton_fused, triton_cublas, triton_fused_grad force one each)."""
    n, v = GOAL_SHAPE
    others = {}
    for (name, phase, n_, v_), r in results.items():
        if (n_, v_) == GOAL_SHAPE and r.get("time"):
            others.setdefault(name, {})[phase] = r["time"]
    return roofline.table(n, v, args.d, args.d_teacher, tflops=rate or roofline.H200_TFLOPS, others=others)


def divergence_grid(args, budget: Budget, results: dict, notes: list, write) -> None:
    """Section 3: every (N, V) of the grid, goal shape first, for every variant; ``write()`` after each cell."""
    device = args.device
    built = {name: variants.build_variant(name, device, args.liger_wheel) for name in args.variants}
    notes.extend(x for var in built.values() for x in var.notes)
    skips, reported = Skips(budget), set()
    train = [p for p in args.phases if p in cells.TRAIN_PHASES]
    for n, v in sorted([(n, v) for v in args.v for n in args.n], key=lambda c: c != GOAL_SHAPE):
        inputs = None
        for name, var in built.items():
            groups = ([train] if train else []) + (
                [["scoring"]] if "scoring" in args.phases and name in variants.SCORING else [])
            why = var.unavailable or skips.reason(name, (n, v)) if groups else "nothing to run"
            if inputs is None and why is None:
                try:
                    free_memory(device)
                    inputs = make_inputs(n, v, args.d, args.d_teacher, args.dtype_t, device)
                except Exception as err:  # noqa: BLE001
                    why = f"inputs: {describe_error(err)}"
            if why:
                results.update({(name, p, n, v): {"text": why} for p in sum(groups, [])})
                continue
            log(f"[divergence] {name:12s} N={n:6d} V={v:6d} {'+'.join(sum(groups, []))} …")
            t0 = time.monotonic()
            kw = dict(warmup=args.warmup, max_repeats=args.repeats, target_s=args.target_s,
                      cell_timeout=budget.cell_timeout(args.cell_timeout))
            for group in groups:
                with Attempt(lambda: (clear_grads(inputs), free_memory(device))) as cell:
                    res = ({"scoring": cells.measure_scoring(var.score, inputs, device, **kw)} if group == ["scoring"]
                           else cells.measure_train(var.loss, inputs, device, group, **kw))
                    results.update({(name, p, n, v): r for p, r in res.items()})
                if cell.text:
                    results.update({(name, p, n, v): {"text": cell.text} for p in group})
                    if skips.failed(name, (n, v), cell.oom, var.compiled):
                        notes.append(f"{name} at N={n}, V={v}: {cell.text}")
                        with contextlib.suppress(Exception):
                            torch._dynamo.reset()
            if var.compiled and name not in skips.broken and name not in reported:
                reported.add(name)
                notes.append(f"{name}: first cell (N={n}, V={v}) including compilation took "
                             f"{time.monotonic() - t0:.0f} s; {variants.compile_counters()}")
            log("    " + "; ".join(f"{p}: {cell_text(results.get((name, p, n, v)))}" for p in sum(groups, [])))
            write()
        del inputs
        free_memory(device)
    write(f"{skips.for_budget} cell(s) skipped for the time budget." if skips.for_budget else "")


def tip_section(args, budget: Budget, tip: list, write) -> None:
    """Section 4: the TIP loss step per rule and ratio (and the all-token ``none`` step) on one set of inputs."""
    batch, seq, vocab = args.tip_shape
    free_memory(args.device)
    inputs = make_inputs(batch * seq, vocab, args.d, args.d_teacher, args.dtype_t, args.device, seed=1)
    for rule, ratio in [(r, q) for r in args.tip_rules for q in args.tip_ratios] + [("none", 1.0)]:
        entry = {"rule": rule, "ratio": ratio, "n": batch * seq}
        if budget.exhausted(reserve=10.0):
            entry["text"] = "skipped (time budget)"
        else:
            log(f"[tip] {rule} ratio={ratio:g} …")
            with Attempt(lambda: (clear_grads(inputs), free_memory(args.device))) as cell:
                step = variants.tip_step(args.tip_backend, rule, ratio, inputs, batch, seq, seeded=False)
                entry.update(cells.measure_step(step, inputs, args.device, warmup=args.warmup, repeats=args.repeats,
                                                target_s=args.target_s,
                                                cell_timeout=budget.cell_timeout(args.cell_timeout)))
            entry.update({"text": cell.text} if cell.text else {})
            log(f"    {fmt_ms(entry['time']) if entry.get('time') else entry.get('text')}")
        tip.append(entry)
        write()


def main(argv=None) -> int:
    args = parse_args(argv)
    budget, device = Budget(args.budget_s), args.device
    if device.type == "cuda" and not torch.cuda.is_available():
        log("CUDA is not available here; use --device cpu")
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    out_dir = args.out or os.path.join(REPO_ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    name = device_name(device)
    base = os.path.join(out_dir, slug(name) + ("-quick" if args.quick else ""))
    report = Report(base + ".md", f"tipkernels benchmarks on {name}", env_markdown(device))
    log(f"[suite] device {name}; report → {base}.md; budget {args.budget_s or 'none'} s")
    raw = {"device": name, "args": {k: str(v) for k, v in vars(args).items()}}
    results, tip, notes, rate = {}, [], [], None

    def section(key: str, title: str, body) -> None:
        report.set(key, f"{title}\n\nrunning…")
        try:
            report.set(key, f"{title}\n\n{body()}")
        except Exception as err:  # noqa: BLE001
            report.set(key, f"{title}\n\n{describe_error(err)}")

    def write(status: str = "") -> None:
        batch, seq, vocab = args.tip_shape
        body = [f"## 3. Reverse KL, fused linear (D_s={args.d}, D_t={args.d_teacher}, {args.dtype})", "",
                "Cell: median time (fraction of the GEMM floor at the measured matmul rate) +peak memory beyond "
                "inputs and gradients. Floors (docs/design.md §4): scoring/forward `2·N·V·(D_s+D_t)`, backward "
                "`N·V·(2D_s+2D_t+4D_s)`, step both. The backward's peak is counted from the memory held after "
                "the forward.", "",
                markdown_table([{"variant": k, "what": variants.LABELS[k]} for k in args.variants],
                               ["variant", "what"]), "", divergence_tables(args, results, rate)]
        body += (["", "Notes:", ""] + [f"- {x}" for x in notes] if notes else []) + (["", status] if status else [])
        if results:
            report.set("divergence", "\n".join(body))
        if tip:
            report.set("tip", f"## 4. TIP loss step (TIPDistillationLoss forward + backward, backend="
                       f"{args.tip_backend}, B={batch}, L={seq}, V={vocab}, D_s={args.d}, D_t={args.d_teacher}, "
                       f"{args.dtype})\n\n`vs 1.0`: time over the same rule's ratio-1.0 step (goal ≤ 0.6 at ratio "
                       "0.2); `ideal vs 1.0`: the GEMM floor's ratio (scoring + ρ·backward); `none`: "
                       "tk.fused_linear_divergence over all tokens (no scoring pass, no selection).\n\n"
                       + markdown_table(ratio_rows(tip, rate, args.d, args.d_teacher, vocab), RATIO_COLUMNS,
                                        [c if c != "ideal" else "ideal vs 1.0" for c in RATIO_COLUMNS]))
        report.set("goals", "## Goals\n\n" + goals_table(args, results, rate, tip))
        report.set("roofline", "## 5. Roofline at the goal shape (benchmarks/harness/roofline.py)\n\n"
                   + roofline_section(args, results, rate))
        raw.update(divergence=[{"variant": k[0], "phase": k[1], "n": k[2], "v": k[3], **r} for k, r in results.items()],
                   tip=tip, matmul_tflops=rate)
        write_json(base + ".json", raw)

    tests = (lambda: "skipped (`--skip-tests`)") if args.skip_tests else lambda: run_pytest(
        args.pytest_args.split(), timeout=budget.cell_timeout(args.tests_timeout, reserve=60, least=10),
        logfile=os.path.join(out_dir, "pytest.log"), log=log)
    section("tests", "## 1. Correctness suite", tests)
    if args.tune:
        section("tune", "## 1b. Tuning", lambda: tune_triton.tune_and_use(
            args.device, args.dtype, out_dir, budget.cell_timeout(args.tune_budget_s, reserve=60, least=0),
            None if args.quick else (*GOAL_SHAPE, args.d, args.d_teacher), log=log))
        free_memory(device)

    def matmul() -> str:
        nonlocal rate
        rate = dense_matmul_tflops(device, args.dtype_t, n=args.matmul_n, warmup=2 if args.quick else 3,
                                   repeats=3 if args.quick else 10)
        log(f"[matmul] {args.matmul_n}³ {args.dtype}: {rate:.1f} TFLOP/s")
        return (f"{args.matmul_n}×{args.matmul_n}×{args.matmul_n} {args.dtype} matmul on random data, median: "
                f"**{rate:.1f} TFLOP/s** (the GEMM floor's denominator)")
    section("matmul", "## 2. Dense matmul rate", matmul)
    free_memory(device)
    if not args.skip_divergence:
        divergence_grid(args, budget, results, notes, write)
    if not args.skip_tip:
        try:
            tip_section(args, budget, tip, write)
        except Exception as err:  # noqa: BLE001 - the inputs did not fit
            report.set("tip", f"## 4. TIP loss step\n\ninputs: {describe_error(err)}")
    write()
    report.set("end", f"Finished in {budget.elapsed():.0f} s.")
    log("\n" + report.text())
    log(f"[suite] report written to {base}.md (raw numbers: {base}.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
