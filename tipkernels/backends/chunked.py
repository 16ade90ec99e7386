"""Chunked PyTorch backend (registry name "torch"): the quantities of docs/design.md §1 without ever holding ``[N, V]`` logits.

Tokens are processed in row chunks and the vocabulary in column chunks; a tile of logits of at most
``CHUNK_BUDGET_BYTES`` (all fp32 temporaries counted) exists at a time. The forward keeps online accumulators per
row (running maxima, rescaled sums), the backward recomputes each tile from the hidden states and weights and
the per-row LSEs/values saved by the forward. Implements the backend contract of :class:`tipkernels.backends.Backend`.

The module is ``chunked.py``, not ``torch.py``: a submodule named ``torch`` becomes the attribute ``torch`` of the
``tipkernels.backends`` package once imported, shadowing the ``torch`` module in the package's ``__init__`` namespace.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, Optional, Tuple

import torch

from ..options import deterministic
from ..inputs import IGNORE_INDEX, SAVED_VALUE, Problem, combine_jsd, effective_kind

Tensor = torch.Tensor

# Capability flags of the backend contract (tipkernels.backends.Backend).
name = "torch"
autograd_native = False
supports_vocab_parallel = True
has_jsd_sums = True

#: Upper bound on the bytes of fp32 temporaries alive for one logits tile.
CHUNK_BUDGET_BYTES = 64 * 2**20
#: How many tile-sized fp32 temporaries the widest step holds at once (logits of both models, exps, products).
_TILE_TEMPORARIES = 8
_MAX_VOCAB_CHUNK = 8192


def tile_shape(n_rows: int, vocab: int, budget_bytes: Optional[int] = None) -> Tuple[int, int]:
    """(rows, columns) of a logits tile so that its temporaries fit ``budget_bytes`` (independent of N)."""
    budget = CHUNK_BUDGET_BYTES if budget_bytes is None else budget_bytes
    elems = max(1, budget // (4 * _TILE_TEMPORARIES))
    cols = max(1, min(vocab, _MAX_VOCAB_CHUNK, elems))
    rows = max(1, min(n_rows, elems // cols))
    return rows, cols


def _chunks(total: int, size: int) -> Iterator[Tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _compute_dtype(t: Tensor) -> torch.dtype:
    # fp64 stays fp64 (the reference runs through here in tests); everything else accumulates in fp32.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def transform_logits(z: Tensor, scale: float, cap: Optional[float], temperature: float) -> Tensor:
    """The logit transform (docs/design.md §1) on a tile of raw logits ``z`` (overwritten): ``c·tanh(a·z/c)/T``,
    or ``a·z/T`` without a cap (then exactly today's ``z / T`` when ``a = 1``)."""
    if cap is None:
        return z.mul_(scale / temperature)
    return torch.tanh_(z.mul_(scale / cap)).mul_(cap / temperature)


def transform_grad_factor(s: Tensor, scale: float, cap: Optional[float], temperature: float):
    """``∂s/∂z`` of :func:`transform_logits` from its output ``s``: ``a·(1 − tanh²)/T`` with ``tanh = s·T/c``
    (a ``[n, c]`` tensor), or the number ``a/T`` without a cap. Multiply ``∂value/∂s`` by it for ``∂value/∂z``."""
    if cap is None:
        return scale / temperature
    t = s * (temperature / cap)
    return (1.0 - t * t).mul_(scale / temperature)


class _Side:
    """One model's logits, tile by tile: :func:`transform_logits` of ``hidden @ weight[v0:v1].T + bias[v0:v1]``
    or of a logits slice."""

    def __init__(self, hidden, weight, bias, logits, temperature: float, scale: float = 1.0,
                 cap: Optional[float] = None):
        self.weight, self.bias, self.logits = weight, bias, logits
        self.temperature, self.scale, self.cap = temperature, scale, cap
        self.hidden = hidden
        self.dtype = _compute_dtype(hidden if hidden is not None else logits)
        # On the CPU half-precision matmuls are slow and lossy: upcast once per row chunk. On GPUs keep the
        # input dtype for the matmul (tensor cores) and upcast its output.
        self.upcast_inputs = hidden is not None and hidden.device.type == "cpu"

    def rows(self, r0: int, r1: int) -> Optional[Tensor]:
        if self.hidden is None:
            return None
        h = self.hidden[r0:r1]
        return h.to(self.dtype) if self.upcast_inputs else h

    def tile(self, h: Optional[Tensor], r0: int, r1: int, v0: int, v1: int) -> Tensor:
        if self.hidden is None:
            out = self.logits[r0:r1, v0:v1].to(self.dtype, copy=True)
        else:
            w = self.weight[v0:v1]
            if self.upcast_inputs:
                w = w.to(self.dtype)
            out = (h @ w.t()).to(self.dtype)
            if self.bias is not None:
                out = out + self.bias[v0:v1].to(self.dtype)
        return transform_logits(out, self.scale, self.cap, self.temperature)

    def grad_factor(self, s: Tensor):
        """``∂s/∂z`` on a tile ``s`` this side formed (:func:`transform_grad_factor`)."""
        return transform_grad_factor(s, self.scale, self.cap, self.temperature)


def _sides(prob: Problem):
    student = _Side(prob.student_hidden, prob.student_weight, prob.student_bias, prob.student_logits, prob.temperature,
                    prob.student_scale, prob.student_cap)
    teacher = None
    if prob.has_teacher:
        teacher = _Side(prob.teacher_hidden, prob.teacher_weight, prob.teacher_bias, prob.teacher_logits,
                        prob.temperature, prob.teacher_scale, prob.teacher_cap)
    return student, teacher


class _Online:
    """Running max ``m``, ``Z = Σ e^{x-m}`` and ``A = Σ e^{x-m}(x-m)`` of one model's logits, plus its argmax."""

    def __init__(self, n: int, dtype, device):
        self.m = torch.full((n,), -math.inf, dtype=dtype, device=device)
        self.z = torch.zeros(n, dtype=dtype, device=device)
        self.a = torch.zeros(n, dtype=dtype, device=device)
        self.best = torch.full((n,), -math.inf, dtype=dtype, device=device)
        self.arg = torch.zeros(n, dtype=torch.int64, device=device)

    def update(self, x: Tensor, v0: int) -> Tuple[Tensor, Tensor, Tensor]:
        """Fold in tile ``x [n, c]``; return ``(e^{x - m_new}, x - m_new, alpha = e^{m_old - m_new})``.

        Also leaves ``shift = m_old - m_new`` (0 before the first tile) and ``z_old`` for the cross terms."""
        tile_max, tile_arg = x.max(dim=1)
        better = tile_max > self.best
        self.best = torch.where(better, tile_max, self.best)
        self.arg = torch.where(better, tile_arg + v0, self.arg)
        m_new = torch.maximum(self.m, tile_max)
        alpha = torch.exp(self.m - m_new)  # 0 on the first tile (m = -inf)
        self.shift = torch.where(self.z > 0, self.m - m_new, torch.zeros_like(m_new))
        self.z_old = self.z
        centred = x - m_new[:, None]
        e = torch.exp(centred)
        self.a = alpha * (self.a + self.shift * self.z) + _xlogy_sum(e, centred)
        self.z = alpha * self.z + e.sum(1)
        self.m = m_new
        return e, centred, alpha

    def lse(self) -> Tensor:
        return self.m + torch.log(self.z)

    def entropy(self) -> Tensor:
        return torch.log(self.z) - self.a / self.z


def _xlogy_sum(weight: Tensor, log_term: Tensor) -> Tensor:
    """Row sums of ``weight * log_term`` where entries of weight exactly 0 contribute exactly 0 (0·log 0 = 0).

    A probability is exactly 0 only where a scaled logit is -inf (an overflowing ``logit / T``, or -inf inputs
    with ``check_finite`` off); there ``log_term`` is -inf and the plain product would be NaN. Where the weight is
    positive and ``log_term`` is -inf the sum is -inf on purpose: that divergence is +inf, not NaN."""
    prod = weight * log_term
    return torch.where(weight > 0, prod, torch.zeros((), dtype=prod.dtype, device=prod.device)).sum(1)


@deterministic
def forward_stats(prob: Problem) -> Dict[str, Tensor]:
    """One pass over the vocabulary: every per-row statistic of the backend contract."""
    n, vocab = prob.num_rows, prob.vocab_size
    student, teacher = _sides(prob)
    dtype, device = student.dtype, prob.device
    out = {k: [] for k in ("student_lse", "entropy", "student_argmax")}
    if teacher is not None:
        out.update({k: [] for k in ("teacher_lse", "teacher_entropy", "reverse_kl", "forward_kl", "teacher_argmax")})
    if prob.labels is not None:
        out["label_logprob"] = []
    rows, cols = tile_shape(n, vocab)
    with torch.no_grad():
        for r0, r1 in _chunks(n, rows):
            hs, ht = student.rows(r0, r1), teacher.rows(r0, r1) if teacher is not None else None
            acc_s = _Online(r1 - r0, dtype, device)
            if teacher is not None:
                acc_t = _Online(r1 - r0, dtype, device)
                # cross terms, centred on both running maxima (no cancellation of huge logits):
                b_s = torch.zeros(r1 - r0, dtype=dtype, device=device)  # Σ e^{s-ms} (u-mt)
                b_t = torch.zeros(r1 - r0, dtype=dtype, device=device)  # Σ e^{u-mt} (s-ms)
            if prob.labels is not None:
                lab = prob.labels[r0:r1]
                label_logit = torch.zeros(r1 - r0, dtype=dtype, device=device)
            for v0, v1 in _chunks(vocab, cols):
                s = student.tile(hs, r0, r1, v0, v1)
                es, cs, alpha_s = acc_s.update(s, v0)
                if teacher is not None:
                    et, ct, alpha_t = acc_t.update(teacher.tile(ht, r0, r1, v0, v1), v0)
                    b_s = alpha_s * (b_s + acc_t.shift * acc_s.z_old) + _xlogy_sum(es, ct)
                    b_t = alpha_t * (b_t + acc_s.shift * acc_t.z_old) + _xlogy_sum(et, cs)
                if prob.labels is not None:
                    inside = (lab >= v0) & (lab < v1)
                    picked = s.gather(1, (lab - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0]
                    label_logit = torch.where(inside, picked, label_logit)
            ls = acc_s.lse()
            out["student_lse"].append(ls)
            out["entropy"].append(acc_s.entropy().clamp_min(0))
            out["student_argmax"].append(acc_s.arg)
            if teacher is not None:
                lt = acc_t.lse()
                out["teacher_lse"].append(lt)
                out["teacher_entropy"].append(acc_t.entropy().clamp_min(0))
                log_zs, log_zt = torch.log(acc_s.z), torch.log(acc_t.z)
                # KL(p||q) = Σ p (s-ms) - Σ p (u-mt) - log Zs + log Zt, and symmetrically for KL(q||p)
                out["reverse_kl"].append(((acc_s.a - b_s) / acc_s.z - log_zs + log_zt).clamp_min(0))
                out["forward_kl"].append(((acc_t.a - b_t) / acc_t.z - log_zt + log_zs).clamp_min(0))
                out["teacher_argmax"].append(acc_t.arg)
            if prob.labels is not None:
                out["label_logprob"].append(torch.where(lab != IGNORE_INDEX, label_logit - ls, torch.zeros_like(ls)))
    return {k: _cat(v, dtype, device) for k, v in out.items()}


def _cat(parts, dtype, device) -> Tensor:
    if parts:
        return torch.cat(parts)
    return torch.zeros(0, dtype=dtype, device=device)


def _log_mixture(logp: Tensor, logq: Tensor, beta: float) -> Tensor:
    """``log(β q + (1-β) p)``; the limits β=0 (m=p) and β=1 (m=q) exactly."""
    kind = effective_kind("jsd", beta)
    if kind == "forward_kl":
        return logp
    if kind == "reverse_kl":
        return logq
    return torch.logaddexp(logq + math.log(beta), logp + math.log1p(-beta))


def jsd_forward(prob: Problem, student_lse: Tensor, teacher_lse: Tensor, beta: float) -> Tuple[Tensor, Tensor]:
    """Second pass (both LSEs known): per-row JSD(β) and KL(p || m)."""
    return combine_jsd(*jsd_sums(prob, student_lse, teacher_lse, beta), beta)


@deterministic
def jsd_sums(prob: Problem, student_lse: Tensor, teacher_lse: Tensor, beta: float) -> Tuple[Tensor, Tensor]:
    """Per-row unclamped ``Σ q (log q − log m)`` and ``Σ p (log p − log m)`` over this problem's vocabulary."""
    n, vocab = prob.num_rows, prob.vocab_size
    student, teacher = _sides(prob)
    dtype = student.dtype
    kl_qm = torch.zeros(n, dtype=dtype, device=prob.device)
    kl_pm = torch.zeros(n, dtype=dtype, device=prob.device)
    rows, cols = tile_shape(n, vocab)
    with torch.no_grad():
        for r0, r1 in _chunks(n, rows):
            hs, ht = student.rows(r0, r1), teacher.rows(r0, r1)
            ls, lt = student_lse[r0:r1, None].to(dtype), teacher_lse[r0:r1, None].to(dtype)
            for v0, v1 in _chunks(vocab, cols):
                logp = student.tile(hs, r0, r1, v0, v1) - ls
                logq = teacher.tile(ht, r0, r1, v0, v1) - lt
                logm = _log_mixture(logp, logq, beta)
                kl_qm[r0:r1] += _xlogy_sum(logq.exp(), logq - logm)
                kl_pm[r0:r1] += _xlogy_sum(logp.exp(), logp - logm)
    return kl_qm, kl_pm


def grad_logits_tile(kind: str, s: Tensor, u: Optional[Tensor], ls: Tensor, lt: Optional[Tensor],
                     saved_value: Optional[Tensor], beta: float) -> Tensor:
    """``∂ value / ∂ s_j`` on a tile (docs/design.md §2), before the upstream gradient and 1/T.

    ``s``/``u`` are the temperature-scaled logits ``[n, c]``; ``ls``/``lt`` the LSEs ``[n, 1]``; ``saved_value``
    ``[n, 1]`` is H (entropy), KL(p||q) (reverse_kl) or KL(p||m) (jsd).
    """
    logp = s - ls
    p = logp.exp()
    if kind == "entropy":
        return _where_live(p, -p * (logp + saved_value))
    logq = u - lt
    if kind == "forward_kl":
        return p - logq.exp()
    if kind == "reverse_kl":
        return _where_live(p, p * (logp - logq - saved_value))
    if kind == "jsd":
        return _where_live(p, (1.0 - beta) * p * (logp - _log_mixture(logp, logq, beta) - saved_value))
    raise ValueError(f"unknown kind {kind!r}")


def _where_live(p: Tensor, grad: Tensor) -> Tensor:
    """0 where ``p`` is exactly 0 (a -inf logit gets no gradient), instead of 0·(-inf) = NaN."""
    return torch.where(p > 0, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


@deterministic
def backward(prob: Problem, kind: str, grad_rows: Tensor, saved: Dict[str, Tensor], beta: float = 0.5):
    """Recompute tiles and accumulate ``d hidden``/``d logits``, ``d weight``, ``d bias``; zero rows skipped.

    The formula is the effective kind's (JSD at β = 0 / 1 is forward / reverse KL); the saved value read is the
    requested kind's (``SAVED_VALUE``: at β = 1 JSD's ``kl_pm`` is KL(p‖q))."""
    formula = effective_kind(kind, beta)
    n, vocab = prob.num_rows, prob.vocab_size
    lin = prob.student_is_linear
    src = prob.student_hidden if lin else prob.student_logits
    d_student = torch.zeros_like(src)
    d_weight = torch.zeros(prob.student_weight.shape, dtype=torch.float32 if prob.student_weight.dtype != torch.float64
                           else torch.float64, device=prob.device) if lin else None
    d_bias = torch.zeros(vocab, dtype=d_weight.dtype, device=prob.device) if prob.student_bias is not None else None
    keep = (grad_rows != 0).nonzero().squeeze(1)
    if keep.numel() == 0:
        return d_student, _cast(d_weight, prob.student_weight), _cast(d_bias, prob.student_bias)
    sub = prob.rows(keep) if keep.numel() < n else prob
    sel = (lambda t: t.index_select(0, keep)) if keep.numel() < n else (lambda t: t)
    student, teacher = _sides(sub)
    dtype = student.dtype
    g_all = sel(grad_rows).to(dtype)
    ls_all = sel(saved["student_lse"]).to(dtype)
    lt_all = sel(saved["teacher_lse"]).to(dtype) if teacher is not None and kind != "entropy" else None
    value_name = None if formula == "forward_kl" else SAVED_VALUE[kind]
    val_all = sel(saved[value_name]).to(dtype) if value_name is not None else None
    m = keep.numel()
    rows, cols = tile_shape(m, vocab)
    with torch.no_grad():
        for r0, r1 in _chunks(m, rows):
            hs = student.rows(r0, r1)
            ht = teacher.rows(r0, r1) if lt_all is not None else None
            g = g_all[r0:r1, None]
            ls = ls_all[r0:r1, None]
            lt = lt_all[r0:r1, None] if lt_all is not None else None
            val = val_all[r0:r1, None] if val_all is not None else None
            dh = torch.zeros(r1 - r0, src.shape[1], dtype=dtype, device=prob.device) if lin else None
            for v0, v1 in _chunks(vocab, cols):
                s = student.tile(hs, r0, r1, v0, v1)
                u = teacher.tile(ht, r0, r1, v0, v1) if lt is not None else None
                ds = grad_logits_tile(formula, s, u, ls, lt, val, beta).mul_(g).mul_(student.grad_factor(s))
                if not lin:
                    d_student[keep[r0:r1], v0:v1] = ds.to(d_student.dtype)
                    continue
                w = sub.student_weight[v0:v1].to(dtype)
                dh.addmm_(ds, w)
                d_weight[v0:v1].addmm_(ds.t().to(d_weight.dtype), hs.to(d_weight.dtype))
                if d_bias is not None:
                    d_bias[v0:v1] += ds.sum(0).to(d_bias.dtype)
            if lin:
                d_student[keep[r0:r1]] = dh.to(d_student.dtype)
    return d_student, _cast(d_weight, prob.student_weight), _cast(d_bias, prob.student_bias)


def _cast(grad: Optional[Tensor], like: Optional[Tensor]) -> Optional[Tensor]:
    return None if grad is None else grad.to(like.dtype)


def plan(prob: Problem) -> Problem:
    """The contract's per-call preparation: nothing to resolve here."""
    return prob
