"""The benchmark scripts keep working: each one's quick path at tiny shapes, with real values checked (≈30 s).

The scripts themselves live in ``benchmarks/`` (not collected by this suite); scripts that fork measurement cells
run in a fresh subprocess here, since a process forked after its parent used OpenMP must not use it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # each test runs a benchmark script in a subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _run(args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def test_reproduce_memory_quick(tmp_path):
    js = tmp_path / "m.json"
    out_dir = tmp_path / "out"
    _run(["benchmarks/reproduce_memory.py", "--device", "cpu", "--quick", "--ratios", "1,0.1",
          "--out-dir", str(out_dir), "--json", str(js)])
    records = json.loads(js.read_text())
    assert len(records) == 12
    for r in records:
        assert {"impl", "ratio", "peak_mib"} <= set(r)
        assert r["peak_mib"] > 0 and math.isfinite(r["peak_mib"])
        assert r["step_extra_mib"] >= 0
    peak = {(r["impl"], r["ratio"]): r for r in records}
    topk = ("fused_topk@20", "fused_topk@64", "fused_topk@128")
    assert {i for i, _ in peak} == {"materialized_all", "materialized_selected", "fused", *topk}
    for impl in topk:  # the sparse teacher: the same selection budget, a finite loss, no [tokens, vocab] tensor
        assert peak[(impl, 1.0)]["selected"] == peak[(impl, 1.0)]["tokens"] and math.isfinite(peak[(impl, 1.0)]["loss"])
        assert peak[(impl, 0.1)]["selected"] == peak[("fused", 0.1)]["selected"]
        assert peak[(impl, 1.0)]["peak_mib"] < peak[("materialized_all", 1.0)]["peak_mib"]
    # the selection budget: ⌊ρ·m⌋ per sequence of m response tokens
    assert peak[("fused", 0.1)]["selected"] < peak[("fused", 1.0)]["selected"] == peak[("fused", 1.0)]["tokens"]
    # the claims the full run makes, at tiny shapes too
    assert peak[("fused", 0.1)]["peak_mib"] < peak[("materialized_all", 1.0)]["peak_mib"]
    assert peak[("materialized_all", 0.1)]["peak_mib"] < peak[("materialized_all", 1.0)]["peak_mib"]
    assert peak[("materialized_selected", 0.1)]["peak_mib"] < peak[("materialized_selected", 1.0)]["peak_mib"]
    # the losses agree across implementations at ratio 1 (same statistics, same selection, same KL)
    losses = [peak[(i, 1.0)]["loss"] for i in ("materialized_all", "materialized_selected", "fused")]
    assert max(losses) - min(losses) < 1e-3 * max(1.0, abs(losses[0]))
    text = (out_dir / "memory.md").read_text()
    assert "fused ≤ best materialised at every ratio" in text and "72.0" in text
    assert (out_dir / "memory.png").stat().st_size > 1000


def test_loss_step_core():
    from benchmarks import loss_step

    args = loss_step.parse_args(["--quick", "--no-baseline"])
    results = []
    for ratio in (1.0, 0.2):
        a = loss_step.parse_args(["--worker", "--quick", "--rule", "soft_or", "--ratio", str(ratio),
                                  "--repeats", "1"])
        results.append(loss_step.worker(a))
    assert results[0]["selected"] == results[0]["n"] == 2 * 64
    assert results[1]["selected"] == 2 * math.floor(0.2 * 64)
    assert all(r["time_s"] > 0 and r["peak_extra_bytes"] >= 0 for r in results)
    text = loss_step.report(results, 0.1, args)
    assert "| soft_or | 0.2 | 24/128 |" in text


def test_scaling_quick(tmp_path):
    _run(["benchmarks/scaling.py", "--quick", "--out-dir", str(tmp_path)])
    records = json.loads((tmp_path / "scaling.json").read_text())
    assert len(records) == 8 and not [r for r in records if "error" in r]
    assert all(r["time_s"] > 0 and r["peak_bytes"] >= 0 for r in records)
    assert {r["backend"] for r in records} == {"reference", "torch"}
    assert (tmp_path / "scaling.png").stat().st_size > 1000


def test_cpu_backends_tiny(tmp_path):
    md = tmp_path / "b.md"
    _run(["benchmarks/cpu_backends.py", "--shapes", "64x512x32", "--rounds", "2", "--repeats", "1",
          "--variants", "reference,torch-fused,torch-recompute,trl", "--out", str(md)])
    text = md.read_text()
    for variant in ("reference", "torch-fused", "torch-recompute", "trl"):
        assert f"| {variant} |" in text, variant
    assert "torch-fused time ≤ 0.8× reference" in text
    rounds = json.loads(md.with_suffix(".json").read_text())[0]["rounds"]
    ref = rounds[0]["reference"]
    for name in ("torch-fused", "torch-recompute", "trl"):  # equal semantics: same loss and gradient norms
        got = rounds[0][name]
        assert abs(got["loss"] - ref["loss"]) <= 1e-4 * abs(ref["loss"]), name
        assert abs(got["grad_norm_w"] / ref["grad_norm_w"] - 1) <= 1e-3, name


def test_cpu_topk_fused_tiny():
    out = _run(["benchmarks/cpu_topk_fused.py", "--shape", "128x2048x32", "--rounds", "1"]).stdout
    for variant in ("dense", "bucket", "bucket-recompute", "renormalize"):
        assert f"| {variant} |" in out, variant
    got = {ln.split()[2]: (float(ln.split()[6]), float(ln.split()[8])) for ln in out.splitlines()
           if ln.startswith("round ")}
    for a, b in zip(got["bucket"], got["bucket-recompute"]):  # the sweep and the recompute path: loss, |dW|
        assert abs(a - b) <= 1e-5 * abs(b) + 1e-6, got


def test_cpu_topk_tiny(tmp_path):
    md = tmp_path / "t.md"
    _run(["benchmarks/cpu_topk.py", "--shape", "300x2048x32", "--ks", "20,64", "--rounds", "2", "--repeats", "1",
          "--out", str(md)])
    text = md.read_text()
    for variant in ("dense", "topk_torch@20", "topk_chunked@20", "topk_torch@64", "topk_chunked@64"):
        assert f"| {variant} |" in text, variant
    assert "Command: `PYTHONPATH=. python benchmarks/cpu_topk.py --shape 300x2048x32" in text
    got = json.loads(md.with_suffix(".json").read_text())["rounds"][0]
    for k in (20, 64):  # the bucket KL (a coarsening) bounds the full KL from below, and grows with K
        dense, bucket = got["dense"]["loss"], got[f"topk_torch@{k}"]["loss"]
        assert 0 < bucket <= dense * (1 + 1e-5), (k, dense, bucket)
        assert math.isfinite(got[f"topk_chunked@{k}"]["loss"])
    assert got["topk_torch@20"]["loss"] <= got["topk_torch@64"]["loss"] * (1 + 1e-5)


def test_chunked_topk_baseline_is_its_float64_formula():
    from benchmarks.harness import variants
    from benchmarks.harness.inputs import make_inputs

    hs, ws, ht, wt = make_inputs(300, 1000, 32, 24, torch.float32, "cpu")
    topk = variants.teacher_topk_of(ht, wt, 20)
    variants.chunked_topk_forward_kl(hs, ws, topk, rows=128).backward()
    h64, w64 = hs.detach().double().requires_grad_(), ws.detach().double().requires_grad_()
    logq = topk.logprobs.double()
    want = (logq.exp() * (logq - torch.log_softmax(h64 @ w64.T, -1).gather(-1, topk.ids))).sum(-1).mean()
    want.backward()
    got = variants.chunked_topk_forward_kl(hs.detach(), ws.detach(), topk, rows=128)
    assert abs(float(got) - float(want.detach())) < 1e-5 * float(want.detach())
    for g, g64 in ((hs.grad, h64.grad), (ws.grad, w64.grad)):
        assert float((g.double() - g64).abs().max()) < 1e-5 * float(g64.abs().max())


def test_gpu_suite_runs_the_sparse_cells_on_the_cpu(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    names = "torch,topk_torch@20,topk_chunked@20,topk_torch@128,topk_triton@64"
    out = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--device", "cpu", "--quick", "--skip-tests",
                          "--skip-tip", "--n", "48", "--v", "997", "--variants", names, "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    raw = json.loads(next(tmp_path.glob("*.json")).read_text())
    cells = {(r["variant"], r["phase"]): r for r in raw["divergence"]}
    for name in ("topk_torch@20", "topk_torch@128"):
        assert all(cells[(name, p)].get("time", 0) > 0 for p in ("scoring", "forward", "backward", "step")), name
    assert cells[("topk_chunked@20", "step")].get("time", 0) > 0 and ("topk_chunked@20", "scoring") not in cells
    assert cells[("topk_triton@64", "step")]["text"] == "n/a (needs CUDA)"


def test_gpu_suite_tunes_then_uses_the_table(tmp_path):
    # the GPU suite's tuning section on the CPU (interpreter, tiny shape): the table is written and put first in
    # $TIPKERNELS_TRITON_CONFIGS for the cells after it
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1")
    env.pop("TIPKERNELS_TRITON_CONFIGS", None)
    out = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--device", "cpu", "--quick", "--skip-tests",
                          "--skip-divergence", "--skip-tip", "--tune", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    table = json.loads((tmp_path / "tuned_configs.json").read_text())
    assert len(table["entries"]) == 1 and table["entries"][0]["device"] == "cpu"
    report = next(p for p in tmp_path.glob("*.md") if p.name != "tuning.md").read_text()
    assert "## 1b. Tuning" in report and "| forward | start |" in report and "| backward | start |" in report
    assert "Dense matmul rate" in report


def test_bench_ops_collect_and_run():
    pytest.importorskip("pytest_benchmark")
    _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_bench_ops.py", "--benchmark-only",
          "--bench-shape", "32,256,16", "--bench-rounds", "1", "-k", "torch and (step or token_stats)"])


def test_gpu_plan_dry_run_cpu(tmp_path):
    """``benchmarks/gpu_plan.sh --dry-run-cpu``: the GPU plan's whole sequence at small shapes on the CPU (≈1–2 min):
    every section reported, every strategy correct against the torch backend, at most 8 result files."""
    out = tmp_path / "plan"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # the script sets it
    proc = subprocess.run(["bash", "benchmarks/gpu_plan.sh", "--dry-run-cpu", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "plan.md").read_text()
    for title in ("1. Matmul rate", "2. Compiled correctness", "3. Goal shape", "4. TRL and Liger", "5. TIP loss",
                  "6. Targeted compiled pytest", "7. Everything else", "Finished in"):
        assert title in report, title
    raw = json.loads((out / "plan.json").read_text())
    assert raw["rate"] > 0 and raw["bw"] > 0
    rows = raw["correct"]
    assert len(rows) >= 4 and not any("skipped" in str(r.get("torch")) for r in rows)
    for row in rows:
        for name in ("fused", "cublas", "fused_grad"):
            assert row[name].startswith("ok "), (row["shape"], name, row[name])
    assert all(raw["goal"][s].get("step", {}).get("time", 0) > 0 for s in ("fused", "cublas", "fused_grad"))
    assert "passed" in report.split("6. Targeted compiled pytest")[1].split("###")[0]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files


def test_triton_strategy_variants_run_their_strategy():
    """The suite's triton_fused / triton_cublas / triton_fused_grad variants run the strategy they name (its
    kernels, in the forward or the backward), the same strategies as the GPU plan's cells and the roofline's rows,
    and agree with the torch backend (interpreter, tiny fp32 shape; the triton tests check each strategy against
    the float64 truth)."""
    import torch

    from benchmarks.harness import roofline, variants
    from benchmarks.harness.inputs import clear_grads, make_inputs
    from tests._harness import TOL, scaled_err, triton_backend

    assert tuple(variants.TRITON_STRATEGIES) == roofline.STRATEGIES
    assert variants.STRATEGY_VARIANTS == ("triton_fused", "triton_cublas", "triton_fused_grad")
    inputs = make_inputs(24, 72, 16, 20, torch.float32, "cpu", seed=1)

    def run(loss):
        clear_grads(inputs)
        value = loss(*inputs)
        value.backward()
        out = (value.detach(), inputs[0].grad.clone(), inputs[1].grad.clone())
        clear_grads(inputs)
        return out

    def kernels(loss):
        """Names of the kernels launched by the forward and by the backward (recorded: nothing runs)."""
        clear_grads(inputs)
        with triton_backend.recorded_launches() as fwd:
            value = loss(*inputs)
        with triton_backend.recorded_launches() as bwd:
            value.backward()
        clear_grads(inputs)
        return {x.kernel.__name__ for x in fwd}, {x.kernel.__name__ for x in bwd}

    truth = run(variants.build_variant("torch", "cpu").loss)
    expect = {"triton_fused": ({"stats_kernel"}, {"dlogits_kernel"}),
              "triton_cublas": ({"stats_epilogue_kernel"}, {"dlogits_epilogue_kernel"}),
              "triton_fused_grad": ({"stats_epilogue_kernel", "dlogits_epilogue_kernel"}, set())}
    for name, (fwd_want, bwd_want) in expect.items():
        var = variants.build_variant(name, "cpu")
        assert var.unavailable is None and (var.score is not None) == (name in variants.SCORING), name
        fwd, bwd = kernels(var.loss)
        assert fwd == fwd_want and bwd_want <= bwd and (bwd_want or not bwd), (name, fwd, bwd)
        for got, want, what in zip(run(var.loss), truth, ("value", "d h_s", "d W_s")):
            assert scaled_err(got, want.double(), 1.0 if what == "value" else 0.0) <= TOL[torch.float32], (name, what)
