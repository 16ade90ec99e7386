"""Differentiable student entropy from hidden states and lm_head weights."""

from __future__ import annotations

from typing import Optional

import torch

from ..backends import get_backend
from ..inputs import REDUCTIONS, build_problem, check_choice, check_logit_scale, check_softcap
from .core import reduced_row_values

Tensor = torch.Tensor


def fused_linear_entropy(
    hidden: Tensor,
    weight: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    reduction: str = "none",
    backend: str = "auto",
    process_group=None,
) -> Tensor:
    """Entropy ``H = -Σ p log p`` (nats) of ``softmax(c · tanh(a · (hidden · weightᵀ + bias) / c) / T)`` per token
    (``softmax(a · (hidden · weightᵀ + bias) / T)`` without a soft-cap).

    Args:
        hidden: ``[N, D]`` or ``[B, L, D]`` (fp32/fp16/bf16/fp64). Differentiable.
        weight: ``[V, D]``. Differentiable. bias: ``[V]`` or None. Differentiable.
        temperature: positive. logit_scale: ``a > 0`` (default 1). softcap: ``c > 0`` or None (no tanh); the
            transform is applied in that order: scale, cap, temperature.
        reduction: "none", "sum" or "mean". backend: as in ``token_stats``.
        process_group: vocabulary parallelism, as in :func:`fused_linear_divergence` (``weight`` is this rank's
            shard).

    Returns:
        fp32 (fp64 for fp64 inputs) per-token entropies shaped like the token dims, or a 0-dim tensor.
    """
    prob, lead = build_problem(hidden, weight, student_bias=bias, temperature=temperature,
                               student_logit_scale=_named("logit_scale", logit_scale),
                               student_softcap=_named("softcap", softcap, cap=True))
    check_choice("reduction", reduction, REDUCTIONS)
    be = get_backend(backend, prob.device, process_group, prob.vocab_size)
    return reduced_row_values(prob, "entropy", 0.0, be, lead, reduction)


def _named(name: str, value, cap: bool = False):
    """Check with this op's keyword names (build_problem's errors would name the student's)."""
    return check_softcap(name, value) if cap else check_logit_scale(name, value)
