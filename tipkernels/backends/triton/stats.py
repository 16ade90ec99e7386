"""Forward passes over the vocabulary: the one-pass statistics kernel, the JSD second pass, their launchers and the
host-side merge of the vocabulary splits.

Both use a 1-D grid of ``row blocks x vocabulary splits`` programs in grouped order (``common.grouped_block``):
program ``(i, k)`` streams the logit tiles of rows ``i*BLOCK_N ...`` over its contiguous range of
``tiles_per_split`` vocabulary tiles and writes per-row *partial* accumulators to ``part[field, k, row]``; the host
merges the splits (a few ``[splits, N]`` ops). The programs resident together hold ``GROUP_N`` row blocks across
the splits, so their hidden states stay in L2 while each weight tile is shared by ``GROUP_N`` programs. Splitting
the vocabulary also keeps the GPU busy when there are few rows; with one split it is the plain one-pass algorithm of
docs/design.md §1 (grid and splits: §4).
"""

import math
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ...inputs import IGNORE_INDEX, Problem, effective_kind
from . import config as _cfg
from .common import NEG_BIG, both_tiles, grouped_block, log_mixture
from .launch import cap_flags, launch, prepare, student_args, teacher_args

Tensor = torch.Tensor

# Fields of the statistics partials (fp32) ...
F_MS, F_ZS, F_AS, F_LABEL, F_BEST_S = 0, 1, 2, 3, 4
F_MT, F_ZT, F_AT, F_C, F_D, F_BEST_T = 5, 6, 7, 8, 9, 10
NUM_FIELDS_STUDENT, NUM_FIELDS_TEACHER = 5, 11
# ... and of the argmax partials (int32).
I_ARG_S, I_ARG_T = 0, 1


@triton.jit
def _split_block(N, V, tiles_per_split, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_N: tl.constexpr):
    """Program ``(i, k)`` (row block, vocabulary split; grouped order) of the 1-D grid: its rows, its vocabulary
    range ``[v_begin, v_end)``, and where its partials go: ``part[field, k, row]`` is ``part + field * stride_f +
    off``."""
    n_splits = tl.cdiv(tl.cdiv(V, BLOCK_V), tiles_per_split)
    pid_n, pid_v = grouped_block(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_splits, GROUP_N)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    v_begin = pid_v * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    return rows, rows < N, v_begin, v_end, pid_v.to(tl.int64) * N + rows, n_splits.to(tl.int64) * N


@triton.jit
def fold_tile(s, u, col0, state, HAS_TEACHER: tl.constexpr):
    """Fold one ``[BLOCK_N, BLOCK_V]`` tile of fp32 transformed logits (student ``s``, teacher ``u``; ``-inf`` past
    the vocabulary; ``col0`` the global column of the tile's first column) into the running per-row ``[BLOCK_N]``
    accumulators ``state`` = ``(ms, zs, as_, best_s, arg_s, mt, zt, at, c, d, best_t, arg_t)`` (fp32, the argmaxes
    int32) and return them updated: the online algebra of :func:`stats_kernel`'s docstring. The teacher's fields are
    passed through untouched without HAS_TEACHER (``u`` is then not read)."""
    ms, zs, as_, best_s, arg_s, mt, zt, at, c, d, best_t, arg_t = state
    # student: argmax, then rescale and accumulate
    tile_max, tile_arg = tl.max(s, axis=1, return_indices=True)
    better = tile_max > best_s  # strict: the earliest index wins ties, like torch.argmax
    best_s = tl.where(better, tile_max, best_s)
    arg_s = tl.where(better, col0 + tile_arg, arg_s)
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
        arg_t = tl.where(better_t, col0 + targ_t, arg_t)
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
    return ms, zs, as_, best_s, arg_s, mt, zt, at, c, d, best_t, arg_t


@triton.jit
def store_partials(base, arg_base, stride_f, row_mask, fields, HAS_TEACHER: tl.constexpr):
    """Store per-row partials ``fields`` = ``(ms, zs, as_, label logit, best_s, arg_s, mt, zt, at, c, d, best_t,
    arg_t)`` at ``base + F_* * stride_f`` (fp32) and ``arg_base + I_ARG_* * stride_f`` (int32); the teacher's only
    with HAS_TEACHER."""
    ms, zs, as_, lab_logit, best_s, arg_s, mt, zt, at, c, d, best_t, arg_t = fields
    tl.store(base + 0 * stride_f, ms, mask=row_mask)
    tl.store(base + 1 * stride_f, zs, mask=row_mask)
    tl.store(base + 2 * stride_f, as_, mask=row_mask)
    tl.store(base + 3 * stride_f, lab_logit, mask=row_mask)
    tl.store(base + 4 * stride_f, best_s, mask=row_mask)
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
def jsd_tile(lp, lq, kl_qm, kl_pm, log_beta, log1m_beta, MODE: tl.constexpr):
    """Add one tile's terms to the per-row ``[BLOCK_N]`` fp32 sums of :func:`jsd_kernel` and return them:
    ``lp``, ``lq`` ``[BLOCK_N, BLOCK_V]`` fp32 are the student's and the teacher's log-probabilities (``-inf`` past
    the vocabulary); MODE 0: KL(q||m) and KL(p||m) with ``m = β q + (1-β) p`` (``log_beta``, ``log1m_beta``);
    MODE 1: KL(q||p) into ``kl_qm``; MODE 2: KL(p||q) into ``kl_pm`` (the other sum returned unchanged)."""
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
    return kl_qm, kl_pm


@triton.jit
def stats_kernel(
    student, teacher,  # per model: (h, w, b, z pointers, D, h_n, h_d, w_v, w_d, z_n, z_v strides)
    label_ptr, part_ptr, arg_ptr,
    N, V, tiles_per_split,
    S_LINEAR: tl.constexpr, S_BIAS: tl.constexpr, S_CAP: tl.constexpr,
    HAS_TEACHER: tl.constexpr, T_LINEAR: tl.constexpr, T_BIAS: tl.constexpr, T_CAP: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax statistics of student logits s and teacher logits u (transformed: ``common.logit_tile``).

    Per row, relative to the running maxima ms, mt (rescaled by exp(m_old - m_new) when they grow):
      zs = sum e^{s-ms},  as = sum e^{s-ms} (s-ms)                    -> Ls = ms + log zs, H = log zs - as/zs
      zt, at likewise for u                                            -> Lt, teacher entropy
      c  = sum e^{s-ms} ((s-ms) - (u-mt))                              -> KL(p||q) = c/zs - log zs + log zt
      d  = sum e^{u-mt} ((u-mt) - (s-ms))                              -> KL(q||p) = d/zt - log zt + log zs
    Centring on the maxima keeps every summand O(logit spread) rather than O(|logit|), so nothing large
    cancels. Shifting a centre from m_old to m_new adds (m_old - m_new) per unit weight to the summands.
    """
    rows, row_mask, v_begin, v_end, off, stride_f = _split_block(N, V, tiles_per_split, BLOCK_N, BLOCK_V, GROUP_N)
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
        s, u = both_tiles(student, teacher, rows, row_mask, cols, col_mask, S_LINEAR, S_BIAS, S_CAP,
                          HAS_TEACHER, T_LINEAR, T_BIAS, T_CAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
        ms, zs, as_, best_s, arg_s, mt, zt, at, c, d, best_t, arg_t = fold_tile(
            s, u, v0, (ms, zs, as_, best_s, arg_s, mt, zt, at, c, d, best_t, arg_t), HAS_TEACHER)
        if HAS_LABELS:
            hit = cols[None, :] == labels[:, None]
            lab_logit += tl.sum(tl.where(hit, s, 0.0), axis=1)

    store_partials(part_ptr + off, arg_ptr + off, stride_f, row_mask,
                   (ms, zs, as_, lab_logit, best_s, arg_s, mt, zt, at, c, d, best_t, arg_t), HAS_TEACHER)

@triton.jit
def jsd_kernel(
    student, teacher,  # per model, as in stats_kernel
    ls_ptr, lt_ptr, part_ptr,
    N, V, tiles_per_split, log_beta, log1m_beta,
    S_LINEAR: tl.constexpr, S_BIAS: tl.constexpr, S_CAP: tl.constexpr,
    T_LINEAR: tl.constexpr, T_BIAS: tl.constexpr, T_CAP: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Second pass, knowing both LSEs: partial sums of KL(q||m) (field 0) and KL(p||m) (field 1).

    MODE 0: general beta, m = beta q + (1-beta) p.  MODE 1 (beta = 0): field 0 = KL(q||p).
    MODE 2 (beta = 1): field 1 = KL(p||q). Unused fields are left untouched (host zero-fills them).
    """
    rows, row_mask, v_begin, v_end, off, stride_f = _split_block(N, V, tiles_per_split, BLOCK_N, BLOCK_V, GROUP_N)
    offs_v = tl.arange(0, BLOCK_V)
    ls = tl.load(ls_ptr + rows, mask=row_mask, other=0.0)
    lt = tl.load(lt_ptr + rows, mask=row_mask, other=0.0)
    kl_qm = tl.zeros((BLOCK_N,), tl.float32)
    kl_pm = tl.zeros((BLOCK_N,), tl.float32)

    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = (v0 + offs_v).to(tl.int64)
        col_mask = cols < V
        s, u = both_tiles(student, teacher, rows, row_mask, cols, col_mask, S_LINEAR, S_BIAS, S_CAP,
                          True, T_LINEAR, T_BIAS, T_CAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
        kl_qm, kl_pm = jsd_tile(s - ls[:, None], u - lt[:, None], kl_qm, kl_pm, log_beta, log1m_beta, MODE)

    base = part_ptr + off
    tl.store(base, kl_qm, mask=row_mask)
    tl.store(base + stride_f, kl_pm, mask=row_mask)


# ------------------------------------------------------------------------------------------ launchers


def forward_stats(prob: Problem, *, config: Optional[dict] = None) -> Dict[str, Tensor]:
    """All per-row statistics in one pass over the vocabulary (the contract of :class:`tipkernels.backends.Backend`)."""
    prob = prepare(prob)
    n, vocab, dev = prob.num_rows, prob.vocab_size, prob.device
    has_teacher, has_labels = prob.has_teacher, prob.labels is not None
    f32 = dict(dtype=torch.float32, device=dev)
    if n == 0:
        empty = torch.empty(0, **f32)
        out = {"student_lse": empty, "entropy": empty.clone(),
               "student_argmax": torch.empty(0, dtype=torch.int64, device=dev)}
        if has_teacher:
            out.update(teacher_lse=empty.clone(), teacher_entropy=empty.clone(), reverse_kl=empty.clone(),
                       forward_kl=empty.clone(), teacher_argmax=torch.empty(0, dtype=torch.int64, device=dev))
        if has_labels:
            out["label_logprob"] = empty.clone()
        return out

    cfg = _cfg.for_call(prob, config)
    n_splits, per_split = _cfg.splits(cfg, n, vocab, dev)
    n_fields = NUM_FIELDS_TEACHER if has_teacher else NUM_FIELDS_STUDENT
    part = torch.empty((n_fields, n_splits, n), **f32)
    args = torch.empty((2 if has_teacher else 1, n_splits, n), dtype=torch.int32, device=dev)
    labels = prob.labels.contiguous() if has_labels else part
    grid = (triton.cdiv(n, cfg["block_n"]) * n_splits,)
    launch(
        stats_kernel, grid,
        student_args(prob), teacher_args(prob), labels, part, args,
        n, vocab, per_split,
        S_LINEAR=prob.student_is_linear, S_BIAS=prob.student_bias is not None, **cap_flags(prob),
        HAS_TEACHER=has_teacher, T_LINEAR=prob.teacher_hidden is not None,
        T_BIAS=prob.teacher_bias is not None, HAS_LABELS=has_labels,
        BLOCK_N=cfg["block_n"], BLOCK_V=cfg["block_v"], BLOCK_D=cfg["block_d"],
        GROUP_N=cfg["group_n"], DOT_PRECISION=_cfg.dot_precision(prob), **_cfg.launch_opts(cfg),
    )
    return _merge_stats(part, args, prob.labels, has_teacher)


def _merge_softmax(m, z, a):
    """Merge split accumulators [S, N] (max, sum e^{x-m}, sum e^{x-m}(x-m)) onto the global max."""
    top = m.max(0).values
    shift = m - top  # <= 0; a split that saw nothing has m = -1e30 and z = a = 0
    w = torch.exp(shift)
    return top, shift, w, (w * z).sum(0), (w * (a + shift * z)).sum(0)


def _merge_stats(part: Tensor, args: Tensor, labels: Optional[Tensor], has_teacher: bool) -> Dict[str, Tensor]:
    ms, shift_s, w_s, zs, as_ = _merge_softmax(part[F_MS], part[F_ZS], part[F_AS])
    log_zs = torch.log(zs)
    lse_s = ms + log_zs

    def argmax(best, arg):
        k = best.argmax(0, keepdim=True)  # first split on ties, i.e. the smallest index
        return arg.gather(0, k)[0].long()

    out = {
        "student_lse": lse_s,
        "entropy": (log_zs - as_ / zs).clamp_min(0.0),
        "student_argmax": argmax(part[F_BEST_S], args[I_ARG_S]),
    }
    if has_teacher:
        mt, shift_t, w_t, zt, at = _merge_softmax(part[F_MT], part[F_ZT], part[F_AT])
        log_zt = torch.log(zt)
        zs_k, zt_k = part[F_ZS], part[F_ZT]
        c = (w_s * (part[F_C] + (shift_s - shift_t) * zs_k)).sum(0)
        d = (w_t * (part[F_D] + (shift_t - shift_s) * zt_k)).sum(0)
        out.update(
            teacher_lse=mt + log_zt,
            teacher_entropy=(log_zt - at / zt).clamp_min(0.0),
            reverse_kl=(c / zs - log_zs + log_zt).clamp_min(0.0),
            forward_kl=(d / zt - log_zt + log_zs).clamp_min(0.0),
            teacher_argmax=argmax(part[F_BEST_T], args[I_ARG_T]),
        )
    if labels is not None:
        picked = part[F_LABEL].sum(0) - lse_s
        out["label_logprob"] = torch.where(labels != IGNORE_INDEX, picked, torch.zeros_like(picked))
    return out


#: jsd_kernel's MODE for the effective kind of JSD(β) (:func:`tipkernels.inputs.effective_kind`).
_JSD_MODE = {"jsd": 0, "forward_kl": 1, "reverse_kl": 2}


def jsd_sums(prob: Problem, student_lse: Tensor, teacher_lse: Tensor, beta: float,
             *, config: Optional[dict] = None) -> Tuple[Tensor, Tensor]:
    """Per-row unclamped ``Σ q (log q − log m)`` and ``Σ p (log p − log m)`` over this problem's vocabulary."""
    prob = prepare(prob)
    beta = float(beta)
    n, vocab, dev = prob.num_rows, prob.vocab_size, prob.device
    if n == 0:
        z = torch.empty(0, dtype=torch.float32, device=dev)
        return z, z.clone()
    cfg = _cfg.for_call(prob, config)
    n_splits, per_split = _cfg.splits(cfg, n, vocab, dev)
    part = torch.zeros((2, n_splits, n), dtype=torch.float32, device=dev)
    mode = _JSD_MODE[effective_kind("jsd", beta)]
    grid = (triton.cdiv(n, cfg["block_n"]) * n_splits,)
    launch(
        jsd_kernel, grid,
        student_args(prob), teacher_args(prob),
        student_lse.float().contiguous(), teacher_lse.float().contiguous(), part,
        n, vocab, per_split,
        math.log(beta) if mode == 0 else 0.0, math.log1p(-beta) if mode == 0 else 0.0,
        S_LINEAR=prob.student_is_linear, S_BIAS=prob.student_bias is not None, **cap_flags(prob),
        T_LINEAR=prob.teacher_hidden is not None, T_BIAS=prob.teacher_bias is not None,
        MODE=mode, BLOCK_N=cfg["block_n"], BLOCK_V=cfg["block_v"], BLOCK_D=cfg["block_d"],
        GROUP_N=cfg["group_n"], DOT_PRECISION=_cfg.dot_precision(prob), **_cfg.launch_opts(cfg),
    )
    kl_qm, kl_pm = part.sum(1).unbind(0)  # mode 1 (beta = 0) leaves kl_pm 0; mode 2 (m = q) kl_qm 0
    return kl_qm, kl_pm
