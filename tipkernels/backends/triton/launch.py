"""How the Triton backend launches kernels: one :func:`launch` (recordable), and the packing of a problem's tensors
into kernel arguments.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Tuple

import torch

from ...inputs import Problem

Tensor = torch.Tensor


@dataclass
class Launch:
    """One kernel launch as the backend makes it: ``kernel[grid](*args, **kwargs)`` (kwargs: constexprs and
    launch options such as num_warps)."""

    kernel: object
    grid: Tuple[int, ...]
    args: tuple
    kwargs: dict


_recording: Optional[List[Launch]] = None


def launch(kernel, grid, *args, **kwargs) -> None:
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


def prepare(prob: Problem) -> Problem:
    """float64 -> fp32 (the kernels accumulate in fp32 anyway), biases and hidden rows made contiguous; the rest
    as is."""
    return replace(
        prob,
        student_hidden=_hidden(prob.student_hidden),
        student_weight=_fp32_if_fp64(prob.student_weight),
        student_bias=_bias(prob.student_bias),
        student_logits=_fp32_if_fp64(prob.student_logits),
        teacher_hidden=_hidden(prob.teacher_hidden),
        teacher_weight=_fp32_if_fp64(prob.teacher_weight),
        teacher_bias=_bias(prob.teacher_bias),
        teacher_logits=_fp32_if_fp64(prob.teacher_logits),
    )


def transform_scalars(scale: float, cap: Optional[float], temperature: float) -> Tuple[float, float]:
    """The runtime ``(pre, post)`` of ``common.logit_tile`` for ``c·tanh(a·z/c)/T``: ``(a/c, c/T)``, or ``(a/T, 1)``
    without a cap (then ``a = 1`` multiplies by exactly ``1/T``, as before transforms existed)."""
    if cap is None:
        return scale / temperature, 1.0
    return scale / cap, cap / temperature


def model_args(hidden, weight, bias, logits, dummy, transform=(1.0, 1.0)) -> tuple:
    """One model's kernel argument: ``(h, w, b, z, D, h_n, h_d, w_v, w_d, z_n, z_v, pre, post)`` (see
    ``common.logit_tile``; ``transform`` is ``(pre, post)`` from :func:`transform_scalars`).

    A linear model fills the pointers h, w, b (``w`` again when there is no bias) and its strides; a model given as
    logits fills z; an absent one is all ``dummy`` and zeros (never read: the kernel's flags say so)."""
    pre, post = float(transform[0]), float(transform[1])
    if hidden is not None:
        return (hidden, weight, bias if bias is not None else weight, dummy, hidden.shape[1],
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), 0, 0, pre, post)
    if logits is not None:
        return (dummy, dummy, dummy, logits, 0, 0, 0, 0, 0, logits.stride(0), logits.stride(1), pre, post)
    return (dummy, dummy, dummy, dummy, 0, 0, 0, 0, 0, 0, 0, pre, post)


def student_args(prob: Problem) -> tuple:
    dummy = prob.student_hidden if prob.student_is_linear else prob.student_logits
    return model_args(prob.student_hidden, prob.student_weight, prob.student_bias, prob.student_logits, dummy,
                      transform_scalars(prob.student_scale, prob.student_cap, prob.temperature))


def teacher_args(prob: Problem) -> tuple:
    dummy = prob.student_hidden if prob.student_is_linear else prob.student_logits
    return model_args(prob.teacher_hidden, prob.teacher_weight, prob.teacher_bias, prob.teacher_logits, dummy,
                      transform_scalars(prob.teacher_scale, prob.teacher_cap, prob.temperature))


def cap_flags(prob: Problem, teacher: bool = True) -> dict:
    """The HAS_CAP constexprs of a launch: ``S_CAP`` and ``T_CAP`` (False without a teacher in the launch)."""
    return dict(S_CAP=prob.student_cap is not None, T_CAP=teacher and prob.has_teacher and prob.teacher_cap is not None)
