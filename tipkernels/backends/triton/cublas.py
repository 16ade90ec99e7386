"""The cuBLAS-chunk strategy of the Triton backend (docs/design.md §2, §4): cuBLAS forms the logits, Triton does
the rest in one read of them.

Forward (:func:`forward_stats`, :func:`jsd_sums`): rows in row chunks and the vocabulary in chunks; per chunk,
cuBLAS writes both models' raw logits ``h · W[chunk]ᵀ`` into fp32 buffers (``torch.mm(..., out_dtype=float32)`` for
16-bit inputs on CUDA: the tensor cores' fp32 accumulator is kept, never rounded to 16 bits), at most
``cublas_chunk_mib`` MiB for both; then ONE Triton epilogue kernel adds the bias, applies the logit transform and
folds both chunks into the online per-row statistics (LSEs, entropies, the KL pieces, argmaxes, the label logit:
the same accumulators and merge algebra as the fused ``stats_kernel``, docs/design.md §1), reading each logit once.
Program ``(i, k)`` of the grid ``(row blocks, column splits)`` keeps its partial accumulators in ``part[field, k,
row]`` across the vocabulary chunks (read at its start, written at its end); the host merges the splits with
:func:`.stats._merge_stats`. The JSD second pass likewise (:func:`jsd_sums`, the chunks formed again). A model given
as logits is read in place (a strided view, no buffer).

Backward, recompute (:func:`backward`): the chunks formed again for the rows of nonzero upstream gradient, a Triton
kernel writes ``dS`` (in the input dtype: the cuBLAS products run on tensor cores), cuBLAS forms ``d W[chunk] (+)=
dSᵀ · h`` and ``d h += dS · W[chunk]`` (fp32 accumulator), as the fused kernels' "matmul" backward does.

Gradient in the same sweep (:func:`fused_value_and_grad`, grad_strategy "fused_grad"): a block of rows holds both
models' full-vocabulary fp32 logits (and a 16-bit ``dS`` for 16-bit inputs; fp32 ``dS`` overwrites the student's
logits), bounded by ``sweep_mib`` (:func:`sweep_rows`). The epilogue forms the statistics (and the JSD pass reads
the block again), the ``dS`` kernel forms the gradient logits, cuBLAS forms ``d h[block] = dS · W`` (complete:
the block spans the vocabulary) and ``d W (+)= dSᵀ · h[block]``. ``d W`` over several blocks is accumulated either
in an fp32 ``[V, D]`` buffer (``sweep_dw`` "fp32", ``4·V·D`` bytes more: 2.3 GiB at V=151936, D=4096) or in the
weight's dtype (``"dtype"``: rounded once per block, no extra memory); "auto" takes fp32 where the accumulator fits
``sweep_mib`` next to the block. No logit is formed twice; nothing of size ``[N, V]`` exists.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ...inputs import KINDS, SAVED_VALUE, Problem, check_choice, combine_jsd, effective_kind, needs_teacher, saved_scalar
from ...options import deterministic
from ..chunked import _chunks  # (start, end) spans of a range, the torch backend's
from . import config as _cfg
from . import stats as _stats
from .backward import _KIND, K_JSD, _exact_fp32_matmuls, grad_tile
from .common import NEG_BIG, tanh
from .launch import launch, prepare, transform_scalars
from .stats import fold_tile, jsd_tile, store_partials

Tensor = torch.Tensor
_MIB = 2**20
#: The narrowest vocabulary chunk the default chunk shape aims for: narrower chunks make the cuBLAS products skinny.
_MIN_CHUNK_COLS = 512

F_MS, F_ZS, F_AS, F_LABEL, F_BEST_S = _stats.F_MS, _stats.F_ZS, _stats.F_AS, _stats.F_LABEL, _stats.F_BEST_S
F_MT, F_ZT, F_AT, F_C, F_D, F_BEST_T = _stats.F_MT, _stats.F_ZT, _stats.F_AT, _stats.F_C, _stats.F_D, _stats.F_BEST_T


# ------------------------------------------------------------------------------------------------ kernels


@triton.jit
def chunk_tile(model, rows, row_mask, cols, col_mask, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr):
    """fp32 transformed logits ``[BLOCK_N, BLOCK_V]`` of a chunk: ``c·tanh(a·(z + b)/c)/T`` (HAS_CAP) or
    ``a·(z + b)/T``. ``model`` = ``(z, b, z_n, z_v, pre, post)``: the chunk's raw logits (a cuBLAS buffer or a view of
    given logits, any strides), its bias slice, and the transform's ``(pre, post)`` (``launch.transform_scalars``).
    Columns outside ``col_mask`` are ``-inf``; rows outside ``row_mask`` read 0 and must not be stored."""
    z_ptr, b_ptr, stride_zn, stride_zv, pre, post = model
    z = tl.load(z_ptr + rows[:, None] * stride_zn + cols[None, :] * stride_zv,
                mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    z = z * pre
    if HAS_CAP:
        z = tanh(z) * post
    return tl.where(col_mask[None, :], z, float("-inf"))


@triton.jit
def _split_range(m, width, tiles_per_split, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Program ``(i, k)``: its chunk rows, their mask, its column range and where its partials live
    (``part[field, k, row]`` = ``part + field * stride_f + off``)."""
    pid_k = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_begin = pid_k * tiles_per_split * BLOCK_V
    c_end = tl.minimum(width, c_begin + tiles_per_split * BLOCK_V)
    return rows, rows < m, c_begin, c_end, pid_k.to(tl.int64) * m + rows, tl.num_programs(1).to(tl.int64) * m


@triton.jit
def stats_epilogue_kernel(
    student, teacher,  # per model: (z, b, z_n, z_v, pre, post)
    label_ptr, part_ptr, arg_ptr,
    m, width, v_base, tiles_per_split,
    S_BIAS: tl.constexpr, S_CAP: tl.constexpr, HAS_TEACHER: tl.constexpr, T_BIAS: tl.constexpr,
    T_CAP: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Fold the chunk (global columns ``v_base ...``) into the partial accumulators of ``stats.stats_kernel`` (same
    fields, same online algebra), which persist across chunks in ``part`` / ``arg``."""
    rows, row_mask, c_begin, c_end, off, stride_f = _split_range(m, width, tiles_per_split, BLOCK_N, BLOCK_V)
    offs_v = tl.arange(0, BLOCK_V)
    base = part_ptr + off
    arg_base = arg_ptr + off
    ms = tl.load(base + 0 * stride_f, mask=row_mask, other=NEG_BIG)
    zs = tl.load(base + 1 * stride_f, mask=row_mask, other=0.0)
    as_ = tl.load(base + 2 * stride_f, mask=row_mask, other=0.0)
    lab_logit = tl.load(base + 3 * stride_f, mask=row_mask, other=0.0)
    best_s = tl.load(base + 4 * stride_f, mask=row_mask, other=float("-inf"))
    arg_s = tl.load(arg_base, mask=row_mask, other=0)
    mt = ms
    zt = zs
    at = as_
    c = as_
    d = as_
    best_t = best_s
    arg_t = arg_s
    if HAS_TEACHER:
        mt = tl.load(base + 5 * stride_f, mask=row_mask, other=NEG_BIG)
        zt = tl.load(base + 6 * stride_f, mask=row_mask, other=0.0)
        at = tl.load(base + 7 * stride_f, mask=row_mask, other=0.0)
        c = tl.load(base + 8 * stride_f, mask=row_mask, other=0.0)
        d = tl.load(base + 9 * stride_f, mask=row_mask, other=0.0)
        best_t = tl.load(base + 10 * stride_f, mask=row_mask, other=float("-inf"))
        arg_t = tl.load(arg_base + stride_f, mask=row_mask, other=0)
    if HAS_LABELS:
        labels = tl.load(label_ptr + rows, mask=row_mask, other=-1) - v_base

    for c0 in range(c_begin, c_end, BLOCK_V):
        cols = (c0 + offs_v).to(tl.int64)
        col_mask = cols < c_end
        s = chunk_tile(student, rows, row_mask, cols, col_mask, S_BIAS, S_CAP)
        u = s
        if HAS_TEACHER:
            u = chunk_tile(teacher, rows, row_mask, cols, col_mask, T_BIAS, T_CAP)
        ms, zs, as_, best_s, arg_s, mt, zt, at, c, d, best_t, arg_t = fold_tile(
            s, u, v_base + c0, (ms, zs, as_, best_s, arg_s, mt, zt, at, c, d, best_t, arg_t), HAS_TEACHER)
        if HAS_LABELS:
            hit = cols[None, :] == labels[:, None]
            lab_logit += tl.sum(tl.where(hit, s, 0.0), axis=1)

    store_partials(base, arg_base, stride_f, row_mask,
                   (ms, zs, as_, lab_logit, best_s, arg_s, mt, zt, at, c, d, best_t, arg_t), HAS_TEACHER)

@triton.jit
def jsd_epilogue_kernel(
    student, teacher, ls_ptr, lt_ptr, part_ptr,
    m, width, tiles_per_split, log_beta, log1m_beta,
    S_BIAS: tl.constexpr, S_CAP: tl.constexpr, T_BIAS: tl.constexpr, T_CAP: tl.constexpr, MODE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """``stats.jsd_kernel``'s sums (field 0 KL(q||m), field 1 KL(p||m); MODE 0 / 1 / 2 as there) over a chunk, added
    to the partials in ``part`` (the host zero-fills them before the first chunk)."""
    rows, row_mask, c_begin, c_end, off, stride_f = _split_range(m, width, tiles_per_split, BLOCK_N, BLOCK_V)
    offs_v = tl.arange(0, BLOCK_V)
    ls = tl.load(ls_ptr + rows, mask=row_mask, other=0.0)
    lt = tl.load(lt_ptr + rows, mask=row_mask, other=0.0)
    base = part_ptr + off
    kl_qm = tl.load(base, mask=row_mask, other=0.0)
    kl_pm = tl.load(base + stride_f, mask=row_mask, other=0.0)
    for c0 in range(c_begin, c_end, BLOCK_V):
        cols = (c0 + offs_v).to(tl.int64)
        col_mask = cols < c_end
        lp = chunk_tile(student, rows, row_mask, cols, col_mask, S_BIAS, S_CAP) - ls[:, None]
        lq = chunk_tile(teacher, rows, row_mask, cols, col_mask, T_BIAS, T_CAP) - lt[:, None]
        kl_qm, kl_pm = jsd_tile(lp, lq, kl_qm, kl_pm, log_beta, log1m_beta, MODE)
    tl.store(base, kl_qm, mask=row_mask)
    tl.store(base + stride_f, kl_pm, mask=row_mask)


@triton.jit
def dlogits_epilogue_kernel(
    student, teacher, row_in, dz_ptr,  # row_in: (upstream gradient, student LSE, teacher LSE, scalar) of the rows
    m, width, g_scale, betas, dz_n, dz_v,
    S_BIAS: tl.constexpr, S_CAP: tl.constexpr, HAS_TEACHER: tl.constexpr, T_BIAS: tl.constexpr,
    T_CAP: tl.constexpr, HAS_SCAL: tl.constexpr, KIND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """``dS = g·a/T · ∂value/∂s`` (``backward.grad_tile``, times ``1 − tanh²`` with S_CAP) of a chunk's tile, stored
    at ``dz[row, col]`` in ``dz``'s dtype; rows of zero upstream gradient get exact zeros. ``dz`` may be the
    student's fp32 chunk itself (each program reads its tile before writing it)."""
    g_ptr, ls_ptr, lt_ptr, scal_ptr = row_in
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < m
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < width
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0) * g_scale
    ls = tl.load(ls_ptr + rows, mask=row_mask, other=0.0)
    lt = ls
    scal = ls
    if HAS_TEACHER:
        lt = tl.load(lt_ptr + rows, mask=row_mask, other=0.0)
    if HAS_SCAL:
        scal = tl.load(scal_ptr + rows, mask=row_mask, other=0.0)
    s = chunk_tile(student, rows, row_mask, cols, col_mask, S_BIAS, S_CAP)
    u = s
    if HAS_TEACHER:
        u = chunk_tile(teacher, rows, row_mask, cols, col_mask, T_BIAS, T_CAP)
    inside = row_mask[:, None] & col_mask[None, :]
    valid = inside & (g != 0.0)[:, None]
    ds = grad_tile(s, u, ls, lt, scal, g, valid, betas, KIND)
    if S_CAP:
        _z, _b, _s0, _s1, _pre, post = student
        th = tl.where(valid, s, 0.0) * (1.0 / post)
        ds = ds * (1.0 - th * th)
    tl.store(dz_ptr + rows[:, None] * dz_n + cols[None, :] * dz_v, ds.to(dz_ptr.dtype.element_ty), mask=inside)


# ------------------------------------------------------------------------------------------------ host side


def mm_fp32(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """``out = a · bᵀ`` in fp32 (``a [m, D]``, ``b [w, D]``, ``out`` an fp32 ``[m, w]`` of contiguous rows, any row
    stride: cuBLAS's leading dimension).

    16-bit on CUDA: ``torch.mm(..., out_dtype=torch.float32)`` keeps cuBLAS's fp32 accumulator (PyTorch >= 2.8);
    where that is missing, the 16-bit product is widened (logits rounded to 16 bits: an error of ~2⁻⁹·|logit|).
    16-bit on the CPU (the interpreter tests): the operands are widened, exact products summed in fp32 as a GPU's
    tensor cores do. fp32: without TF32 while ``FP32_DOT_PRECISION`` is "ieee"."""
    if a.dtype == torch.float32:
        with _exact_fp32_matmuls():
            return torch.mm(a, b.t(), out=out)
    if a.is_cuda:
        how = _out_dtype_support()
        if how == "out":
            return torch.mm(a, b.t(), out_dtype=torch.float32, out=out)
        if how == "alloc":  # an fp32 temporary the chunk's size
            return out.copy_(torch.mm(a, b.t(), out_dtype=torch.float32))
        return out.copy_(torch.mm(a, b.t()))
    return torch.mm(a.float(), b.float().t(), out=out)


_OUT_DTYPE: Optional[str] = None


def _out_dtype_support() -> str:
    """How this PyTorch takes ``torch.mm(bf16, bf16, out_dtype=torch.float32)`` on CUDA, probed once: "out" (into a
    given buffer), "alloc" (only into a new tensor) or "" (not at all: 16-bit logits are rounded, with a warning)."""
    global _OUT_DTYPE
    if _OUT_DTYPE is None:
        a = torch.ones(16, 16, dtype=torch.bfloat16, device="cuda")
        out = torch.empty(16, 16, dtype=torch.float32, device="cuda")
        _OUT_DTYPE = ""
        for how in ("out", "alloc"):
            try:
                got = (torch.mm(a, a, out_dtype=torch.float32, out=out) if how == "out"
                       else torch.mm(a, a, out_dtype=torch.float32))
                if got.dtype == torch.float32 and bool((got == 16).all()):
                    _OUT_DTYPE = how
                    break
            except torch.OutOfMemoryError:
                raise
            except (TypeError, RuntimeError, NotImplementedError):
                continue
        if not _OUT_DTYPE:
            warnings.warn("tipkernels: torch.mm(..., out_dtype=torch.float32) is unavailable; the cuBLAS-chunk "
                          "strategy rounds 16-bit logits to 16 bits (PyTorch >= 2.8 has it)")
    return _OUT_DTYPE


def _product(a: Tensor, b: Tensor, fp32: bool) -> Tensor:
    """``a · b`` with fp32 accumulation: an fp32 result if ``fp32``, else in ``a``'s dtype (one rounding)."""
    if a.dtype == torch.float32:
        with _exact_fp32_matmuls():
            return torch.mm(a, b)
    if a.device.type == "cpu":  # widened as in mm_fp32
        p = torch.mm(a.float(), b.float())
        return p if fp32 else p.to(a.dtype)
    if fp32:
        return torch.mm(a, b, out_dtype=torch.float32) if _out_dtype_support() else torch.mm(a, b).float()
    return torch.mm(a, b)


#: Rows of ``a`` per product when an fp32 accumulator takes a 16-bit product without ``addmm(out_dtype=)``: bounds
#: the fp32 temporary.
_ACC_SLICE_ROWS = 8192
_ADDMM_OUT_DTYPE = [True]  # False once ``addmm(..., out_dtype=, out=)`` failed here


def _accumulate(out: Tensor, a: Tensor, b: Tensor, first: bool) -> None:
    """``out = a · b`` (``first``) or ``out += a · b``, fp32 accumulation, result rounded to ``out``'s dtype.

    16-bit operands into an fp32 ``out`` on CUDA: ``torch.addmm(out, a, b, out_dtype=float32)`` (no temporary);
    where that is missing, in slices of :data:`_ACC_SLICE_ROWS` rows of ``a`` (an fp32 temporary that size)."""
    fp32_out = out.dtype == torch.float32
    if a.dtype == out.dtype and a.device.type != "cpu":
        with _exact_fp32_matmuls():
            if first and out.is_contiguous():
                torch.mm(a, b, out=out)
            elif first:  # a transposed weight's gradient has its strides
                out.copy_(torch.mm(a, b))
            else:
                out.addmm_(a, b)
        return
    if first:
        out.copy_(_product(a, b, fp32_out))
        return
    if fp32_out and a.is_cuda and _ADDMM_OUT_DTYPE[0] and _out_dtype_support():
        try:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            return
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError):  # this PyTorch's addmm lacks it: slices from now on
            _ADDMM_OUT_DTYPE[0] = False
    for i in range(0, a.shape[0], _ACC_SLICE_ROWS):
        out[i:i + _ACC_SLICE_ROWS].add_(_product(a[i:i + _ACC_SLICE_ROWS], b, fp32_out).to(out.dtype))


class _Model:
    """One model's raw logits for rows × a vocabulary range: a cuBLAS product into an fp32 buffer (linear), or a
    view of the given logits (no copy); and the kernel argument of a chunk."""

    def __init__(self, hidden, weight, bias, logits, transform, cap: bool):
        self.hidden, self.weight, self.bias, self.logits = hidden, weight, bias, logits
        self.pre, self.post = transform
        self.has_bias, self.has_cap = bias is not None, cap

    @property
    def linear(self) -> bool:
        return self.hidden is not None

    def raw(self, buf: Optional[Tensor], h_rows: Optional[Tensor], row_ids, v0: int, v1: int) -> Tensor:
        """Raw logits ``[m, v1 - v0]`` of the rows (``h_rows``: their hidden states; ``row_ids``: a slice or an index
        tensor into given logits)."""
        if self.linear:
            m, w = h_rows.shape[0], v1 - v0
            p = pitch(w)
            out = buf.view(-1)[: m * p].view(m, p)[:, :w]
            return mm_fp32(h_rows, self.weight[v0:v1], out)
        z = self.logits[:, v0:v1]  # a view; gathered rows copy only the chunk's columns
        return z[row_ids] if isinstance(row_ids, slice) else z.index_select(0, row_ids)

    def args(self, z: Tensor, v0: int, v1: int) -> tuple:
        b = self.bias[v0:v1] if self.bias is not None else z
        return (z, b, z.stride(0), z.stride(1), float(self.pre), float(self.post))

    def rows(self, r0: int, r1: int, ids: Optional[Tensor] = None) -> Optional[Tensor]:
        if not self.linear:
            return None
        return self.hidden[r0:r1] if ids is None else self.hidden.index_select(0, ids[r0:r1])


def _models(prob: Problem, teacher: bool = True) -> Tuple[_Model, Optional[_Model]]:
    s = _Model(prob.student_hidden, prob.student_weight, prob.student_bias, prob.student_logits,
               transform_scalars(prob.student_scale, prob.student_cap, prob.temperature), prob.student_cap is not None)
    t = None
    if teacher and prob.has_teacher:
        t = _Model(prob.teacher_hidden, prob.teacher_weight, prob.teacher_bias, prob.teacher_logits,
                   transform_scalars(prob.teacher_scale, prob.teacher_cap, prob.temperature),
                   prob.teacher_cap is not None)
    return s, t


#: Row pitch of the fp32 chunk buffers (elements): a multiple of 16 keeps each row 64-byte aligned, so Triton
#: specialises the row stride as divisible by 16 whatever the chunk's width (with an odd width, e.g. a vocabulary of
#: 1000 or 50257 in one chunk, the statistics epilogue took 255 registers and spilled on sm_90).
PITCH = 16


def pitch(width: int) -> int:
    """Row stride of a chunk ``width`` columns wide in an fp32 buffer (:data:`PITCH`)."""
    return triton.cdiv(width, PITCH) * PITCH


def chunk_shape(cfg, n_rows: int, vocab: int, n_buffers: int) -> Tuple[int, int]:
    """``(rows, columns)`` of a cuBLAS chunk: ``n_buffers`` fp32 buffers of ``rows × columns`` fit
    ``cublas_chunk_mib``. All rows when the columns stay at least :data:`_MIN_CHUNK_COLS` wide (or the whole
    vocabulary), else fewer rows; columns a multiple of ``epi_block_v``."""
    bv = cfg["epi_block_v"]
    full = triton.cdiv(vocab, bv) * bv
    elems = max(1, int(cfg["cublas_chunk_mib"] * _MIB) // (4 * max(1, n_buffers)))
    aim = min(full, max(bv, _MIN_CHUNK_COLS // bv * bv))
    rows = max(1, min(n_rows, elems // aim))
    cols = min(full, max(bv, elems // rows // bv * bv))
    return rows, cols


def sweep_rows(cfg, prob: Problem) -> int:
    """Rows of a fused_grad block: both models' fp32 ``[rows, V]`` logits (a model given as logits needs none) and
    a 16-bit ``dS`` for 16-bit inputs fit ``sweep_mib`` (at least one row)."""
    vocab = prob.vocab_size
    per_row = 4 * pitch(vocab) * (1 + (prob.teacher_hidden is not None))
    if prob.student_hidden is not None and prob.student_hidden.dtype in (torch.bfloat16, torch.float16):
        per_row += 2 * vocab
    return max(1, min(prob.num_rows, int(cfg["sweep_mib"] * _MIB) // per_row))


def _splits(cfg, m: int, width: int, device) -> Tuple[int, int]:
    """``(column splits, tiles per split)`` of the epilogue grid for ``m`` rows and chunks ``width`` wide.

    Automatic (``split_v`` None): two programs per SM over the whole grid; the epilogues are light (several resident
    per SM) and launch no grouped program order, so the fused forward's ``group_n`` rule does not apply."""
    want = cfg["split_v"]
    if want is None:
        want = triton.cdiv(2 * _cfg._num_sms(device), triton.cdiv(m, cfg["epi_block_n"]))
    epi = {"block_v": cfg["epi_block_v"], "block_n": cfg["epi_block_n"], "split_v": want}
    return _cfg.splits(epi, m, width, device)


def _init_stats_part(n_splits: int, m: int, has_teacher: bool, device) -> Tuple[Tensor, Tensor]:
    """Empty statistics partials of ``m`` rows: fp32 ``[fields, n_splits, m]`` (``stats.F_*``; the maxima at
    ``NEG_BIG`` / ``-inf``, the sums at 0) and int32 argmaxes ``[1 or 2, n_splits, m]``."""
    fields = _stats.NUM_FIELDS_TEACHER if has_teacher else _stats.NUM_FIELDS_STUDENT
    part = torch.zeros((fields, n_splits, m), dtype=torch.float32, device=device)
    part[F_MS] = -1.0e30  # common.NEG_BIG: a finite "minus infinity" for the running maxima
    part[F_BEST_S] = -math.inf
    if has_teacher:
        part[F_MT] = part[F_MS]
        part[F_BEST_T] = -math.inf
    args = torch.zeros((2 if has_teacher else 1, n_splits, m), dtype=torch.int32, device=device)
    return part, args


def _epilogue_opts(cfg) -> dict:
    return dict(BLOCK_N=cfg["epi_block_n"], BLOCK_V=cfg["epi_block_v"], num_warps=cfg["num_warps"])


def _fold_stats(cfg, student: _Model, teacher: Optional[_Model], zs: Tensor, zt: Optional[Tensor], v0: int,
                labels: Optional[Tensor], part: Tensor, args: Tensor, per_split: int) -> None:
    """Fold the raw logit chunks ``zs`` / ``zt`` ``[m, width]`` (global columns ``v0 ...``) into ``part`` /
    ``args`` (:func:`_init_stats_part`) by :func:`stats_epilogue_kernel`; ``labels`` int64 ``[m]`` or None."""
    m, width = zs.shape
    v1 = v0 + width
    launch(
        stats_epilogue_kernel, (triton.cdiv(m, cfg["epi_block_n"]), part.shape[1]),
        student.args(zs, v0, v1), (teacher or student).args(zt if teacher is not None else zs, v0, v1),
        labels if labels is not None else part, part, args, m, width, v0, per_split,
        S_BIAS=student.has_bias, S_CAP=student.has_cap, HAS_TEACHER=teacher is not None,
        T_BIAS=teacher is not None and teacher.has_bias, T_CAP=teacher is not None and teacher.has_cap,
        HAS_LABELS=labels is not None, **_epilogue_opts(cfg),
    )


def _fold_jsd(cfg, student: _Model, teacher: _Model, zs: Tensor, zt: Tensor, v0: int, ls: Tensor, lt: Tensor,
              part: Tensor, per_split: int, beta: float) -> None:
    """Add the JSD sums of the chunks ``zs`` / ``zt`` ``[m, width]`` (LSEs ``ls`` / ``lt`` fp32 ``[m]``) to the fp32
    partials ``part [2, splits, m]`` by :func:`jsd_epilogue_kernel`."""
    m, width = zs.shape
    mode = _stats._JSD_MODE[effective_kind("jsd", beta)]
    launch(
        jsd_epilogue_kernel, (triton.cdiv(m, cfg["epi_block_n"]), part.shape[1]),
        student.args(zs, v0, v0 + width), teacher.args(zt, v0, v0 + width), ls, lt, part, m, width, per_split,
        math.log(beta) if mode == 0 else 0.0, math.log1p(-beta) if mode == 0 else 0.0,
        S_BIAS=student.has_bias, S_CAP=student.has_cap, T_BIAS=teacher.has_bias, T_CAP=teacher.has_cap,
        MODE=mode, **_epilogue_opts(cfg),
    )


def _buffers(student: _Model, teacher: Optional[_Model], elems: int, device) -> Tuple[Optional[Tensor], ...]:
    """fp32 chunk buffers of ``elems`` elements for each linear model (None for a model given as logits)."""
    f32 = dict(dtype=torch.float32, device=device)
    bs = torch.empty(elems, **f32) if student.linear else None
    bt = torch.empty(elems, **f32) if teacher is not None and teacher.linear else None
    return bs, bt


def forward_stats(prob: Problem, *, config: Optional[dict] = None) -> Dict[str, Tensor]:
    """The contract's ``forward_stats`` by cuBLAS chunks and the Triton epilogue (same outputs as
    :func:`.stats.forward_stats`; see the module docstring). Extra memory: ``cublas_chunk_mib`` of fp32 chunk
    buffers and ``[11, splits, rows]`` partials."""
    prob = prepare(prob)
    n, vocab, dev = prob.num_rows, prob.vocab_size, prob.device
    if n == 0:
        return _stats.forward_stats(prob, config=config)  # empty outputs, no launch
    cfg = _cfg.for_call(prob, config)
    student, teacher = _models(prob)
    rows, cols = chunk_shape(cfg, n, vocab, student.linear + (teacher is not None and teacher.linear))
    bs, bt = _buffers(student, teacher, rows * cols, dev)
    labels = prob.labels.contiguous() if prob.labels is not None else None
    outs = []
    for r0, r1 in _chunks(n, rows):
        m = r1 - r0
        n_splits, _ = _splits(cfg, m, cols, dev)
        part, args = _init_stats_part(n_splits, m, teacher is not None, dev)
        hs, ht = student.rows(r0, r1), teacher.rows(r0, r1) if teacher is not None else None
        for v0, v1 in _chunks(vocab, cols):
            zs = student.raw(bs, hs, slice(r0, r1), v0, v1)
            zt = teacher.raw(bt, ht, slice(r0, r1), v0, v1) if teacher is not None else None
            per = triton.cdiv(triton.cdiv(v1 - v0, cfg["epi_block_v"]), n_splits)
            _fold_stats(cfg, student, teacher, zs, zt, v0, labels[r0:r1] if labels is not None else None,
                        part, args, per)
        outs.append(_stats._merge_stats(part, args, labels[r0:r1] if labels is not None else None,
                                        teacher is not None))
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def jsd_sums(prob: Problem, student_lse: Tensor, teacher_lse: Tensor, beta: float,
             *, config: Optional[dict] = None) -> Tuple[Tensor, Tensor]:
    """The contract's ``jsd_sums`` by cuBLAS chunks (the chunks formed again) and the Triton JSD epilogue."""
    prob = prepare(prob)
    beta = float(beta)
    n, vocab, dev = prob.num_rows, prob.vocab_size, prob.device
    if n == 0:
        z = torch.empty(0, dtype=torch.float32, device=dev)
        return z, z.clone()
    cfg = _cfg.for_call(prob, config)
    student, teacher = _models(prob)
    rows, cols = chunk_shape(cfg, n, vocab, student.linear + teacher.linear)
    bs, bt = _buffers(student, teacher, rows * cols, dev)
    ls_all, lt_all = student_lse.float().contiguous(), teacher_lse.float().contiguous()
    kl_qm, kl_pm = [], []
    for r0, r1 in _chunks(n, rows):
        m = r1 - r0
        n_splits, _ = _splits(cfg, m, cols, dev)
        part = torch.zeros((2, n_splits, m), dtype=torch.float32, device=dev)
        hs, ht = student.rows(r0, r1), teacher.rows(r0, r1)
        for v0, v1 in _chunks(vocab, cols):
            zs = student.raw(bs, hs, slice(r0, r1), v0, v1)
            zt = teacher.raw(bt, ht, slice(r0, r1), v0, v1)
            per = triton.cdiv(triton.cdiv(v1 - v0, cfg["epi_block_v"]), n_splits)
            _fold_jsd(cfg, student, teacher, zs, zt, v0, ls_all[r0:r1], lt_all[r0:r1], part, per, beta)
        a, b = part.sum(1).unbind(0)
        kl_qm.append(a)
        kl_pm.append(b)
    return torch.cat(kl_qm), torch.cat(kl_pm)


def _grad_launch(cfg, student: _Model, teacher: Optional[_Model], zs, zt, v0, row_in, dz, kind: str, beta: float,
                 g_scale: float) -> None:
    """``dS`` of the chunks ``zs`` / ``zt`` ``[m, width]`` into ``dz [m, width]`` (any float dtype; may be ``zs``) by
    :func:`dlogits_epilogue_kernel`; ``row_in`` = fp32 ``[m]`` (upstream gradient, student LSE, teacher LSE,
    per-row scalar), ``kind`` the effective kind."""
    m, width = zs.shape
    k = _KIND[kind]
    betas = (math.log(beta) if k == K_JSD else 0.0, math.log1p(-beta) if k == K_JSD else 0.0, 1.0 - beta)
    launch(
        dlogits_epilogue_kernel, (triton.cdiv(m, cfg["epi_block_n"]), triton.cdiv(width, cfg["epi_block_v"])),
        student.args(zs, v0, v0 + width), (teacher or student).args(zt if teacher is not None else zs, v0, v0 + width),
        row_in, dz, m, width, g_scale, betas, dz.stride(0), dz.stride(1),
        S_BIAS=student.has_bias, S_CAP=student.has_cap, HAS_TEACHER=teacher is not None,
        T_BIAS=teacher is not None and teacher.has_bias, T_CAP=teacher is not None and teacher.has_cap,
        HAS_SCAL=SAVED_VALUE[kind] is not None, KIND=k, **_epilogue_opts(cfg),
    )


@deterministic  # its cuBLAS matmuls run under torch.use_deterministic_algorithms when the flag is on
def backward(prob: Problem, kind: str, grad_rows: Tensor, saved: Dict[str, Tensor], beta: float = 0.5,
             *, config: Optional[dict] = None):
    """The contract's ``backward`` for a linear student, recomputing the logits by cuBLAS chunks of the rows of
    nonzero upstream gradient; ``dS`` by :func:`dlogits_epilogue_kernel`, the gradient products by cuBLAS.
    Extra memory: the chunk buffers (``cublas_chunk_mib``), a 16-bit ``dS`` chunk for 16-bit inputs (fp32 ``dS``
    overwrites the student's chunk) and the fp32 ``d h`` accumulator of the pass's rows (at most half of
    ``cublas_chunk_mib``): 128 + 32 + 64 = 224 MiB at the goal shape by default."""
    check_choice("kind", kind, KINDS)
    orig, prob = prob, prepare(prob)
    beta = float(beta)
    n, vocab, dev = prob.num_rows, prob.vocab_size, prob.device
    h, w = prob.student_hidden, prob.student_weight
    d_student, d_weight = torch.zeros_like(h), torch.zeros_like(w)
    d_bias = None if prob.student_bias is None else torch.zeros_like(prob.student_bias)

    def finish():
        cast = lambda g, ref: None if g is None else g.to(ref.dtype)  # noqa: E731
        return cast(d_student, orig.student_hidden), cast(d_weight, orig.student_weight), cast(d_bias, orig.student_bias)

    grad_rows = grad_rows.reshape(-1).float()
    idx = torch.nonzero(grad_rows).reshape(-1)
    n_sel = idx.numel()
    if n == 0 or n_sel == 0:
        return finish()
    formula = effective_kind(kind, beta)
    with_teacher = needs_teacher(kind)
    if with_teacher and not prob.has_teacher:
        raise ValueError(f"kind {kind!r} needs a teacher")
    cfg = _cfg.for_call(prob, config)
    student, teacher = _models(prob, teacher=with_teacher)
    ls = saved["student_lse"].float()
    lt = saved["teacher_lse"].float() if with_teacher else ls
    scal_name = saved_scalar(kind, beta)
    scal = saved[scal_name].float() if scal_name is not None else ls
    # rows per pass: the fp32 ``d h`` accumulator at most half the chunk budget (4096 rows at D = 4096, 128 MiB)
    cap = max(cfg["epi_block_n"], int(cfg["cublas_chunk_mib"] * _MIB) // 2 // (4 * h.shape[1]))
    rows, cols = chunk_shape(cfg, min(n_sel, cap), vocab, student.linear + (teacher is not None and teacher.linear))
    bs, bt = _buffers(student, teacher, rows * cols, dev)
    d_buf = None if h.dtype == torch.float32 else torch.empty(rows * cols, dtype=h.dtype, device=dev)
    every = n_sel == n
    for r0, r1 in _chunks(n_sel, rows):
        ids = idx[r0:r1]
        m = r1 - r0
        hs = h[r0:r1] if every else h.index_select(0, ids)
        ht = teacher.rows(r0, r1, None if every else idx) if teacher is not None else None
        row_in = tuple(t.index_select(0, ids).contiguous() for t in (grad_rows, ls, lt, scal))
        d_sel = torch.zeros((m, h.shape[1]), dtype=torch.float32, device=dev)
        for v0, v1 in _chunks(vocab, cols):
            zs = student.raw(bs, hs, None, v0, v1)
            zt = teacher.raw(bt, ht, slice(r0, r1) if every else ids, v0, v1) if teacher is not None else None
            dz = zs if d_buf is None else d_buf[: m * (v1 - v0)].view(m, v1 - v0)
            _grad_launch(cfg, student, teacher, zs, zt, v0, row_in, dz, formula, beta,
                         prob.student_scale / prob.temperature)
            _accumulate(d_weight[v0:v1], dz.t(), hs, first=r0 == 0)
            _accumulate(d_sel, dz, w[v0:v1], first=False)
            if d_bias is not None:
                d_bias[v0:v1] += dz.sum(0, dtype=torch.float32).to(d_bias.dtype)
        d_student.index_copy_(0, ids, d_sel.to(d_student.dtype))
    return finish()


@deterministic
def fused_value_and_grad(prob: Problem, kind: str, beta: float, row_grad: Tensor,
                         wanted: Tuple[bool, bool, bool] = (True, True, True), *, config: Optional[dict] = None):
    """Per-row values of ``kind`` and the gradients of ``Σ_i row_grad_i · value_i`` in one sweep ("fused_grad";
    the module docstring has the memory).

    Args:
        prob: a linear student (``student_hidden [N, D_s]``, ``student_weight [V, D_s]``, optional bias, any
            transform); the teacher linear, as logits, or absent (``kind`` "entropy").
        kind: the effective kind ("entropy", "reverse_kl", "forward_kl", "jsd"; β = 0 / 1 already mapped).
        row_grad: ``[N]`` upstream gradient of each row's value.
        wanted: which of ``(d_hidden, d_weight, d_bias)`` to form.

    Returns:
        ``(values [N] fp32, d_hidden [N, D_s], d_weight [V, D_s], d_bias [V])``: ``d_hidden`` in the hidden states'
        dtype (fp32 for fp64 inputs), ``d_weight`` in fp32 or the weight's dtype (``sweep_dw``), ``d_bias`` fp32;
        None where not wanted. Nothing is differentiable.
    """
    check_choice("kind", kind, tuple(k for k in KINDS if k != "lse"))  # "lse" (top-k teachers) takes recompute
    prob = prepare(prob)
    beta = float(beta)
    n, vocab, dev = prob.num_rows, prob.vocab_size, prob.device
    cfg = _cfg.for_call(prob, config)
    h, w = prob.student_hidden, prob.student_weight
    student, teacher = _models(prob, teacher=needs_teacher(kind))
    if needs_teacher(kind) and teacher is None:
        raise ValueError(f"kind {kind!r} needs a teacher")
    prob_rows = replace(prob, teacher_hidden=None if teacher is None else prob.teacher_hidden)
    rows = sweep_rows(cfg, prob_rows)
    n_blocks = triton.cdiv(n, rows)
    want_h, want_w, want_b = wanted
    dw_mode = cfg["sweep_dw"]
    if dw_mode == "auto":
        block_bytes = rows * vocab * (4 * (student.linear + (teacher is not None and teacher.linear))
                                      + (0 if h.dtype == torch.float32 else 2))
        fits = block_bytes + 4 * w.numel() <= cfg["sweep_mib"] * _MIB
        dw_mode = "fp32" if (w.dtype == torch.float32 or n_blocks == 1 or fits) else "dtype"
    if n_blocks == 1 and w.dtype != torch.float32:
        dw_mode = "dtype"  # written once: one rounding, no fp32 buffer
    d_hidden = torch.empty_like(h) if want_h else None
    d_weight = (torch.empty(w.shape, dtype=torch.float32 if dw_mode == "fp32" else w.dtype, device=dev)
                if want_w else None)
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=dev) if want_b and prob.student_bias is not None else None
    values = torch.empty(n, dtype=torch.float32, device=dev)
    g_all = row_grad.reshape(-1).float().contiguous()
    bs, bt = _buffers(student, teacher, rows * pitch(vocab), dev)
    d_buf = None if h.dtype == torch.float32 else torch.empty(rows * vocab, dtype=h.dtype, device=dev)
    labels = None
    for r0, r1 in _chunks(n, rows):
        m = r1 - r0
        hs = h[r0:r1]
        zs = student.raw(bs, hs, None, 0, vocab)
        zt = teacher.raw(bt, teacher.rows(r0, r1), slice(r0, r1), 0, vocab) if teacher is not None else None
        n_splits, per = _splits(cfg, m, vocab, dev)
        part, args = _init_stats_part(n_splits, m, teacher is not None, dev)
        _fold_stats(cfg, student, teacher, zs, zt, 0, labels, part, args, per)
        st = _stats._merge_stats(part, args, None, teacher is not None)
        ls, lt = st["student_lse"], st.get("teacher_lse", st["student_lse"])
        if kind == "jsd":
            jpart = torch.zeros((2, n_splits, m), dtype=torch.float32, device=dev)
            _fold_jsd(cfg, student, teacher, zs, zt, 0, ls, lt, jpart, per, beta)
            val, scal = combine_jsd(*jpart.sum(1).unbind(0), beta)
        else:
            val = st[kind]
            scal = val if kind != "forward_kl" else ls
        values[r0:r1] = val
        g = g_all[r0:r1]
        dz = zs if d_buf is None else d_buf[: m * vocab].view(m, vocab)
        _grad_launch(cfg, student, teacher, zs, zt, 0, (g, ls, lt, scal.contiguous()), dz, kind, beta,
                     prob.student_scale / prob.temperature)
        if d_hidden is not None:
            _accumulate(d_hidden[r0:r1], dz, w, first=True)
        if d_weight is not None:
            _accumulate(d_weight, dz.t(), hs, first=r0 == 0)
        if d_bias is not None:
            d_bias += dz.sum(0, dtype=torch.float32)
    return values, d_hidden, d_weight, d_bias
