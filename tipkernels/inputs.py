"""Input validation and the flattened problem every backend computes on.

The public ops (``tipkernels.ops``) validate their arguments once, here, and hand the backends a
:class:`Problem`: 2-D tensors, the teacher already cut to the student's vocabulary, the temperature checked.

Backend contract (``tipkernels.backends.chunked``, ``tipkernels.backends.triton``, ``tipkernels.backends.reference``)::

    forward_stats(prob) -> dict of per-row tensors [N]:
        student_lse, entropy (fp32), student_argmax (int64); with a teacher also
        teacher_lse, teacher_entropy, reverse_kl, forward_kl (fp32), teacher_argmax (int64);
        with labels also label_logprob (fp32; 0 where the label is IGNORE_INDEX).
    jsd_sums(prob, student_lse, teacher_lse, beta) -> (kl_qm, kl_pm):
        per-row sums over this problem's vocabulary of q (log q - log m) and p (log p - log m), unclamped, with p
        and q normalised by the given LSEs (so that vocabulary shards can add them up; torch/triton backends).
    jsd_forward(prob, student_lse, teacher_lse, beta) -> (jsd, kl_pm):
        per-row fp32 JSD(beta) and KL(p || m) (the latter is what the gradient needs); ``combine_jsd`` of the
        sums where a backend has ``jsd_sums``.
    backward(prob, kind, grad_rows, saved, beta) -> (d_student, d_weight, d_bias):
        kind in {"entropy", "reverse_kl", "forward_kl", "jsd"}; grad_rows fp32 [N] is the upstream gradient of
        each row's value (rows where it is 0 are skipped); saved holds the per-row fp32 tensors the kind's
        gradient needs (student_lse always; teacher_lse for KL/JSD; entropy / reverse_kl / kl_pm for
        entropy / reverse_kl / jsd). d_student is d hidden [N, Ds] (or d logits [N, V] when the student is given
        as logits), d_weight [V, Ds] and d_bias [V] (None when absent), each in its input's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .options import options

Tensor = torch.Tensor

IGNORE_INDEX = -100
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
REDUCTIONS = ("none", "sum", "mean")
BACKENDS = ("auto", "torch", "reference", "triton")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class Problem:
    """A validated, flattened problem of N token rows over a vocabulary of V entries.

    The student is either linear (``student_hidden [N, Ds]``, ``student_weight [V, Ds]``, optional
    ``student_bias [V]``) or given as ``student_logits [N, V]``. The teacher, if any, is linear
    (``teacher_hidden [N, Dt]``, ``teacher_weight [V, Dt]``, ``teacher_bias [V]``) or ``teacher_logits [N, V]``;
    a padded teacher vocabulary has already been cut to the first V entries (views, no copy).
    Logits of both models are divided by ``temperature``.
    """

    student_hidden: Optional[Tensor] = None
    student_weight: Optional[Tensor] = None
    student_bias: Optional[Tensor] = None
    student_logits: Optional[Tensor] = None
    teacher_hidden: Optional[Tensor] = None
    teacher_weight: Optional[Tensor] = None
    teacher_bias: Optional[Tensor] = None
    teacher_logits: Optional[Tensor] = None
    labels: Optional[Tensor] = None
    temperature: float = 1.0

    @property
    def num_rows(self) -> int:
        src = self.student_hidden if self.student_hidden is not None else self.student_logits
        return src.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.student_weight.shape[0] if self.student_weight is not None else self.student_logits.shape[1]

    @property
    def has_teacher(self) -> bool:
        return self.teacher_hidden is not None or self.teacher_logits is not None

    @property
    def student_is_linear(self) -> bool:
        return self.student_hidden is not None

    @property
    def device(self) -> torch.device:
        src = self.student_hidden if self.student_hidden is not None else self.student_logits
        return src.device

    def rows(self, index: Tensor) -> "Problem":
        """The sub-problem of the rows ``index`` (int64 [n]); weights and biases are shared."""
        take = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
        return Problem(
            student_hidden=take(self.student_hidden),
            student_weight=self.student_weight,
            student_bias=self.student_bias,
            student_logits=take(self.student_logits),
            teacher_hidden=take(self.teacher_hidden),
            teacher_weight=self.teacher_weight,
            teacher_bias=self.teacher_bias,
            teacher_logits=take(self.teacher_logits),
            labels=take(self.labels),
            temperature=self.temperature,
        )


def combine_jsd(kl_qm: Tensor, kl_pm: Tensor, beta: float):
    """``(JSD(β), KL(p‖m))`` per row from the sums of ``jsd_sums``: both KLs clamped at 0 (rounding can leave
    them a hair below), mixed as β·KL(q‖m) + (1−β)·KL(p‖m); β = 0 / 1 are forward / reverse KL exactly."""
    kl_qm, kl_pm = kl_qm.clamp_min(0), kl_pm.clamp_min(0)
    if beta == 0.0:
        return kl_qm, kl_pm
    if beta == 1.0:
        return kl_pm, kl_pm.clone()
    return beta * kl_qm + (1.0 - beta) * kl_pm, kl_pm


# ----------------------------------------------------------------------------------------------- checks


def _shape(t: Optional[Tensor]) -> str:
    return "None" if t is None else str(tuple(t.shape))


def check_tensor(name: str, t, *, ndims: Sequence[int], float_dtype: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ndims:
        raise ValueError(f"{name} must have {' or '.join(str(n) for n in ndims)} dims, got shape {tuple(t.shape)}")
    if float_dtype and t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float32, float16, bfloat16 or float64), got dtype {t.dtype}"
        )


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(choices)}")
    return value


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive finite number, got {type(temperature).__name__}")
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return t


def check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a number in [0, 1], got {type(beta).__name__}")
    b = float(beta)
    if not (0.0 <= b <= 1.0):
        raise ValueError(f"beta must lie in [0, 1], got {beta!r}")
    return b


def check_finite(name: str, t: Optional[Tensor]) -> None:
    """Raise a ValueError naming ``name`` and the first non-finite index of ``t`` (skipped when disabled)."""
    if t is None or not options.check_finite or t.numel() == 0:
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} has a non-finite value ({t[index].item()}) at index {index} (shape {tuple(t.shape)}); "
            "fix the input, or disable this check with tipkernels.set_options(check_finite=False)"
        )


def _same_device(pairs) -> None:
    devices = {(n, t.device) for n, t in pairs if t is not None}
    if len({d for _, d in devices}) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in sorted(devices, key=lambda x: x[0]))
        raise ValueError(f"all tensors must be on one device; got {listing}")


def _same_dtype(pairs) -> None:
    dtypes = {(n, t.dtype) for n, t in pairs if t is not None}
    if len({d for _, d in dtypes}) > 1:
        listing = ", ".join(f"{n}: {d}" for n, d in sorted(dtypes, key=lambda x: x[0]))
        raise TypeError(f"mixed dtypes are not supported; got {listing} (cast them to one dtype)")


def _flatten(name: str, t: Tensor, lead: Optional[torch.Size]) -> Tensor:
    if lead is not None and t.shape[:-1] != lead:
        raise ValueError(
            f"{name} has leading dims {tuple(t.shape[:-1])}, expected {tuple(lead)} (the student's token dims)"
        )
    return t.reshape(-1, t.shape[-1])


def build_problem(
    student_hidden: Optional[Tensor],
    student_weight: Optional[Tensor],
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    *,
    student_logits: Optional[Tensor] = None,
    teacher_logits: Optional[Tensor] = None,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    temperature: float = 1.0,
    require_teacher: bool = False,
) -> tuple:
    """Validate user inputs; return ``(Problem, lead_shape)`` where ``lead_shape`` is the token dims."""
    temperature = check_temperature(temperature)
    if student_logits is None:
        check_tensor("student_hidden", student_hidden, ndims=(2, 3))
        check_tensor("student_weight", student_weight, ndims=(2,))
        if student_hidden.shape[-1] != student_weight.shape[1]:
            raise ValueError(
                f"student_hidden's hidden size {student_hidden.shape[-1]} (shape {tuple(student_hidden.shape)}) "
                f"does not match student_weight {tuple(student_weight.shape)} ([V, D] expected)"
            )
        lead = student_hidden.shape[:-1]
        vocab = student_weight.shape[0]
        if student_bias is not None:
            check_tensor("student_bias", student_bias, ndims=(1,))
            if student_bias.shape[0] != vocab:
                raise ValueError(
                    f"student_bias has shape {tuple(student_bias.shape)}, expected ({vocab},) to match "
                    f"student_weight {tuple(student_weight.shape)}"
                )
    else:
        check_tensor("student_logits", student_logits, ndims=(2, 3))
        lead = student_logits.shape[:-1]
        vocab = student_logits.shape[-1]
    if vocab < 1:
        raise ValueError("the student vocabulary is empty")

    if teacher_logits is not None and (teacher_hidden is not None or teacher_weight is not None):
        raise ValueError("give the teacher either as teacher_hidden + teacher_weight or as teacher_logits, not both")
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError(
            f"teacher_hidden and teacher_weight go together; got teacher_hidden {_shape(teacher_hidden)} "
            f"and teacher_weight {_shape(teacher_weight)}"
        )
    if teacher_bias is not None and teacher_weight is None:
        raise ValueError("teacher_bias was given without teacher_weight")
    has_teacher = teacher_hidden is not None or teacher_logits is not None
    if require_teacher and not has_teacher:
        raise ValueError("a teacher is required: pass teacher_hidden and teacher_weight, or teacher_logits")

    if teacher_hidden is not None:
        check_tensor("teacher_hidden", teacher_hidden, ndims=(2, 3))
        check_tensor("teacher_weight", teacher_weight, ndims=(2,))
        if teacher_hidden.shape[:-1] != lead:
            raise ValueError(
                f"student and teacher token counts differ: student {tuple(lead)} vs teacher_hidden "
                f"{tuple(teacher_hidden.shape)}"
            )
        if teacher_hidden.shape[-1] != teacher_weight.shape[1]:
            raise ValueError(
                f"teacher_hidden's hidden size {teacher_hidden.shape[-1]} (shape {tuple(teacher_hidden.shape)}) "
                f"does not match teacher_weight {tuple(teacher_weight.shape)} ([V_t, D_t] expected)"
            )
        if teacher_weight.shape[0] < vocab:
            raise ValueError(
                f"the teacher vocabulary ({teacher_weight.shape[0]} rows in teacher_weight) is smaller than the "
                f"student's ({vocab}); a teacher must have at least as many lm_head rows"
            )
        if teacher_bias is not None:
            check_tensor("teacher_bias", teacher_bias, ndims=(1,))
            if teacher_bias.shape[0] != teacher_weight.shape[0]:
                raise ValueError(
                    f"teacher_bias has shape {tuple(teacher_bias.shape)}, expected ({teacher_weight.shape[0]},) "
                    f"to match teacher_weight {tuple(teacher_weight.shape)}"
                )
    if teacher_logits is not None:
        check_tensor("teacher_logits", teacher_logits, ndims=(2, 3))
        if teacher_logits.shape[:-1] != lead:
            raise ValueError(
                f"student and teacher token counts differ: student {tuple(lead)} vs teacher_logits "
                f"{tuple(teacher_logits.shape)}"
            )
        if teacher_logits.shape[-1] < vocab:
            raise ValueError(
                f"the teacher vocabulary ({teacher_logits.shape[-1]} logits) is smaller than the student's ({vocab})"
            )

    float_inputs = [
        ("student_hidden", student_hidden),
        ("student_weight", student_weight),
        ("student_bias", student_bias),
        ("student_logits", student_logits),
        ("teacher_hidden", teacher_hidden),
        ("teacher_weight", teacher_weight),
        ("teacher_bias", teacher_bias),
        ("teacher_logits", teacher_logits),
    ]
    _same_dtype(float_inputs)
    _same_device(float_inputs + [("labels", labels)])
    for name, t in float_inputs:
        check_finite(name, t)

    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be an integer torch.Tensor, got {type(labels).__name__}")
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.shape != lead:
            raise ValueError(f"labels has shape {tuple(labels.shape)}, expected the token dims {tuple(lead)}")
        labels = labels.reshape(-1).long()
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
        if labels.numel() and bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"labels out of range: labels[{first}] (flattened) = {int(labels[first])}, "
                f"expected 0 <= label < {vocab} or {IGNORE_INDEX} to ignore"
            )

    def flat(name, t):
        return None if t is None else _flatten(name, t, lead)

    prob = Problem(
        student_hidden=flat("student_hidden", student_hidden),
        student_weight=student_weight,
        student_bias=student_bias,
        student_logits=flat("student_logits", student_logits),
        teacher_hidden=flat("teacher_hidden", teacher_hidden),
        teacher_weight=None if teacher_weight is None else teacher_weight[:vocab],
        teacher_bias=None if teacher_bias is None else teacher_bias[:vocab],
        teacher_logits=None if teacher_logits is None else flat("teacher_logits", teacher_logits)[:, :vocab],
        labels=labels,
        temperature=temperature,
    )
    return prob, lead


def resolve_backend(backend, device: torch.device) -> str:
    """Map ``backend`` (one of BACKENDS) to a concrete backend for tensors on ``device``."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend
