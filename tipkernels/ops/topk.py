"""A teacher seen through its top-k log-probabilities (docs/design.md §1, "A teacher seen through its top-k").

Every top-k divergence is a function of three things per row only: the student's full-vocabulary log-sum-exp
``Ls``, the K student logits ``s_k = s[i_k]`` at the teacher's ids, and the teacher's log-probabilities ``l_k``.
So, on every backend:

1. ``Ls`` comes from the backend's student-only fused pass, made differentiable as the row kind "lse"
   (``d Ls / d s_j = p_j``, a recompute backward like cross-entropy's; :func:`student_lse`);
2. the K logits come from an indexed gather, ``s_k = transform(h · W[i_k] + b[i_k])``, in row chunks so that the
   ``[rows, K, D]`` gathered weights stay within :data:`GATHER_BUDGET_BYTES`, with a deterministic sparse backward
   (:class:`GatherLogits`; a torch gather on every backend, the triton one included);
3. the ``[N, K]`` bin maths runs once, here, in torch under autograd (:func:`bin_logprobs`,
   :func:`bin_divergence`).

Where the torch backend forms gradients in its forward sweep ("fused_grad": reduction "sum"/"mean" on the CPU),
``tail="bucket"`` takes ``Ls`` and ``s_k`` from the sweep's row block instead of 1. and 2. (:class:`BucketRows`,
:func:`reduced_topk_values`).

Nothing of size ``[N, V]`` is formed (the reference backend, the executable spec, materialises its logits and
gathers from them). Under vocabulary parallelism each rank gathers the ids it owns and one all-reduce of ``[N, K]``
completes them; the LSE is the global one already.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from ..backends import Backend
from ..backends.chunked import transform_grad_factor, transform_logits
from ..backends.reference import _nonneg
from ..backends.vocab_parallel import VocabParallelBackend
from ..inputs import Problem, TopKTeacher, effective_kind
from ..options import deterministic_scope
from .core import fused_grad_choice, fused_reduced, reduce, row_values

Tensor = torch.Tensor

#: Bytes of the gathered ``[rows, K, D]`` weights (fp32) alive at a time in :class:`GatherLogits`.
GATHER_BUDGET_BYTES = 32 * 2**20
_LN2 = math.log(2.0)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def student_only(prob: Problem) -> Problem:
    """``prob`` without a teacher (the top-k teacher is not a :class:`Problem` field)."""
    return Problem(student_hidden=prob.student_hidden, student_weight=prob.student_weight,
                   student_bias=prob.student_bias, student_logits=prob.student_logits, labels=prob.labels,
                   temperature=prob.temperature, **prob.transforms(), backend_config=prob.backend_config)


# ------------------------------------------------------------------------------------- the bin maths


def masked_logsumexp(x: Tensor, valid: Tensor) -> Tensor:
    """``log Σ_{k valid} e^{x_k}`` per row of ``x [N, K]``; ``-inf`` for a row with no valid (or only ``-inf``)
    entry, with finite (zero) gradients there."""
    neg = torch.full((), -math.inf, dtype=x.dtype, device=x.device)
    m = torch.where(valid, x, neg).amax(1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.where(valid, torch.exp(torch.where(valid, x, m) - m), torch.zeros_like(x))
    total = e.sum(1)
    live = total > 0
    return torch.where(live, m[:, 0] + torch.log(torch.where(live, total, torch.ones_like(total))), neg)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − e^x)`` without cancellation (``log(−expm1 x)`` above ``−ln 2``, ``log1p(−e^x)`` below); ``-inf``
    for ``x >= 0`` (an empty rest: a total mass rounded to 1 or above is clamped there), with finite gradients
    everywhere (the masked branches are fed a harmless ``x``)."""
    inside = x < 0
    xs = torch.where(inside, x, torch.full_like(x, -1.0))
    out = torch.where(xs > -_LN2, torch.log(-torch.expm1(xs)), torch.log1p(-torch.exp(xs)))
    return torch.where(inside, out, torch.full_like(out, -math.inf))


def rest_floors(lse: Tensor, logprob_dtype: torch.dtype, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """``(log δ_p [N], log δ_q [N])``: the logs of the smallest rests that the inputs resolve (docs/design.md §1).

    ``log P = logsumexp_k s_k − Ls`` is a difference of two numbers of size ``|Ls|``, so it is known to about
    ``δ_p = 4·eps·max(1, |Ls|)`` (eps of the compute dtype); ``Q`` sums log-probabilities rounded to their dtype, so
    it is known to about ``δ_q = eps`` of that dtype (and a served log-softmax rounds its top entry to 0 whenever the
    teacher is confident). A rest below its floor is taken at the floor: a rounded-away rest would make a KL +inf
    (``q_rest·log(q_rest/0)``) where the true value is small. Not differentiated."""
    eps = torch.finfo(dtype).eps
    floor_p = math.log(4 * eps) + torch.log(lse.detach().abs().clamp_min(1.0))
    floor_q = torch.full_like(floor_p, math.log(torch.finfo(logprob_dtype).eps))
    return floor_p, floor_q


def bin_logprobs(s_k: Tensor, lse: Optional[Tensor], teacher: TopKTeacher, tail: str) -> Tuple[Tensor, Tensor]:
    """The student's and teacher's log-probabilities over the bins: ``[N, K+1]`` for ``tail="bucket"`` (the K ids,
    then the rest), ``[N, K]`` for "renormalize". Padding ids (and an empty rest) are ``-inf`` on both sides.

    ``s_k [N, K]`` the student's (transformed) logits at the ids, ``lse [N]`` its full-vocabulary LSE (unused by
    "renormalize"). Each rest is at least its floor (:func:`rest_floors`) unless the ids cover the vocabulary.
    Differentiable in ``s_k`` and ``lse``."""
    valid = teacher.valid
    neg = torch.full((), -math.inf, dtype=s_k.dtype, device=s_k.device)
    l_k = torch.where(valid, teacher.logprobs.to(s_k.dtype), neg)
    if tail == "renormalize":
        logp = torch.where(valid, s_k - masked_logsumexp(s_k, valid)[:, None], neg)
        log_q_mass = masked_logsumexp(l_k, valid)[:, None]
        logq = torch.where(valid & torch.isfinite(log_q_mass), l_k - log_q_mass, neg)
        return logp, logq
    logp = torch.where(valid, s_k - lse[:, None], neg)
    log_p_mass = masked_logsumexp(logp, valid)  # log P
    log_q_mass = masked_logsumexp(l_k, valid)  # log Q
    floor_p, floor_q = rest_floors(lse, teacher.logprobs.dtype, s_k.dtype)
    rest_p = torch.maximum(log1mexp(log_p_mass), floor_p)
    rest_q = torch.maximum(log1mexp(log_q_mass), floor_q)
    covered = valid.sum(1) == teacher.vocab_size  # K = V: the rest is empty on both sides, exactly
    rest_p = torch.where(covered, neg, rest_p)
    rest_q = torch.where(covered, neg, rest_q)
    return torch.cat([logp, rest_p[:, None]], 1), torch.cat([l_k, rest_q[:, None]], 1)


def _kl(loga: Tensor, logb: Tensor) -> Tensor:
    """``Σ a (log a − log b)`` per row over bins: a term with ``a = 0`` is exactly 0; one with ``a > 0 = b`` makes
    the row +inf as a constant, so that the row's gradient stays finite (a row given an upstream gradient of 0, a
    masked or unweighted one, then contributes 0, not 0·inf = NaN)."""
    a = loga.exp()
    live = a > 0
    infinite = live & torch.isneginf(logb)
    zero = torch.zeros((), dtype=loga.dtype, device=loga.device)
    terms = torch.where(live & ~infinite,
                        a * (torch.where(live, loga, zero) - torch.where(infinite, zero, logb)), zero)
    return terms.sum(1) + torch.where(infinite.any(1), math.inf, 0.0).to(loga.dtype)


def bin_divergence(logp: Tensor, logq: Tensor, kind: str, beta: float = 0.5) -> Tensor:
    """``kind`` ("reverse_kl", "forward_kl", "jsd" with TRL's β) between two distributions given as log-probabilities
    over bins ``[N, B]``, per row, clamped at 0 (gradient of the unclamped value). A bin empty on both sides
    contributes exactly 0 (0·log 0 = 0) and no gradient; a bin with mass on the weighting side only makes the KL
    +inf, as in the dense ops (with a finite gradient from the other bins: :func:`_kl`)."""
    empty = torch.isneginf(logp) & torch.isneginf(logq)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp, logq = torch.where(empty, zero, logp), torch.where(empty, zero, logq)  # then equal: every term is 0
    kind = effective_kind(kind, beta)
    if kind == "reverse_kl":
        return _nonneg(_kl(logp, logq))
    if kind == "forward_kl":
        return _nonneg(_kl(logq, logp))
    if kind != "jsd":
        raise ValueError(f"unknown divergence {kind!r}")
    logm = torch.logaddexp(logq + math.log(beta), logp + math.log1p(-beta))
    kl_qm = _nonneg(_kl(logq, logm))
    kl_pm = _nonneg(_kl(logp, logm))
    return beta * kl_qm + (1.0 - beta) * kl_pm


def topk_divergence(s_k: Tensor, lse: Optional[Tensor], teacher: TopKTeacher, kind: str, beta: float,
                    tail: str) -> Tensor:
    """Per-row divergence ``[N]`` of the binned distributions (:func:`bin_logprobs`, :func:`bin_divergence`)."""
    return bin_divergence(*bin_logprobs(s_k, lse, teacher, tail), kind, beta)


# -------------------------------------------------------------------------------------- the gather


def _owned(teacher: TopKTeacher, backend) -> Tuple[Tensor, Tensor, Optional[object]]:
    """``(local ids [N, K] (0 where not owned), owned [N, K], group)``: under vocabulary parallelism the ids this
    rank's shard holds, shifted to local rows; otherwise every valid id."""
    ids, valid = teacher.ids, teacher.valid
    if not isinstance(backend, VocabParallelBackend):
        return torch.where(valid, ids, torch.zeros_like(ids)), valid, None
    lo = backend.vocab_offset
    hi = lo + backend.sizes[backend.rank]
    owned = valid & (ids >= lo) & (ids < hi)
    return torch.where(owned, ids - lo, torch.zeros_like(ids)), owned, backend.group


def _index_add_rows(target: Tensor, index: Tensor, values: Tensor) -> None:
    """``target[index[e]] += values[e]`` in a fixed order: ``index_add_`` runs serially over the index on the CPU;
    on CUDA ``index_put_(accumulate=True)`` under deterministic algorithms sorts the index first (no atomics)."""
    if target.device.type == "cpu":
        target.index_add_(0, index, values)
        return
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        target.index_put_((index,), values, accumulate=True)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def _gather_rows(n: int, k: int, d: int) -> int:
    return max(1, min(n, GATHER_BUDGET_BYTES // max(1, 4 * k * d)))


class GatherLogits(torch.autograd.Function):
    """``s [N, K] = transform(h · W[ids]ᵀ + b[ids])`` at the teacher's ids, 0 where not ``owned``; differentiable
    in ``h``, ``W``, ``b`` with a deterministic sparse backward (``d h = Σ_k c_k W[i_k]``, ``d W[i_k] += c_k h``,
    ``d b[i_k] += c_k``, ``c = g · ∂s/∂z``). With ``group`` (vocabulary parallelism) the owned entries of the ranks
    are summed (all-reduce of ``[N, K]``) and so are the ranks' ``d h`` (all-reduce of ``[N, D]``)."""

    @staticmethod
    def forward(ctx, meta, ids, owned, hidden, weight, bias):
        scale, cap, temperature, group = meta
        dtype = _compute_dtype(hidden)
        n, k = ids.shape
        out = torch.zeros(n, k, dtype=dtype, device=hidden.device)
        rows = _gather_rows(n, k, hidden.shape[1])
        with torch.no_grad():
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                idx = ids[r0:r1].reshape(-1)
                w = weight.index_select(0, idx).to(dtype).view(r1 - r0, k, -1)
                z = torch.bmm(w, hidden[r0:r1].to(dtype)[:, :, None])[:, :, 0]
                if bias is not None:
                    z = z + bias.index_select(0, idx).to(dtype).view(r1 - r0, k)
                out[r0:r1] = transform_logits(z, scale, cap, temperature)
            out = torch.where(owned, out, torch.zeros((), dtype=dtype, device=out.device))
            if group is not None:
                import torch.distributed as dist

                dist.all_reduce(out, group=group)
        ctx.meta = meta
        ctx.save_for_backward(ids, owned, hidden, weight, bias, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        ids, owned, hidden, weight, bias, s = ctx.saved_tensors
        scale, cap, temperature, group = ctx.meta
        want_h, want_w, want_b = ctx.needs_input_grad[3:6]
        dtype = s.dtype
        n, k = ids.shape
        d = hidden.shape[1]
        c = grad.to(dtype) * transform_grad_factor(s, scale, cap, temperature)
        c = torch.where(owned, c, torch.zeros((), dtype=dtype, device=c.device))
        d_h = torch.zeros(n, d, dtype=dtype, device=hidden.device) if want_h else None
        d_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if want_w else None
        d_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if want_b and bias is not None else None
        rows = _gather_rows(n, k, d)
        with torch.no_grad(), deterministic_scope():
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                idx = ids[r0:r1].reshape(-1)
                cc = c[r0:r1]
                if d_h is not None:
                    w = weight.index_select(0, idx).to(dtype).view(r1 - r0, k, d)
                    d_h[r0:r1] = torch.bmm(cc[:, None, :], w)[:, 0]
                if d_w is not None:
                    contrib = (cc[:, :, None] * hidden[r0:r1].to(dtype)[:, None, :]).reshape(-1, d)
                    _index_add_rows(d_w, idx, contrib)
                if d_b is not None:
                    _index_add_rows(d_b, idx, cc.reshape(-1))
        if d_h is not None and group is not None:
            import torch.distributed as dist

            dist.all_reduce(d_h, group=group)
        cast = lambda g, ref: None if g is None else g.to(ref.dtype)  # noqa: E731
        return None, None, None, cast(d_h, hidden), cast(d_w, weight), cast(d_b, bias)


def gather_logits(prob: Problem, teacher: TopKTeacher, backend: Backend) -> Tensor:
    """The student's transformed logits at the teacher's ids, ``[N, K]`` fp32 (fp64 for fp64 inputs), 0 at padding;
    differentiable in the student's hidden states, weight and bias."""
    if backend.autograd_native:  # the executable spec: gather from the materialised logits
        s = backend.student_logits(prob)
        return torch.where(teacher.valid, s.gather(1, teacher.ids.clamp_min(0)),
                           torch.zeros((), dtype=s.dtype, device=s.device))
    if not prob.student_is_linear:
        raise ValueError("a top-k teacher needs the student as hidden states and lm_head weight")
    local, owned, group = _owned(teacher, backend)
    meta = (prob.student_scale, prob.student_cap, prob.temperature, group)
    return GatherLogits.apply(meta, local, owned, prob.student_hidden, prob.student_weight, prob.student_bias)


# ------------------------------------------------------------------------------ values and statistics


def student_lse(prob: Problem, backend: Backend, precomputed: Optional[Tensor] = None) -> Tensor:
    """The student's full-vocabulary LSE ``[N]``, differentiable (row kind "lse"); ``precomputed`` (a no-grad
    scoring pass's LSEs) skips the forward."""
    pre = None if precomputed is None else (precomputed, {"student_lse": precomputed})
    return row_values(student_only(prob), "lse", 0.0, backend, precomputed=pre)


def topk_values(prob: Problem, teacher: TopKTeacher, kind: str, beta: float, tail: str, backend: Backend,
                precomputed_lse: Optional[Tensor] = None) -> Tensor:
    """Differentiable per-row divergence ``[N]`` against a top-k teacher ("renormalize" needs no LSE pass)."""
    s_k = gather_logits(prob, teacher, backend)
    lse = None if tail == "renormalize" else student_lse(prob, backend, precomputed_lse).to(s_k.dtype)
    return topk_divergence(s_k, lse, teacher, kind, beta, tail)


class BucketRows:
    """fused_grad's row function for ``tail="bucket"`` (``chunked.fused_value_and_grad``; docs/design.md §1, §2):
    the student's full-vocabulary logits of a group of rows are in hand, so ``Ls`` and ``s_k`` come from them (no
    "lse" pass, no gather matmul). Per group: ``s_k = s[i_k]``, then per cache-sized sub-block ``s ← e^{s − m}``
    and ``Z``; the ``[rows, K]`` bin maths (:func:`topk_divergence`) under a local autograd gives, with the
    upstream ``g``, ``a = g·∂v/∂Ls`` and ``c = g·∂v/∂s_k``; then ``dS = a·p + c`` at the ids
    (``s ← s·a/Z``, ``scatter_add_`` along the vocabulary: a fixed order on the CPU). ``teacher`` holds all
    ``N`` rows; the rows are picked by the sweep's ``i0:i1``. A soft-capped student (``cap``): the sweep's ``g``
    carries ``a/T``, the row function the ``1 − t²`` (``t = s·T/c``), read before ``s`` is overwritten:
    ``s ← e·(1 − t²)`` per sub-block, and the scattered ``c`` times its value at the ids."""

    def __init__(self, teacher: TopKTeacher, kind: str, beta: float, cap: Optional[float] = None,
                 temperature: float = 1.0):
        self.teacher, self.kind, self.beta = teacher, kind, beta
        self.tanh_of_s = None if cap is None else temperature / cap  # t = s·T/c
        self.index = torch.where(teacher.valid, teacher.ids, torch.zeros_like(teacher.ids))  # padding: c = 0

    def _one_minus_t2(self, x: Tensor) -> Tensor:
        """``1 − (x·T/c)²`` into ``x``."""
        return x.mul_(self.tanh_of_s).square_().neg_().add_(1.0)

    def __call__(self, s: Tensor, g: Tensor, i0: int, i1: int, sub: int) -> Tensor:
        idx = self.index[i0:i1]
        s_k = s.gather(1, idx)
        z = torch.empty(i1 - i0, 1, dtype=s.dtype, device=s.device)
        lse = torch.empty(i1 - i0, dtype=s.dtype, device=s.device)
        for a in range(0, i1 - i0, sub):
            x = s[a:a + sub]
            m = x.amax(1, keepdim=True)
            if self.tanh_of_s is None:
                e = torch.exp(x.sub_(m), out=x)
            else:  # e and 1 − t² both from x: e in a sub-block temporary, the product back into x
                e = torch.exp(x - m)
                self._one_minus_t2(x).mul_(e)
            z[a:a + sub] = e.sum(1, keepdim=True)
            lse[a:a + sub] = m[:, 0] + z[a:a + sub, 0].log()
        t = self.teacher
        rows = TopKTeacher(t.ids[i0:i1], t.logprobs[i0:i1], t.valid[i0:i1], t.vocab_size)
        with torch.enable_grad():
            ls, sk = lse.requires_grad_(), s_k.requires_grad_()
            values = topk_divergence(sk, ls, rows, self.kind, self.beta, "bucket")
            d_ls, d_sk = torch.autograd.grad(values, (ls, sk), grad_outputs=g[:, 0].to(values.dtype),
                                             materialize_grads=True)
        if self.tanh_of_s is not None:
            d_sk = d_sk * self._one_minus_t2(s_k.detach().clone())
        s.mul_((d_ls[:, None] / z).to(s.dtype))
        s.scatter_add_(1, idx, d_sk.to(s.dtype))
        return values.detach()


def reduced_topk_values(prob: Problem, teacher: TopKTeacher, kind: str, beta: float, tail: str, backend: Backend,
                        lead: torch.Size, reduction: str, weights: Optional[Tensor] = None) -> Tensor:
    """``reduce(topk_values(...), lead, reduction, weights)``; for ``tail="bucket"`` on a backend whose fused sweep
    takes row functions (``fused_row_functions``: the torch backend) and whose ``grad_strategy`` answers
    "fused_grad" for one (CPU, reduction "sum"/"mean"; a soft-capped student included) the gradients are formed in
    the student's fused sweep by :class:`BucketRows` (docs/design.md §2). Elsewhere (the triton backend, CUDA,
    vocabulary parallelism, whose backend offers no strategy) the "lse" row kind and the gather. Differentiable
    in the student's tensors."""
    if tail == "bucket" and getattr(backend, "fused_row_functions", False):
        student, fused = fused_grad_choice(student_only(prob), backend, reduction, weights, row_function=True)
        if fused:
            rows = BucketRows(teacher, kind, beta, student.student_cap, student.temperature)
            return fused_reduced(student, rows, beta, backend, lead, reduction, weights)
    return reduce(topk_values(backend.plan(prob), teacher, kind, beta, tail, backend), lead, reduction, weights)


def teacher_argmax(teacher: TopKTeacher) -> Tensor:
    """The id of the largest log-probability per row (the first among ties; -1 for a row of padding only)."""
    lp = teacher.logprobs.double().nan_to_num(neginf=-torch.finfo(torch.float64).max)
    key = torch.where(teacher.valid, lp, torch.full_like(lp, -math.inf))
    best = teacher.ids.gather(1, key.argmax(1, keepdim=True))[:, 0]
    return torch.where(teacher.valid.any(1), best, torch.full_like(best, -1))


@torch.no_grad()
def topk_stats(prob: Problem, teacher: TopKTeacher, backend: Backend, tail: str = "bucket") -> Dict[str, Tensor]:
    """The backend contract's per-row statistics (``forward_stats``) with a top-k teacher: the student's fields
    exact (full vocabulary), ``reverse_kl``/``forward_kl`` the binned divergences of ``tail``, ``teacher_argmax``
    the id of the largest log-probability, ``teacher_lse`` 0 (the log-probabilities are the teacher's logits
    normalised to LSE 0) and ``teacher_entropy`` NaN (top-k cannot give it)."""
    out = dict(backend.forward_stats(student_only(prob)))
    ls = out["student_lse"]
    s_k = gather_logits(prob, teacher, backend)
    logp, logq = bin_logprobs(s_k, ls.to(s_k.dtype), teacher, tail)
    out["reverse_kl"] = bin_divergence(logp, logq, "reverse_kl").to(ls.dtype)
    out["forward_kl"] = bin_divergence(logp, logq, "forward_kl").to(ls.dtype)
    out["teacher_lse"] = torch.zeros_like(ls)
    out["teacher_entropy"] = torch.full_like(ls, math.nan)
    out["teacher_argmax"] = teacher_argmax(teacher)
    return out
