"""Test configuration: without a CUDA device, Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here (before tests._harness, which imports
the backends). On a CUDA machine the same tests run the compiled kernels.

Layout: tests/_harness.py holds everything shared (inputs, the float64 truth, the pass rule, memory probes, the
library internals the tests use); ops/ the public ops, backends/ one file per backend, contracts/ errors,
extremes, properties and determinism, opd/ the OPD loop.

Markers: ``slow`` (longer tests, still part of CI) and ``gpu`` (need a CUDA device; skipped without one).
The fast subset, under 3 minutes on 2 cores: ``python -m pytest -m "not slow" tests``.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Hypothesis profiles (tests/contracts/test_properties.py): "ci" (the default) is few examples, derandomized so
# that a CI run is reproducible, with no deadline (the Triton interpreter is slow and erratic); "deep" explores many
# random examples. Pick one with HYPOTHESIS_PROFILE=deep.
try:
    from hypothesis import HealthCheck, settings
except ModuleNotFoundError:  # hypothesis is a dev extra; only contracts/test_properties.py needs it
    pass
else:
    _SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True,
                              suppress_health_check=_SLOW_OK)
    settings.register_profile("deep", max_examples=200, deadline=None, print_blob=True,
                              suppress_health_check=_SLOW_OK)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


from tests._harness import HAS_CUDA, torch_backend  # noqa: E402  (after TRITON_INTERPRET is set)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped on a machine without CUDA (never silently passed)."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------------ torch backend tile fixtures


@pytest.fixture
def tiles_3x16(monkeypatch):
    """Logit tiles of 3 rows x 16 columns: several row and vocab chunks, with ragged last chunks."""
    calls = []
    real = torch_backend.tile_shape

    def small(n_rows, vocab, budget_bytes=None):
        calls.append((n_rows, vocab))
        return min(3, max(1, n_rows)), min(16, vocab)

    monkeypatch.setattr(torch_backend, "tile_shape", small)
    yield calls
    assert real is not None


@pytest.fixture
def tiny_budget(monkeypatch):
    """A CHUNK_BUDGET_BYTES of 3 x 16 fp32 tiles' worth: 1-row x 48-column tiles through the real tile_shape."""
    budget = 3 * 16 * 4 * torch_backend._TILE_TEMPORARIES
    monkeypatch.setattr(torch_backend, "CHUNK_BUDGET_BYTES", budget)
    rows, cols = torch_backend.tile_shape(10**6, 101)
    assert rows * cols * 4 * torch_backend._TILE_TEMPORARIES <= budget and cols < 101
    return rows, cols
