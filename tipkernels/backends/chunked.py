"""Chunked PyTorch backend (registry name "torch"): the quantities of docs/design.md §1 without ever holding ``[N, V]`` logits.

Two gradient strategies (docs/design.md §2), chosen in one place, :func:`grad_strategy`:

- ``"recompute"``: tokens are processed in row chunks and the vocabulary in column chunks; a tile of logits whose
  fp32 temporaries fit :func:`tile_budget_bytes` exists at a time. The forward keeps
  online accumulators per row (running maxima, rescaled sums), the backward recomputes each tile from the hidden
  states and weights and the per-row LSEs/values saved by the forward. Serves any upstream gradient.
- ``"fused_grad"``: when the upstream gradient is known up to one scalar (reduction "sum"/"mean", weighted or
  not), :func:`fused_value_and_grad` forms the gradient in the forward's sweep: a block of ``rows`` tokens holds
  both models' full-vocabulary logits (``2 · rows · V`` floats, :func:`fused_rows`), computes their statistics,
  turns the student's block into ``dS`` in place and accumulates ``d hidden``/``d weight``/``d bias`` with
  matmuls. No logit is computed twice; the backward only scales the stored gradients. Its matmuls and elementwise
  work are pieces (vocabulary chunks, row sub-blocks) that :data:`FUSED_WORKERS` threads take one at a time.

Implements the backend contract of :class:`tipkernels.backends.Backend`.

The module is ``chunked.py``, not ``torch.py``: a submodule named ``torch`` becomes the attribute ``torch`` of the
``tipkernels.backends`` package once imported, shadowing the ``torch`` module in the package's ``__init__`` namespace.
"""

from __future__ import annotations

import glob
import math
import os
import queue
import re
import subprocess
import threading
import warnings
from functools import lru_cache
from typing import Dict, Iterator, Optional, Tuple

import torch

from ..options import deterministic
from ..inputs import IGNORE_INDEX, Problem, combine_jsd, effective_kind, needs_teacher, saved_scalar

Tensor = torch.Tensor

# Capability flags of the backend contract (tipkernels.backends.Backend).
name = "torch"
autograd_native = False
supports_vocab_parallel = True
has_jsd_sums = True
#: fused_value_and_grad takes a row function in place of a dense kind (a top-k teacher's bucket, ops/topk.py).
fused_row_functions = True

#: Bytes of fp32 temporaries alive for one logits tile of the recompute strategy; None: :func:`tile_budget_bytes`
#: (derived from the cache size).
CHUNK_BUDGET_BYTES: Optional[int] = None
#: How many tile-sized fp32 temporaries the widest step holds at once (logits of both models, exps, products).
_TILE_TEMPORARIES = 8
_MAX_VOCAB_CHUNK = 8192
_TILE_ROWS = 256
_MIB = 2**20

#: "auto" (fused_grad when the upstream gradient is known up to a scalar and the student is linear, else
#: recompute), "fused_grad" or "recompute" (both forced where possible; tests and benchmarks set it).
STRATEGY = "auto"
#: Bytes the fused_grad strategy holds for one row block's full-vocabulary logits of both models; None: 64 MiB,
#: or 64 rows' worth where that is more (:func:`fused_rows`).
FUSED_BLOCK_BYTES: Optional[int] = None
#: Row-block bounds of fused_grad: at least 64 rows so the ``d weight`` matmul (K = rows) runs near peak and its
#: ``[V, D]`` accumulator is read and written N/rows times only.
_FUSED_MIN_ROWS, _FUSED_MAX_ROWS = 64, 512


def _parse_size(text: str) -> int:
    m = re.match(r"\s*([0-9.]+)\s*([KMG]?)i?B?", text.strip(), re.I)
    if not m:
        return 0
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2).upper()])


@lru_cache(maxsize=1)
def cache_sizes() -> Tuple[int, int]:
    """``(per-core L2 bytes, last-level cache bytes)`` of this CPU: sysfs, then ``lscpu``, then (1 MiB, 8 MiB)."""
    l2 = llc = 0
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(d, "level")) as f:
                level = int(f.read())
            with open(os.path.join(d, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(d, "size")) as f:
                size = _parse_size(f.read())
        except (OSError, ValueError):
            continue
        if kind == "Instruction":
            continue
        if level == 2:
            l2 = size
        llc = max(llc, size) if level >= 2 else llc
    if not (l2 and llc):
        try:
            out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, timeout=5).stdout
            for line in out.splitlines():
                key, _, val = line.partition(":")
                n = int(val.split()[0]) if val.split() and val.split()[0].isdigit() else 0
                if key.strip() == "L2 cache" and not l2:
                    l2 = n // max(1, _count_in(val))
                if key.strip() == "L3 cache" and not llc:
                    llc = n
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    l2 = l2 or _MIB
    return l2, max(llc, l2, 8 * _MIB if not llc else 0)


def _count_in(val: str) -> int:
    m = re.search(r"\((\d+) instances?\)", val)
    return int(m.group(1)) if m else 1


def tile_budget_bytes() -> int:
    """The recompute strategy's tile budget: twice the last-level cache, between 16 and 64 MiB (64 MiB here).

    Its tile temporaries stream through memory whatever their size (8 of them, interleaved with the matmuls);
    what costs is the number of torch ops, each a barrier of the intra-op threads. Measured on the loaded 2-core
    box (benchmarks/TUNING.md, CPU section): tiles of half the LLC (16 MiB) took 1.8–2.5× longer than 64 MiB."""
    if CHUNK_BUDGET_BYTES is not None:
        return CHUNK_BUDGET_BYTES
    _, llc = cache_sizes()
    return int(min(64 * _MIB, max(16 * _MIB, 2 * llc)))


def tile_shape(n_rows: int, vocab: int, budget_bytes: Optional[int] = None) -> Tuple[int, int]:
    """(rows, columns) of a logits tile so that its temporaries fit ``budget_bytes`` (independent of N).

    Rows first (up to 256: the ``d weight`` matmul's K, which reads and writes a ``[cols, D]`` slice of the
    accumulator once per tile), then as many columns as the budget leaves."""
    budget = tile_budget_bytes() if budget_bytes is None else budget_bytes
    elems = max(1, budget // (4 * _TILE_TEMPORARIES))
    full_rows = max(1, min(_TILE_ROWS, elems // min(vocab, _TILE_ROWS)))
    cols = max(1, min(vocab, _MAX_VOCAB_CHUNK, elems // full_rows))
    return max(1, min(n_rows, full_rows)), cols


def fused_rows(n_rows: int, vocab: int, itemsize: int = 4) -> Tuple[int, int]:
    """fused_grad's ``(row block, row sub-block)``. A row block holds both models' full-vocabulary logits in
    :data:`FUSED_BLOCK_BYTES` (default: 64 MiB, raised to fit 64 rows; at most 512 rows); its elementwise work
    walks sub-blocks of rows whose three live ``[sub, V]`` arrays fit about one core's L2 cache (twice its size:
    L3 catches the spill), so each of its ~12 passes over a sub-block hits cache."""
    budget = FUSED_BLOCK_BYTES
    if budget is None:
        budget = max(64 * _MIB, 2 * _FUSED_MIN_ROWS * vocab * itemsize)
    block = max(1, min(n_rows, _FUSED_MAX_ROWS, budget // max(1, 2 * vocab * itemsize)))
    l2, _ = cache_sizes()
    sub = max(1, min(block, (2 * l2) // (3 * vocab * itemsize)))
    return block, sub


#: Columns of fused_grad's matmul pieces (both phases); None: :func:`fused_vocab_chunks` (from the cache size).
FUSED_VOCAB_CHUNK: Optional[int] = None


def fused_vocab_chunks(vocab: int) -> Tuple[int, int]:
    """fused_grad's vocabulary chunks ``(logits, gradient)``: the columns of one matmul piece. A logits piece
    writes a ``[rows, cols]`` slice that fits half a core's L2 at 256 rows (512 columns with 1 MiB of L2); a
    gradient piece (``d W`` and ``d h`` from one slice of ``dS``) is 4× wider. Measured single-threaded on this
    box (benchmarks/TUNING.md, c6): the logits matmul at 128–256 rows ran at 77–83 GFLOP/s in 512-column pieces,
    71–76 in 2048, 64–67 over the whole 65536-column vocabulary; the gradient pair at 81–86 from 1024 columns up."""
    if FUSED_VOCAB_CHUNK is not None:
        c = max(1, min(vocab, FUSED_VOCAB_CHUNK))
        return c, c
    l2, _ = cache_sizes()
    cols = max(128, min(4096, l2 // (2 * 256 * 4)))
    return min(vocab, cols), min(vocab, 4 * cols)


def _chunks(total: int, size: int) -> Iterator[Tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _compute_dtype(t: Tensor) -> torch.dtype:
    # fp64 stays fp64 (the reference runs through here in tests); everything else accumulates in fp32.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def transform_logits(z: Tensor, scale: float, cap: Optional[float], temperature: float) -> Tensor:
    """The logit transform (docs/design.md §1) on a tile of raw logits ``z`` (overwritten): ``c·tanh(a·z/c)/T``,
    or ``a·z/T`` without a cap (exactly ``z / T`` when ``a = 1``)."""
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
    ``[n, 1]`` is H (entropy), KL(p||q) (reverse_kl) or KL(p||m) (jsd); "lse" (the student's log-sum-exp) reads
    neither ``u`` nor a saved value.
    """
    logp = s - ls
    p = logp.exp()
    if kind == "lse":  # d Ls / d s_j = p_j
        return p
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
    requested kind's (``inputs.saved_scalar``: at β = 1 JSD's ``kl_pm`` is KL(p‖q))."""
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
    lt_all = sel(saved["teacher_lse"]).to(dtype) if teacher is not None and needs_teacher(kind) else None
    value_name = saved_scalar(kind, beta)
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


# ------------------------------------------------------------------------------------------------ fused_grad


def grad_strategy(prob: Problem, upstream_known: bool, *, row_function: bool = False) -> str:
    """The one place the gradient strategy is chosen: "fused_grad" for CPU tensors when the upstream gradient of
    every row is known in the forward (``upstream_known``: reduction "sum"/"mean") and the student is linear without
    a soft-cap, else "recompute". (Its elementwise phase is sized and threaded for CPU caches; on a GPU the
    per-sub-block host checks would stall.) (A student soft-cap's derivative ``1 − tanh²`` needs the capped logits, which the
    fused sweep overwrites with ``dS``; a logit scale is a constant factor and is folded in.) ``row_function``: the
    sweep runs a row function (:func:`fused_value_and_grad`), which reads the capped logits before it overwrites
    them, so a soft-capped student is taken too. :data:`STRATEGY` = "recompute" forces the recompute path
    everywhere."""
    if STRATEGY not in ("auto", "fused_grad", "recompute"):
        raise ValueError(f"tipkernels.backends.chunked.STRATEGY must be 'auto', 'fused_grad' or 'recompute', got {STRATEGY!r}")
    if (STRATEGY == "recompute" or not upstream_known or not prob.student_is_linear
            or (prob.student_cap is not None and not row_function) or prob.device.type != "cpu"):
        return "recompute"
    return "fused_grad"


def _dense(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``t`` in ``dtype`` with a layout BLAS takes without a copy per call (row-major or its transpose)."""
    if t is None:
        return None
    t = t.to(dtype)
    return t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()


class _BlockSide:
    """One model's transformed logits ``c·tanh(a·(h · Wᵀ + b)/c)/T`` (:func:`transform_logits`) of a row block,
    written into a preallocated buffer: the factor before the tanh (``a/c``, or ``a/T`` without a cap) is folded
    into the hidden rows and the bias (a ``[rows, D]`` and a ``[V]`` scaling instead of a ``[rows, V]`` pass) and
    the bias is added by the matmul itself (addmm's beta)."""

    def __init__(self, hidden, weight, bias, logits, temperature: float, dtype: torch.dtype, vocab: int,
                 scale: float = 1.0, cap: Optional[float] = None):
        self.pre = scale / (temperature if cap is None else cap)
        self.post = None if cap is None else cap / temperature
        self.dtype, self.vocab = dtype, vocab
        self.hidden, self.logits = hidden, logits
        self.weight_t = _dense(weight, dtype).t() if weight is not None else None
        self.bias = None if bias is None else (bias.to(dtype) * self.pre)

    def fill(self, out: Tensor, r0: int, r1: int) -> Tensor:
        """All ``V`` columns of rows ``r0:r1`` into ``out [r1 - r0, V]`` (one op; the safe path's refill)."""
        return self.fill_cols(out, self.rows(r0, r1), r0, r1, 0, self.vocab)

    def rows(self, r0: int, r1: int) -> Optional[Tensor]:
        """The hidden rows ``r0:r1`` in the compute dtype, times the pre-tanh factor (None for a logits side)."""
        return None if self.hidden is None else self.hidden[r0:r1].to(self.dtype) * self.pre

    def fill_cols(self, out: Tensor, h: Optional[Tensor], r0: int, r1: int, v0: int, v1: int) -> Tensor:
        """Columns ``v0:v1`` of rows ``r0:r1`` (``h``: :meth:`rows`) into ``out[:, v0:v1]`` of the row block
        ``out``; BLAS writes the strided column slice in place."""
        out = out[:, v0:v1]
        if self.hidden is None:  # widen first, then scale (as the recompute path's tiles do)
            out = out.copy_(self.logits[r0:r1, v0:v1]).mul_(self.pre)
        else:
            w = self.weight_t[:, v0:v1]
            out = (torch.mm(h, w, out=out) if self.bias is None
                   else torch.addmm(self.bias[v0:v1], h, w, out=out))
        return out if self.post is None else torch.tanh_(out).mul_(self.post)


def _rkl_rows(s: Tensor, u: Tensor, scratch: Tensor, g: Tensor) -> Tuple[Tensor, Tensor]:
    """Reverse KL of rows ``s``/``u`` (scaled logits, ``[r, V]``) and, in ``s``, ``g · ∂KL/∂s``; in place.

    Every pass reads arrays that fit the cache (the caller sizes ``r``): centre both on their maxima, ``e = e^{s_c}``
    into ``scratch``, ``d = s_c − u_c`` into ``u``; then ``log p − log q = d − c`` with ``c = log Zs − log Zt``,
    ``KL = Σ e·d / Zs − c`` (one batched dot) and ``dS = g · e/Zs · (d − c − KL)``. Returns ``(KL clamped at 0,
    finite)``; where a row is not finite (a -inf or overflowing logit) the caller redoes it on the safe path."""
    mt = u.amax(1, keepdim=True)
    u.sub_(mt)
    zt = torch.exp(u, out=scratch).sum(1, keepdim=True)
    ms = s.amax(1, keepdim=True)
    s.sub_(ms)
    e = torch.exp(s, out=scratch)
    zs = e.sum(1, keepdim=True)
    c = zs.log() - zt.log()
    d = torch.sub(s, u, out=u)
    kl = torch.bmm(e.unsqueeze(1), d.unsqueeze(2))[:, :, 0] / zs - c
    kl = kl.clamp_min(0)
    ok = bool(torch.isfinite(kl).all())
    # dS = (d - (c + KL)) · e · (g / Zs), written into s
    torch.sub(d, c + kl, out=s)
    s.mul_(e.mul_(g / zs))
    return kl[:, 0], ok


#: Opt-in: fused_grad's reverse-KL sub-block update through ``torch.compile`` (inductor's C++ loops fuse the
#: ~12 passes). Off by default: on this 2-core CPU it ran the update 2.1× faster (59 vs 127 ms per 256 × 32768
#: rows, single-threaded) but cost ~25 s of compilation per process and dtype, more than it saves in a short run
#: (benchmarks/TUNING.md, CPU section). Where compilation fails, a warning is given and the eager update is used.
COMPILE_ELEMENTWISE = False
_COMPILED: Dict[Tuple[int, int, torch.dtype], object] = {}
_COMPILE_LOCK = threading.Lock()


def _rkl_pure(s: Tensor, u: Tensor, g: Tensor) -> Tuple[Tensor, Tensor]:
    """:func:`_rkl_rows`'s maths without in-place writes (for ``torch.compile``): ``(KL [r, 1], dS [r, V])``."""
    sc = s - s.amax(1, keepdim=True)
    uc = u - u.amax(1, keepdim=True)
    e = sc.exp()
    zs = e.sum(1, keepdim=True)
    c = zs.log() - uc.exp().sum(1, keepdim=True).log()
    d = sc - uc
    kl = ((e * d).sum(1, keepdim=True) / zs - c).clamp_min(0)
    return kl, (d - (c + kl)) * e * (g / zs)


def compiled_rkl(rows: int, vocab: int, dtype: torch.dtype):
    """The compiled update for ``[rows, vocab]`` sub-blocks, compiled and checked once on this thread (None if
    :data:`COMPILE_ELEMENTWISE` is off or compilation failed: the caller runs the eager update)."""
    if not COMPILE_ELEMENTWISE:
        return None
    key = (rows, vocab, dtype)
    with _COMPILE_LOCK:
        if key not in _COMPILED:
            try:
                fn = torch.compile(_rkl_pure, dynamic=False)
                x = torch.randn(rows, vocab, dtype=dtype)
                y = torch.randn(rows, vocab, dtype=dtype)
                gx = torch.ones(rows, 1, dtype=dtype)
                want, got = _rkl_pure(x, y, gx), fn(x, y, gx)
                if not all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(want, got)):
                    raise RuntimeError("compiled update disagrees with the eager one")
                _COMPILED[key] = fn
            except Exception as err:  # noqa: BLE001 - any compiler failure means: use the eager update
                warnings.warn(f"tipkernels: torch.compile of the fused_grad update failed ({err!r:.200}); "
                              "using the eager update")
                _COMPILED[key] = None
        return _COMPILED[key]


def _generic_rows(kind: str, s: Tensor, u: Optional[Tensor], g: Tensor, beta: float) -> Tensor:
    """Any kind on rows of full-vocabulary scaled logits: per-row value (clamped at 0 like the forward) and
    ``g · ∂value/∂s`` written into ``s``; exact 0·log 0 handling (the safe path, also for non-finite rows)."""
    ls = torch.logsumexp(s, 1, keepdim=True)
    logp = s - ls
    p = logp.exp()
    lt = logq = None
    if u is not None:
        lt = torch.logsumexp(u, 1, keepdim=True)
        logq = u - lt
    if kind == "entropy":
        value = saved = (-_xlogy_sum(p, logp)).clamp_min(0)
    elif kind == "reverse_kl":
        value = saved = _xlogy_sum(p, logp - logq).clamp_min(0)
    elif kind == "forward_kl":
        value, saved = _xlogy_sum(logq.exp(), logq - logp).clamp_min(0), None
    elif kind == "jsd":
        logm = _log_mixture(logp, logq, beta)
        value, saved = combine_jsd(_xlogy_sum(logq.exp(), logq - logm), _xlogy_sum(p, logp - logm), beta)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    ds = grad_logits_tile(kind, s, u, ls, lt, None if saved is None else saved[:, None], beta)
    ds = torch.where(g != 0, ds * g, torch.zeros((), dtype=ds.dtype, device=ds.device))
    s.copy_(ds)
    return value


#: fused_grad gathers the rows of nonzero upstream gradient (a ``[live, V]`` copy) before its gradient matmuls
#: when fewer than this fraction of a block's rows are live (weights with zeros, e.g. a mask).
_COMPACT_BELOW = 0.9
#: Python threads that share fused_grad's work (None: torch's thread count). Each runs single-threaded torch ops
#: on pieces it takes from a shared list: row sub-blocks for the elementwise work, vocabulary chunks for the
#: matmuls. torch's intra-op threads would meet at a barrier after every op: on a loaded 2-core machine a
#: 5 × 32768 step took 10× longer with 2 intra-op threads than with 1, and a whole-vocabulary 128-row matmul split
#: by MKL over 2 threads ran at a third of the single-threaded chunked pieces' rate (benchmarks/TUNING.md, c2, c6).
FUSED_WORKERS: Optional[int] = None


def fused_workers() -> int:
    return max(1, torch.get_num_threads() if FUSED_WORKERS is None else FUSED_WORKERS)


@lru_cache(maxsize=4)
def _pool(workers: int):
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(workers, thread_name_prefix="tipkernels-fused")


def _run_pieces(workers: int, fn, pieces) -> None:
    """``fn(piece, slot)`` for every piece, on ``workers`` threads that each take the next piece when done (a
    thread the OS deschedules holds up one piece, not half the work). ``slot`` (``0 <= slot < workers``) is held
    by one thread at a time: per-thread scratch and accumulators are indexed by it. Exceptions propagate."""
    if workers == 1 or len(pieces) <= 1:
        with torch.no_grad():
            for piece in pieces:
                fn(piece, 0)
        return
    slots = queue.SimpleQueue()
    for k in range(workers):
        slots.put(k)

    @torch.no_grad()  # grad mode is per thread: the pool's threads need it too
    def job(piece):
        k = slots.get()
        try:
            fn(piece, k)
        finally:
            slots.put(k)

    list(_pool(workers).map(job, pieces))


@torch.no_grad()  # grad mode is per thread: the pool's threads need it too
def _elementwise(kind, beta, student, teacher, s, u, scratch, g_all, values, r0, parts, compiled=None) -> None:
    """Values and ``dS`` (into ``s``) for the row sub-blocks ``parts`` of the block starting at row ``r0``;
    ``kind`` a dense kind or a row function (:func:`fused_value_and_grad`)."""
    if callable(kind):  # a row function walks the group's sub-blocks itself (its per-call costs: once a group)
        a, b = parts[0][0], parts[-1][1]
        values[r0 + a:r0 + b] = kind(s[a:b], g_all[r0 + a:r0 + b], r0 + a, r0 + b, scratch.shape[0])
        return
    for a, b in parts:
        g = g_all[r0 + a:r0 + b]
        if kind == "reverse_kl" and compiled is not None and b - a == scratch.shape[0]:
            kl, ds = compiled(s[a:b], u[a:b], g)
            s[a:b].copy_(ds)
            val, ok = kl[:, 0], bool(torch.isfinite(kl).all())
            if not ok:
                student.fill(s[a:b], r0 + a, r0 + b)
                teacher.fill(u[a:b], r0 + a, r0 + b)
                val = _generic_rows(kind, s[a:b], u[a:b], g, beta)
        elif kind == "reverse_kl":
            val, ok = _rkl_rows(s[a:b], u[a:b], scratch[: b - a], g)
            if not ok:  # a non-finite row: rebuild these rows' logits, take the safe path
                student.fill(s[a:b], r0 + a, r0 + b)
                teacher.fill(u[a:b], r0 + a, r0 + b)
                val = _generic_rows(kind, s[a:b], u[a:b], g, beta)
        else:
            val = _generic_rows(kind, s[a:b], None if u is None else u[a:b], g, beta)
        values[r0 + a:r0 + b] = val


class _one_thread:
    """torch's intra-op threads set to 1 within the sweep (restored after: the caller's setting)."""

    def __enter__(self):
        self.prev = torch.get_num_threads()
        if self.prev != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.prev != 1:
            torch.set_num_threads(self.prev)


@deterministic
def fused_value_and_grad(prob: Problem, kind: str, beta: float, row_grad: Tensor,
                         wanted: Tuple[bool, bool, bool] = (True, True, True)):
    """Per-row values of ``kind`` and the gradients of ``Σ_i row_grad_i · value_i`` in one sweep ("fused_grad").

    Args:
        prob: a linear student (``student_hidden [N, D_s]``, ``student_weight [V, D_s]``, optional bias); the
            teacher linear, as logits, or absent (``kind`` "entropy").
        kind: "entropy", "reverse_kl", "forward_kl" or "jsd" (β = 0 / 1 already mapped to the KLs), or a row
            function of the student alone (the teacher of ``prob`` is not read), ``fn(s, g, i0, i1, sub) ->
            values [i1 - i0]``: ``s [i1 - i0, V]`` the transformed logits of rows ``i0:i1`` (a group of
            consecutive sub-blocks; overwritten with ``g · ∂value/∂s · ∂s/∂z``), ``g [i1 - i0, 1]`` their
            upstream gradient times the transform's constant factor ``a/T`` (a soft-capped student's ``1 − tanh²``
            is the row function's to apply), ``sub`` the cache-sized rows of one sub-block; it
            runs on the worker threads under no-grad (the top-k teacher's bins, :mod:`tipkernels.ops.topk`).
        row_grad: ``[N]`` upstream gradient of each row's value (weights / Σ weights for a weighted mean).

    Returns:
        ``(values [N], d_hidden, d_weight, d_bias)``: values in the compute dtype (fp64 for fp64 inputs, else
        fp32), ``d_hidden`` ``[N, D_s]`` and ``d_weight`` ``[V, D_s]``/``d_bias`` ``[V]`` in the compute dtype
        (the caller casts them). Nothing is differentiable.

    Memory beyond inputs and outputs: two ``[rows, V]`` blocks (:func:`fused_rows`: 64 MiB together by default,
    or 64 rows' worth where that is more), per worker thread a ``[sub, V]`` scratch (L2-sized) and a
    ``[rows, D_s]`` partial ``d_hidden``, with weights of zero in a block one more ``[live rows, V]`` gather, and
    fp32 copies of 16-bit inputs (weights included).
    """
    n, vocab = prob.num_rows, prob.vocab_size
    dtype = _compute_dtype(prob.student_hidden)
    device = prob.device
    if prob.student_cap is not None and not callable(kind):
        raise ValueError("fused_value_and_grad takes a soft-capped student only with a row function (grad_strategy "
                         "picks recompute)")
    student = _BlockSide(prob.student_hidden, prob.student_weight, prob.student_bias, None, prob.temperature,
                         dtype, vocab, prob.student_scale, prob.student_cap)
    teacher = None
    if isinstance(kind, str) and kind != "entropy":
        teacher = _BlockSide(prob.teacher_hidden, prob.teacher_weight, prob.teacher_bias, prob.teacher_logits,
                             prob.temperature, dtype, vocab, prob.teacher_scale, prob.teacher_cap)
    weight = student.weight_t.t()
    want_h, want_w, want_b = wanted  # gradients nobody asked for are neither formed nor held
    d_hidden = torch.zeros(n, prob.student_hidden.shape[1], dtype=dtype, device=device) if want_h else None
    d_weight = torch.zeros(vocab, weight.shape[1], dtype=dtype, device=device) if want_w else None
    d_bias = (torch.zeros(vocab, dtype=dtype, device=device)
              if prob.student_bias is not None and want_b else None)
    values = torch.empty(n, dtype=dtype, device=device)
    g_all = (row_grad.to(dtype) * transform_grad_factor(None, prob.student_scale, None, prob.temperature))[:, None]
    rows, sub = fused_rows(n, vocab, torch.finfo(dtype).bits // 8)
    fwd_cols, grad_cols = fused_vocab_chunks(vocab)
    s_buf = torch.empty(rows, vocab, dtype=dtype, device=device)
    u_buf = torch.empty(rows, vocab, dtype=dtype, device=device) if teacher is not None else None
    workers = fused_workers()
    scratch = [torch.empty(sub, vocab, dtype=dtype, device=device) for _ in range(workers)]
    # d hidden of a block: one partial sum over vocabulary chunks per worker, added up after the block
    dh_parts = (torch.empty(workers, rows, weight.shape[1], dtype=dtype, device=device)
                if d_hidden is not None else None)
    compiled = compiled_rkl(sub, vocab, dtype) if kind == "reverse_kl" and device.type == "cpu" else None
    sides = [(student, s_buf)] + ([(teacher, u_buf)] if teacher is not None else [])

    with torch.no_grad(), _one_thread():  # single-threaded ops (pieces run on the workers, see FUSED_WORKERS)
        for r0, r1 in _chunks(n, rows):
            m = r1 - r0
            s, u = s_buf[:m], (u_buf[:m] if u_buf is not None else None)
            hs = [side.rows(r0, r1) for side, _ in sides]

            def logits(piece, _slot, r0=r0, r1=r1, m=m, hs=hs):
                k, v0, v1 = piece
                sides[k][0].fill_cols(sides[k][1][:m], hs[k], r0, r1, v0, v1)

            _run_pieces(workers, logits, [(k, v0, v1) for v0, v1 in _chunks(vocab, fwd_cols)
                                          for k in range(len(sides))])

            parts = list(_chunks(m, sub))
            per = max(1, -(-len(parts) // (4 * workers)))  # ~4 pieces per worker: balance, few hand-overs
            groups = [parts[i:i + per] for i in range(0, len(parts), per)]

            def elementwise(group, slot, r0=r0, s=s, u=u):
                _elementwise(kind, beta, student, teacher, s, u, scratch[slot], g_all, values, r0, group, compiled)

            _run_pieces(workers, elementwise, groups)

            h = prob.student_hidden[r0:r1].to(dtype)
            live = g_all[r0:r1, 0] != 0
            k = int(live.sum())
            idx = None
            if k < m * _COMPACT_BELOW:  # rows of weight 0 have dS = 0: leave them out of the gradient matmuls
                if k == 0:
                    continue
                idx = live.nonzero().squeeze(1)
                s, h = s.index_select(0, idx), h.index_select(0, idx)
            dh = None
            if dh_parts is not None:
                dh = dh_parts[:, : s.shape[0]]
                dh.zero_()

            def grads(piece, slot, s=s, h=h, dh=dh):
                v0, v1 = piece
                ds = s[:, v0:v1]  # cache-resident for all three products
                if d_weight is not None:
                    d_weight[v0:v1].addmm_(ds.t(), h)
                if dh is not None:
                    dh[slot].addmm_(ds, weight[v0:v1])
                if d_bias is not None:
                    d_bias[v0:v1].add_(ds.sum(0))

            _run_pieces(workers, grads, list(_chunks(vocab, grad_cols)))
            if dh is not None:
                total = dh.sum(0) if workers > 1 else dh[0]
                if idx is None:
                    d_hidden[r0:r1].copy_(total)
                else:
                    d_hidden[r0:r1].index_copy_(0, idx, total)
    return values, d_hidden, d_weight, d_bias
