"""Building blocks shared by the forward and backward kernels.

Kernel arguments are grouped per model: one tuple of pointers, hidden size and strides for the student and one for
the teacher (``launch.model_args`` packs them; tuples as ``@triton.jit`` arguments need Triton >= 3.2, the
interpreter >= 3.3).

Conventions: row and column indices are int64 vectors (``N*V`` and ``V*D`` may pass 2**31); every matmul
accumulates in fp32; vocabulary columns past ``V`` get logit ``-inf`` so they drop out of every softmax sum.
"""

import triton
import triton.language as tl

# A finite "minus infinity" for running maxima: ``m_old - m_new`` then stays finite, so the rescaling
# ``(m_old - m_new) * Z_old`` of an empty accumulator is 0 instead of NaN.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b`` in fp32. DOT_PRECISION is a tl.dot input_precision, or "upcast": the operands go to fp32
    first (the Triton interpreter multiplies bf16 operands wrongly; bf16 products are exact in fp32 anyway)."""
    if DOT_PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


@triton.jit
def grouped_block(pid, n_row_blocks, n_col_blocks, GROUP_N: tl.constexpr):
    """``(row block, column block)`` of program ``pid`` of a 1-D grid of ``n_row_blocks * n_col_blocks`` programs, in
    grouped order: programs ``0, 1, ...`` take the first ``GROUP_N`` row blocks (rows fastest) across every column
    block, then the next ``GROUP_N`` (the last group may be smaller). The programs resident at one time then share a
    few row blocks, whose hidden states stay in L2, and each column block is read by ``GROUP_N`` programs at about
    the same time (docs/design.md §4)."""
    per_group = GROUP_N * n_col_blocks
    first = (pid // per_group) * GROUP_N
    size = tl.minimum(n_row_blocks - first, GROUP_N)
    within = pid % per_group
    return first + within % size, within // size


@triton.jit
def tanh(x):
    """``tanh(x) = 2·sigmoid(2x) − 1``: exactly ±1 for large |x| (no overflow, no NaN), absolute error ~1e-7 (the
    interpreter has no libdevice tanh)."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def logit_tile(
    model, rows, row_mask, cols, col_mask,
    LINEAR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """fp32 logits ``[BLOCK_N, BLOCK_V]`` of rows x cols of one model, transformed: ``c·tanh(a·z/c)/T`` with
    HAS_CAP, else ``a·z/T`` (docs/design.md §1).

    ``model`` is the tuple the host packs per model (``launch.model_args``): pointers ``(h, w, b, z)``, the hidden
    size ``D``, strides ``(h_n, h_d, w_v, w_d, z_n, z_v)`` and the transform's runtime scalars ``(pre, post)``:
    ``(a/T, 1)`` without a cap, ``(a/c, c/T)`` with one. LINEAR: ``z = h[rows] @ w[cols].T (+ b[cols])`` over the
    hidden dim in chunks of BLOCK_D; otherwise the tile is read from the logits tensor ``z``. Columns outside
    ``col_mask`` are ``-inf``; rows outside ``row_mask`` are finite (their inputs read as 0) and must not be stored.
    """
    h_ptr, w_ptr, b_ptr, z_ptr, D, stride_hn, stride_hd, stride_wv, stride_wd, stride_zn, stride_zv, pre, post = model
    if LINEAR:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
        h_rows = h_ptr + rows[:, None] * stride_hn
        w_cols = w_ptr + cols[None, :] * stride_wv
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < D
            h = tl.load(h_rows + d[None, :] * stride_hd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            w = tl.load(w_cols + d[:, None] * stride_wd, mask=d_mask[:, None] & col_mask[None, :], other=0.0)
            acc = mma(h, w, acc, DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    else:
        acc = tl.load(
            z_ptr + rows[:, None] * stride_zn + cols[None, :] * stride_zv,
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
    acc = acc * pre
    if HAS_CAP:
        acc = tanh(acc) * post
    return tl.where(col_mask[None, :], acc, float("-inf"))


@triton.jit
def both_tiles(
    student, teacher, rows, row_mask, cols, col_mask,
    S_LINEAR: tl.constexpr, S_BIAS: tl.constexpr, S_CAP: tl.constexpr,
    HAS_TEACHER: tl.constexpr, T_LINEAR: tl.constexpr, T_BIAS: tl.constexpr, T_CAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``(s, u)``: the student's and, with HAS_TEACHER, the teacher's logit tiles (``u = s`` without one).

    Both tiles first: the teacher's matmul then runs with only ``s`` live, not the tiles derived from it.
    """
    s = logit_tile(student, rows, row_mask, cols, col_mask,
                   S_LINEAR, S_BIAS, S_CAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
    u = s
    if HAS_TEACHER:
        u = logit_tile(teacher, rows, row_mask, cols, col_mask,
                       T_LINEAR, T_BIAS, T_CAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
    return s, u


@triton.jit
def log_mixture(lp, lq, log_beta, log1m_beta):
    """``log(beta*q + (1-beta)*p)`` from log-probabilities, as a stable logaddexp (NaN only where p = q = 0)."""
    a = lq + log_beta
    b = lp + log1m_beta
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return hi + tl.log(1.0 + tl.exp(lo - hi))
