"""The one autograd.Function every differentiable op goes through, and the reductions.

How a call flows (docs/design.md §3), e.g. ``fused_linear_divergence(..., backend="triton")``: the op
(:mod:`tipkernels.ops.divergence`) validates its inputs into a :class:`~tipkernels.inputs.Problem`
(:func:`~tipkernels.inputs.build_problem`) and gets the backend (:func:`tipkernels.backends.get_backend`); here
:func:`row_values` lets the backend ``plan`` the call (the triton launch config, resolved once) and runs
:class:`RowValues`, whose forward calls ``forward_stats`` (and ``jsd_forward``) and whose backward calls
``backward``: for triton, the launchers in :mod:`tipkernels.backends.triton.stats` / ``.backward``, beside their
kernels.

``RowValues`` maps the student's tensors to one value per token row (entropy or a divergence). Its forward
either runs the backend's forward or takes values already computed by a no-grad scoring pass (the TIP loss);
its backward asks the backend to recompute logit tiles from the saved per-row LSEs/values, so nothing of size
``[N, V]`` is kept between forward and backward.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ..backends import Backend
from ..inputs import REDUCTIONS, Problem, check_choice, detach, effective_kind, needs_teacher

Tensor = torch.Tensor


def row_forward(backend: Backend, prob: Problem, kind: str, beta: float) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Per-row values of ``kind`` and the per-row tensors its backward needs (no grad)."""
    kind = effective_kind(kind, beta)
    if not needs_teacher(kind) and prob.has_teacher:
        prob = replace(prob, teacher_hidden=None, teacher_weight=None, teacher_bias=None, teacher_logits=None)
    stats = backend.forward_stats(prob)
    return saved_from_stats(backend, prob, kind, beta, stats)


def saved_from_stats(backend: Backend, prob: Problem, kind: str, beta: float,
                     stats: Dict[str, Tensor]) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Values and saved tensors of ``kind`` from forward stats already computed (runs JSD's second pass)."""
    kind = effective_kind(kind, beta)
    saved = {"student_lse": stats["student_lse"]}
    if kind == "lse":  # d Ls / d s_j = p_j: the LSE itself is all the backward reads
        return stats["student_lse"], saved
    if kind == "entropy":
        saved["entropy"] = stats["entropy"]
        return stats["entropy"], saved
    saved["teacher_lse"] = stats["teacher_lse"]
    if kind == "jsd":
        values, saved["kl_pm"] = backend.jsd_forward(prob, stats["student_lse"], stats["teacher_lse"], beta)
        return values, saved
    saved["reverse_kl"] = stats["reverse_kl"]
    return stats[kind], saved


@dataclass
class _Call:
    prob: Problem
    kind: object  # a row kind ("lse", "entropy", a divergence) or a fused_grad row function
    beta: float
    backend: Backend
    precomputed: Optional[Tuple[Tensor, Dict[str, Tensor]]] = None


class RowValues(torch.autograd.Function):
    """Per-row value of the student (and teacher); differentiable in the student's hidden/weight/bias/logits."""

    @staticmethod
    def forward(ctx, call: _Call, student_hidden, student_weight, student_bias, student_logits):
        prob = replace(call.prob, student_hidden=student_hidden, student_weight=student_weight,
                       student_bias=student_bias, student_logits=student_logits)
        if call.precomputed is not None:
            values, saved = call.precomputed
        else:
            values, saved = row_forward(call.backend, prob, call.kind, call.beta)
        ctx.call = replace(call, prob=replace(prob, student_hidden=None, student_weight=None, student_bias=None,
                                              student_logits=None), precomputed=None)
        ctx.saved_rows = saved
        ctx.save_for_backward(student_hidden, student_weight, student_bias, student_logits)
        return values.clone() if call.precomputed is not None else values

    @staticmethod
    def backward(ctx, grad_values):
        hidden, weight, bias, logits = ctx.saved_tensors
        call = ctx.call
        prob = replace(call.prob, student_hidden=hidden, student_weight=weight, student_bias=bias,
                       student_logits=logits)
        d_student, d_weight, d_bias = call.backend.backward(
            prob, effective_kind(call.kind, call.beta), grad_values.float() if grad_values.dtype != torch.float64
            else grad_values, ctx.saved_rows, call.beta)
        if logits is not None:
            return None, None, None, None, d_student
        return None, d_student, d_weight, d_bias, None


def row_values(prob: Problem, kind: str, beta: float, backend: Backend,
               precomputed: Optional[Tuple[Tensor, Dict[str, Tensor]]] = None) -> Tensor:
    """Differentiable per-row values ``[N]`` of ``kind`` ("entropy", "lse", "reverse_kl", "forward_kl", "jsd").

    An ``autograd_native`` backend (the reference) materialises the logits and autograd does the rest; otherwise
    the fused ``RowValues`` function runs. ``precomputed`` = (values, saved) from an earlier no-grad pass skips the
    forward.
    """
    if backend.autograd_native:
        return backend.value(detached(prob, "teacher"), kind, beta)
    prob = backend.plan(prob)
    call = _Call(prob=prob, kind=kind, beta=beta, backend=backend, precomputed=precomputed)
    return RowValues.apply(call, prob.student_hidden, prob.student_weight, prob.student_bias, prob.student_logits)


def detached(prob: Problem, *sides: str) -> Problem:
    """``prob`` with the tensors of ``sides`` ("student", "teacher"; default both) detached."""
    names = [f"{side}_{t}" for side in (sides or ("student", "teacher")) for t in ("hidden", "weight", "bias", "logits")]
    return replace(prob, **{n: detach(getattr(prob, n)) for n in names})


# ------------------------------------------------------------- gradient formed in the forward's sweep


def reduced_row_values(prob: Problem, kind: str, beta: float, backend: Backend, lead: torch.Size,
                       reduction: str, weights: Optional[Tensor] = None) -> Tensor:
    """``reduce(row_values(...), lead, reduction, weights)``; where the backend offers a ``grad_strategy`` that
    answers "fused_grad" (the upstream gradient of each row is then known in the forward: ``weights / Σ weights``
    or ``1/N`` for "mean", ``weights`` or 1 for "sum", times the loss's one incoming scalar), the gradients are
    formed in the forward's sweep by ``backend.fused_value_and_grad`` (docs/design.md §2)."""
    prob, fused = fused_grad_choice(prob, backend, reduction, weights)
    if not fused:
        return reduce(row_values(prob, kind, beta, backend), lead, reduction, weights)
    kind = effective_kind(kind, beta)
    if kind == "entropy" and prob.has_teacher:
        prob = replace(prob, teacher_hidden=None, teacher_weight=None, teacher_bias=None, teacher_logits=None)
    return fused_reduced(prob, kind, beta, backend, lead, reduction, weights)


def fused_grad_choice(prob: Problem, backend: Backend, reduction: str, weights: Optional[Tensor],
                      **choice) -> Tuple[Problem, bool]:
    """``(prob, fused)``: whether the gradients can be formed in the forward's sweep (a reduction "sum"/"mean",
    weights, if any, not differentiable, a student gradient wanted, and the backend's ``grad_strategy`` answering
    "fused_grad"; ``choice``: its keywords), with ``prob`` planned where the choice needed it (one resolution for
    the choice and the call; ``row_values`` keeps a planned prob)."""
    grad_wanted = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (prob.student_hidden, prob.student_weight, prob.student_bias))
    known = reduction != "none" and grad_wanted and (weights is None or not weights.requires_grad)
    choose = getattr(backend, "grad_strategy", None)
    if not known or choose is None:
        return prob, False
    prob = backend.plan(prob)
    return prob, choose(prob, True, **choice) == "fused_grad"


def fused_reduced(prob: Problem, kind, beta: float, backend: Backend, lead: torch.Size, reduction: str,
                  weights: Optional[Tensor] = None) -> Tensor:
    """The reduced value, its gradients formed by ``backend.fused_value_and_grad(prob, kind, ...)`` in the forward
    (:class:`FusedReduced`); ``prob`` planned, ``kind`` an effective dense kind or (a backend with
    ``fused_row_functions``) a row function; only where :func:`fused_grad_choice` says so."""
    call = _Call(prob=prob, kind=kind, beta=beta, backend=backend)
    return FusedReduced.apply(call, lead, reduction, weights, prob.student_hidden, prob.student_weight,
                              prob.student_bias)


def row_upstream(n: int, reduction: str, weights: Optional[Tensor], dtype: torch.dtype,
                 device: torch.device) -> Tensor:
    """``∂ reduce(values) / ∂ values_i`` ``[n]``: the per-row gradient :func:`reduce` gives its input."""
    w = torch.ones(n, dtype=dtype, device=device) if weights is None else weights.reshape(-1).to(dtype)
    if reduction == "sum":
        return w
    return w / w.sum().clamp_min(torch.finfo(dtype).tiny) if weights is not None else w / max(n, 1)


class FusedReduced(torch.autograd.Function):
    """A reduced ("sum"/"mean") value whose gradients the backend formed in the forward; backward scales them.

    The first backward hands the stored gradients over (no copy: autograd's accumulation takes a tensor nobody
    else holds without cloning it); a second backward through a retained graph forms them again."""

    @staticmethod
    def forward(ctx, call: _Call, lead, reduction, weights, student_hidden, student_weight, student_bias):
        prob = replace(call.prob, student_hidden=student_hidden, student_weight=student_weight,
                       student_bias=student_bias)
        ctx.wanted = tuple(ctx.needs_input_grad[4:7])
        values, grads = _fused_sweep(call, prob, reduction, weights, ctx.wanted)
        ctx.grads = grads
        ctx.call, ctx.reduction, ctx.weights = call, reduction, weights
        ctx.save_for_backward(student_hidden, student_weight, student_bias)
        return reduce(values, lead, reduction, weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        hidden, weight, bias = ctx.saved_tensors
        if grads is None:  # retained graph, second backward
            prob = replace(ctx.call.prob, student_hidden=hidden, student_weight=weight, student_bias=bias)
            grads = _fused_sweep(ctx.call, prob, ctx.reduction, ctx.weights, ctx.wanted)[1]
        dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        scale_one = bool(grad_loss == 1)
        out = []
        for grad, dtype in zip(grads, dtypes):
            if grad is not None:
                grad = (grad if scale_one else grad * grad_loss.to(grad.dtype)).to(dtype)
            out.append(grad)
        del grads
        return (None, None, None, None, *out)


def _fused_sweep(call: _Call, prob: Problem, reduction: str, weights: Optional[Tensor], wanted):
    dtype = torch.float64 if prob.student_hidden.dtype == torch.float64 else torch.float32
    g = row_upstream(prob.num_rows, reduction, weights, dtype, prob.device)
    values, d_hidden, d_weight, d_bias = call.backend.fused_value_and_grad(prob, call.kind, call.beta, g, wanted)
    return values, [d_hidden, d_weight, d_bias]




def reduce(values: Tensor, lead: torch.Size, reduction: str, weights: Optional[Tensor] = None) -> Tensor:
    """Apply ``reduction`` to per-row ``values [N]``, reshaped to the token dims ``lead``.

    "none" returns ``values`` (times ``weights`` if given) shaped ``lead``; "sum" the (weighted) sum; "mean" the
    mean, or ``Σ w·v / Σ w`` with weights. Empty inputs or zero total weight give 0, never NaN; a row of weight 0
    gives 0 and no gradient even where its value is +inf (a top-k teacher's reverse KL can be).
    """
    check_choice("reduction", reduction, REDUCTIONS)
    values = values.reshape(lead)
    if weights is not None:
        w = weights.to(values.dtype)
        values = torch.where(w == 0, torch.zeros((), dtype=values.dtype, device=values.device), values * w)
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    denom = weights.to(values.dtype).sum() if weights is not None else torch.tensor(
        float(values.numel()), dtype=values.dtype, device=values.device)
    return total / denom.clamp_min(torch.finfo(values.dtype).tiny)
