"""The cuBLAS-chunk strategy's Triton kernels (``stats_epilogue_kernel``, ``jsd_epilogue_kernel``,
``dlogits_epilogue_kernel``) compile for Hopper (sm_90) ahead of time, on a machine without a GPU.

The same method and machinery as tests/backends/test_triton_compile.py (``tipkernels.backends.triton.aot`` through
tests/_harness.py's ``aot_problem``, ``aot_worker``, ``aot_report``: one place for how a recorded launch becomes an
sm_90 cubin): the backend's entry points run with ``recorded_launches()`` and the strategy forced to ``"cublas"``
(forward, JSD, recompute backward) and fused_grad's sweep; each distinct specialisation is compiled in a subprocess
(``python tests/backends/test_triton_cublas_compile.py OUT.json``; TRITON_INTERPRET=0, a fresh cache). Checked
(``aot.check_resources``): compiles for sm_90a, fits a block's shared memory, no register spills, <= 255 registers
with one block fitting the register file; and no MMA (the epilogues do no matmul: cuBLAS does). Every constexpr flag
and KIND/MODE is covered. A separate subprocess from the fused kernels' (whose 114 compiles already take most of
their 600 s bound on two loaded cores).
"""

from __future__ import annotations

import os
import sys

import pytest

from tests._harness import triton_backend

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
    # a vocabulary not a multiple of 16 in one chunk: the fp32 buffers' row pitch keeps the stride 16-aligned (the
    # statistics epilogue spilled at 255 registers without it)
    _case("odd-bf16-L+L", "bfloat16", "L", "L", None, [("stats",), ("jsd", 0.3), ("backward", "reverse_kl"),
                                                      ("sweep", "reverse_kl")], config="odd"),
    _case("small-bf16-Lb+Lb", "bfloat16", "Lb", "Lb", "i64", [("stats",), ("jsd", 0.3), ("backward", "reverse_kl")],
          config="small"),
]
CASE_IDS = [c["id"] for c in CASES]
SMALL_EPILOGUE = dict(epi_block_n=16, epi_block_v=16, split_v=2)


def _record(case):
    """The launches of the case's calls with the strategy forced to "cublas" (nothing runs: outputs are garbage)."""
    import torch

    from tests._harness import aot_problem, triton_backend as tb

    prob = aot_problem(case)
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
                tb.fused_value_and_grad(prob, call[1], beta, torch.ones(prob.num_rows), config=cfg)
    return launches


def worker(out_path: str, jobs: int = 2) -> None:
    """Record every case's launches, compile the distinct specialisations for sm_90, write the JSON report."""
    from tests._harness import aot_worker

    aot_worker(out_path, {c["id"]: _record(c) for c in CASES}, jobs=jobs)


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton")  # a hard dependency of the project: never actually skipped here
    from tests._harness import aot_report

    return aot_report(__file__, timeout=600)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compiles_for_sm90(report, case):
    specs = [report["specs"][i] for i in report["cases"][case["id"]]]
    names = {sp["kernel"] for sp in specs}
    assert names & KERNELS, f"the case launched none of the strategy's kernels: {names}"
    for sp in specs:
        # compiles for sm_90a; shared memory fits a block; <= 255 registers, one block fits the file; no spills
        problems = triton_backend.aot.check_resources(sp)
        assert not problems, "\n".join(problems)
        assert sp["ptx_target"] == "sm_90a" and sp["registers"] <= 255 and sp["spill_bytes"] == 0, sp
        what = f"{sp['kernel']} {sp['constexprs']} {sp['pointer_types']}"
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
    worker(sys.argv[1])
