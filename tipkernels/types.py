"""Result containers shared by the ops, the selection rules and the loss."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, NamedTuple, Optional

import torch

Tensor = torch.Tensor

class TeacherTopK(NamedTuple):
    """A teacher seen only through its top-k log-probabilities per token (a served or offline teacher).

    - ``ids``: int ``[N, K]`` or ``[B, L, K]`` (token dims like the student's hidden states): distinct vocabulary
      ids in ``[0, V)`` per row; ``-1`` pads a row that has fewer than ``K``.
    - ``logprobs``: float, same shape: the teacher's log-softmax over its *full* vocabulary at those ids (``<= 0``,
      may be ``-inf``); ignored where ``ids`` is ``-1``.

    Plain data, never differentiated. A ``(ids, logprobs)`` tuple is accepted wherever this is; the semantics
    (the tail bin, renormalisation) are in docs/design.md.
    """

    ids: Tensor
    logprobs: Tensor


STAT_FIELDS = (
    "student_lse",
    "teacher_lse",
    "entropy",
    "entropy_norm",
    "teacher_entropy",
    "reverse_kl",
    "forward_kl",
    "student_argmax",
    "teacher_argmax",
    "label_logprob",
)


@dataclass
class TokenStats:
    """Per-token statistics of a student (and teacher) softmax, without gradients.

    Every field is a tensor shaped like the hidden states' leading dims (``[N]`` or ``[B, L]``) or ``None``.
    Float fields are fp32; ``student_argmax``/``teacher_argmax`` are int64.

    - ``student_lse`` / ``teacher_lse``: log-sum-exp of the (temperature-scaled) logits.
    - ``entropy``: student entropy ``H`` in nats; ``entropy_norm``: ``H / log V`` in [0, 1].
    - ``teacher_entropy``: teacher entropy in nats (over the shared first ``V_s`` entries).
    - ``reverse_kl``: ``KL(p_student || q_teacher)``; ``forward_kl``: ``KL(q || p)``.
    - ``student_argmax`` / ``teacher_argmax``: index of the largest logit.
    - ``label_logprob``: ``log p_student(label)``, ``None`` unless labels were given.

    Any subset of fields may be given by keyword, so statistics computed elsewhere can feed
    :func:`tipkernels.select_tokens` and :func:`tipkernels.quadrants`; rules check for the fields they read.
    """

    student_lse: Optional[Tensor] = None
    teacher_lse: Optional[Tensor] = None
    entropy: Optional[Tensor] = None
    entropy_norm: Optional[Tensor] = None
    teacher_entropy: Optional[Tensor] = None
    reverse_kl: Optional[Tensor] = None
    forward_kl: Optional[Tensor] = None
    student_argmax: Optional[Tensor] = None
    teacher_argmax: Optional[Tensor] = None
    label_logprob: Optional[Tensor] = None

    def __post_init__(self) -> None:
        shape = None
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"TokenStats.{f.name} must be a torch.Tensor or None, got {type(value).__name__}")
            if shape is None:
                shape = value.shape
            elif value.shape != shape:
                raise ValueError(
                    f"TokenStats fields must share one shape: {f.name} has {tuple(value.shape)}, "
                    f"expected {tuple(shape)}"
                )

    @classmethod
    def from_rows(cls, rows: Dict[str, Tensor], lead_shape, *, vocab_size: int) -> "TokenStats":
        """The stats shaped ``lead_shape`` from a backend's per-row dict (``forward_stats``: ``[N]`` tensors).

        Float fields become fp32 (fp64 when the LSEs are fp64); ``entropy_norm = entropy / log vocab_size`` is added
        (0 when ``vocab_size`` is 1; under vocabulary parallelism pass the global vocabulary)."""
        out_dtype = torch.float64 if rows["student_lse"].dtype == torch.float64 else torch.float32
        out = {k: (v.to(out_dtype) if v.is_floating_point() else v).reshape(lead_shape) for k, v in rows.items()}
        log_v = math.log(vocab_size)
        out["entropy_norm"] = out["entropy"] / log_v if log_v > 0 else torch.zeros_like(out["entropy"])
        return cls(**out)

    @property
    def shape(self) -> Optional[torch.Size]:
        """The common shape of the fields that are set (``None`` if none is)."""
        for name in STAT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                return value.shape
        return None

    def present(self) -> tuple:
        """Names of the fields that are set."""
        return tuple(n for n in STAT_FIELDS if getattr(self, n) is not None)

    def require(self, *names: str, who: str = "this operation") -> None:
        """Raise a ValueError naming the missing fields if any of ``names`` is ``None``."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(
                f"{who} needs TokenStats field(s) {missing}; the given stats only have {list(self.present())}"
            )

    def map(self, fn: Callable[[Tensor], Tensor]) -> "TokenStats":
        """A new TokenStats with ``fn`` applied to every field that is set."""
        return TokenStats(**{n: (None if getattr(self, n) is None else fn(getattr(self, n))) for n in STAT_FIELDS})

    def reshape(self, *shape) -> "TokenStats":
        return self.map(lambda t: t.reshape(*shape))

    def to(self, *args, **kwargs) -> "TokenStats":
        """Move every field (dtype casts apply to float fields only)."""

        def move(t: Tensor) -> Tensor:
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            device = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
            return t if device is None else t.to(device)

        return self.map(move)

    def as_dict(self) -> Dict[str, Tensor]:
        return {n: getattr(self, n) for n in self.present()}


@dataclass
class Selection:
    """Which tokens a TIP rule keeps.

    - ``mask``: bool ``[B, L]``, True for selected tokens (always a subset of the valid mask).
    - ``weights``: float32 ``[B, L]``, the per-token loss weight (1 for selected tokens unless the rule
      asks for importance weights; 0 elsewhere).
    - ``scores``: float32 ``[B, L]``, the rule's score (0 on invalid tokens).
    """

    mask: Tensor
    weights: Tensor
    scores: Tensor

    @property
    def count(self) -> Tensor:
        """Number of selected tokens (a 0-dim tensor on the device, no host sync)."""
        return self.mask.sum()


@dataclass
class TIPLossOutput:
    """What :class:`tipkernels.TIPDistillationLoss` returns.

    - ``loss``: 0-dim tensor, weighted mean divergence over the selected tokens; differentiable in the
      student hidden states, lm_head weight and bias.
    - ``stats``: the no-grad :class:`TokenStats` of every token, shaped ``[B, L]``.
    - ``selection``: the :class:`Selection` made from them.
    - ``metrics``: Python floats (selected fraction, quadrant shares, mean entropy, mean KLs, ...).
    """

    loss: Tensor
    stats: TokenStats
    selection: Selection
    metrics: Dict[str, float] = field(default_factory=dict)

