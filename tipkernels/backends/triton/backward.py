"""Backward kernels: gradients of per-row entropy / KL / JSD w.r.t. the student, without an [N, V] buffer.

Both kernels run over a compacted list of row indices (the rows whose upstream gradient is non-zero) and
recompute the logit tiles of both models, then form the gradient tile ``dS = g/T * f(s, u)`` with
``f`` from docs/design.md §2, using the LSEs and per-row scalars saved by the forward:

- ``dhidden_kernel``, grid ``(row blocks, hidden blocks)``: ``dh[rows, dblock] = sum_v dS @ W[v, dblock]``.
- ``dweight_kernel``, grid ``(vocab blocks, hidden blocks)``: ``dW[vblock, dblock] = sum_rows dS^T @ h``,
  ``db[vblock] = sum_rows dS``.
- ``dlogits_kernel``, a 1-D grid of ``row blocks x vocab blocks`` in grouped order (``common.grouped_block``): ``dS``
  itself, for the student given as logits
  (``d logits = dS``), or, for a linear student, written as a ``[rows, vocabulary chunk]`` gradient-logit chunk
  that the host multiplies with the weight and the hidden states (cuBLAS): the backend's ``"matmul"`` strategy.

The launchers (:func:`backward`, and :func:`_backward_matmul` for the ``"matmul"`` strategy) follow the kernels.
Every output element is owned by one program, so results are deterministic (no atomics). In the ``"tiles"``
strategy (``dhidden_kernel`` + ``dweight_kernel``) each hidden block recomputes the logit tiles over the full
hidden dims, so the recompute costs ``D / BLOCK_DH`` times the forward's; the ``"matmul"`` strategy recomputes each
tile once (see ``benchmarks/TUNING.md``).
"""

import contextlib
import math
from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from ...inputs import KINDS, Problem, check_choice, effective_kind, needs_teacher, saved_scalar
from ...options import deterministic
from . import config as _cfg
from .common import both_tiles, grouped_block, log_mixture, mma
from .launch import cap_flags, launch, model_args, prepare, student_args, teacher_args

Tensor = torch.Tensor

# KIND values of the kernels; the host passes the effective kind (JSD at beta = 0 / 1 is forward / reverse KL).
K_ENTROPY, K_REVERSE_KL, K_FORWARD_KL, K_JSD, K_LSE = 0, 1, 2, 3, 4
_KIND = {"entropy": K_ENTROPY, "reverse_kl": K_REVERSE_KL, "forward_kl": K_FORWARD_KL, "jsd": K_JSD,
         "lse": K_LSE}


@triton.jit
def grad_tile(s, u, ls, lt, scal, g, valid, betas, KIND: tl.constexpr):
    """``g[:, None] * d value / d s`` (fp32) for a tile; ``scal`` is H, KL(p||q) or KL(p||m) per KIND;
    ``betas`` = (log beta, log(1 - beta), 1 - beta), read by JSD only."""
    log_beta, log1m_beta, one_m_beta = betas
    lp = s - ls[:, None]
    p = tl.exp(lp)
    if KIND == 0:  # entropy: -p (log p + H)
        f = tl.where(p > 0, -p * (lp + scal[:, None]), 0.0)
    elif KIND == 1:  # reverse KL: p (log p - log q - KL)
        f = tl.where(p > 0, p * (lp - (u - lt[:, None]) - scal[:, None]), 0.0)
    elif KIND == 2:  # forward KL: p - q
        f = p - tl.exp(u - lt[:, None])
    elif KIND == 4:  # the student's LSE: p
        f = p
    else:  # JSD: (1 - beta) p (log p - log m - KL(p||m))
        lm = log_mixture(lp, u - lt[:, None], log_beta, log1m_beta)
        f = tl.where(p > 0, one_m_beta * p * (lp - lm - scal[:, None]), 0.0)
    return tl.where(valid, f * g[:, None], 0.0)


@triton.jit
def _row_block(row_in, start, n_sel, g_scale,
               HAS_TEACHER: tl.constexpr, HAS_SCAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row ids of compacted slots ``start ...`` and their per-row inputs (0 past ``n_sel``). ``row_in`` is the
    tuple of pointers (compacted row ids, upstream gradient, student LSE, teacher LSE, per-row scalar)."""
    idx_ptr, g_ptr, ls_ptr, lt_ptr, scal_ptr = row_in
    slots = start + tl.arange(0, BLOCK_N)
    slot_mask = slots < n_sel
    rows = tl.load(idx_ptr + slots, mask=slot_mask, other=0)
    g = tl.load(g_ptr + rows, mask=slot_mask, other=0.0) * g_scale  # g_scale = a/T of the student
    ls = tl.load(ls_ptr + rows, mask=slot_mask, other=0.0)
    lt = ls
    scal = ls
    if HAS_TEACHER:
        lt = tl.load(lt_ptr + rows, mask=slot_mask, other=0.0)
    if HAS_SCAL:
        scal = tl.load(scal_ptr + rows, mask=slot_mask, other=0.0)
    return rows, slot_mask, g, ls, lt, scal


@triton.jit
def _grad_logits(student, teacher, rows, row_mask, cols, col_mask, ls, lt, scal, g, betas,
                 S_LINEAR: tl.constexpr, S_BIAS: tl.constexpr, S_CAP: tl.constexpr, HAS_TEACHER: tl.constexpr,
                 T_LINEAR: tl.constexpr, T_BIAS: tl.constexpr, T_CAP: tl.constexpr, KIND: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """``(dZ, valid)`` of a rows x cols tile: both logit tiles recomputed, then :func:`grad_tile`, then the chain
    rule through the transform: ``g`` already carries ``a/T``; with S_CAP the factor ``1 − tanh²``, ``tanh = s/post``
    (docs/design.md §1)."""
    s, u = both_tiles(student, teacher, rows, row_mask, cols, col_mask, S_LINEAR, S_BIAS, S_CAP,
                      HAS_TEACHER, T_LINEAR, T_BIAS, T_CAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
    valid = row_mask[:, None] & col_mask[None, :]
    ds = grad_tile(s, u, ls, lt, scal, g, valid, betas, KIND)
    if S_CAP:
        _h, _w, _b, _z, _d, _s0, _s1, _s2, _s3, _s4, _s5, _pre, post = student
        th = tl.where(valid, s, 0.0) * (1.0 / post)  # s = -inf past V (where ds is 0)
        ds = ds * (1.0 - th * th)
    return ds, valid


@triton.jit
def dhidden_kernel(
    student, teacher,  # per model: (h, w, b, z pointers, D, h_n, h_d, w_v, w_d, z_n, z_v strides)
    row_in, dh_ptr,  # row_in: (row ids, upstream gradient, student LSE, teacher LSE, per-row scalar) pointers
    n_sel, V, g_scale, betas, dh_n, dh_d,  # betas: (log beta, log(1 - beta), 1 - beta)
    S_BIAS: tl.constexpr, S_CAP: tl.constexpr, HAS_TEACHER: tl.constexpr, T_LINEAR: tl.constexpr,
    T_BIAS: tl.constexpr, T_CAP: tl.constexpr, HAS_SCAL: tl.constexpr, KIND: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    sh_ptr, sw_ptr, sb_ptr, sz_ptr, DS, s_hn, s_hd, s_wv, s_wd, s_zn, s_zv, s_pre, s_post = student
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows, row_mask, g, ls, lt, scal = _row_block(row_in, pid_n.to(tl.int64) * BLOCK_N, n_sel, g_scale,
                                                 HAS_TEACHER, HAS_SCAL, BLOCK_N)
    dcols = pid_d.to(tl.int64) * BLOCK_DH + tl.arange(0, BLOCK_DH)
    dcol_mask = dcols < DS
    offs_v = tl.arange(0, BLOCK_V)
    acc = tl.zeros((BLOCK_N, BLOCK_DH), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + offs_v).to(tl.int64)
        col_mask = cols < V
        ds, valid = _grad_logits(student, teacher, rows, row_mask, cols, col_mask, ls, lt, scal, g,
                                 betas, True, S_BIAS, S_CAP, HAS_TEACHER, T_LINEAR, T_BIAS, T_CAP, KIND,
                                 BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
        w = tl.load(sw_ptr + cols[:, None] * s_wv + dcols[None, :] * s_wd,
                    mask=col_mask[:, None] & dcol_mask[None, :], other=0.0)
        acc = mma(ds.to(w.dtype), w, acc, DOT_PRECISION)
    tl.store(dh_ptr + rows[:, None] * dh_n + dcols[None, :] * dh_d, acc.to(dh_ptr.dtype.element_ty),
             mask=row_mask[:, None] & dcol_mask[None, :])


@triton.jit
def dweight_kernel(
    student, teacher,  # per model, as in dhidden_kernel
    row_in, dw_ptr, db_ptr,  # row_in as in dhidden_kernel
    n_sel, V, g_scale, betas, dw_v, dw_d,
    S_BIAS: tl.constexpr, S_CAP: tl.constexpr, HAS_TEACHER: tl.constexpr, T_LINEAR: tl.constexpr,
    T_BIAS: tl.constexpr, T_CAP: tl.constexpr, HAS_SCAL: tl.constexpr, KIND: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    sh_ptr, sw_ptr, sb_ptr, sz_ptr, DS, s_hn, s_hd, s_wv, s_wd, s_zn, s_zv, s_pre, s_post = student
    pid_v = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    dcols = pid_d.to(tl.int64) * BLOCK_DH + tl.arange(0, BLOCK_DH)
    dcol_mask = dcols < DS
    acc = tl.zeros((BLOCK_V, BLOCK_DH), tl.float32)
    acc_b = tl.zeros((BLOCK_V,), tl.float32)
    for r0 in range(0, n_sel, BLOCK_N):
        rows, row_mask, g, ls, lt, scal = _row_block(row_in, r0, n_sel, g_scale, HAS_TEACHER, HAS_SCAL, BLOCK_N)
        ds, valid = _grad_logits(student, teacher, rows, row_mask, cols, col_mask, ls, lt, scal, g,
                                 betas, True, S_BIAS, S_CAP, HAS_TEACHER, T_LINEAR, T_BIAS, T_CAP, KIND,
                                 BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
        h = tl.load(sh_ptr + rows[:, None] * s_hn + dcols[None, :] * s_hd,
                    mask=row_mask[:, None] & dcol_mask[None, :], other=0.0)
        acc = mma(tl.trans(ds.to(h.dtype)), h, acc, DOT_PRECISION)
        if S_BIAS:
            acc_b += tl.sum(ds, axis=0)
    tl.store(dw_ptr + cols[:, None] * dw_v + dcols[None, :] * dw_d, acc.to(dw_ptr.dtype.element_ty),
             mask=col_mask[:, None] & dcol_mask[None, :])
    if S_BIAS:
        if pid_d == 0:
            tl.store(db_ptr + cols, acc_b.to(db_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def dlogits_kernel(
    student, teacher,  # per model, as in dhidden_kernel
    row_in, dz_ptr,  # row_in as in dhidden_kernel
    n_sel, v_start, v_end, g_scale, betas, dz_n, dz_v,
    S_LINEAR: tl.constexpr, S_BIAS: tl.constexpr, S_CAP: tl.constexpr,
    HAS_TEACHER: tl.constexpr, T_LINEAR: tl.constexpr, T_BIAS: tl.constexpr, T_CAP: tl.constexpr,
    HAS_SCAL: tl.constexpr, KIND: tl.constexpr, COMPACT_OUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``dS`` for the compacted rows and vocabulary columns ``[v_start, v_end)``. Stored at ``dz[row, col]``
    (the student given as logits), or with ``COMPACT_OUT`` at ``dz[slot, col - v_start]`` (a gradient-logit chunk
    that the host multiplies with cuBLAS). Programs in grouped order: ``GROUP_N`` row blocks across the chunk's
    vocabulary tiles, then the next ``GROUP_N``."""
    pid_n, pid_v = grouped_block(tl.program_id(0), tl.cdiv(n_sel, BLOCK_N), tl.cdiv(v_end - v_start, BLOCK_V), GROUP_N)
    start = pid_n.to(tl.int64) * BLOCK_N
    rows, row_mask, g, ls, lt, scal = _row_block(row_in, start, n_sel, g_scale, HAS_TEACHER, HAS_SCAL, BLOCK_N)
    cols = v_start + pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < v_end
    ds, valid = _grad_logits(student, teacher, rows, row_mask, cols, col_mask, ls, lt, scal, g, betas,
                             S_LINEAR, S_BIAS, S_CAP, HAS_TEACHER, T_LINEAR, T_BIAS, T_CAP, KIND,
                             BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
    if COMPACT_OUT:
        out_rows = start + tl.arange(0, BLOCK_N)
        out_cols = cols - v_start
    else:
        out_rows = rows
        out_cols = cols
    tl.store(dz_ptr + out_rows[:, None] * dz_n + out_cols[None, :] * dz_v, ds.to(dz_ptr.dtype.element_ty),
             mask=valid)


# ------------------------------------------------------------------------------------------ launchers


@contextlib.contextmanager
def _exact_fp32_matmuls():
    """fp32 matmuls without TF32 while ``FP32_DOT_PRECISION`` is "ieee" (as the kernels' own dots)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = _cfg.FP32_DOT_PRECISION == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def backward(prob: Problem, kind: str, grad_rows: Tensor, saved: Dict[str, Tensor], beta: float = 0.5,
             *, config: Optional[dict] = None):
    """``(d_student, d_weight, d_bias)`` of ``sum_n grad_rows[n] * value_n`` for ``kind`` (see the contract)."""
    check_choice("kind", kind, KINDS)
    orig = prob
    prob = prepare(prob)
    beta = float(beta)
    n, vocab = prob.num_rows, prob.vocab_size
    linear = prob.student_is_linear

    # Outputs: d_student rows that are never touched must be exactly 0.
    if linear:
        d_student = torch.zeros_like(prob.student_hidden)
        d_weight = torch.zeros_like(prob.student_weight)
        d_bias = None if prob.student_bias is None else torch.zeros_like(prob.student_bias)
    else:
        d_student = torch.zeros_like(prob.student_logits)
        d_weight = d_bias = None

    def finish():
        cast = lambda g, ref: None if g is None else g.to(ref.dtype)  # noqa: E731
        if linear:
            return (cast(d_student, orig.student_hidden), cast(d_weight, orig.student_weight),
                    cast(d_bias, orig.student_bias))
        return cast(d_student, orig.student_logits), None, None

    grad_rows = grad_rows.reshape(-1).float()
    idx = torch.nonzero(grad_rows).reshape(-1)  # host sync: cost then scales with the rows that matter
    n_sel = idx.numel()
    if n == 0 or n_sel == 0:
        return finish()

    # The gradient formula is the effective kind's; its per-row scalar is the requested kind's saved value (at
    # beta = 1 JSD's kl_pm is KL(p||q), the reverse-KL scalar).
    formula = effective_kind(kind, beta)
    k = _KIND[formula]
    scal_name = saved_scalar(kind, beta)
    with_teacher = needs_teacher(kind)
    if with_teacher and not prob.has_teacher:
        raise ValueError(f"kind {kind!r} needs a teacher")
    log_beta = math.log(beta) if k == K_JSD else 0.0
    log1m_beta = math.log1p(-beta) if k == K_JSD else 0.0

    cfg = _cfg.for_call(prob, config)
    bn, bv = cfg["bwd_block_n"], cfg["bwd_block_v"]
    ls = saved["student_lse"].float().contiguous()
    lt = saved["teacher_lse"].float().contiguous() if with_teacher else ls
    scal = saved[scal_name].float().contiguous() if scal_name is not None else ls
    student = student_args(prob)
    teacher = teacher_args(prob) if with_teacher else model_args(None, None, None, None, ls)
    common = dict(
        **cap_flags(prob, teacher=with_teacher), HAS_TEACHER=with_teacher,
        T_LINEAR=with_teacher and prob.teacher_hidden is not None, T_BIAS=with_teacher and prob.teacher_bias is not None,
        HAS_SCAL=scal_name is not None, KIND=k,
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=cfg["bwd_block_d"], DOT_PRECISION=_cfg.dot_precision(prob),
        **_cfg.launch_opts(cfg, backward=True),
    )
    scalars = (prob.student_scale / prob.temperature, (log_beta, log1m_beta, 1.0 - beta))  # g_scale = a/T, betas
    row_in = (idx, grad_rows.contiguous(), ls, lt, scal)

    if not linear:
        grid = (triton.cdiv(n_sel, bn) * triton.cdiv(vocab, bv),)
        launch(
            dlogits_kernel, grid, student, teacher, row_in, d_student, n_sel, 0, vocab, *scalars,
            d_student.stride(0), d_student.stride(1), S_LINEAR=False, S_BIAS=False, COMPACT_OUT=False,
            GROUP_N=cfg["group_n"], **common,
        )
        return finish()

    ds_dim, bdh = prob.student_hidden.shape[1], cfg["block_dh"]
    if cfg["bwd_strategy"] == "matmul":
        _backward_matmul(prob, cfg, common, row_in, student, teacher, scalars, d_student, d_weight, d_bias)
        return finish()
    grid_a = (triton.cdiv(n_sel, bn), triton.cdiv(ds_dim, bdh))
    launch(
        dhidden_kernel, grid_a, student, teacher, row_in, d_student, n_sel, vocab, *scalars,
        d_student.stride(0), d_student.stride(1), S_BIAS=prob.student_bias is not None, BLOCK_DH=bdh, **common,
    )
    grid_b = (triton.cdiv(vocab, bv), triton.cdiv(ds_dim, bdh))
    launch(
        dweight_kernel, grid_b, student, teacher, row_in, d_weight, d_bias if d_bias is not None else d_weight,
        n_sel, vocab, *scalars, d_weight.stride(0), d_weight.stride(1),
        S_BIAS=prob.student_bias is not None, BLOCK_DH=bdh, **common,
    )
    return finish()


@deterministic  # its cuBLAS matmuls run under torch.use_deterministic_algorithms when the flag is on
def _backward_matmul(prob, cfg, common, row_in, student, teacher, scalars, d_student, d_weight, d_bias) -> None:
    """The "matmul" strategy: ``dS`` once per (row block, vocab tile) into ``[rows, vocab chunk]`` buffers of at
    most ``bwd_chunk_mib``; cuBLAS forms ``d W[chunk] (+)= dSᵀ @ h[rows]`` and ``d h[rows] += dS @ W[chunk]`` (fp32
    accumulator). Rows go in passes whose fp32 accumulator is at most 4 × ``bwd_chunk_mib``, so the extra memory
    does not grow with N; ``d W`` is written by the first pass and accumulated (in its dtype) by later ones."""
    h, w = prob.student_hidden, prob.student_weight
    idx, rest = row_in[0], row_in[1:]
    n, vocab, dev, ds_dim = h.shape[0], w.shape[0], h.device, h.shape[1]
    bn, bv = cfg["bwd_block_n"], cfg["bwd_block_v"]
    budget = int(cfg["bwd_chunk_mib"] * 2**20)
    per_pass = max(bn, 4 * budget // (torch.float32.itemsize * ds_dim))  # rows of the fp32 accumulator
    for r0 in range(0, idx.numel(), per_pass):
        ids = idx[r0:r0 + per_pass]
        m = ids.numel()
        width = min(max(bv, budget // (m * h.element_size()) // bv * bv), triton.cdiv(vocab, bv) * bv)
        chunk = torch.empty((m, width), dtype=h.dtype, device=dev)
        h_sel = h if m == n else h.index_select(0, ids)  # idx is sorted: m == n means every row, in order
        d_sel = torch.zeros((m, ds_dim), dtype=torch.float32, device=dev)
        part = None if h.dtype == torch.float32 else torch.empty((m, ds_dim), dtype=h.dtype, device=dev)
        for v0 in range(0, vocab, width):
            v1 = min(vocab, v0 + width)
            g = chunk[:, : v1 - v0]
            launch(
                dlogits_kernel, (triton.cdiv(m, bn) * triton.cdiv(v1 - v0, bv),),
                student, teacher, (ids, *rest), g, m, v0, v1, *scalars, g.stride(0), g.stride(1),
                S_LINEAR=True, S_BIAS=prob.student_bias is not None, COMPACT_OUT=True, GROUP_N=cfg["group_n"],
                **common,
            )
            with _exact_fp32_matmuls():
                dw = d_weight[v0:v1]
                if r0:
                    dw.addmm_(g.t(), h_sel)
                elif dw.is_contiguous():
                    torch.mm(g.t(), h_sel, out=dw)
                else:  # a transposed weight's gradient has its strides
                    dw.copy_(g.t() @ h_sel)
                if part is None:
                    d_sel.addmm_(g, w[v0:v1])
                else:  # the 16-bit product of one chunk, accumulated in fp32 across chunks
                    d_sel.add_(torch.mm(g, w[v0:v1], out=part))
            if d_bias is not None:
                d_bias[v0:v1] += g.sum(0, dtype=torch.float32).to(d_bias.dtype)
        d_student.index_copy_(0, ids, d_sel.to(d_student.dtype))
