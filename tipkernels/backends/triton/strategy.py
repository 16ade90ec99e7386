"""Which of the Triton backend's strategies runs a call, chosen in one place (docs/design.md §2, §4).

Forward (statistics, the JSD pass) and recompute backward:

- ``"fused"``: the fused kernels of :mod:`.stats` / :mod:`.backward`; each logit tile is formed by ``tl.dot`` in
  registers and never stored.
- ``"cublas"``: :mod:`.cublas`: cuBLAS forms both models' logits for ``[rows, vocabulary chunk]`` in bounded fp32
  buffers (``cublas_chunk_mib``), one Triton epilogue kernel folds both chunks into the online statistics in a
  single read. The backward likewise: cuBLAS chunk logits, a Triton ``dS`` kernel, cuBLAS gradient products.

Gradient, when the upstream gradient of every row is known in the forward (reduction "sum"/"mean",
:func:`tipkernels.ops.core.reduced_row_values` asks :func:`grad_strategy`):

- ``"recompute"``: forward now, backward recomputes the logits (either forward strategy above).
- ``"fused_grad"``: :func:`.cublas.fused_value_and_grad`: a row block holds both models' full-vocabulary logits
  (bounded by ``sweep_mib``), forms values and ``dS`` and the gradient products in the forward's sweep; backward
  only scales.

Config keys (validated here, resolved with the launch config of :mod:`.config`; set them with
``tk.set_options(triton_config={...})``, a tuned-table entry, or an entry point's ``config=``):

``strategy`` "auto" | "fused" | "cublas"; ``grad_strategy`` "auto" | "recompute" | "fused_grad";
``cublas_chunk_mib`` (fp32 chunk buffers of both models together); ``sweep_mib`` (fused_grad's row block: both
models' fp32 logits and the 16-bit ``dS``, plus an fp32 ``d weight`` accumulator if it fits too);
``sweep_dw`` "auto" | "fp32" | "dtype" (how fused_grad accumulates ``d weight`` over row blocks);
``epi_block_n`` / ``epi_block_v`` (the epilogue kernels' tile).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

from ...inputs import Problem

STRATEGY_KEYS = ("strategy", "grad_strategy", "cublas_chunk_mib", "sweep_mib", "sweep_dw", "epi_block_n",
                 "epi_block_v")
FORWARD_STRATEGIES = ("auto", "fused", "cublas")
GRAD_STRATEGIES = ("auto", "recompute", "fused_grad")
SWEEP_DW = ("auto", "fp32", "dtype")

#: "auto" picks cuBLAS chunks on CUDA for a linear student with at least this hidden size and this many rows: the
#: roofline (benchmarks/harness/roofline.py) has the chunk GEMMs near the matmul rate there and the two extra
#: fp32 passes over the chunk (the GEMM's write, the epilogue's read) at ~15% of the GEMM time (D = 4096).
AUTO_CUBLAS_MIN_D = 1024
AUTO_CUBLAS_MIN_ROWS = 1024
#: "auto" takes fused_grad only when a row block of at least this many rows fits ``sweep_mib`` (the ``d weight``
#: product's K: fewer rows make it bound by reading and writing the ``[V, D]`` accumulator).
AUTO_SWEEP_MIN_ROWS = 512
_MIB = 2**20


def strategy_defaults() -> Dict[str, object]:
    """Defaults of the strategy keys. ``sweep_mib`` 256: the step's extra-memory goal (benchmarks/gpu_suite.py)."""
    return {"strategy": "auto", "grad_strategy": "auto", "cublas_chunk_mib": 128, "sweep_mib": 256,
            "sweep_dw": "auto", "epi_block_n": 16, "epi_block_v": 128}


def validate_strategy(over: Mapping, source: str) -> None:
    """ValueError naming ``source`` and the key for a bad strategy value (the block sizes are checked with the
    other dot blocks by :func:`.config.validate`)."""
    for key, allowed in (("strategy", FORWARD_STRATEGIES), ("grad_strategy", GRAD_STRATEGIES),
                         ("sweep_dw", SWEEP_DW)):
        if key in over and over[key] not in allowed:
            raise ValueError(f"{source} {key}={over[key]!r}: expected one of {', '.join(map(repr, allowed))}")
    for key in ("cublas_chunk_mib", "sweep_mib"):
        if key in over:
            x = over[key]
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0:
                raise ValueError(f"{source} {key}={x!r}: expected a positive number")


def _cfg(prob: Problem, config: Optional[Mapping]):
    from . import config as _config

    return _config.for_call(prob, config)


def forward_choice(prob: Problem, cfg: Mapping) -> str:
    """"fused" or "cublas" for this problem and resolved config (see the module docstring)."""
    want = cfg["strategy"]
    if want != "auto":
        return want
    if prob.device.type != "cuda" or not prob.student_is_linear:
        return "fused"
    big = prob.student_hidden.shape[1] >= AUTO_CUBLAS_MIN_D and prob.num_rows >= AUTO_CUBLAS_MIN_ROWS
    return "cublas" if big else "fused"


def grad_choice(prob: Problem, cfg: Mapping, upstream_known: bool) -> str:
    """"fused_grad" or "recompute": fused_grad needs a known upstream gradient and a linear student; "auto" takes
    it on CUDA where the forward is "cublas" and a block of :data:`AUTO_SWEEP_MIN_ROWS` rows (or all rows) fits
    ``sweep_mib`` (:func:`.cublas.sweep_rows`)."""
    if not upstream_known or not prob.student_is_linear:
        return "recompute"
    want = cfg["grad_strategy"]
    if want != "auto":
        return want
    if prob.device.type != "cuda" or forward_choice(prob, cfg) != "cublas":
        return "recompute"
    from .cublas import sweep_rows

    rows = sweep_rows(cfg, prob)
    return "fused_grad" if rows >= min(prob.num_rows, AUTO_SWEEP_MIN_ROWS) else "recompute"


# ----------------------------------------------------------------------- the backend's entry points


def forward_stats(prob: Problem, *, config: Optional[dict] = None):
    """The contract's ``forward_stats`` by the chosen forward strategy."""
    from .cublas import forward_stats as by_cublas
    from .stats import forward_stats as by_fused

    chosen = forward_choice(prob, _cfg(prob, config))
    return (by_cublas if chosen == "cublas" else by_fused)(prob, config=config)


def jsd_sums(prob: Problem, student_lse, teacher_lse, beta: float, *, config: Optional[dict] = None):
    from .cublas import jsd_sums as by_cublas
    from .stats import jsd_sums as by_fused

    chosen = forward_choice(prob, _cfg(prob, config))
    return (by_cublas if chosen == "cublas" else by_fused)(prob, student_lse, teacher_lse, beta, config=config)


def jsd_forward(prob: Problem, student_lse, teacher_lse, beta: float, *, config: Optional[dict] = None):
    """Per-row JSD(beta) and KL(p || m) (fp32 ``[N]`` each), a second pass given both LSEs ``[N]`` (beta = 0 / 1:
    forward / reverse KL), by the chosen forward strategy's :func:`jsd_sums`."""
    from ...inputs import combine_jsd

    return combine_jsd(*jsd_sums(prob, student_lse, teacher_lse, beta, config=config), float(beta))


def backward(prob: Problem, kind: str, grad_rows, saved, beta: float = 0.5, *, config: Optional[dict] = None):
    """The contract's ``backward`` (recompute) by the chosen forward strategy (its logits recomputed the same way)."""
    from .backward import backward as by_fused
    from .cublas import backward as by_cublas

    chosen = forward_choice(prob, _cfg(prob, config))
    by = by_cublas if chosen == "cublas" and prob.student_is_linear else by_fused
    return by(prob, kind, grad_rows, saved, beta, config=config)


def grad_strategy(prob: Problem, upstream_known: bool, *, config: Optional[dict] = None) -> str:
    """The contract's optional ``grad_strategy`` (:func:`tipkernels.ops.core.reduced_row_values`)."""
    if prob.num_rows == 0:
        return "recompute"
    return grad_choice(prob, _cfg(prob, config), upstream_known)


def fused_value_and_grad(prob: Problem, kind: str, beta: float, row_grad: torch.Tensor, wanted=(True, True, True),
                         *, config: Optional[dict] = None):
    """The contract's optional ``fused_value_and_grad``: :func:`.cublas.fused_value_and_grad`."""
    from .cublas import fused_value_and_grad as sweep

    return sweep(prob, kind, beta, row_grad, wanted, config=config)
