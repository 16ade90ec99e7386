"""``token_stats``: every per-token statistic of docs/design.md §1 in one no-grad pass."""

from __future__ import annotations

from typing import Optional

import torch

from ..backends import get_backend
from ..backends.vocab_parallel import global_vocab, shard_labels
from ..inputs import build_problem, check_tail, check_teacher_topk, detach, split_teacher
from ..types import TokenStats
from .topk import topk_stats

Tensor = torch.Tensor


def token_stats(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    *,
    teacher_logits: Optional[Tensor] = None,
    teacher_topk=None,
    tail: str = "bucket",
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    temperature: float = 1.0,
    student_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: Optional[float] = None,
    backend: str = "auto",
    process_group=None,
) -> TokenStats:
    """Per-token softmax statistics of the student (and teacher), straight from hidden states; no grad.

    Args:
        student_hidden: ``[N, D_s]`` or ``[B, L, D_s]``, fp32/fp16/bf16/fp64.
        student_weight: student lm_head ``[V, D_s]``, same dtype.
        teacher_hidden / teacher_weight: ``[..., D_t]`` and ``[V_t, D_t]`` with ``V_t >= V`` (a padded teacher
            vocabulary is cut to the first ``V`` entries and renormalised there). Optional.
        teacher_logits: ``[..., V_t]`` instead of teacher_hidden/teacher_weight.
        teacher_topk: instead of a dense teacher, a :class:`tipkernels.TeacherTopK` or ``(ids, logprobs)`` pair
            ``[*token dims, K]`` (see :func:`tipkernels.fused_linear_divergence`). The student's fields stay exact;
            ``reverse_kl``/``forward_kl`` are the binned divergences of ``tail``; ``teacher_argmax`` is the id of
            the largest log-probability (-1 for a row of padding), ``teacher_lse`` is 0 (log-probabilities are
            logits normalised to LSE 0) and ``teacher_entropy`` is NaN (the top-k cannot give it).
        tail: with ``teacher_topk``: "bucket" (default: the K ids and the rest) or "renormalize".
        student_bias / teacher_bias: ``[V]`` / ``[V_t]``, optional.
        labels: int ``[N]`` or ``[B, L]``; fills ``label_logprob`` (-100 entries give 0).
        temperature: positive; divides the logits of both models.
        student_logit_scale / student_softcap / teacher_logit_scale / teacher_softcap: per-model logit transforms:
            each model's logits are ``c · tanh(a · (h·Wᵀ + b) / c) / T`` with scale ``a > 0`` (default 1) and
            soft-cap ``c > 0`` (None: no tanh), applied in that order (scale, cap, temperature; TRL's order).
        backend: "auto" (triton for CUDA tensors, torch otherwise), "torch", "triton" or "reference".
        process_group: vocabulary parallelism (see :func:`fused_linear_divergence`): the weights (and biases) are
            this rank's shard, ``labels`` stay global ids; every rank gets the global statistics.

    Returns:
        :class:`TokenStats` with fields shaped like the token dims, fp32 (fp64 for fp64 inputs); teacher fields
        are ``None`` without a teacher. ``entropy_norm = entropy / log V`` (0 when V = 1).
    """
    tail = check_tail(tail)
    sparse = teacher_topk is not None
    dense, (teacher_hidden, teacher_weight, teacher_logits, teacher_bias) = split_teacher(
        teacher_topk, teacher_hidden, teacher_weight, teacher_logits, teacher_bias)
    be = None
    if process_group is not None and isinstance(student_hidden, Tensor) and isinstance(student_weight, Tensor):
        be = get_backend(backend, student_hidden.device, process_group, student_weight.shape[0])
        labels = shard_labels(labels, be)
    prob, lead = build_problem(
        detach(student_hidden), detach(student_weight), detach(teacher_hidden), detach(teacher_weight),
        teacher_logits=detach(teacher_logits), student_bias=detach(student_bias),
        teacher_bias=detach(teacher_bias), labels=labels, temperature=temperature,
        student_logit_scale=student_logit_scale, student_softcap=student_softcap,
        teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_softcap,
    )
    be = be or get_backend(backend, prob.device)
    if sparse:
        teacher = check_teacher_topk(teacher_topk, lead, global_vocab(be, prob), prob.device, dense=dense)
        raw = topk_stats(be.plan(prob), teacher, be, tail)
        return TokenStats.from_rows(raw, lead, vocab_size=global_vocab(be, prob))
    with torch.no_grad():
        raw = be.forward_stats(be.plan(prob))
    return TokenStats.from_rows(raw, lead, vocab_size=global_vocab(be, prob))
