"""Backward kernels: gradients of per-row entropy / KL / JSD w.r.t. the student, without an [N, V] buffer.

Both kernels run over a compacted list of row indices (the rows whose upstream gradient is non-zero) and
recompute the logit tiles of both models, then form the gradient tile ``dS = g/T * f(s, u)`` with
``f`` from docs/design.md §2, using the LSEs and per-row scalars saved by the forward:

- ``dhidden_kernel``, grid ``(row blocks, hidden blocks)``: ``dh[rows, dblock] = sum_v dS @ W[v, dblock]``.
- ``dweight_kernel``, grid ``(vocab blocks, hidden blocks)``: ``dW[vblock, dblock] = sum_rows dS^T @ h``,
  ``db[vblock] = sum_rows dS``.
- ``dlogits_kernel``, grid ``(row blocks, vocab blocks)``: ``dS`` itself, for the student given as logits
  (``d logits = dS``), or, for a linear student, written as a ``[rows, vocabulary chunk]`` gradient-logit chunk
  that the host multiplies with the weight and the hidden states (cuBLAS): the backend's ``"matmul"`` strategy.

Every output element is owned by one program, so results are deterministic (no atomics). In the ``"tiles"``
strategy (``dhidden_kernel`` + ``dweight_kernel``) each hidden block recomputes the logit tiles over the full
hidden dims, so the recompute costs ``D / BLOCK_DH`` times the forward's; the ``"matmul"`` strategy recomputes each
tile once (see ``benchmarks/TUNING.md``).
"""

import triton
import triton.language as tl

from .common import both_tiles, log_mixture, mma

# KIND values (the host maps jsd with beta = 0 / 1 to forward / reverse KL, their special-cased values).
K_ENTROPY, K_REVERSE_KL, K_FORWARD_KL, K_JSD = 0, 1, 2, 3


@triton.jit
def grad_tile(s, u, ls, lt, scal, g, valid, log_beta, log1m_beta, one_m_beta, KIND: tl.constexpr):
    """``g[:, None] * d value / d s`` (fp32) for a tile; ``scal`` is H, KL(p||q) or KL(p||m) per KIND."""
    lp = s - ls[:, None]
    p = tl.exp(lp)
    if KIND == 0:  # entropy: -p (log p + H)
        f = tl.where(p > 0, -p * (lp + scal[:, None]), 0.0)
    elif KIND == 1:  # reverse KL: p (log p - log q - KL)
        f = tl.where(p > 0, p * (lp - (u - lt[:, None]) - scal[:, None]), 0.0)
    elif KIND == 2:  # forward KL: p - q
        f = p - tl.exp(u - lt[:, None])
    else:  # JSD: (1 - beta) p (log p - log m - KL(p||m))
        lm = log_mixture(lp, u - lt[:, None], log_beta, log1m_beta)
        f = tl.where(p > 0, one_m_beta * p * (lp - lm - scal[:, None]), 0.0)
    return tl.where(valid, f * g[:, None], 0.0)


@triton.jit
def _row_block(idx_ptr, g_ptr, ls_ptr, lt_ptr, scal_ptr, start, n_sel, inv_temp,
               HAS_TEACHER: tl.constexpr, HAS_SCAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row ids of compacted slots ``start ...`` and their per-row inputs (0 past ``n_sel``)."""
    slots = start + tl.arange(0, BLOCK_N)
    slot_mask = slots < n_sel
    rows = tl.load(idx_ptr + slots, mask=slot_mask, other=0)
    g = tl.load(g_ptr + rows, mask=slot_mask, other=0.0) * inv_temp
    ls = tl.load(ls_ptr + rows, mask=slot_mask, other=0.0)
    lt = ls
    scal = ls
    if HAS_TEACHER:
        lt = tl.load(lt_ptr + rows, mask=slot_mask, other=0.0)
    if HAS_SCAL:
        scal = tl.load(scal_ptr + rows, mask=slot_mask, other=0.0)
    return rows, slot_mask, g, ls, lt, scal


@triton.jit
def _grad_logits(sh_ptr, sw_ptr, sb_ptr, sz_ptr, th_ptr, tw_ptr, tb_ptr, tz_ptr,
                 rows, row_mask, cols, col_mask, ls, lt, scal, g,
                 DS, DT, inv_temp, log_beta, log1m_beta, one_m_beta,
                 s_hn, s_hd, s_wv, s_wd, s_zn, s_zv, t_hn, t_hd, t_wv, t_wd, t_zn, t_zv,
                 S_LINEAR: tl.constexpr, S_BIAS: tl.constexpr, HAS_TEACHER: tl.constexpr,
                 T_LINEAR: tl.constexpr, T_BIAS: tl.constexpr, KIND: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """``(dS, valid)`` of a rows x cols tile: both logit tiles recomputed, then :func:`grad_tile`."""
    s, u = both_tiles(sh_ptr, sw_ptr, sb_ptr, sz_ptr, th_ptr, tw_ptr, tb_ptr, tz_ptr,
                      rows, row_mask, cols, col_mask, DS, DT, s_hn, s_hd, s_wv, s_wd, s_zn, s_zv,
                      t_hn, t_hd, t_wv, t_wd, t_zn, t_zv, inv_temp, S_LINEAR, S_BIAS,
                      HAS_TEACHER, T_LINEAR, T_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
    valid = row_mask[:, None] & col_mask[None, :]
    return grad_tile(s, u, ls, lt, scal, g, valid, log_beta, log1m_beta, one_m_beta, KIND), valid


@triton.jit
def dhidden_kernel(
    sh_ptr, sw_ptr, sb_ptr,
    th_ptr, tw_ptr, tb_ptr, tz_ptr,
    idx_ptr, g_ptr, ls_ptr, lt_ptr, scal_ptr, dh_ptr,
    n_sel, V, DS, DT, inv_temp, log_beta, log1m_beta, one_m_beta,
    s_hn, s_hd, s_wv, s_wd,
    t_hn, t_hd, t_wv, t_wd, t_zn, t_zv,
    dh_n, dh_d,
    S_BIAS: tl.constexpr, HAS_TEACHER: tl.constexpr, T_LINEAR: tl.constexpr, T_BIAS: tl.constexpr,
    HAS_SCAL: tl.constexpr, KIND: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows, row_mask, g, ls, lt, scal = _row_block(idx_ptr, g_ptr, ls_ptr, lt_ptr, scal_ptr,
                                                 pid_n.to(tl.int64) * BLOCK_N, n_sel, inv_temp,
                                                 HAS_TEACHER, HAS_SCAL, BLOCK_N)
    dcols = pid_d.to(tl.int64) * BLOCK_DH + tl.arange(0, BLOCK_DH)
    dcol_mask = dcols < DS
    offs_v = tl.arange(0, BLOCK_V)
    acc = tl.zeros((BLOCK_N, BLOCK_DH), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + offs_v).to(tl.int64)
        col_mask = cols < V
        ds, valid = _grad_logits(sh_ptr, sw_ptr, sb_ptr, sh_ptr, th_ptr, tw_ptr, tb_ptr, tz_ptr,
                                 rows, row_mask, cols, col_mask, ls, lt, scal, g,
                                 DS, DT, inv_temp, log_beta, log1m_beta, one_m_beta,
                                 s_hn, s_hd, s_wv, s_wd, 0, 0, t_hn, t_hd, t_wv, t_wd, t_zn, t_zv,
                                 True, S_BIAS, HAS_TEACHER, T_LINEAR, T_BIAS, KIND,
                                 BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
        w = tl.load(sw_ptr + cols[:, None] * s_wv + dcols[None, :] * s_wd,
                    mask=col_mask[:, None] & dcol_mask[None, :], other=0.0)
        acc = mma(ds.to(w.dtype), w, acc, DOT_PRECISION)
    tl.store(dh_ptr + rows[:, None] * dh_n + dcols[None, :] * dh_d, acc.to(dh_ptr.dtype.element_ty),
             mask=row_mask[:, None] & dcol_mask[None, :])


@triton.jit
def dweight_kernel(
    sh_ptr, sw_ptr, sb_ptr,
    th_ptr, tw_ptr, tb_ptr, tz_ptr,
    idx_ptr, g_ptr, ls_ptr, lt_ptr, scal_ptr, dw_ptr, db_ptr,
    n_sel, V, DS, DT, inv_temp, log_beta, log1m_beta, one_m_beta,
    s_hn, s_hd, s_wv, s_wd,
    t_hn, t_hd, t_wv, t_wd, t_zn, t_zv,
    dw_v, dw_d,
    S_BIAS: tl.constexpr, HAS_TEACHER: tl.constexpr, T_LINEAR: tl.constexpr, T_BIAS: tl.constexpr,
    HAS_SCAL: tl.constexpr, KIND: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    dcols = pid_d.to(tl.int64) * BLOCK_DH + tl.arange(0, BLOCK_DH)
    dcol_mask = dcols < DS
    acc = tl.zeros((BLOCK_V, BLOCK_DH), tl.float32)
    acc_b = tl.zeros((BLOCK_V,), tl.float32)
    for r0 in range(0, n_sel, BLOCK_N):
        rows, row_mask, g, ls, lt, scal = _row_block(idx_ptr, g_ptr, ls_ptr, lt_ptr, scal_ptr,
                                                     r0, n_sel, inv_temp, HAS_TEACHER, HAS_SCAL, BLOCK_N)
        ds, valid = _grad_logits(sh_ptr, sw_ptr, sb_ptr, sh_ptr, th_ptr, tw_ptr, tb_ptr, tz_ptr,
                                 rows, row_mask, cols, col_mask, ls, lt, scal, g,
                                 DS, DT, inv_temp, log_beta, log1m_beta, one_m_beta,
                                 s_hn, s_hd, s_wv, s_wd, 0, 0, t_hn, t_hd, t_wv, t_wd, t_zn, t_zv,
                                 True, S_BIAS, HAS_TEACHER, T_LINEAR, T_BIAS, KIND,
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
    sh_ptr, sw_ptr, sb_ptr, sz_ptr,
    th_ptr, tw_ptr, tb_ptr, tz_ptr,
    idx_ptr, g_ptr, ls_ptr, lt_ptr, scal_ptr, dz_ptr,
    n_sel, v_start, v_end, DS, DT, inv_temp, log_beta, log1m_beta, one_m_beta,
    s_hn, s_hd, s_wv, s_wd, s_zn, s_zv,
    t_hn, t_hd, t_wv, t_wd, t_zn, t_zv,
    dz_n, dz_v,
    S_LINEAR: tl.constexpr, S_BIAS: tl.constexpr,
    HAS_TEACHER: tl.constexpr, T_LINEAR: tl.constexpr, T_BIAS: tl.constexpr,
    HAS_SCAL: tl.constexpr, KIND: tl.constexpr, COMPACT_OUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``dS`` for the compacted rows and vocabulary columns ``[v_start, v_end)``. Stored at ``dz[row, col]``
    (the student given as logits), or with ``COMPACT_OUT`` at ``dz[slot, col - v_start]`` (a gradient-logit chunk
    that the host multiplies with cuBLAS)."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    start = pid_n.to(tl.int64) * BLOCK_N
    rows, row_mask, g, ls, lt, scal = _row_block(idx_ptr, g_ptr, ls_ptr, lt_ptr, scal_ptr,
                                                 start, n_sel, inv_temp, HAS_TEACHER, HAS_SCAL, BLOCK_N)
    cols = v_start + pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < v_end
    ds, valid = _grad_logits(sh_ptr, sw_ptr, sb_ptr, sz_ptr, th_ptr, tw_ptr, tb_ptr, tz_ptr,
                             rows, row_mask, cols, col_mask, ls, lt, scal, g,
                             DS, DT, inv_temp, log_beta, log1m_beta, one_m_beta,
                             s_hn, s_hd, s_wv, s_wd, s_zn, s_zv, t_hn, t_hd, t_wv, t_wd, t_zn, t_zv,
                             S_LINEAR, S_BIAS, HAS_TEACHER, T_LINEAR, T_BIAS, KIND,
                             BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
    if COMPACT_OUT:
        out_rows = start + tl.arange(0, BLOCK_N)
        out_cols = cols - v_start
    else:
        out_rows = rows
        out_cols = cols
    tl.store(dz_ptr + out_rows[:, None] * dz_n + out_cols[None, :] * dz_v, ds.to(dz_ptr.dtype.element_ty),
             mask=valid)
