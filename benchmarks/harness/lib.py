"""Every import of a tipkernels internal the benchmarks use, in one place (the public API, ``import tipkernels as
tk``, is imported where it is used).

The scripts and the other harness modules reach the library's internals only through the names below, so a move
inside the package changes this file and nothing else. The Triton backend is imported on first use: importing the
harness must not need a working Triton.
"""

from __future__ import annotations

from tipkernels.backends import chunked  # noqa: F401 - the chunked PyTorch backend ("torch")
from tipkernels.backends import reference  # noqa: F401 - the materialised formulas (entropy, reverse_kl, forward_kl, …)
from tipkernels.backends.chunked import tile_budget_bytes  # noqa: F401 - the torch backend's tile budget (bytes)
from tipkernels.inputs import Problem, build_problem, effective_kind  # noqa: F401


def triton_backend():
    """The Triton backend package (``forward_stats``, ``backward``; ``config``: ``resolve``, ``device_key``,
    ``tuned_config``, ``TUNED_CONFIGS_ENV``, ``BWD_STRATEGIES``; ``aot``: the ahead-of-time compiles)."""
    from tipkernels.backends import triton as module

    return module


def opd_models():
    """The OPD helpers on Hugging Face models (``final_hidden_states``, ``lm_head``)."""
    from tipkernels.opd import models

    return models
