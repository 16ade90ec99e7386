"""Test configuration: without a CUDA device, Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here. On a CUDA machine the same tests
run the compiled kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Hypothesis profiles (tests/test_properties.py): "ci" (the default) is few examples, derandomized so that a CI
# run is reproducible, with no deadline (the Triton interpreter is slow and erratic); "deep" explores many random
# examples. Pick one with HYPOTHESIS_PROFILE=deep.
try:
    from hypothesis import HealthCheck, settings
except ModuleNotFoundError:  # hypothesis is a dev extra; only test_properties.py needs it
    pass
else:
    _SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True,
                              suppress_health_check=_SLOW_OK)
    settings.register_profile("deep", max_examples=200, deadline=None, print_blob=True,
                              suppress_health_check=_SLOW_OK)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
