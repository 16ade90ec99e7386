"""The roofline of benchmarks/harness/roofline.py: its floors are TUNING.md's, its strategies cost what their steps
say (a fast arithmetic check; the GPU plan prints it beside measured times)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.harness import roofline  # noqa: E402

GOAL = (8192, 151936, 4096, 4096)


def test_floors_at_the_goal_shape():
    fl = roofline.floors(*GOAL)
    assert fl["scoring"] * 1e3 == pytest.approx(25.8, abs=0.05)
    assert fl["step (recompute)"] * 1e3 == pytest.approx(77.4, abs=0.05)
    assert fl["step (gradient in the sweep)"] * 1e3 == pytest.approx(51.6, abs=0.05)


def test_predictions_at_the_goal_shape():
    ms = {(s, p): roofline.predict(s, p, *GOAL) * 1e3 for s in roofline.STRATEGIES for p in roofline.PHASES}
    assert ms[("fused", "scoring")] == pytest.approx(25.8, abs=0.05)  # compute-bound, inputs read once
    assert ms[("fused", "step")] == pytest.approx(77.4, abs=0.05)
    # cuBLAS chunks: + one read of both models' fp32 logits (2 x 4·N·V bytes at 4.3 TB/s = 2.32 ms)
    assert ms[("cublas", "scoring")] == pytest.approx(25.8 + 2.32, abs=0.05)
    # backward: + the dS kernel's read of both chunks and its 16-bit write (2.32 + 0.58 ms)
    assert ms[("cublas", "step")] == pytest.approx(77.4 + 2.32 + 2.32 + 0.58, abs=0.1)
    # the sweep: floor 51.6 + statistics read + dS read + dS write
    assert ms[("fused_grad", "step")] == pytest.approx(51.6 + 2.32 + 2.32 + 0.58, abs=0.1)
    assert ms[("fused_grad", "step")] < ms[("cublas", "step")] < ms[("fused", "step")] + 6
    # blocks of 64 rows: the d W accumulator's traffic (read and written per block) takes over
    assert roofline.predict("fused_grad", "step", *GOAL, sweep_rows=64) * 1e3 > ms[("fused_grad", "step")] + 5


def test_table_and_bad_names():
    text = roofline.table(*GOAL, measured={("cublas", "step"): 0.1}, others={"triton": {"scoring": 0.03}})
    assert "| cublas |" in text and "**100**" in text and "triton (measured)" in text
    with pytest.raises(ValueError, match="strategy"):
        roofline.steps("tiles", "step", *GOAL)
    with pytest.raises(ValueError, match="phase"):
        roofline.steps("fused", "train", *GOAL)
