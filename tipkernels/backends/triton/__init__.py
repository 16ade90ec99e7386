"""Triton backend: the fused kernels of ``stats`` and ``backward`` behind the backend contract of ``tipkernels.inputs``.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported; tests).
float64 inputs are computed in fp32 (gradients are returned in float64). Block sizes come from
:func:`default_config`, then from the first matching entry of the tuned-config tables (:func:`tuned_config`:
the files named by ``$TIPKERNELS_TRITON_CONFIGS``, then the packaged ``tuned_configs.json``; written by
``benchmarks/tune_triton.py``); every entry point takes an optional ``config`` dict overriding any of its keys.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import triton

from ...options import deterministic
from . import backward as _bwd
from . import stats as _stats
from ...inputs import IGNORE_INDEX, Problem, combine_jsd

Tensor = torch.Tensor

KINDS = ("entropy", "reverse_kl", "forward_kl", "jsd")

# tl.dot precision for fp32 inputs: "ieee" keeps fp32 results within the fp32 tolerance of docs/design.md §8
# (tf32 would not, at real hidden sizes); set to "tf32" to trade that for tensor-core speed.
FP32_DOT_PRECISION = "ieee"


# ------------------------------------------------------------------------------------------ configuration


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def default_config(prob: Problem) -> Dict[str, object]:
    """Block sizes and launch options. First guesses for Hopper; tune on the device.

    block_n / block_v: the logit tile; block_d: the hidden-dim chunk of the logit matmul; block_dh: the
    hidden-dim block a backward program owns (its fp32 accumulator is block_n x block_dh or block_v x block_dh);
    split_v: vocabulary splits of the forward passes (None: enough programs to fill the device);
    bwd_block_n / bwd_block_v / bwd_block_d / bwd_num_stages / bwd_num_warps: the backward's logit tile, hidden
    chunk, pipeline depth and warps (a config that sets block_d, num_stages or num_warps but not its bwd_ twin uses
    it for both).
    num_warps, num_stages (None: Triton's default): launch options.
    bwd_strategy (linear students): ``"matmul"`` computes each gradient-logit tile once into a ``[rows, vocabulary
    chunk]`` buffer of at most ``bwd_chunk_mib`` MiB (at least one bwd_block_v wide) and leaves ``d hidden`` /
    ``d weight`` to cuBLAS, with an fp32 ``[rows, D]`` accumulator of at most 4 x ``bwd_chunk_mib`` MiB (rows in
    passes); ``"tiles"`` never allocates more than its outputs but recomputes the logit tiles ``D / block_dh`` times
    (see ``benchmarks/TUNING.md``).
    """
    dtype = (prob.student_hidden if prob.student_is_linear else prob.student_logits).dtype
    wide = dtype == torch.float32 or dtype == torch.float64
    ds = prob.student_hidden.shape[1] if prob.student_is_linear else 16
    # Sized so that ptxas compiles every specialisation for sm_90 within 255 registers without spilling
    # (tests/test_triton_compile.py): a 64 x 128 forward tile spilled up to 600 B (16-bit) / 1.3 KB (fp32).
    return {
        "block_n": 64,
        "block_v": 64,
        "block_d": 16 if wide else 64,
        "block_dh": min(128 if wide else 256, _pow2_at_least_16(ds)),
        "split_v": None,
        "num_warps": 8,
        "num_stages": 2 if wide else None,  # fp32 forward with 3 stages: ptxas spilled (Triton 3.6)
        "bwd_block_n": 64,
        "bwd_block_v": 32 if wide else 64,
        "bwd_block_d": 32 if wide else 64,  # fp32 at 16: ptxas picked 128 registers and spilled
        "bwd_num_stages": None,  # fp32 at 2: the same in dweight
        "bwd_num_warps": None,  # None: num_warps
        "bwd_strategy": "matmul",
        "bwd_chunk_mib": 32,
    }


def _config(prob: Problem, config: Optional[dict]) -> Dict[str, object]:
    cfg = default_config(prob)
    for source, over in (("tuned config", tuned_config(prob)), ("triton config", config)):
        if not over:
            continue
        unknown = set(over) - set(cfg)
        if unknown:
            raise KeyError(f"unknown {source} keys {sorted(unknown)}; known: {sorted(cfg)}")
        cfg.update(over)
        for key in _TWINNED:
            if key in over and "bwd_" + key not in over:
                cfg["bwd_" + key] = over[key]
    if cfg["bwd_strategy"] not in ("matmul", "tiles"):
        raise ValueError(f"triton config bwd_strategy={cfg['bwd_strategy']!r}: expected 'matmul' or 'tiles'")
    chunk_mib = cfg["bwd_chunk_mib"]
    if isinstance(chunk_mib, bool) or not isinstance(chunk_mib, (int, float)) or not chunk_mib > 0:
        raise ValueError(f"triton config bwd_chunk_mib={chunk_mib!r}: expected a positive number")
    for key in _DOT_BLOCKS:  # every one is a tl.dot dimension somewhere
        b = cfg[key]
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"triton config {key}={b!r}: must be a power of two >= 16")
    return cfg


_TWINNED = ("block_d", "num_stages", "num_warps")
_DOT_BLOCKS = ("block_n", "block_v", "block_d", "block_dh", "bwd_block_n", "bwd_block_v", "bwd_block_d")


def _launch_opts(cfg, backward: bool = False) -> dict:
    opts = {"num_warps": (cfg["bwd_num_warps"] if backward else None) or cfg["num_warps"]}
    stages = cfg["bwd_num_stages" if backward else "num_stages"]
    if stages is not None:
        opts["num_stages"] = stages
    return opts


def _splits(cfg, n_rows: int, vocab: int, device: torch.device) -> Tuple[int, int]:
    """(number of vocabulary splits, tiles per split), every split non-empty."""
    tiles = triton.cdiv(vocab, cfg["block_v"])
    want = cfg["split_v"]
    if want is None:
        row_blocks = triton.cdiv(n_rows, cfg["block_n"])
        want = triton.cdiv(2 * _num_sms(device), row_blocks)
    want = max(1, min(int(want), tiles))
    per = triton.cdiv(tiles, want)
    return triton.cdiv(tiles, per), per


# ------------------------------------------------------------------------------------------ tuned configs

TUNED_CONFIGS_ENV = "TIPKERNELS_TRITON_CONFIGS"
PACKAGED_TUNED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_configs.json")
_ENTRY_KEYS = {"device", "dtype", "d_min", "d_max", "v_min", "v_max", "config"}
_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp32"}


def device_key(device: torch.device) -> str:
    """The name tuned-config entries are matched on: ``torch.cuda.get_device_name`` on CUDA, else the type."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@functools.lru_cache(maxsize=32)
def _read_table(path: str, mtime: float) -> Tuple[dict, ...]:
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"tuned triton config table {path}: cannot read it ({err})") from err
    entries = table.get("entries") if isinstance(table, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"tuned triton config table {path}: expected an object with a list 'entries'")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not _ENTRY_KEYS <= set(e) or not isinstance(e["config"], dict):
            raise ValueError(f"tuned triton config table {path}, entry {i}: expected the keys "
                             f"{sorted(_ENTRY_KEYS)} with 'config' an object, got {e!r}")
    return tuple(entries)


def tuned_tables() -> List[str]:
    """The tuned-config files consulted, first match wins: ``$TIPKERNELS_TRITON_CONFIGS`` (``os.pathsep``-separated
    paths), then the packaged table."""
    paths = [p for p in os.environ.get(TUNED_CONFIGS_ENV, "").split(os.pathsep) if p]
    return paths + [PACKAGED_TUNED_CONFIGS]


def tuned_config(prob: Problem) -> Dict[str, object]:
    """The ``config`` of the first tuned entry matching the problem's device name, input dtype, student hidden
    size (0 for logits inputs) and vocabulary size (inclusive ranges); ``{}`` when none matches. A path named in
    ``$TIPKERNELS_TRITON_CONFIGS`` must exist; a malformed table raises ``ValueError`` naming the file."""
    src = prob.student_hidden if prob.student_is_linear else prob.student_logits
    dev, dt = device_key(src.device), _DTYPE_KEYS.get(src.dtype)
    d = src.shape[1] if prob.student_is_linear else 0
    v = prob.vocab_size
    for path in tuned_tables():
        if not os.path.exists(path):
            if path == PACKAGED_TUNED_CONFIGS:
                continue
            raise ValueError(f"${TUNED_CONFIGS_ENV} names {path}, which does not exist")
        for e in _read_table(path, os.path.getmtime(path)):
            if e["device"] == dev and e["dtype"] == dt and e["d_min"] <= d <= e["d_max"] \
                    and e["v_min"] <= v <= e["v_max"]:
                return dict(e["config"])
    return {}


# ------------------------------------------------------------------------------------------ launching


@dataclass
class Launch:
    """One kernel launch as the backend makes it: ``kernel[grid](*args, **kwargs)`` (kwargs: constexprs and
    launch options such as num_warps)."""

    kernel: object
    grid: Tuple[int, ...]
    args: tuple
    kwargs: dict


_recording: Optional[List[Launch]] = None


def _launch(kernel, grid, *args, **kwargs) -> None:
    if _recording is not None:
        _recording.append(Launch(kernel, tuple(grid), args, kwargs))
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def recorded_launches() -> Iterator[List[Launch]]:
    """Within the block, entry points record their kernel launches in the yielded list instead of running them
    (their outputs are then garbage). Lets a test compile exactly what the backend launches, e.g. ahead of time
    for a GPU this machine does not have. Not thread-safe."""
    global _recording
    saved, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = saved


# ------------------------------------------------------------------------------------------ argument packing


def _fp32_if_fp64(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.float() if t is not None and t.dtype == torch.float64 else t


def _bias(t: Optional[Tensor]) -> Optional[Tensor]:
    # The kernels index a bias with unit stride; a [V] copy is cheap.
    return None if t is None else _fp32_if_fp64(t).contiguous()


def _hidden(t: Optional[Tensor]) -> Optional[Tensor]:
    # Rows of hidden states must be contiguous: with a strided hidden dim the compiled kernels spill heavily
    # (up to ~1.5 KB per thread on sm_90). An [N, D] copy is cheap next to the N x V x D work. (Weights are
    # taken as they are: a transposed weight compiles without spills, and copying [V, D] costs memory.)
    if t is None:
        return None
    t = _fp32_if_fp64(t)
    return t if t.stride(-1) == 1 else t.contiguous()


def _prepare(prob: Problem) -> Problem:
    """float64 -> fp32 (the kernels accumulate in fp32 anyway), biases and hidden rows made contiguous; the rest
    as is."""
    return Problem(
        student_hidden=_hidden(prob.student_hidden),
        student_weight=_fp32_if_fp64(prob.student_weight),
        student_bias=_bias(prob.student_bias),
        student_logits=_fp32_if_fp64(prob.student_logits),
        teacher_hidden=_hidden(prob.teacher_hidden),
        teacher_weight=_fp32_if_fp64(prob.teacher_weight),
        teacher_bias=_bias(prob.teacher_bias),
        teacher_logits=_fp32_if_fp64(prob.teacher_logits),
        labels=prob.labels,
        temperature=prob.temperature,
    )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _dot_precision(prob: Problem) -> str:
    """tl.dot input_precision; "upcast" (operands to fp32) for bf16 under the interpreter, whose bf16 dot is wrong."""
    src = prob.student_hidden if prob.student_is_linear else prob.student_logits
    if prob.teacher_hidden is not None:
        src = prob.teacher_hidden
    if src.dtype == torch.float32:
        return FP32_DOT_PRECISION
    return "upcast" if src.dtype == torch.bfloat16 and _interpreting() else "tf32"


def _model_args(hidden, weight, bias, logits, dummy):
    """Pointers (h, w, b, z), hidden size and strides (h_n, h_d, w_v, w_d, z_n, z_v) of one model."""
    if hidden is not None:
        return ((hidden, weight, bias if bias is not None else weight, dummy), hidden.shape[1],
                (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), 0, 0))
    if logits is not None:
        return (dummy, dummy, dummy, logits), 0, (0, 0, 0, 0, logits.stride(0), logits.stride(1))
    return (dummy, dummy, dummy, dummy), 0, (0, 0, 0, 0, 0, 0)


def _student_args(prob: Problem):
    dummy = prob.student_hidden if prob.student_is_linear else prob.student_logits
    return _model_args(prob.student_hidden, prob.student_weight, prob.student_bias, prob.student_logits, dummy)


def _teacher_args(prob: Problem):
    dummy = prob.student_hidden if prob.student_is_linear else prob.student_logits
    return _model_args(prob.teacher_hidden, prob.teacher_weight, prob.teacher_bias, prob.teacher_logits, dummy)


# ------------------------------------------------------------------------------------------ forward


def forward_stats(prob: Problem, *, config: Optional[dict] = None) -> Dict[str, Tensor]:
    """All per-row statistics in one pass over the vocabulary (see ``tipkernels.inputs``)."""
    prob = _prepare(prob)
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

    cfg = _config(prob, config)
    n_splits, per_split = _splits(cfg, n, vocab, dev)
    n_fields = _stats.NUM_FIELDS_TEACHER if has_teacher else _stats.NUM_FIELDS_STUDENT
    part = torch.empty((n_fields, n_splits, n), **f32)
    args = torch.empty((2 if has_teacher else 1, n_splits, n), dtype=torch.int32, device=dev)
    labels = prob.labels.contiguous() if has_labels else part
    s_ptrs, ds, s_strides = _student_args(prob)
    t_ptrs, dt, t_strides = _teacher_args(prob)
    grid = (triton.cdiv(n, cfg["block_n"]), n_splits)
    _launch(
        _stats.stats_kernel, grid,
        *s_ptrs, *t_ptrs, labels, part, args,
        n, vocab, ds, dt, per_split, 1.0 / prob.temperature,
        *s_strides, *t_strides,
        S_LINEAR=prob.student_is_linear, S_BIAS=prob.student_bias is not None,
        HAS_TEACHER=has_teacher, T_LINEAR=prob.teacher_hidden is not None,
        T_BIAS=prob.teacher_bias is not None, HAS_LABELS=has_labels,
        BLOCK_N=cfg["block_n"], BLOCK_V=cfg["block_v"], BLOCK_D=cfg["block_d"],
        DOT_PRECISION=_dot_precision(prob), **_launch_opts(cfg),
    )
    return _merge_stats(part, args, prob.labels, has_teacher)


def _merge_softmax(m, z, a):
    """Merge split accumulators [S, N] (max, sum e^{x-m}, sum e^{x-m}(x-m)) onto the global max."""
    top = m.max(0).values
    shift = m - top  # <= 0; a split that saw nothing has m = -1e30 and z = a = 0
    w = torch.exp(shift)
    return top, shift, w, (w * z).sum(0), (w * (a + shift * z)).sum(0)


def _merge_stats(part: Tensor, args: Tensor, labels: Optional[Tensor], has_teacher: bool) -> Dict[str, Tensor]:
    F = _stats
    ms, shift_s, w_s, zs, as_ = _merge_softmax(part[F.F_MS], part[F.F_ZS], part[F.F_AS])
    log_zs = torch.log(zs)
    lse_s = ms + log_zs

    def argmax(best, arg):
        k = best.argmax(0, keepdim=True)  # first split on ties, i.e. the smallest index
        return arg.gather(0, k)[0].long()

    out = {
        "student_lse": lse_s,
        "entropy": (log_zs - as_ / zs).clamp_min(0.0),
        "student_argmax": argmax(part[F.F_BEST_S], args[F.I_ARG_S]),
    }
    if has_teacher:
        mt, shift_t, w_t, zt, at = _merge_softmax(part[F.F_MT], part[F.F_ZT], part[F.F_AT])
        log_zt = torch.log(zt)
        zs_k, zt_k = part[F.F_ZS], part[F.F_ZT]
        c = (w_s * (part[F.F_C] + (shift_s - shift_t) * zs_k)).sum(0)
        d = (w_t * (part[F.F_D] + (shift_t - shift_s) * zt_k)).sum(0)
        out.update(
            teacher_lse=mt + log_zt,
            teacher_entropy=(log_zt - at / zt).clamp_min(0.0),
            reverse_kl=(c / zs - log_zs + log_zt).clamp_min(0.0),
            forward_kl=(d / zt - log_zt + log_zs).clamp_min(0.0),
            teacher_argmax=argmax(part[F.F_BEST_T], args[F.I_ARG_T]),
        )
    if labels is not None:
        picked = part[F.F_LABEL].sum(0) - lse_s
        out["label_logprob"] = torch.where(labels != IGNORE_INDEX, picked, torch.zeros_like(picked))
    return out


def _jsd_mode(beta: float) -> int:
    return 1 if beta == 0.0 else 2 if beta == 1.0 else 0


def jsd_forward(prob: Problem, student_lse: Tensor, teacher_lse: Tensor, beta: float,
                *, config: Optional[dict] = None) -> Tuple[Tensor, Tensor]:
    """Per-row JSD(beta) and KL(p || m), a second pass given both LSEs (beta = 0 / 1: forward / reverse KL)."""
    return combine_jsd(*jsd_sums(prob, student_lse, teacher_lse, beta, config=config), float(beta))


def jsd_sums(prob: Problem, student_lse: Tensor, teacher_lse: Tensor, beta: float,
             *, config: Optional[dict] = None) -> Tuple[Tensor, Tensor]:
    """Per-row unclamped ``Σ q (log q − log m)`` and ``Σ p (log p − log m)`` over this problem's vocabulary."""
    prob = _prepare(prob)
    beta = float(beta)
    n, vocab, dev = prob.num_rows, prob.vocab_size, prob.device
    if n == 0:
        z = torch.empty(0, dtype=torch.float32, device=dev)
        return z, z.clone()
    cfg = _config(prob, config)
    n_splits, per_split = _splits(cfg, n, vocab, dev)
    part = torch.zeros((2, n_splits, n), dtype=torch.float32, device=dev)
    mode = _jsd_mode(beta)
    s_ptrs, ds, s_strides = _student_args(prob)
    t_ptrs, dt, t_strides = _teacher_args(prob)
    grid = (triton.cdiv(n, cfg["block_n"]), n_splits)
    _launch(
        _stats.jsd_kernel, grid,
        *s_ptrs, *t_ptrs,
        student_lse.float().contiguous(), teacher_lse.float().contiguous(), part,
        n, vocab, ds, dt, per_split, 1.0 / prob.temperature,
        math.log(beta) if mode == 0 else 0.0, math.log1p(-beta) if mode == 0 else 0.0,
        *s_strides, *t_strides,
        S_LINEAR=prob.student_is_linear, S_BIAS=prob.student_bias is not None,
        T_LINEAR=prob.teacher_hidden is not None, T_BIAS=prob.teacher_bias is not None,
        MODE=mode, BLOCK_N=cfg["block_n"], BLOCK_V=cfg["block_v"], BLOCK_D=cfg["block_d"],
        DOT_PRECISION=_dot_precision(prob), **_launch_opts(cfg),
    )
    kl_qm, kl_pm = part.sum(1).unbind(0)  # mode 1 (beta = 0) leaves kl_pm 0; mode 2 (m = q) kl_qm 0
    return kl_qm, kl_pm


# ------------------------------------------------------------------------------------------ backward


@contextlib.contextmanager
def _exact_fp32_matmuls():
    """fp32 matmuls without TF32 while ``FP32_DOT_PRECISION`` is "ieee" (as the kernels' own dots)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = FP32_DOT_PRECISION == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def backward(prob: Problem, kind: str, grad_rows: Tensor, saved: Dict[str, Tensor], beta: float = 0.5,
             *, config: Optional[dict] = None):
    """``(d_student, d_weight, d_bias)`` of ``sum_n grad_rows[n] * value_n`` for ``kind`` (see the contract)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {list(KINDS)}")
    orig = prob
    prob = _prepare(prob)
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

    # Map the kind to a gradient formula and its per-row scalar.
    if kind == "entropy":
        k, scal = _bwd.K_ENTROPY, saved["entropy"]
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        k, scal = _bwd.K_REVERSE_KL, saved["reverse_kl"] if kind == "reverse_kl" else saved["kl_pm"]
    elif kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        k, scal = _bwd.K_FORWARD_KL, None
    else:
        k, scal = _bwd.K_JSD, saved["kl_pm"]
    needs_teacher = kind != "entropy"
    if needs_teacher and not prob.has_teacher:
        raise ValueError(f"kind {kind!r} needs a teacher")
    log_beta = math.log(beta) if k == _bwd.K_JSD else 0.0
    log1m_beta = math.log1p(-beta) if k == _bwd.K_JSD else 0.0

    cfg = _config(prob, config)
    bn, bv = cfg["bwd_block_n"], cfg["bwd_block_v"]
    ls = saved["student_lse"].float().contiguous()
    lt = saved["teacher_lse"].float().contiguous() if needs_teacher else ls
    scal = scal.float().contiguous() if scal is not None else ls
    t_ptrs, dt, t_strides = _teacher_args(prob) if needs_teacher else _model_args(None, None, None, None, ls)
    common = dict(
        HAS_TEACHER=needs_teacher, T_LINEAR=needs_teacher and prob.teacher_hidden is not None,
        T_BIAS=needs_teacher and prob.teacher_bias is not None, HAS_SCAL=k != _bwd.K_FORWARD_KL, KIND=k,
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=cfg["bwd_block_d"], DOT_PRECISION=_dot_precision(prob),
        **_launch_opts(cfg, backward=True),
    )
    scalars = (1.0 / prob.temperature, log_beta, log1m_beta, 1.0 - beta)
    row_inputs = (idx, grad_rows.contiguous(), ls, lt, scal)

    if not linear:
        z = prob.student_logits
        grid = (triton.cdiv(n_sel, bn), triton.cdiv(vocab, bv))
        _launch(
            _bwd.dlogits_kernel, grid,
            z, z, z, z, *t_ptrs, *row_inputs, d_student,
            n_sel, 0, vocab, 0, dt, *scalars, 0, 0, 0, 0, z.stride(0), z.stride(1), *t_strides,
            d_student.stride(0), d_student.stride(1), S_LINEAR=False, S_BIAS=False, COMPACT_OUT=False, **common,
        )
        return finish()

    h, w = prob.student_hidden, prob.student_weight
    b = prob.student_bias if prob.student_bias is not None else w
    ds_dim = h.shape[1]
    bdh = cfg["block_dh"]
    s_strides = (h.stride(0), h.stride(1), w.stride(0), w.stride(1))
    if cfg["bwd_strategy"] == "matmul":
        _backward_matmul(prob, cfg, common, row_inputs, (h, w, b), s_strides, t_ptrs, t_strides, dt, scalars,
                         d_student, d_weight, d_bias)
        return finish()
    grid_a = (triton.cdiv(n_sel, bn), triton.cdiv(ds_dim, bdh))
    _launch(
        _bwd.dhidden_kernel, grid_a,
        h, w, b, *t_ptrs, *row_inputs, d_student,
        n_sel, vocab, ds_dim, dt, *scalars, *s_strides, *t_strides,
        d_student.stride(0), d_student.stride(1),
        S_BIAS=prob.student_bias is not None, BLOCK_DH=bdh, **common,
    )
    grid_b = (triton.cdiv(vocab, bv), triton.cdiv(ds_dim, bdh))
    _launch(
        _bwd.dweight_kernel, grid_b,
        h, w, b, *t_ptrs, *row_inputs, d_weight, d_bias if d_bias is not None else d_weight,
        n_sel, vocab, ds_dim, dt, *scalars, *s_strides, *t_strides,
        d_weight.stride(0), d_weight.stride(1),
        S_BIAS=prob.student_bias is not None, BLOCK_DH=bdh, **common,
    )
    return finish()


@deterministic  # its cuBLAS matmuls run under torch.use_deterministic_algorithms when the flag is on
def _backward_matmul(prob, cfg, common, row_inputs, student, s_strides, t_ptrs, t_strides, dt, scalars,
                     d_student, d_weight, d_bias) -> None:
    """The "matmul" strategy: ``dS`` once per (row block, vocab tile) into ``[rows, vocab chunk]`` buffers of at
    most ``bwd_chunk_mib``; cuBLAS forms ``d W[chunk] (+)= dSᵀ @ h[rows]`` and ``d h[rows] += dS @ W[chunk]`` (fp32
    accumulator). Rows go in passes whose fp32 accumulator is at most 4 × ``bwd_chunk_mib``, so the extra memory
    does not grow with N; ``d W`` is written by the first pass and accumulated (in its dtype) by later ones."""
    h, w, b = student
    idx, rest = row_inputs[0], row_inputs[1:]
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
            _launch(
                _bwd.dlogits_kernel, (triton.cdiv(m, bn), triton.cdiv(v1 - v0, bv)),
                h, w, b, h, *t_ptrs, ids, *rest, g,
                m, v0, v1, ds_dim, dt, *scalars, *s_strides, 0, 0, *t_strides, g.stride(0), g.stride(1),
                S_LINEAR=True, S_BIAS=prob.student_bias is not None, COMPACT_OUT=True, **common,
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
