"""The executable spec: every quantity of docs/design.md §1 on materialised ``[N, V]`` logits.

Used as the truth in tests (cast the inputs to float64 first) and as the naive baseline in benchmarks. Logits
are formed with a plain matmul in the input dtype, then upcast to at least fp32 for the softmax math, as a
typical trainer would. Everything here is differentiable through ordinary autograd.

Conventions shared with the fused backends: a term whose probability is exactly 0 (a -inf scaled logit)
contributes exactly 0 (``0·log 0 = 0``), so a divergence is +inf where the weighting distribution has mass on a
zero-probability token of the other, never NaN; KL and JSD values are clamped at 0 (rounding can leave them a hair
below) with the gradient of the unclamped value passed through.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from ..options import deterministic
from ..inputs import IGNORE_INDEX, Problem, effective_kind

Tensor = torch.Tensor

# Capability flags of the backend contract (tipkernels.backends.Backend).
name = "reference"
autograd_native = True
supports_vocab_parallel = False
has_jsd_sums = False


def _upcast(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def transform(z: Tensor, scale: float, cap: Optional[float], temperature: float) -> Tensor:
    """The logit transform of docs/design.md §1: ``c · tanh(a · z / c) / T`` (``a · z / T`` when ``cap`` is None),
    in this order: scale, soft-cap, temperature."""
    z = _upcast(z)
    if cap is None:
        return scale * z / temperature
    return cap * torch.tanh(scale * z / cap) / temperature


def _raw_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logits


def student_logits(prob: Problem) -> Tensor:
    """Materialised student logits ``[N, V]`` (fp32 or fp64), transformed and divided by the temperature."""
    if prob.student_is_linear:
        z = _raw_logits(prob.student_hidden, prob.student_weight, prob.student_bias)
    else:
        z = prob.student_logits
    return transform(z, prob.student_scale, prob.student_cap, prob.temperature)


def teacher_logits(prob: Problem) -> Tensor:
    """Materialised teacher logits ``[N, V]`` over the shared vocabulary, transformed and divided by the
    temperature."""
    if prob.teacher_hidden is not None:
        z = _raw_logits(prob.teacher_hidden, prob.teacher_weight, prob.teacher_bias)
    else:
        z = prob.teacher_logits
    return transform(z, prob.teacher_scale, prob.teacher_cap, prob.temperature)


# -------------------------------------------------------------------------- per-row formulas on logits


def _xlogy_sum(logw: Tensor, log_term: Tensor) -> Tensor:
    """``Σ_j w_j · t_j`` with ``w = exp(logw)``; entries where ``w`` is exactly 0 contribute exactly 0 (and no
    NaN gradient: the masked difference is replaced before the product)."""
    w = logw.exp()
    return (w * torch.where(w > 0, log_term, torch.zeros_like(log_term))).sum(-1)


def _nonneg(x: Tensor) -> Tensor:
    """``max(x, 0)`` in value, with the gradient of ``x`` (a clamped rounding error is not a kink of the loss)."""
    return torch.where(x < 0, x - x.detach(), x)


def entropy(s: Tensor) -> Tensor:
    """``H = -Σ p log p`` per row of logits ``s [N, V]``."""
    logp = torch.log_softmax(s, dim=-1)
    return -_xlogy_sum(logp, logp)


def reverse_kl(s: Tensor, u: Tensor) -> Tensor:
    """``KL(p || q)`` per row, p = softmax(s) (student), q = softmax(u) (teacher); >= 0."""
    logp = torch.log_softmax(s, dim=-1)
    logq = torch.log_softmax(u, dim=-1)
    return _nonneg(_xlogy_sum(logp, logp - logq))


def forward_kl(s: Tensor, u: Tensor) -> Tensor:
    """``KL(q || p)`` per row."""
    return reverse_kl(u, s)


def jsd(s: Tensor, u: Tensor, beta: float) -> Tensor:
    """Generalised JSD(β) in TRL's convention: ``β KL(q||m) + (1-β) KL(p||m)``, ``m = β q + (1-β) p``.

    β = 0 is forward KL and β = 1 reverse KL, taken as exact limits (:func:`tipkernels.inputs.effective_kind`).
    """
    kind = effective_kind("jsd", beta)
    if kind != "jsd":
        return divergence(s, u, kind)
    logp = torch.log_softmax(s, dim=-1)
    logq = torch.log_softmax(u, dim=-1)
    logm = torch.logaddexp(logq + math.log(beta), logp + math.log1p(-beta))
    kl_qm = _nonneg(_xlogy_sum(logq, logq - logm))
    kl_pm = _nonneg(_xlogy_sum(logp, logp - logm))
    return beta * kl_qm + (1.0 - beta) * kl_pm


def kl_to_mixture(s: Tensor, u: Tensor, beta: float) -> Tensor:
    """``KL(p || m)`` per row, the quantity the JSD gradient needs."""
    logp = torch.log_softmax(s, dim=-1)
    logq = torch.log_softmax(u, dim=-1)
    kind = effective_kind("jsd", beta)
    if kind == "forward_kl":  # m = p
        return torch.zeros_like(logp[:, 0])
    logm = logq if kind == "reverse_kl" else torch.logaddexp(logq + math.log(beta), logp + math.log1p(-beta))
    return _nonneg(_xlogy_sum(logp, logp - logm))


def divergence(s: Tensor, u: Tensor, kind: str, beta: float = 0.5) -> Tensor:
    """Per-row divergence ``kind`` in {"reverse_kl", "forward_kl", "jsd"}."""
    if kind == "reverse_kl":
        return reverse_kl(s, u)
    if kind == "forward_kl":
        return forward_kl(s, u)
    if kind == "jsd":
        return jsd(s, u, beta)
    raise ValueError(f"unknown divergence {kind!r}")


@deterministic
def value(prob: Problem, kind: str, beta: float = 0.5) -> Tensor:
    """Per-row differentiable value of ``kind`` (a divergence, "entropy" or "lse") on materialised logits."""
    s = student_logits(prob)
    if kind == "entropy":
        return entropy(s)
    if kind == "lse":
        return torch.logsumexp(s, -1)
    return divergence(s, teacher_logits(prob), kind, beta)


# ------------------------------------------------------------------------------- backend contract


@deterministic
def forward_stats(prob: Problem) -> Dict[str, Tensor]:
    """Every per-row statistic (see ``tipkernels.inputs``), materialising the logits."""
    with torch.no_grad():
        s = student_logits(prob)
        out = {
            "student_lse": torch.logsumexp(s, -1),
            "entropy": entropy(s),
            "student_argmax": s.argmax(-1),
        }
        if prob.has_teacher:
            u = teacher_logits(prob)
            out.update(
                teacher_lse=torch.logsumexp(u, -1),
                teacher_entropy=entropy(u),
                reverse_kl=reverse_kl(s, u),
                forward_kl=forward_kl(s, u),
                teacher_argmax=u.argmax(-1),
            )
        if prob.labels is not None:
            valid = prob.labels != IGNORE_INDEX
            picked = s.gather(1, prob.labels.clamp_min(0)[:, None])[:, 0] - out["student_lse"]
            out["label_logprob"] = torch.where(valid, picked, torch.zeros_like(picked))
    return out


@deterministic
def jsd_forward(prob: Problem, student_lse: Tensor, teacher_lse: Tensor, beta: float) -> Tuple[Tensor, Tensor]:
    with torch.no_grad():
        s, u = student_logits(prob), teacher_logits(prob)
        return jsd(s, u, beta), kl_to_mixture(s, u, beta)


@deterministic
def backward(prob: Problem, kind: str, grad_rows: Tensor, saved: Dict[str, Tensor], beta: float = 0.5):
    """Gradients by autograd through the materialised logits (``saved`` is not needed here)."""
    leaves = [prob.student_hidden, prob.student_weight, prob.student_bias, prob.student_logits]
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in leaves]
    sub = Problem(
        student_hidden=leaves[0],
        student_weight=leaves[1],
        student_bias=leaves[2],
        student_logits=leaves[3],
        teacher_hidden=prob.teacher_hidden,
        teacher_weight=prob.teacher_weight,
        teacher_bias=prob.teacher_bias,
        teacher_logits=prob.teacher_logits,
        temperature=prob.temperature,
        **prob.transforms(),
    )
    with torch.enable_grad():
        val = value(sub, kind, beta)
        wanted = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(val, wanted, grad_rows.to(val.dtype), allow_unused=True)
    it = iter(grads)
    g = [None if t is None else next(it) for t in leaves]
    d_student = g[0] if prob.student_is_linear else g[3]
    return d_student, g[1], g[2]


def plan(prob: Problem) -> Problem:
    """The contract's per-call preparation: nothing to resolve here."""
    return prob
