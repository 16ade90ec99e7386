"""One vocabulary for inputs: the enums, every argument check, and the flattened problem every backend computes on.

The public ops (``tipkernels.ops``), the loss, the selection rules and the OPD config validate their arguments
here, once, and the ops hand the backends a :class:`Problem`: 2-D tensors, the teacher already cut to the
student's vocabulary, the temperature checked. Every choice the library accepts is spelt once below
(:data:`BACKENDS`, :data:`DIVERGENCES`, :data:`KINDS`, :data:`REDUCTIONS`, :data:`RULES`, :data:`BUDGETS`,
:data:`TAILS`), and so is the β rule of the JSD (:func:`effective_kind`). A top-k teacher is validated once too
(:func:`check_teacher_topk`, giving a :class:`TopKTeacher`). The backend contract is :class:`tipkernels.backends.Backend`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .options import options

Tensor = torch.Tensor

IGNORE_INDEX = -100
#: ``backend=`` choices: "auto" is triton for CUDA tensors and torch elsewhere (:func:`tipkernels.backends.get_backend`).
BACKENDS = ("auto", "torch", "triton", "reference")
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
#: What a per-row value is: the student's entropy, its log-sum-exp (the top-k teacher's student pass,
#: docs/design.md §1) or a divergence (the backends' ``kind``).
KINDS = ("entropy", "lse") + DIVERGENCES
#: ``tail=`` choices of a top-k teacher (docs/design.md §1, "A teacher seen through its top-k").
TAILS = ("bucket", "renormalize")
REDUCTIONS = ("none", "sum", "mean")
#: TIP selection rules (see :mod:`tipkernels.selection`) and budgets.
RULES = ("all", "random", "entropy_topk", "entropy_sample", "soft_or", "q3", "divergence")
BUDGETS = ("per_sequence", "per_batch")
#: Rules whose selection is random, hence can give importance weights (``all`` trivially: weights 1).
SAMPLING_RULES = ("all", "random", "entropy_sample")
#: The per-row value each kind's gradient reads from a forward's saved tensors (besides the LSEs).
SAVED_VALUE = {"entropy": "entropy", "lse": None, "reverse_kl": "reverse_kl", "forward_kl": None, "jsd": "kl_pm"}
#: Row kinds of the student alone: no teacher in their forward or backward.
STUDENT_KINDS = ("entropy", "lse")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def effective_kind(kind: str, beta: float) -> str:
    """The β rule, the one place it is written: JSD(β=0) is forward KL and JSD(β=1) reverse KL, exactly (values and
    gradients; the mixture ``m = β q + (1−β) p`` is then ``p`` or ``q``). Any other kind or β is returned as is."""
    if kind == "jsd" and beta == 0.0:
        return "forward_kl"
    if kind == "jsd" and beta == 1.0:
        return "reverse_kl"
    return kind


def needs_teacher(kind: str) -> bool:
    """Whether the row kind ``kind`` reads a teacher (every divergence; not "entropy" or "lse")."""
    return kind not in STUDENT_KINDS


def saved_scalar(kind: str, beta: float) -> Optional[str]:
    """The saved per-row value the gradient of ``kind`` reads besides the LSEs, or None ("lse", forward KL, JSD at
    β = 0). The formula is the effective kind's, the value the requested kind's: at β = 1 JSD's ``kl_pm`` is
    KL(p||q), the reverse-KL scalar."""
    return None if SAVED_VALUE[effective_kind(kind, beta)] is None else SAVED_VALUE[kind]


def detach(t):
    """``t.detach()`` for a tensor; anything else (None, or a wrong type left for the checks to name) as is."""
    return t.detach() if isinstance(t, torch.Tensor) else t


@dataclass
class Problem:
    """A validated, flattened problem of N token rows over a vocabulary of V entries.

    The student is either linear (``student_hidden [N, Ds]``, ``student_weight [V, Ds]``, optional
    ``student_bias [V]``) or given as ``student_logits [N, V]``. The teacher, if any, is linear
    (``teacher_hidden [N, Dt]``, ``teacher_weight [V, Dt]``, ``teacher_bias [V]``) or ``teacher_logits [N, V]``;
    a padded teacher vocabulary has already been cut to the first V entries (views, no copy).
    Each model's logits are ``c · tanh(a · z / c) / T`` of its raw logits ``z`` (``h·Wᵀ + b``, or the given logits):
    scale ``a`` (``student_scale`` / ``teacher_scale``), soft-cap ``c`` (``student_cap`` / ``teacher_cap``; None: no
    tanh, ``a · z / T``), then the shared ``temperature`` (docs/design.md §1). ``backend_config`` is what a backend resolved for this op
    call (:meth:`tipkernels.backends.Backend.plan`; None until then).
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
    student_scale: float = 1.0
    student_cap: Optional[float] = None
    teacher_scale: float = 1.0
    teacher_cap: Optional[float] = None
    backend_config: Optional[dict] = field(default=None, repr=False, compare=False)

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
            **self.transforms(),
            backend_config=self.backend_config,
        )

    def transforms(self) -> dict:
        """The logit transforms as keyword arguments of :class:`Problem`."""
        return dict(student_scale=self.student_scale, student_cap=self.student_cap,
                    teacher_scale=self.teacher_scale, teacher_cap=self.teacher_cap)


def combine_jsd(kl_qm: Tensor, kl_pm: Tensor, beta: float):
    """``(JSD(β), KL(p‖m))`` per row from the sums of ``jsd_sums``: both KLs clamped at 0 (rounding can leave
    them a hair below), mixed as β·KL(q‖m) + (1−β)·KL(p‖m); β = 0 / 1 are forward / reverse KL exactly."""
    kl_qm, kl_pm = kl_qm.clamp_min(0), kl_pm.clamp_min(0)
    kind = effective_kind("jsd", beta)
    if kind == "forward_kl":  # m = p: the sums hold KL(q‖p) and 0
        return kl_qm, kl_pm
    if kind == "reverse_kl":  # m = q: they hold 0 and KL(p‖q)
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


def _positive_finite(name: str, value, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    x = float(value)
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return x


def check_logit_scale(name: str, value) -> float:
    """A logit scale ``a``: a finite number > 0 (bools and strings are TypeErrors naming ``name``)."""
    return _positive_finite(name, value, "a positive finite number")


def check_softcap(name: str, value) -> Optional[float]:
    """A logit soft-cap ``c``: None (no cap) or a finite number > 0 (bools and strings are TypeErrors)."""
    return None if value is None else _positive_finite(name, value, "None or a positive finite number")


#: The ops' four transform keywords at their defaults: logits ``h·Wᵀ + b`` (then divided by T).
IDENTITY_TRANSFORMS = {"student_logit_scale": 1.0, "student_softcap": None, "teacher_logit_scale": 1.0,
                       "teacher_softcap": None}


def check_transforms(student_logit_scale=1.0, student_softcap=None, teacher_logit_scale=1.0,
                     teacher_softcap=None) -> dict:
    """The four transform keywords of the ops, checked, as :class:`Problem` keyword arguments."""
    return dict(student_scale=check_logit_scale("student_logit_scale", student_logit_scale),
                student_cap=check_softcap("student_softcap", student_softcap),
                teacher_scale=check_logit_scale("teacher_logit_scale", teacher_logit_scale),
                teacher_cap=check_softcap("teacher_softcap", teacher_softcap))


def check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a number in [0, 1], got {type(beta).__name__}")
    b = float(beta)
    if not (0.0 <= b <= 1.0):
        raise ValueError(f"beta must lie in [0, 1], got {beta!r}")
    return b


def check_fraction(name: str, value, *, allow_none: bool = False) -> Optional[float]:
    """A real number in (0, 1] (bools and NaN rejected)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def check_number(name: str, value, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False,
                 hi_open: bool = False):
    """A finite int (``integer``) or real number in the interval from ``lo`` to ``hi`` (open ends as flagged); bools
    rejected. TypeError for the wrong type, ValueError naming the interval otherwise. Returns ``value``."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
        lo_b, hi_b = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must lie in {lo_b}{lo}, {hi}{hi_b}, got {value!r}")
    return value


def check_mask(mask, shape: Optional[torch.Size], *, what: str = "the stats' shape",
               device: Optional[torch.device] = None) -> Tensor:
    """A bool token mask shaped ``shape`` (``[B, L]`` or ``[N]``; any when None), on ``device`` if given.

    Returns it viewed as ``[B, L]`` (``[N]`` becomes ``[1, N]``)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor ([B, L] or [N]), got {got}")
    if shape is not None and mask.shape != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {what} {tuple(shape)}")
    if mask.dim() not in (1, 2):
        raise ValueError(f"mask and stats must be shaped [B, L] or [N], got {tuple(mask.shape)}")
    if device is not None and mask.device != device:
        raise ValueError(f"mask is on {mask.device}, the hidden states on {device}")
    return mask if mask.dim() == 2 else mask.reshape(1, -1)


def check_weights(weights, lead: torch.Size, device: torch.device) -> Optional[Tensor]:
    """Optional float per-token weights shaped like the token dims ``lead``, on ``device``."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise TypeError(f"weights must be a floating torch.Tensor, got {getattr(weights, 'dtype', type(weights))}")
    if weights.shape != lead:
        raise ValueError(f"weights has shape {tuple(weights.shape)}, expected the token dims {tuple(lead)}")
    if weights.device != device:
        raise ValueError(f"weights is on {weights.device}, the inputs on {device}")
    return weights


def check_finite(name: str, t: Optional[Tensor]) -> None:
    """Raise a ValueError naming ``name`` and the first non-finite index of ``t`` (skipped when disabled)."""
    if t is None or not options.check_finite or t.numel() == 0:
        return
    # min and max propagate NaN and show ±inf: one reading pass, no tensor of t's size (a bool mask of a
    # [V, D] weight is as large as a row block of the chunked backend)
    lo, hi = torch.aminmax(t.detach())
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
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
    student_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: Optional[float] = None,
    require_teacher: bool = False,
) -> tuple:
    """Validate user inputs; return ``(Problem, lead_shape)`` where ``lead_shape`` is the token dims.

    The transform keywords are the public ops' (:func:`check_transforms`); the teacher's are checked even without
    a teacher (they then have no effect)."""
    temperature = check_temperature(temperature)
    transforms = check_transforms(student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap)
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
        **transforms,
    )
    return prob, lead



# ------------------------------------------------------------------------------- a top-k teacher

#: Largest log-probability accepted (rounding of a served log-softmax can leave a hair above 0), and the largest
#: per-row total probability ``Σ e^l`` of the K ids (the rest is clamped to an empty tail, docs/design.md §1).
TOPK_MAX_LOGPROB = 1e-4
TOPK_MAX_MASS = 1.0 + 1e-3


@dataclass
class TopKTeacher:
    """A validated top-k teacher, flattened to the rows of a :class:`Problem` (:func:`check_teacher_topk`).

    ``ids`` int64 ``[N, K]`` (``-1`` where ``valid`` is False), ``logprobs`` float ``[N, K]`` (as given; read only
    where ``valid``), ``valid`` bool ``[N, K]``, ``vocab_size`` the (global) student vocabulary the ids index.
    Never differentiated."""

    ids: Tensor
    logprobs: Tensor
    valid: Tensor
    vocab_size: int

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def rows(self, index: Tensor) -> "TopKTeacher":
        """The rows ``index`` (int64 ``[n]``)."""
        return TopKTeacher(self.ids.index_select(0, index), self.logprobs.index_select(0, index),
                           self.valid.index_select(0, index), self.vocab_size)


def check_tail(tail) -> str:
    return check_choice("tail", tail, TAILS)


def split_teacher(teacher_topk, teacher_hidden, teacher_weight, teacher_logits, teacher_bias):
    """``(dense, tensors)``: ``dense`` the dense teacher arguments as ``(name, value)`` pairs (for
    :func:`check_teacher_topk`'s "not both" check), ``tensors`` the ``(hidden, weight, logits, bias)`` to build the
    :class:`Problem` with: as given for a dense teacher, all None with a top-k one (it is not a Problem field)."""
    tensors = (teacher_hidden, teacher_weight, teacher_logits, teacher_bias)
    dense = tuple(zip(("teacher_hidden", "teacher_weight", "teacher_logits", "teacher_bias"), tensors))
    return dense, ((None,) * 4 if teacher_topk is not None else tensors)


def check_teacher_topk(teacher_topk, lead: torch.Size, vocab: int, device: torch.device, *,
                       dense=()) -> TopKTeacher:
    """Validate ``teacher_topk`` (a :class:`tipkernels.TeacherTopK` or an ``(ids, logprobs)`` pair) against the
    token dims ``lead`` and the (global) student vocabulary ``vocab``; ``dense`` lists ``(name, value)`` of the
    dense teacher arguments, which must all be None. Returns the rows flattened to ``[N, K]``.

    TypeError: not a pair of tensors, float ids, integer logprobs. ValueError: a dense teacher too, shapes (ids vs
    logprobs, token dims vs the hidden states), K = 0, another device, ids outside ``[0, V)`` other than the
    padding ``-1``, a repeated id in a row, a NaN or a log-probability above ``TOPK_MAX_LOGPROB``, a row whose
    ``Σ e^l`` exceeds ``TOPK_MAX_MASS``. The checks cost O(N·K log K) (the duplicate check sorts along K)."""
    given = [name for name, value in dense if value is not None]
    if given:
        raise ValueError(f"give the teacher either densely ({', '.join(given)}) or as teacher_topk, not both")
    if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
        raise TypeError(f"teacher_topk must be a tk.TeacherTopK or an (ids, logprobs) pair of tensors, got "
                        f"{type(teacher_topk).__name__}")
    ids, logprobs = teacher_topk
    for name, t in (("teacher_topk ids", ids), ("teacher_topk logprobs", logprobs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"teacher_topk ids must be an integer tensor, got dtype {ids.dtype}")
    if logprobs.dtype not in FLOAT_DTYPES:
        raise TypeError(f"teacher_topk logprobs must be a floating tensor (float32, float16, bfloat16 or float64), "
                        f"got dtype {logprobs.dtype}")
    if ids.shape != logprobs.shape:
        raise ValueError(f"teacher_topk ids {tuple(ids.shape)} and logprobs {tuple(logprobs.shape)} must have one "
                         "shape")
    if ids.dim() < 1 or ids.shape[:-1] != lead:
        raise ValueError(f"teacher_topk has shape {tuple(ids.shape)}; expected [*token dims, K] with token dims "
                         f"{tuple(lead)} (the hidden states')")
    if ids.shape[-1] == 0:
        raise ValueError(f"teacher_topk has K = 0 ids per token (shape {tuple(ids.shape)}); give at least one")
    for name, t in (("teacher_topk ids", ids), ("teacher_topk logprobs", logprobs)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the hidden states on {device}")
    k = ids.shape[-1]
    ids = ids.reshape(-1, k).long()
    logprobs = logprobs.reshape(-1, k)
    valid = ids != -1
    bad = valid & ((ids < 0) | (ids >= vocab))
    if bool(bad.any()):
        r, c = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"teacher_topk ids out of range: ids[{r}, {c}] (rows flattened) = {int(ids[r, c])}, "
                         f"expected 0 <= id < {vocab} (the student vocabulary) or -1 for padding")
    if k > 1:
        ordered = ids.sort(dim=1).values
        dup = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != -1)
        if bool(dup.any()):
            r, c = (int(i) for i in dup.nonzero()[0])
            raise ValueError(f"teacher_topk ids repeat within a row: id {int(ordered[r, c])} twice in row {r} (rows "
                             "flattened); the ids of a row must be distinct")
    lp = logprobs.double()
    nan = valid & torch.isnan(lp)
    if bool(nan.any()):
        r, c = (int(i) for i in nan.nonzero()[0])
        raise ValueError(f"teacher_topk logprobs has a NaN at [{r}, {c}] (rows flattened)")
    high = valid & (lp > TOPK_MAX_LOGPROB)
    if bool(high.any()):
        r, c = (int(i) for i in high.nonzero()[0])
        raise ValueError(f"teacher_topk logprobs must be log-probabilities (<= 0): [{r}, {c}] (rows flattened) is "
                         f"{float(lp[r, c])}")
    mass = torch.where(valid, lp, torch.full_like(lp, -math.inf)).exp().sum(1)
    over = mass > TOPK_MAX_MASS
    if bool(over.any()):
        r = int(over.nonzero()[0, 0])
        raise ValueError(f"teacher_topk logprobs of row {r} (rows flattened) sum to probability {float(mass[r]):.6g} "
                         f"> {TOPK_MAX_MASS}; they must be the teacher's log-softmax over its full vocabulary")
    return TopKTeacher(ids=torch.where(valid, ids, torch.full_like(ids, -1)), logprobs=logprobs, valid=valid,
                       vocab_size=int(vocab))
