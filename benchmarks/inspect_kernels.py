"""Compile, without a GPU, every Triton kernel the backend would launch for one problem; print their resources.

    PYTHONPATH=. python benchmarks/inspect_kernels.py --arch sm_90 --n 8192 --d 4096 --v 151936 --dtype bf16 \\
        --dump DIR      # the goal shape: every strategy's kernels, both fused backwards (a few minutes)
    PYTHONPATH=. python benchmarks/inspect_kernels.py --n 64 --d 256 --v 1000 --kinds reverse_kl \\
        --strategies fused --bwd-strategies matmul     # a CI-sized dry run (3 kernels)

Strategies (``--strategies``, the table's ``strategy`` column; docs/design.md §4): ``fused`` (the fused kernels:
forward, JSD pass, and the backward of each ``--bwd-strategies``), ``cublas`` (the cuBLAS-chunk strategy's Triton
epilogues: forward, JSD pass, the recompute backward's dS) and ``fused_grad`` (the gradient in the forward's sweep:
its statistics, JSD and dS epilogues), each forced by the config keys of :data:`STRATEGIES`.

The problem is a linear student and a linear teacher (``D_s = D_t = --d`` unless ``--d-teacher``), no bias, no
soft-cap, over ``--v`` vocabulary entries and ``--n`` rows. The launch config is the one the backend resolves for that
full-size problem (``default_config`` < tuned entries < ``--config`` JSON < the strategy's keys). The launches are
recorded (``recorded_launches``, nothing runs) on a problem with the same hidden sizes and the same Triton integer
specialisation (``N``, ``V`` mod 16, never 1) but at most a few hundred rows and vocabulary entries, so recording
allocates megabytes, not the goal shape's gigabytes; the compiled code is the same. Each distinct specialisation is
compiled for ``--arch`` (``tipkernels.backends.triton.aot``, the machinery of ``tests/backends/test_triton_compile.py``)
and, with ``--dump``, its ``.ptx`` and ``.cubin`` are written to ``DIR/<kernel>_<i>.{ptx,cubin}`` with
``DIR/kernels.json`` (every row of the table). Exit status 1 when a kernel fails to compile, spills, or (``--strict``)
uses an MMA narrower than n64 in a forward or dS kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# A compiling Triton, with ptxas' report, and a fresh cache (so every kernel really compiles): set before triton is
# imported, hence before the harness.
_CACHE = tempfile.TemporaryDirectory(prefix="tk-inspect-")
os.environ["TRITON_INTERPRET"] = "0"
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ["TRITON_DEFAULT_FP_FUSION"] = "1"
os.environ.setdefault("TRITON_CACHE_DIR", _CACHE.name)

import torch  # noqa: E402

from benchmarks.harness import lib, variants  # noqa: E402
from benchmarks.harness.inputs import dtype_of  # noqa: E402
from benchmarks.harness.report import markdown_table  # noqa: E402

#: The kernels whose MMA width decides the speed of the scoring pass and of the "matmul" backward (their wgmma must be
#: at least n64: docs/design.md §4).
WIDE_MMA_KERNELS = ("stats_kernel", "jsd_kernel", "dlogits_kernel")


def _reduced(x: int, floor: int) -> int:
    """A size with the same Triton integer specialisation as ``x`` (divisibility by 16, the value 1) and at most
    ``floor + 15``; ``x`` itself when it is small."""
    return x if x <= floor + 16 else floor + x % 16


#: The strategies whose kernels are compiled (docs/design.md §4), each with the config keys that force it, as the GPU
#: plan measures them (``variants.TRITON_STRATEGIES``): the fused kernels (``"fused"``: forward, JSD pass, backward per
#: ``bwd_strategy``), the cuBLAS-chunk epilogues (``"cublas"``: forward, JSD pass, dS of the recompute backward) and
#: the gradient in the forward's sweep (``"fused_grad"``: statistics, JSD and dS epilogues at the sweep's row block).
STRATEGIES = variants.TRITON_STRATEGIES


def record(n: int, d_s: int, d_t: int, v: int, dtype: torch.dtype, kinds, strategies, beta: float, config: dict,
           bwd_strategies=None):
    """``({label: [Launch, ...]}, {strategy: config})``: what the backend launches, per strategy of ``strategies``
    (keys of :data:`STRATEGIES`) and pass, at the config it resolves for the full-size problem (plus ``config``,
    then the strategy's keys; the fused backward's tile follows ``bwd_strategy``, one of ``bwd_strategies``,
    default every one the backend has). Labels are ``"<strategy>: <pass>"``: ``forward``, ``jsd pass``,
    ``backward [<bwd_strategy>] <kind>``, ``sweep <kind>``."""
    tb = lib.triton_backend()
    bwd_strategies = list(bwd_strategies or tb.config.BWD_STRATEGIES)
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        raise ValueError(f"strategies {sorted(unknown)}: expected some of {', '.join(STRATEGIES)}")
    full = lib.Problem(student_hidden=torch.empty(1, 1, dtype=dtype).expand(n, d_s),
                       student_weight=torch.empty(1, 1, dtype=dtype).expand(v, d_s),
                       teacher_hidden=torch.empty(1, 1, dtype=dtype).expand(n, d_t),
                       teacher_weight=torch.empty(1, 1, dtype=dtype).expand(v, d_t))  # shapes only, no memory
    cfgs = {s: tb.config.resolve(full, dict(config, **STRATEGIES[s])) for s in strategies}
    bwd_cfgs = {b: tb.config.resolve(full, dict(config, **STRATEGIES["fused"], bwd_strategy=b))
                for b in (bwd_strategies if "fused" in strategies else [])}
    widest = max(max(c["block_v"], c["bwd_block_v"], c["epi_block_v"]) for c in [*cfgs.values(), *bwd_cfgs.values()])
    n_r, v_r = _reduced(n, 48), _reduced(v, 4 * widest)
    zeros = lambda *shape: torch.zeros(*shape, dtype=dtype)  # noqa: E731

    def problem(rows):
        return lib.Problem(student_hidden=zeros(rows, d_s), student_weight=zeros(v_r, d_s),
                           teacher_hidden=zeros(rows, d_t), teacher_weight=zeros(v_r, d_t))

    prob, ones = problem(n_r), torch.ones(n_r)
    out = {}

    def rec(label, fn, *args, **kw):
        with tb.recorded_launches() as launches:
            result = fn(*args, **kw)
        out[label] = list(launches)
        return result

    for strategy in strategies:
        cfg = cfgs[strategy]
        if strategy == "fused_grad":  # the sweep takes the effective kind (JSD at beta 0 / 1 is a KL)
            # one row block with the integer specialisation of the full problem's (``sweep_mib`` sets its rows)
            rows = _reduced(tb.cublas.sweep_rows(cfg, full), 48)
            for kind in kinds:
                rec(f"{strategy}: sweep {kind}", tb.fused_value_and_grad, problem(rows),
                    lib.effective_kind(kind, beta), beta, torch.ones(rows), config=cfg)
            continue
        saved = rec(f"{strategy}: forward", tb.forward_stats, prob, config=cfg)
        lse = saved["student_lse"]
        rec(f"{strategy}: jsd pass", tb.jsd_sums, prob, lse, lse, beta, config=cfg)
        fake = dict(saved, teacher_lse=lse, reverse_kl=lse, kl_pm=lse)
        for kind in kinds:
            if strategy == "fused":
                for b in bwd_strategies:
                    rec(f"{strategy}: backward {b} {kind}", tb.backward, prob, kind, ones, fake, beta,
                        config=bwd_cfgs[b])
            else:
                rec(f"{strategy}: backward {kind}", tb.backward, prob, kind, ones, fake, beta, config=cfg)
    return out, cfgs


def screen(n: int, d_s: int, d_t: int, v: int, dtype: torch.dtype, configs, kind: str = "reverse_kl",
           jobs: int = 2) -> list:
    """For each partial config of ``configs``: what is wrong with the fused kernels the backend would launch with it
    for the forward and the ``kind`` backward of its ``bwd_strategy`` (compiled for sm_90, :func:`aot.check_resources`;
    an empty list when nothing is). Kernels shared by several configs are compiled once."""
    aot = lib.triton_backend().aot
    per_config = []
    for cfg in configs:
        bwd = cfg.get("bwd_strategy") or lib.triton_backend().config.BWD_STRATEGIES[0]
        launches, _ = record(n, d_s, d_t, v, dtype, [kind], ["fused"], 0.5, dict(cfg), bwd_strategies=[bwd])
        per_config.append([x for label, xs in launches.items() if label != "fused: jsd pass" for x in xs])
    work, uses = aot.distinct({i: xs for i, xs in enumerate(per_config)})
    specs = aot.compile_all(work, jobs=jobs)
    return [[m for j in dict.fromkeys(uses[i]) for m in aot.check_resources(specs[j])] for i in range(len(configs))]


def _tile(sp: dict) -> str:
    c = sp["constexprs"]
    tile = f"{c.get('BLOCK_N')}x{c.get('BLOCK_V')}x{c.get('BLOCK_D')}"
    if "BLOCK_DH" in c:
        tile += f" dh{c['BLOCK_DH']}"
    if "GROUP_N" in c:
        tile += f" g{c['GROUP_N']}"
    return f"{tile} w{sp['num_warps']} s{sp.get('num_stages')}"


def table_rows(specs: list, uses: dict) -> list:
    """One row per distinct kernel of each label of :func:`record` (``"<strategy>: <pass>"``), in launch order."""
    rows = []
    for label, idx in uses.items():
        strategy, what = label.split(": ", 1)
        for i in dict.fromkeys(idx):
            sp = specs[i]
            extra = {k: v for k, v in sp["constexprs"].items() if k in ("KIND", "MODE", "COMPACT_OUT")}
            rows.append(dict(kernel=f"{sp['kernel']}_{i}", strategy=strategy,
                             call=what + (f" {extra}" if extra else ""), tile=_tile(sp), regs=sp.get("registers"),
                             spill=sp.get("spill_bytes"), smem=sp.get("shared"),
                             mma=", ".join(sp.get("mma_shapes") or []) or "none", ok="ok" if sp["ok"] else "FAILED"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90", choices=["sm_90"], help="target (Hopper; sm_90a PTX)")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", type=int, default=4096, help="student hidden size (and the teacher's)")
    ap.add_argument("--d-teacher", type=int, default=None)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--kinds", default="reverse_kl,jsd", help="backward kinds, comma-separated")
    ap.add_argument("--strategies", default=",".join(STRATEGIES),
                    help=f"strategies whose kernels are compiled, comma-separated, of {', '.join(STRATEGIES)} "
                         "(default: all)")
    ap.add_argument("--bwd-strategies", default=None,
                    help="the fused kernels' backward strategies (default: every one the backend has)")
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--config", default=None, help="JSON dict of config overrides")
    ap.add_argument("--dump", default=None, help="directory for <kernel>_<i>.ptx/.cubin and kernels.json")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--strict", action="store_true", help="fail also on an MMA narrower than n64 (forward, dS)")
    ap.add_argument("--screen", nargs=2, metavar=("IN", "OUT"), default=None,
                    help="screen the partial configs listed in the JSON file IN; write their problems to OUT "
                         "(benchmarks/tune_triton.py calls this)")
    a = ap.parse_args(argv)
    if a.screen:
        with open(a.screen[0]) as f:
            configs = json.load(f)
        problems = screen(a.n, a.d, a.d_teacher or a.d, a.v, dtype_of(a.dtype), configs, jobs=a.jobs)
        with open(a.screen[1], "w") as f:
            json.dump(problems, f, indent=1)
        return 0

    aot = lib.triton_backend().aot
    launches, cfgs = record(a.n, a.d, a.d_teacher or a.d, a.v, dtype_of(a.dtype), a.kinds.split(","),
                            a.strategies.split(","), a.beta, json.loads(a.config) if a.config else {},
                            bwd_strategies=a.bwd_strategies.split(",") if a.bwd_strategies else None)
    work, uses = aot.distinct(launches)
    specs = aot.compile_all(work, jobs=a.jobs, dump_dir=a.dump)
    rows = table_rows(specs, uses)
    import triton

    print(f"triton {triton.__version__}, {a.arch}, N={a.n} D={a.d} V={a.v} {a.dtype}")
    for strategy, cfg in cfgs.items():
        print(f"config ({strategy}): {cfg}")
    print(markdown_table(rows, ["kernel", "strategy", "call", "tile", "regs", "spill", "smem", "mma", "ok"],
                         ["kernel", "strategy", "call", "tile NxVxD warps stages", "regs", "spill B", "smem B",
                          "MMA", ""]))
    if a.dump:
        with open(os.path.join(a.dump, "kernels.json"), "w") as f:
            json.dump(dict(triton=triton.__version__, arch=a.arch, shape=dict(n=a.n, d=a.d, v=a.v, dtype=a.dtype),
                           config=cfgs, rows=rows, specs=specs, uses=uses), f, indent=1)
    bad = [m for sp in specs for m in aot.check_resources(sp)]
    if a.strict:
        bad += [f"{sp['kernel']}: MMA {sp['mma_shapes']} (want wgmma n >= 64)" for sp in specs
                if sp["kernel"] in WIDE_MMA_KERNELS and sp["ok"] and sp["mma"]
                and (not aot.wgmma_n(sp["mma"]) or min(aot.wgmma_n(sp["mma"])) < 64)]
    for m in bad:
        print("FAIL:", m.splitlines()[0], file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
