"""Tune the Triton backend's launch configs for one shape on this device; write a tuned-config table.

    PYTHONPATH=. python benchmarks/tune_triton.py --out "$OUT/tuned_configs.json" --notes "$OUT/tuning.md"
        # CUDA default: N=8192, V=151936, D_s=D_t=4096, bf16 (a few minutes; --budget-s bounds it)
    PYTHONPATH=. python benchmarks/tune_triton.py --device cpu --quick --out /tmp/t.json   # interpreter smoke run

Search: coordinate descent from the current config (``default_config`` plus any tuned entry that already matches).
For each key in turn, its candidate values are tried with the other keys fixed and the fastest correct one is kept;
``--sweeps`` passes over the keys. What is tuned is the fused kernels' launch config, so every timed call pins
``strategy="fused"`` (:data:`PINNED`; "auto" picks the cuBLAS-chunk strategy at the goal shape on CUDA, whose
epilogues ignore these keys); the table's entry keeps the start's strategy keys. Forward keys are timed on the
scoring pass (``forward_stats`` of student and
teacher: LSEs, entropies, KLs, argmaxes), backward keys on the reverse-KL backward over every row (``d hidden``,
``d weight``). A candidate is correct when its error against the chunked torch backend (fp32 accumulation) is at
most twice the starting config's plus 1e-6; a candidate that fails to compile or launch (e.g. too much shared
memory) is recorded and skipped. With ``--screen`` (the default on CUDA) every candidate is first compiled for sm_90
without running (``benchmarks/inspect_kernels.py --screen``, changed alone from the start) and those that spill are
recorded as such and never timed.

Output: the table as ``tipkernels.backends.triton.config.tuned_config`` reads it (``--merge`` keeps the other entries of an
existing file; an entry with the same device, dtype and ranges is replaced), and a Markdown notes file listing every
candidate (time, ratio to the start, error, outcome). Use the table with ``TIPKERNELS_TRITON_CONFIGS=FILE`` or copy
its entries into ``tipkernels/backends/triton/tuned_configs.json`` (packaged) and commit them with the notes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, List, Optional, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from benchmarks.harness import lib  # noqa: E402
from benchmarks.harness.inputs import SHORT_DTYPES, dtype_of, make_inputs  # noqa: E402
from benchmarks.harness.memory import free_memory  # noqa: E402
from benchmarks.harness.report import device_name, env_markdown, fmt_ms, markdown_table, write_json  # noqa: E402
from benchmarks.harness.runner import describe_error  # noqa: E402
from benchmarks.harness.timing import timeit  # noqa: E402

# Candidate values per key: (forward keys, backward keys). All powers of two >= 16 where they are tl.dot blocks.
# "full" (the GPU's space) holds only tiles that can compile well for sm_90 (docs/design.md §4): no 32-row or
# 32-column logit tile (each warpgroup's wgmma would be m64n32 or mma.sync), no 256-wide vocabulary tile (the fp32
# logit tiles alone would take 128+ registers per thread); no "tiles" backward (D / block_dh times the logit
# recompute: at D = 4096 never faster than "matmul"), hence no block_dh. What still spills at the shape is screened
# out by compiling each candidate first (--screen, the default on CUDA).
SPACES = {
    "full": (
        {"block_n": [64, 128], "block_v": [64, 128], "block_d": [32, 64, 128], "group_n": [4, 8, 16],
         "num_warps": [4, 8], "num_stages": [2, 3, 4]},
        {"bwd_block_n": [64, 128], "bwd_block_v": [64, 128], "bwd_block_d": [32, 64, 128], "bwd_num_warps": [4, 8],
         "bwd_num_stages": [2, 3, 4], "bwd_chunk_mib": [16, 32, 64]},
    ),
    "quick": (
        {"block_n": [16, 32], "block_v": [16, 32]},
        {"bwd_block_v": [16, 32], "block_dh": [16, 32], "bwd_strategy": ["matmul", "tiles"]},
    ),
}


SHORT_DTYPES_BY_DTYPE = {name: dtype_of(name) for name in SHORT_DTYPES}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    return float((got.float() - want).abs().max() / want.abs().max().clamp_min(1.0))


class Pass:
    """One timed pass (``forward`` or ``backward``) of the tuning problem, with its error against the torch backend."""

    def __init__(self, name: str, run: Callable[[dict], Tuple[torch.Tensor, ...]],
                 reference: Tuple[torch.Tensor, ...]):
        self.name, self.run, self.reference = name, run, reference

    def error(self, cfg: dict) -> float:
        got = self.run(cfg)
        return max(_rel_err(g, w) for g, w in zip(got, self.reference))


#: Config keys every timed call adds: the fused kernels, whatever "auto" would choose (docs/design.md §4).
PINNED = {"strategy": "fused"}


def build_passes(n: int, v: int, d_s: int, d_t: int, dtype: torch.dtype, device) -> Tuple[object, List[Pass]]:
    h_s, w_s, h_t, w_t = (t.detach() for t in make_inputs(n, v, d_s, d_t, dtype, device))
    prob, _ = lib.build_problem(h_s, w_s, h_t, w_t, require_teacher=True)
    chunked, triton = lib.chunked, lib.triton_backend()
    keys = ("student_lse", "teacher_lse", "entropy", "reverse_kl", "forward_kl")
    ref_stats = chunked.forward_stats(prob)
    grad_rows = torch.full((n,), 1.0 / n, device=device)
    saved = {k: ref_stats[k] for k in ("student_lse", "teacher_lse", "reverse_kl")}
    ref_grads = chunked.backward(prob, "reverse_kl", grad_rows, saved)[:2]

    def forward(cfg):
        out = triton.forward_stats(prob, config=dict(cfg, **PINNED))
        return tuple(out[k] for k in keys)

    def backward(cfg):
        return triton.backward(prob, "reverse_kl", grad_rows, saved, config=dict(cfg, **PINNED))[:2]

    return prob, [Pass("forward", forward, tuple(ref_stats[k] for k in keys)), Pass("backward", backward, ref_grads)]


def measure(p: Pass, cfg: dict, device, repeats: int) -> Tuple[Optional[float], Optional[float], str]:
    """(seconds, error, outcome) of one candidate; the first call compiles and is checked, then timed calls."""
    try:
        err = p.error(cfg)
        seconds = timeit(lambda: p.run(cfg), device=device, warmup=1, repeats=repeats)
        return seconds, err, "ok"
    except Exception as e:  # noqa: BLE001 - compile/launch failures are outcomes of the search
        free_memory(device)
        return None, None, describe_error(e, limit=120)


def screen_candidates(n: int, v: int, d_s: int, d_t: int, dtype: torch.dtype, start: dict, space: str,
                      log: Callable[[str], None] = print) -> dict:
    """``{(key, value): problems}`` for every candidate of ``space`` that, changed alone from ``start``, compiles
    badly for sm_90 at the shape (spills, too many registers or too much shared memory, or fails): one subprocess of
    ``benchmarks/inspect_kernels.py --screen`` (a compiling Triton with ptxas' report and a fresh cache, whatever this
    process runs), which compiles each distinct kernel once."""
    import subprocess
    import tempfile

    cands = [(k, val) for keys in SPACES[space] for k, vals in keys.items() for val in vals if val != start.get(k)]
    name = next(k for k, val in SHORT_DTYPES_BY_DTYPE.items() if val == dtype)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(src, "w") as f:
            json.dump([dict(start, **{k: val}) for k, val in cands], f)
        cmd = [sys.executable, os.path.join(_HERE, "inspect_kernels.py"), "--n", str(n), "--v", str(v), "--d",
               str(d_s), "--d-teacher", str(d_t), "--dtype", name, "--jobs", str(min(8, os.cpu_count() or 2)),
               "--screen", src, dst]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=_ROOT), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"screening failed:\n{proc.stderr[-3000:]}")
        with open(dst) as f:
            problems = json.load(f)
    bad = {c: p for c, p in zip(cands, problems) if p}
    log(f"[tune] screened {len(cands)} candidates for sm_90 in {time.monotonic() - t0:.0f} s: "
        f"{len(bad)} compile badly {sorted(f'{k}={val}' for k, val in bad)}")
    return bad


def _short_problem(msg: str) -> str:
    """``"compiles badly: stats_kernel: ptxas spills 808 bytes (255 registers)"`` from an ``aot.check_resources``
    message (kernel, constexprs, pointer types, then what is wrong)."""
    return f"compiles badly: {msg.split()[0]}: {msg.rsplit(']', 1)[-1].lstrip(': ').splitlines()[0][:80]}"


def tune(*, n: int, v: int, d_s: int, d_t: int, dtype: torch.dtype, device, space: str = "full", sweeps: int = 2,
         repeats: int = 5, budget_s: Optional[float] = None, screen: bool = False,
         log: Callable[[str], None] = print) -> dict:
    """Run the search; return ``{"start", "best", "rows", "passes", "stopped_early"}`` (configs as full dicts).
    With ``screen``, candidates that compile badly for sm_90 when changed alone from the start
    (:func:`screen_candidates`) are recorded as such and never timed."""
    device = torch.device(device)
    t0 = time.monotonic()
    prob, passes = build_passes(n, v, d_s, d_t, dtype, device)
    start = lib.triton_backend().config.resolve(prob, None)
    best = dict(start)
    bad = screen_candidates(n, v, d_s, d_t, dtype, start, space, log) if screen else {}
    rows: List[dict] = []
    summary = {}
    stopped = False
    for p, keys in zip(passes, SPACES[space]):
        base_s, base_err, outcome = measure(p, best, device, repeats)
        if base_s is None:
            raise RuntimeError(f"the starting config fails on the {p.name} pass: {outcome}")
        tol = 2.0 * base_err + 1e-6
        rows.append(dict(p=p.name, change="start", time=base_s, ratio=1.0, err=base_err, outcome="start"))
        log(f"[tune] {p.name}: start {fmt_ms(base_s)}, error {base_err:.2e}")
        cur_s = base_s
        for sweep in range(sweeps):
            improved = False
            for key, values in keys.items():
                for value in values:
                    if value == best.get(key) or (budget_s is not None and time.monotonic() - t0 > budget_s):
                        stopped = stopped or value != best.get(key)
                        continue
                    cand = dict(best, **{key: value})
                    if (key, value) in bad:
                        rows.append(dict(p=p.name, change=f"{key}={value}", time=None, ratio=None, err=None,
                                         outcome=_short_problem(bad[key, value][0])))
                        continue
                    s, err, outcome = measure(p, cand, device, repeats)
                    if s is not None and err > tol:
                        outcome = f"wrong (error {err:.2e} > {tol:.2e})"
                    keep = outcome == "ok" and s < cur_s
                    rows.append(dict(p=p.name, change=f"{key}={value}", time=s,
                                     ratio=None if s is None else s / base_s, err=err,
                                     outcome="kept" if keep else ("slower" if outcome == "ok" else outcome)))
                    log(f"[tune] {p.name} sweep {sweep + 1}: {key}={value}: "
                        f"{fmt_ms(s) if s is not None else '–'} {rows[-1]['outcome']}")
                    if keep:
                        best, cur_s, improved = cand, s, True
            if not improved:
                break
        summary[p.name] = dict(start=base_s, best=cur_s, start_err=base_err)
    return dict(start=start, best=best, rows=rows, passes=summary, stopped_early=stopped)


def write_table(path: str, entry: dict, merge: bool) -> None:
    entries = []
    if merge and os.path.exists(path):
        with open(path) as f:
            entries = json.load(f).get("entries", [])
    same = ("device", "dtype", "d_min", "d_max", "v_min", "v_max")
    entries = [entry] + [e for e in entries if any(e.get(k) != entry[k] for k in same)]
    reader = f"{lib.triton_backend().config.__name__}.tuned_config"
    write_json(path, {"about": f"Tuned Triton launch configs, first match wins ({reader}); written by "
                               "benchmarks/tune_triton.py", "entries": entries})


def notes_markdown(result: dict, args, device) -> str:
    lines = [f"# Triton tuning on {device_name(device)}", "", env_markdown(device), "",
             f"Shape: N={args.n}, V={args.v}, D_s={args.d}, D_t={args.d_teacher}, {args.dtype}; space `{args.space}`, "
             f"{args.sweeps} sweep(s), median of {args.repeats} timed calls per candidate."
             + (" Stopped early by --budget-s." if result["stopped_early"] else ""), ""]
    for name, s in result["passes"].items():
        lines.append(f"- {name}: start {fmt_ms(s['start'])} → tuned {fmt_ms(s['best'])} "
                     f"(**{s['best'] / s['start']:.2f}×**), start's error vs torch backend {s['start_err']:.2e}")
    changed = {k: v for k, v in result["best"].items() if result["start"].get(k) != v}
    lines += ["", f"Changed keys: `{json.dumps(changed)}`", "", "Every candidate:", ""]
    rows = [dict(r, time=fmt_ms(r["time"]) if r["time"] is not None else "–",
                 ratio="–" if r["ratio"] is None else f"{r['ratio']:.2f}",
                 err="–" if r["err"] is None else f"{r['err']:.1e}") for r in result["rows"]]
    lines.append(markdown_table(rows, ["p", "change", "time", "ratio", "err", "outcome"],
                                headers=["pass", "candidate", "time", "vs start", "error", "outcome"]))
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shape, space 'quick', 1 sweep, 1 repeat")
    ap.add_argument("--n", type=int, default=None, help="tokens (default 8192; quick 48)")
    ap.add_argument("--v", type=int, default=None, help="vocabulary (default 151936; quick 80)")
    ap.add_argument("--d", type=int, default=None, help="student hidden size (default 4096; quick 32)")
    ap.add_argument("--d-teacher", type=int, default=None, help="teacher hidden size (default: --d)")
    ap.add_argument("--dtype", default=None, choices=SHORT_DTYPES, help="default bf16 on CUDA, fp32 on the CPU")
    ap.add_argument("--space", default=None, choices=sorted(SPACES))
    ap.add_argument("--sweeps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=None, help="start no candidate after this many seconds")
    ap.add_argument("--screen", action=argparse.BooleanOptionalAction, default=None,
                    help="compile every candidate for sm_90 first and skip those that spill (default: on CUDA)")
    ap.add_argument("--d-range", default=None, help="lo,hi of student hidden sizes the entry covers (default D/2,2D)")
    ap.add_argument("--v-range", default=None, help="lo,hi of vocabulary sizes the entry covers (default V/2,2V)")
    ap.add_argument("--out", default=None, help="the table to write (default benchmarks/results/tuned_configs.json)")
    ap.add_argument("--merge", action="store_true", help="keep the other entries of an existing --out")
    ap.add_argument("--notes", default=None, help="Markdown notes file (default: --out with .md)")
    args = ap.parse_args(argv)
    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    q = args.quick
    args.n = args.n or (48 if q else 8192)
    args.v = args.v or (80 if q else 151936)
    args.d = args.d or (32 if q else 4096)
    args.d_teacher = args.d_teacher or args.d
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.space = args.space or ("quick" if q or not cuda else "full")
    args.sweeps = args.sweeps or (1 if q else 2)
    args.screen = cuda if args.screen is None else args.screen
    args.repeats = args.repeats or (1 if q or not cuda else 5)
    for name, val, default in (("d_range", args.d_range, (args.d // 2, 2 * args.d)),
                               ("v_range", args.v_range, (args.v // 2, 2 * args.v))):
        lo_hi = default if val is None else tuple(int(x) for x in val.split(","))
        if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
            ap.error(f"--{name.replace('_', '-')} must be lo,hi with lo <= hi, got {val!r}")
        setattr(args, name, lo_hi)
    args.out = args.out or os.path.join(_ROOT, "benchmarks", "results", "tuned_configs.json")
    args.notes = args.notes or os.path.splitext(args.out)[0] + ".md"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here; use --device cpu (with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    if args.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("the CPU needs Triton's interpreter: run with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    result = tune(n=args.n, v=args.v, d_s=args.d, d_t=args.d_teacher, dtype=dtype_of(args.dtype), device=args.device,
                  space=args.space, sweeps=args.sweeps, repeats=args.repeats, budget_s=args.budget_s,
                  screen=args.screen)
    entry = {"device": lib.triton_backend().config.device_key(args.device), "dtype": args.dtype,
             "d_min": args.d_range[0], "d_max": args.d_range[1], "v_min": args.v_range[0], "v_max": args.v_range[1],
             "config": result["best"],
             "measured": {name: {"start_ms": round(s["start"] * 1e3, 3), "tuned_ms": round(s["best"] * 1e3, 3)}
                          for name, s in result["passes"].items()},
             "shape": {"n": args.n, "v": args.v, "d_s": args.d, "d_t": args.d_teacher}}
    write_table(args.out, entry, args.merge)
    with open(args.notes, "w") as f:
        f.write(notes_markdown(result, args, args.device))
    for name, s in result["passes"].items():
        print(f"{name}: {fmt_ms(s['start'])} → {fmt_ms(s['best'])} ({s['best'] / s['start']:.2f}×)")
    print(f"table → {args.out}; notes → {args.notes}")
    return 0


def tune_and_use(device, dtype: str, out_dir: str, budget_s: float, shape=None, log=print) -> str:
    """The GPU suite's tuning section: tune at ``shape`` = (N, V, D_s, D_t) (None: the ``--quick`` shape), write
    ``tuned_configs.json`` and ``tuning.md`` to ``out_dir``, put the table first in ``$TIPKERNELS_TRITON_CONFIGS``
    for this process (every later triton call uses it); returns the notes as Markdown."""
    table, notes = os.path.join(out_dir, "tuned_configs.json"), os.path.join(out_dir, "tuning.md")
    argv = ["--device", str(device), "--dtype", dtype, "--out", table, "--notes", notes,
            "--budget-s", f"{budget_s:.0f}"]
    argv += ["--quick"] if shape is None else [x for k, val in zip(("--n", "--v", "--d", "--d-teacher"), shape)
                                               for x in (k, str(val))]
    log(f"[tune] tune_triton.py {' '.join(argv)}")
    if main(argv) != 0:
        return "the tuner refused to run (see the log)"
    env_name = lib.triton_backend().config.TUNED_CONFIGS_ENV
    os.environ[env_name] = table + (os.pathsep + os.environ[env_name] if os.environ.get(env_name) else "")
    with open(notes) as f:
        text = f.read()
    return (f"`{table}` is used by every later triton cell (copy its entries into `tipkernels/backends/triton/tuned_configs.json` "
            f"to keep them).\n" + text[text.index("Shape:"):])  # without the title and environment: the report has them


if __name__ == "__main__":
    sys.exit(main())
