"""Forward passes over the vocabulary: the one-pass statistics kernel and the JSD second pass.

Both use a 2-D grid ``(row blocks, vocabulary splits)``: program ``(i, k)`` streams the logit tiles of rows
``i*BLOCK_N ...`` over its contiguous range of ``tiles_per_split`` vocabulary tiles and writes per-row
*partial* accumulators to ``part[field, k, row]``; the host merges the splits (a few ``[splits, N]`` ops).
Splitting the vocabulary keeps the GPU busy when there are few rows; with one split it is the plain
one-pass algorithm of docs/design.md §1 (grid and splits: §4).
"""

import triton
import triton.language as tl

from .common import NEG_BIG, both_tiles, log_mixture

# Fields of the statistics partials (fp32) ...
F_MS, F_ZS, F_AS, F_LABEL, F_BEST_S = 0, 1, 2, 3, 4
F_MT, F_ZT, F_AT, F_C, F_D, F_BEST_T = 5, 6, 7, 8, 9, 10
NUM_FIELDS_STUDENT, NUM_FIELDS_TEACHER = 5, 11
# ... and of the argmax partials (int32).
I_ARG_S, I_ARG_T = 0, 1


@triton.jit
def stats_kernel(
    sh_ptr, sw_ptr, sb_ptr, sz_ptr,
    th_ptr, tw_ptr, tb_ptr, tz_ptr,
    label_ptr, part_ptr, arg_ptr,
    N, V, DS, DT, tiles_per_split, inv_temp,
    s_hn, s_hd, s_wv, s_wd, s_zn, s_zv,
    t_hn, t_hd, t_wv, t_wd, t_zn, t_zv,
    S_LINEAR: tl.constexpr, S_BIAS: tl.constexpr,
    HAS_TEACHER: tl.constexpr, T_LINEAR: tl.constexpr, T_BIAS: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax statistics of student logits s and teacher logits u.

    Per row, relative to the running maxima ms, mt (rescaled by exp(m_old - m_new) when they grow):
      zs = sum e^{s-ms},  as = sum e^{s-ms} (s-ms)                    -> Ls = ms + log zs, H = log zs - as/zs
      zt, at likewise for u                                            -> Lt, teacher entropy
      c  = sum e^{s-ms} ((s-ms) - (u-mt))                              -> KL(p||q) = c/zs - log zs + log zt
      d  = sum e^{u-mt} ((u-mt) - (s-ms))                              -> KL(q||p) = d/zt - log zt + log zs
    Centring on the maxima keeps every summand O(logit spread) rather than O(|logit|), so nothing large
    cancels. Shifting a centre from m_old to m_new adds (m_old - m_new) per unit weight to the summands.
    """
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    v_begin = pid_v * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    offs_v = tl.arange(0, BLOCK_V)

    ms = tl.full((BLOCK_N,), NEG_BIG, tl.float32)
    zs = tl.zeros((BLOCK_N,), tl.float32)
    as_ = tl.zeros((BLOCK_N,), tl.float32)
    best_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    arg_s = tl.zeros((BLOCK_N,), tl.int32)
    mt = tl.full((BLOCK_N,), NEG_BIG, tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    at = tl.zeros((BLOCK_N,), tl.float32)
    c = tl.zeros((BLOCK_N,), tl.float32)
    d = tl.zeros((BLOCK_N,), tl.float32)
    best_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    arg_t = tl.zeros((BLOCK_N,), tl.int32)
    lab_logit = tl.zeros((BLOCK_N,), tl.float32)
    if HAS_LABELS:
        labels = tl.load(label_ptr + rows, mask=row_mask, other=-1)

    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = (v0 + offs_v).to(tl.int64)
        col_mask = cols < V
        s, u = both_tiles(sh_ptr, sw_ptr, sb_ptr, sz_ptr, th_ptr, tw_ptr, tb_ptr, tz_ptr,
                          rows, row_mask, cols, col_mask, DS, DT, s_hn, s_hd, s_wv, s_wd, s_zn, s_zv,
                          t_hn, t_hd, t_wv, t_wd, t_zn, t_zv, inv_temp, S_LINEAR, S_BIAS,
                          HAS_TEACHER, T_LINEAR, T_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
        # student: argmax, then rescale and accumulate
        tile_max, tile_arg = tl.max(s, axis=1, return_indices=True)
        better = tile_max > best_s  # strict: the earliest index wins ties, like torch.argmax
        best_s = tl.where(better, tile_max, best_s)
        arg_s = tl.where(better, v0 + tile_arg, arg_s)
        ms_new = tl.maximum(ms, tile_max)
        ms_shift = ms - ms_new  # <= 0
        alpha_s = tl.exp(ms_shift)
        ds = s - ms_new[:, None]
        es = tl.exp(ds)
        live_s = es > 0  # e^{-inf} = 0 would otherwise meet (s - ms) = -inf: 0 * inf
        as_ = alpha_s * (as_ + ms_shift * zs) + tl.sum(tl.where(live_s, es * ds, 0.0), axis=1)
        if HAS_TEACHER:
            tmax_t, targ_t = tl.max(u, axis=1, return_indices=True)
            better_t = tmax_t > best_t
            best_t = tl.where(better_t, tmax_t, best_t)
            arg_t = tl.where(better_t, v0 + targ_t, arg_t)
            mt_new = tl.maximum(mt, tmax_t)
            mt_shift = mt - mt_new
            alpha_t = tl.exp(mt_shift)
            dt = u - mt_new[:, None]
            et = tl.exp(dt)
            live_t = et > 0
            at = alpha_t * (at + mt_shift * zt) + tl.sum(tl.where(live_t, et * dt, 0.0), axis=1)
            gap = ds - dt  # (s - ms) - (u - mt)
            c = alpha_s * (c + (ms_shift - mt_shift) * zs) + tl.sum(tl.where(live_s, es * gap, 0.0), axis=1)
            d = alpha_t * (d + (mt_shift - ms_shift) * zt) - tl.sum(tl.where(live_t, et * gap, 0.0), axis=1)
            zt = alpha_t * zt + tl.sum(et, axis=1)
            mt = mt_new
        zs = alpha_s * zs + tl.sum(es, axis=1)
        ms = ms_new
        if HAS_LABELS:
            hit = cols[None, :] == labels[:, None]
            lab_logit += tl.sum(tl.where(hit, s, 0.0), axis=1)

    stride_f = n_splits.to(tl.int64) * N
    base = part_ptr + pid_v.to(tl.int64) * N + rows
    tl.store(base + 0 * stride_f, ms, mask=row_mask)
    tl.store(base + 1 * stride_f, zs, mask=row_mask)
    tl.store(base + 2 * stride_f, as_, mask=row_mask)
    tl.store(base + 3 * stride_f, lab_logit, mask=row_mask)
    tl.store(base + 4 * stride_f, best_s, mask=row_mask)
    arg_base = arg_ptr + pid_v.to(tl.int64) * N + rows
    tl.store(arg_base, arg_s, mask=row_mask)
    if HAS_TEACHER:
        tl.store(base + 5 * stride_f, mt, mask=row_mask)
        tl.store(base + 6 * stride_f, zt, mask=row_mask)
        tl.store(base + 7 * stride_f, at, mask=row_mask)
        tl.store(base + 8 * stride_f, c, mask=row_mask)
        tl.store(base + 9 * stride_f, d, mask=row_mask)
        tl.store(base + 10 * stride_f, best_t, mask=row_mask)
        tl.store(arg_base + stride_f, arg_t, mask=row_mask)


@triton.jit
def jsd_kernel(
    sh_ptr, sw_ptr, sb_ptr, sz_ptr,
    th_ptr, tw_ptr, tb_ptr, tz_ptr,
    ls_ptr, lt_ptr, part_ptr,
    N, V, DS, DT, tiles_per_split, inv_temp, log_beta, log1m_beta,
    s_hn, s_hd, s_wv, s_wd, s_zn, s_zv,
    t_hn, t_hd, t_wv, t_wd, t_zn, t_zv,
    S_LINEAR: tl.constexpr, S_BIAS: tl.constexpr, T_LINEAR: tl.constexpr, T_BIAS: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Second pass, knowing both LSEs: partial sums of KL(q||m) (field 0) and KL(p||m) (field 1).

    MODE 0: general beta, m = beta q + (1-beta) p.  MODE 1 (beta = 0): field 0 = KL(q||p).
    MODE 2 (beta = 1): field 1 = KL(p||q). Unused fields are left untouched (host zero-fills them).
    """
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    v_begin = pid_v * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    offs_v = tl.arange(0, BLOCK_V)
    ls = tl.load(ls_ptr + rows, mask=row_mask, other=0.0)
    lt = tl.load(lt_ptr + rows, mask=row_mask, other=0.0)
    kl_qm = tl.zeros((BLOCK_N,), tl.float32)
    kl_pm = tl.zeros((BLOCK_N,), tl.float32)

    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = (v0 + offs_v).to(tl.int64)
        col_mask = cols < V
        s, u = both_tiles(sh_ptr, sw_ptr, sb_ptr, sz_ptr, th_ptr, tw_ptr, tb_ptr, tz_ptr,
                          rows, row_mask, cols, col_mask, DS, DT, s_hn, s_hd, s_wv, s_wd, s_zn, s_zv,
                          t_hn, t_hd, t_wv, t_wd, t_zn, t_zv, inv_temp, S_LINEAR, S_BIAS,
                          True, T_LINEAR, T_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
        lp = s - ls[:, None]
        lq = u - lt[:, None]
        p = tl.exp(lp)
        q = tl.exp(lq)
        # `where(x > 0, ...)`: a zero probability contributes 0 even where its log is -inf
        if MODE == 0:
            lm = log_mixture(lp, lq, log_beta, log1m_beta)
            kl_qm += tl.sum(tl.where(q > 0, q * (lq - lm), 0.0), axis=1)
            kl_pm += tl.sum(tl.where(p > 0, p * (lp - lm), 0.0), axis=1)
        elif MODE == 1:
            kl_qm += tl.sum(tl.where(q > 0, q * (lq - lp), 0.0), axis=1)
        else:
            kl_pm += tl.sum(tl.where(p > 0, p * (lp - lq), 0.0), axis=1)

    stride_f = n_splits.to(tl.int64) * N
    base = part_ptr + pid_v.to(tl.int64) * N + rows
    tl.store(base, kl_qm, mask=row_mask)
    tl.store(base + stride_f, kl_pm, mask=row_mask)
