"""Differentiable per-token divergences: fused from hidden states, or vocabulary-chunked from logits."""

from __future__ import annotations

from typing import Optional

import torch

from ..backends import get_backend
from ..backends.vocab_parallel import global_vocab
from ..inputs import (DIVERGENCES, REDUCTIONS, build_problem, check_beta, check_choice, check_tail,
                      check_teacher_topk, check_weights, split_teacher)
from .core import reduce, reduced_row_values, row_values
from .topk import reduced_topk_values

Tensor = torch.Tensor


def fused_linear_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    *,
    teacher_logits: Optional[Tensor] = None,
    teacher_topk=None,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    tail: str = "bucket",
    temperature: float = 1.0,
    student_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: Optional[float] = None,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
    reduction: str = "none",
    backend: str = "auto",
    process_group=None,
) -> Tensor:
    """Teacher–student divergence per token, from hidden states and lm_head weights, never forming ``[N, V]``.

    Args:
        student_hidden: ``[N, D_s]`` or ``[B, L, D_s]`` (fp32/fp16/bf16/fp64). Differentiable.
        student_weight: ``[V, D_s]``. Differentiable. student_bias: ``[V]`` or None. Differentiable.
        teacher_hidden / teacher_weight / teacher_bias: ``[..., D_t]``, ``[V_t >= V, D_t]``, ``[V_t]``; or
            teacher_logits ``[..., V_t]``. Never differentiated (treated as constants).
        teacher_topk: instead of a dense teacher, a :class:`tipkernels.TeacherTopK` or ``(ids, logprobs)`` pair
            shaped ``[*token dims, K]``: the teacher's top-k ids (``-1`` pads) and its full-vocabulary
            log-probabilities there (not differentiated). The divergence is then taken between the binned
            distributions of ``tail`` (docs/design.md §1, "A teacher seen through its top-k"); the teacher's
            transform keywords do not apply (its log-probabilities are final).
        divergence: "reverse_kl" = KL(p_s || q_t) (the OPD loss), "forward_kl" = KL(q_t || p_s), or "jsd":
            generalised JSD(beta) in TRL's convention (beta=0 forward KL, beta=1 reverse KL).
        beta: in [0, 1], used by "jsd" only.
        tail: with ``teacher_topk``: "bucket" (default; the K ids and one bin for the rest of the vocabulary,
            a lower bound of the full divergence, exact when the teacher's rest is empty) or "renormalize" (both
            distributions renormalised over the K ids).
        temperature: positive; divides both models' logits.
        student_logit_scale / student_softcap / teacher_logit_scale / teacher_softcap: per-model logit transforms:
            each model's logits are ``c · tanh(a · (h·Wᵀ + b) / c) / T`` with scale ``a > 0`` (default 1) and
            soft-cap ``c > 0`` (None: no tanh), applied in that order (scale, cap, temperature; TRL's order).
            ``teacher_logits`` are taken as the raw ``h·Wᵀ + b``: the teacher's transform is applied to them too
            (pass logits a model has already capped with the default teacher transform).
        weights: optional float ``[N]``/``[B, L]`` per-token weights. Rows of weight 0 cost nothing in backward.
        reduction: "none" (per-token values, times weights if given, shaped like the token dims), "sum", or
            "mean" (the weighted mean ``Σ w·v / Σ w`` with weights; 0 when empty).
        backend: one of :data:`tipkernels.inputs.BACKENDS`: "auto" (triton for CUDA tensors, torch otherwise),
            "torch", "triton" or "reference".
        process_group: a ``torch.distributed`` group for vocabulary parallelism: this rank passes its contiguous
            shard of the student and teacher lm_head rows (shards in rank order), every rank the same hidden
            states; every rank gets the global values, the complete hidden-state gradient and its own weight
            shard's gradient (see :mod:`tipkernels.backends.vocab_parallel`).

    Returns:
        fp32 tensor (fp64 for fp64 inputs): per-token values shaped like the token dims, or a 0-dim tensor.
    """
    check_choice("divergence", divergence, DIVERGENCES)
    beta = check_beta(beta)
    tail = check_tail(tail)
    sparse = teacher_topk is not None
    dense, (teacher_hidden, teacher_weight, teacher_logits, teacher_bias) = split_teacher(
        teacher_topk, teacher_hidden, teacher_weight, teacher_logits, teacher_bias)
    prob, lead = build_problem(
        student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits=teacher_logits,
        student_bias=student_bias, teacher_bias=teacher_bias, temperature=temperature, require_teacher=not sparse,
        student_logit_scale=student_logit_scale, student_softcap=student_softcap,
        teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_softcap,
    )
    weights = check_weights(weights, lead, prob.device)
    check_choice("reduction", reduction, REDUCTIONS)
    be = get_backend(backend, prob.device, process_group, prob.vocab_size)
    if not sparse:
        return reduced_row_values(prob, divergence, beta, be, lead, reduction, weights)
    teacher = check_teacher_topk(teacher_topk, lead, global_vocab(be, prob), prob.device, dense=dense)
    return reduced_topk_values(prob, teacher, divergence, beta, tail, be, lead, reduction, weights)


def divergence_from_logits(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "none",
    backend: str = "auto",
) -> Tensor:
    """Per-token divergence from logits you already have, chunked over the vocabulary.

    Args:
        student_logits: ``[N, V]`` or ``[B, L, V]``. Differentiable; the gradient has its shape and dtype.
        teacher_logits: ``[..., V_t]`` with ``V_t >= V`` (extra entries are cut off). Not differentiated.
        divergence, beta, temperature, reduction, backend: as in :func:`fused_linear_divergence`.

    Returns:
        fp32 (fp64 for fp64 inputs) per-token values shaped like the token dims, or a 0-dim tensor.
    """
    check_choice("divergence", divergence, DIVERGENCES)
    beta = check_beta(beta)
    if isinstance(teacher_logits, Tensor):
        teacher_logits = teacher_logits.detach()
    prob, lead = build_problem(None, None, student_logits=student_logits, teacher_logits=teacher_logits,
                               temperature=temperature, require_teacher=True)
    check_choice("reduction", reduction, REDUCTIONS)
    values = row_values(prob, divergence, beta, get_backend(backend, prob.device))
    return reduce(values, lead, reduction)
