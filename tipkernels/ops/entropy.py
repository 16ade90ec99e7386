"""Differentiable student entropy from hidden states and lm_head weights."""

from __future__ import annotations

from typing import Optional

import torch

from ..backends import get_backend
from ..inputs import REDUCTIONS, build_problem, check_choice
from .core import reduced_row_values

Tensor = torch.Tensor


def fused_linear_entropy(
    hidden: Tensor,
    weight: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    reduction: str = "none",
    backend: str = "auto",
    process_group=None,
) -> Tensor:
    """Entropy ``H = -Σ p log p`` (nats) of ``softmax((hidden · weightᵀ + bias) / T)`` per token.

    Args:
        hidden: ``[N, D]`` or ``[B, L, D]`` (fp32/fp16/bf16/fp64). Differentiable.
        weight: ``[V, D]``. Differentiable. bias: ``[V]`` or None. Differentiable.
        temperature: positive. reduction: "none", "sum" or "mean". backend: as in ``token_stats``.
        process_group: vocabulary parallelism, as in :func:`fused_linear_divergence` (``weight`` is this rank's
            shard).

    Returns:
        fp32 (fp64 for fp64 inputs) per-token entropies shaped like the token dims, or a 0-dim tensor.
    """
    prob, lead = build_problem(hidden, weight, student_bias=bias, temperature=temperature)
    check_choice("reduction", reduction, REDUCTIONS)
    be = get_backend(backend, prob.device, process_group, prob.vocab_size)
    return reduced_row_values(prob, "entropy", 0.0, be, lead, reduction)
