"""``TIPDistillationLoss``: score every token once, select the informative ones, differentiate only those.

One step (docs/design.md §7):

1. **Scoring pass** (no grad): the fused forward over every valid token gives per-token LSEs, entropy and both
   KLs (both models' GEMMs, once). Only per-token scalars are kept.
2. **Selection**: a TIP rule (:func:`tipkernels.select_tokens`) picks tokens from those statistics, on the device.
3. **Differentiated pass**: the selected rows alone enter the autograd function, whose forward *reuses* the
   scoring pass's values and LSEs (no second forward; JSD adds its second pass on those rows only) and whose
   backward recomputes logit tiles for those rows only. Cost of backward ∝ number of selected tokens.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .backends import get_backend
from .backends.vocab_parallel import global_vocab
from .inputs import (BACKENDS, BUDGETS, DIVERGENCES, IDENTITY_TRANSFORMS, RULES, build_problem, check_beta,
                     check_choice, check_fraction, check_mask, check_tail, check_teacher_topk, check_temperature,
                     check_transforms, detach, split_teacher)
from .ops.core import detached, row_values, saved_from_stats
from .ops.topk import topk_stats, topk_values
from .selection import quadrant_shares, quadrants, select_tokens
from .types import TIPLossOutput, TokenStats

Tensor = torch.Tensor

_STAT_ROW_FIELDS = ("student_lse", "teacher_lse", "entropy", "teacher_entropy", "reverse_kl", "forward_kl",
                    "student_argmax", "teacher_argmax")


_TRANSFORM_KEYS = tuple(IDENTITY_TRANSFORMS)


class TIPDistillationLoss(nn.Module):
    """Token-importance on-policy distillation loss over fused per-token divergences.

    Args:
        rule: TIP selection rule, one of ``tipkernels.inputs.RULES`` ("all", "random", "entropy_topk",
            "entropy_sample", "soft_or", "q3", "divergence").
        ratio: retention ratio ρ in (0, 1].
        divergence: the per-token loss: "reverse_kl" (OPD's), "forward_kl" or "jsd".
        beta: JSD's β in [0, 1] (TRL's convention).
        temperature: divides both models' logits (scoring and loss).
        student_logit_scale / student_softcap / teacher_logit_scale / teacher_softcap: per-model logit transforms,
            ``c · tanh(a · (h·Wᵀ + b) / c) / T`` (see :func:`tipkernels.fused_linear_divergence`).
        budget: "per_sequence" (⌊ρ·m⌋ of each sequence's m valid tokens) or "per_batch" (⌊ρ·M⌋ overall).
        backend: "auto", "torch", "triton" or "reference".
        importance_weights: for "entropy_sample", weight selected tokens for an unbiased estimate.
        compute_metrics: fill ``metrics`` (one host synchronisation per call); off for the leanest step.
        process_group: vocabulary parallelism (see :func:`tipkernels.fused_linear_divergence`): the weights are
            this rank's lm_head shards; statistics, selection and loss are the global ones on every rank.
        data_process_group: data parallelism: the group of ranks that each hold a part of the batch; the
            selection's batch statistics and per-batch budget are then global (``select_tokens(process_group=)``).
            The loss stays the mean over this rank's selected tokens.
        tail: with a top-k teacher (``forward(..., teacher_topk=)``): "bucket" (default) or "renormalize", used for
            the scoring statistics (hence the selection) and the loss alike (docs/design.md §1).

    ``forward(student_hidden [B, L, D_s], student_weight [V, D_s], teacher_hidden [B, L, D_t],
    teacher_weight [V_t >= V, D_t], mask [B, L] bool, *, student_bias=None, teacher_bias=None,
    teacher_logits=None, teacher_topk=None, generator=None)`` returns :class:`TIPLossOutput`; ``teacher_topk`` (a
    :class:`tipkernels.TeacherTopK` or ``(ids, logprobs)`` ``[B, L, K]``) replaces the dense teacher (then leave
    ``teacher_hidden``/``teacher_weight`` None and pass ``mask`` by keyword); ``loss`` is the weighted mean divergence
    over the selected tokens, differentiable in the student hidden states, weight and bias (0, still connected to
    the graph, when nothing is selected). Position ``i`` of the hidden states scores the token it predicts: build
    ``mask`` accordingly (see ``tipkernels.opd``).
    """

    def __init__(self, rule: str = "soft_or", ratio: float = 0.5, divergence: str = "reverse_kl", beta: float = 0.5,
                 temperature: float = 1.0, budget: str = "per_sequence", backend: str = "auto", *,
                 importance_weights: bool = False, compute_metrics: bool = True, process_group=None,
                 data_process_group=None, student_logit_scale: float = 1.0, student_softcap: Optional[float] = None,
                 teacher_logit_scale: float = 1.0, teacher_softcap: Optional[float] = None, tail: str = "bucket"):
        super().__init__()
        self.tail = check_tail(tail)
        self.rule = check_choice("rule", rule, RULES)
        self.ratio = check_fraction("ratio", ratio)
        self.divergence = check_choice("divergence", divergence, DIVERGENCES)
        self.beta = check_beta(beta)
        self.temperature = check_temperature(temperature)
        t = check_transforms(student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap)
        self.student_logit_scale, self.student_softcap = t["student_scale"], t["student_cap"]
        self.teacher_logit_scale, self.teacher_softcap = t["teacher_scale"], t["teacher_cap"]
        self.budget = check_choice("budget", budget, BUDGETS)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.importance_weights = bool(importance_weights)
        self.compute_metrics = bool(compute_metrics)
        self.process_group = process_group
        self.data_process_group = data_process_group

    def extra_repr(self) -> str:
        return (f"rule={self.rule!r}, ratio={self.ratio}, divergence={self.divergence!r}, beta={self.beta}, "
                f"temperature={self.temperature}, budget={self.budget!r}, backend={self.backend!r}"
                + (f", tail={self.tail!r}" if self.tail != "bucket" else "")
                + "".join(f", {k}={getattr(self, k)}" for k in _TRANSFORM_KEYS if getattr(self, k) != IDENTITY_TRANSFORMS[k]))

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Optional[Tensor] = None,
                teacher_weight: Optional[Tensor] = None, mask: Optional[Tensor] = None, *,
                student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                teacher_logits: Optional[Tensor] = None, teacher_topk=None,
                generator: Optional[torch.Generator] = None) -> TIPLossOutput:
        sparse = teacher_topk is not None
        dense, (teacher_hidden, teacher_weight, teacher_logits, teacher_bias) = split_teacher(
            teacher_topk, teacher_hidden, teacher_weight, teacher_logits, teacher_bias)
        prob, lead = build_problem(
            student_hidden, student_weight, detach(teacher_hidden), detach(teacher_weight),
            teacher_logits=detach(teacher_logits), student_bias=student_bias, teacher_bias=detach(teacher_bias),
            temperature=self.temperature, require_teacher=not sparse,
            **{k: getattr(self, k) for k in _TRANSFORM_KEYS},
        )
        if mask is None:
            mask = torch.ones(lead if len(lead) == 2 else (1, lead.numel()), dtype=torch.bool, device=prob.device)
        else:
            mask = check_mask(mask, lead, what="the hidden states' token dims", device=prob.device)
        backend = get_backend(self.backend, prob.device, self.process_group, prob.vocab_size)
        teacher = check_teacher_topk(teacher_topk, lead, global_vocab(backend, prob), prob.device,
                                     dense=dense) if sparse else None
        prob = backend.plan(prob)  # resolved once; the row subsets below carry it
        flat_mask = mask.reshape(-1)

        # 1. scoring pass over the valid rows, no grad
        valid_idx = flat_mask.nonzero().squeeze(1)
        with torch.no_grad():
            scored = detached(prob, "student").rows(valid_idx)
            rows = (topk_stats(scored, teacher.rows(valid_idx), backend, self.tail) if sparse
                    else backend.forward_stats(scored))
            full = {k: _scatter(v, valid_idx, prob.num_rows) for k, v in rows.items() if k in _STAT_ROW_FIELDS}
        stats = TokenStats.from_rows(full, mask.shape, vocab_size=global_vocab(backend, prob))

        # 2. selection on the device
        selection = select_tokens(stats, mask, rule=self.rule, ratio=self.ratio, budget=self.budget,
                                  generator=generator, importance_weights=self.importance_weights,
                                  process_group=self.data_process_group)

        # 3. differentiated pass over the selected rows, reusing the scoring pass's values
        sel_idx = selection.mask.reshape(-1).nonzero().squeeze(1)
        sub = prob.rows(sel_idx)
        picked = {k: v.index_select(0, sel_idx) for k, v in full.items()}
        if sparse:  # the LSEs of the scoring pass; the K logits are gathered again, with grad
            values = topk_values(sub, teacher.rows(sel_idx), self.divergence, self.beta, self.tail, backend,
                                 precomputed_lse=picked["student_lse"])
        else:
            with torch.no_grad():
                precomputed = saved_from_stats(backend, detached(sub, "student"), self.divergence, self.beta,
                                               picked)
            values = row_values(sub, self.divergence, self.beta, backend, precomputed=precomputed)
        w = selection.weights.reshape(-1).index_select(0, sel_idx).to(values.dtype)
        loss = (values * w).sum() / w.sum().clamp_min(torch.finfo(values.dtype).tiny)

        metrics = self._metrics(stats, mask, selection, valid_idx.numel(), sel_idx.numel()) \
            if self.compute_metrics else {}
        return TIPLossOutput(loss=loss, stats=stats, selection=selection, metrics=metrics)

    @torch.no_grad()
    def _metrics(self, stats: TokenStats, mask: Tensor, selection, n_valid: int, n_sel: int) -> Dict[str, float]:
        quad = quadrants(stats, mask)
        out = {
            "valid_tokens": float(n_valid),
            "selected_tokens": float(n_sel),
            "selected_fraction": n_sel / n_valid if n_valid else 0.0,
        }
        for name in ("entropy", "entropy_norm", "reverse_kl", "forward_kl", "teacher_entropy"):
            field = getattr(stats, name)
            out[name] = _masked_mean(field, mask)
            out[f"{name}_selected"] = _masked_mean(field, selection.mask)
        for where, m in (("valid", mask), ("selected", selection.mask)):
            for q, share in quadrant_shares(quad, m).items():
                out[f"{q.lower()}_{where}"] = share
        return out


def _scatter(values: Tensor, index: Tensor, n: int) -> Tensor:
    out = torch.zeros(n, dtype=values.dtype, device=values.device)
    return out.index_copy_(0, index, values)


def _masked_mean(x: Tensor, mask: Tensor) -> float:
    count = int(mask.sum())
    return float((x * mask).sum()) / count if count else 0.0
