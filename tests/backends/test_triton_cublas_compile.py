"""The cuBLAS-chunk strategy's Triton kernels (``stats_epilogue_kernel``, ``jsd_epilogue_kernel``,
``dlogits_epilogue_kernel``) compile for Hopper (sm_90) ahead of time, on a machine without a GPU.

The same method and machinery as tests/backends/test_triton_compile.py (its ``_problem``, ``_specialise``,
``_compile_one``, ``_describe``: one place for how a recorded launch becomes an sm_90 cubin): the backend's entry
points run with ``recorded_launches()`` and the strategy forced to ``"cublas"`` (forward, JSD, recompute backward)
and fused_grad's sweep; each distinct specialisation is compiled in a subprocess (TRITON_INTERPRET=0, a fresh
cache). Checked: compiles for sm_90a, no register spills, ≤ 255 registers, and no MMA (the epilogues do no matmul:
cuBLAS does). Every constexpr flag and KIND/MODE is covered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

pytestmark = pytest.mark.slow  # a subprocess compiles ~30 kernels

KERNELS = {"stats_epilogue_kernel", "jsd_epilogue_kernel", "dlogits_epilogue_kernel"}
ALL_KINDS = (("backward", "entropy"), ("backward", "reverse_kl"), ("backward", "forward_kl"),
             ("backward", "jsd", 0.3))
SWEEPS = (("sweep", "reverse_kl"), ("sweep", "jsd", 0.3), ("sweep", "forward_kl"))


def _case(cid, dtype, student, teacher, labels, calls, config="default", caps="", strided=False):
    return dict(id=cid, dtype=dtype, student=student, teacher=teacher, labels=labels, calls=calls, config=config,
                caps=caps, strided=strided, fp32_dot=None)


CASES = [
    _case("bf16-Lb+Lb-labels", "bfloat16", "Lb", "Lb", "i64", [("stats",), ("jsd", 0.3), ("jsd", 1.0), ("jsd", 0.0),
                                                               *ALL_KINDS, *SWEEPS]),
    _case("bf16-L+Z", "bfloat16", "L", "Z", "i32", [("stats",), ("jsd", 0.3), ("backward", "reverse_kl"),
                                                    ("sweep", "reverse_kl")], strided=True),
    _case("bf16-Z+L", "bfloat16", "Z", "L", None, [("stats",), ("jsd", 0.3)]),
    _case("bf16-Lb-alone", "bfloat16", "Lb", "", None, [("stats",), ("backward", "entropy"), ("sweep", "entropy")]),
    _case("bf16-Lb+Lb-capped", "bfloat16", "Lb", "Lb", None, [("stats",), ("jsd", 0.3), ("backward", "jsd", 0.3),
                                                             ("sweep", "reverse_kl")], caps="both"),
    _case("fp16-L+L", "float16", "L", "L", None, [("stats",), ("backward", "reverse_kl")]),
    _case("fp32-Lb+Lb-labels", "float32", "Lb", "Lb", "i64", [("stats",), ("jsd", 0.3), ("backward", "jsd", 0.3),
                                                             ("sweep", "jsd", 0.3)]),
    _case("small-bf16-Lb+Lb", "bfloat16", "Lb", "Lb", "i64", [("stats",), ("jsd", 0.3), ("backward", "reverse_kl")],
          config="small"),
]
CASE_IDS = [c["id"] for c in CASES]
SMALL_EPILOGUE = dict(epi_block_n=16, epi_block_v=16, split_v=2)


def _record(case):
    import torch

    from tests._harness import triton_backend as tb
    from tests.backends import test_triton_compile as tc

    prob = tc._problem(case)
    cfg = dict(SMALL_EPILOGUE if case["config"] == "small" else {}, strategy="cublas")
    with tb.recorded_launches() as launches:
        saved = tb.forward_stats(prob, config=cfg)
        fake = saved["student_lse"]
        full = dict(saved, teacher_lse=fake, reverse_kl=fake, kl_pm=fake)
        for call in case["calls"]:
            beta = call[2] if len(call) > 2 else 0.5
            if call[0] == "jsd":
                tb.jsd_forward(prob, fake, fake, call[1], config=cfg)
            elif call[0] == "backward":
                tb.backward(prob, call[1], torch.ones(prob.num_rows), full, beta, config=cfg)
            elif call[0] == "sweep":
                kind = {"jsd": "jsd"}.get(call[1], call[1])
                tb.fused_value_and_grad(prob, kind, beta, torch.ones(prob.num_rows), config=cfg)
    return launches


def worker(out_path: str, jobs: int = 2) -> None:
    import multiprocessing

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from tests.backends import test_triton_compile as tc

    t0 = time.perf_counter()
    backend = make_backend(GPUTarget(*tc.TARGET))
    work, keys, cases = tc._WORK, {}, {}
    for case in CASES:
        cases[case["id"]] = []
        for launch in _record(case):
            sig, constexprs, attrs, options = tc._specialise(launch.kernel, backend, launch.args, launch.kwargs)
            key = repr((launch.kernel.__name__, sorted(sig.items()), sorted(constexprs.items(), key=repr),
                        sorted(attrs.items(), key=repr), sorted(options.items(), key=repr)))
            if key not in keys:
                keys[key] = len(work)
                work.append((launch.kernel, sig, constexprs, attrs, options))
            cases[case["id"]].append(keys[key])
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        results = pool.map(tc._compile_one, range(len(work)), chunksize=1)
    specs = [dict(tc._describe(k, s, c, o), **results[i]) for i, (k, s, c, a, o) in enumerate(work)]
    with open(out_path, "w") as f:
        json.dump(dict(triton=triton.__version__, cases=cases, specs=specs, seconds=time.perf_counter() - t0), f,
                  indent=1)


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=os.path.join(tmp, "cache"),
                   TRITON_DUMP_PTXAS_LOG="1", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=repo)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), out], env=env, cwd=repo,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"compile worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        with open(out) as f:
            return json.load(f)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compiles_for_sm90(report, case):
    specs = [report["specs"][i] for i in report["cases"][case["id"]]]
    names = {sp["kernel"] for sp in specs}
    assert names & KERNELS, f"the case launched none of the strategy's kernels: {names}"
    for sp in specs:
        what = f"{sp['kernel']} {sp['constexprs']} {sp['pointer_types']}"
        assert sp["ok"], f"{what} does not compile for sm_90:\n{sp['error']}"
        assert sp["ptx_target"] == "sm_90a", what
        assert sp["registers"] is not None and sp["spill_bytes"] is not None, f"{what}: no ptxas -v report"
        assert sp["registers"] <= 255 and sp["registers"] * 32 * sp["num_warps"] <= 64 * 1024, (what, sp)
        assert sp["spill_bytes"] == 0, f"{what}: ptxas spills {sp['spill_bytes']} bytes ({sp['registers']} regs)"
        if sp["kernel"] in KERNELS:
            assert sp["mma"] == [], f"{what}: the epilogues do no matmul"


def test_cases_cover_every_specialisation_axis(report):
    seen = {}
    for sp in report["specs"]:
        seen.setdefault(sp["kernel"], []).append(sp)
    assert KERNELS <= set(seen)

    def values(kernel, name):
        return {sp["constexprs"][name] for sp in seen[kernel] if name in sp["constexprs"]}

    for flag in ("S_BIAS", "S_CAP", "HAS_TEACHER", "T_BIAS", "T_CAP", "HAS_LABELS"):
        assert values("stats_epilogue_kernel", flag) == {False, True}, flag
    assert values("jsd_epilogue_kernel", "MODE") == {0, 1, 2}
    assert values("dlogits_epilogue_kernel", "KIND") == {0, 1, 2, 3}
    for flag in ("S_BIAS", "S_CAP", "HAS_TEACHER"):
        assert values("dlogits_epilogue_kernel", flag) == {False, True}, flag
    ptrs = {t for k in KERNELS for sp in seen[k] for t in sp["pointer_types"]}
    assert {"*bf16", "*fp16", "*fp32", "*i64", "*i32"} <= ptrs
    print(f"triton {report['triton']}: {len(report['specs'])} kernels in {report['seconds']:.1f}s")
    for sp in report["specs"]:
        print(f"{sp['kernel']:24s} regs={sp.get('registers')} spill={sp.get('spill_bytes')} {sp['constexprs']}")


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        sys.exit("run the compile worker with TRITON_INTERPRET=0")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    worker(sys.argv[1])
