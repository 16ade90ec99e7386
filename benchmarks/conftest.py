"""pytest configuration of the microbenchmarks (``pytest benchmarks/test_bench_ops.py --benchmark-only``).

Not collected by the default test command (pyproject's ``testpaths`` is ``tests``). Puts the repository root on
``sys.path`` (for ``benchmarks.harness``) and adds ``--bench-shape N,V,D`` to override the default shapes.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def pytest_addoption(parser):
    parser.addoption("--bench-shape", default=None,
                     help="N,V,D of the microbenchmarks (default: 512,8192,256 on the CPU, 4096,151936,4096 on CUDA)")
    parser.addoption("--bench-rounds", type=int, default=None,
                     help="timed rounds per benchmark (default: 5 on the CPU, 20 on CUDA)")
