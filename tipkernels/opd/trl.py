"""Drop-in use in TRL: :class:`TIPGKDTrainer` makes :class:`tipkernels.TIPDistillationLoss` the loss of TRL's
``GKDTrainer`` (``trl.experimental.gkd``), keeping TRL's data handling, on-policy generation (``lmbda``),
accelerate/DeepSpeed plumbing and logging.

What changes is ``compute_loss``: instead of both models' full logits and TRL's generalised JSD over every
completion token, the student and teacher bodies give final hidden states, and the TIP loss scores every
completion token once (fused, logits-free), selects the informative ones and differentiates only those.
Completion tokens are TRL's ``labels != -100``; token ``j`` is scored by the hidden state at ``j - 1``, as in
TRL's own shift. The default loss is TRL's: ``divergence="jsd"`` with the trainer's ``beta`` (β=0 forward KL,
β=1 reverse KL), temperature 1; pass ``tip_loss=`` to choose the rule, ratio and divergence.

``pip install 'tipkernels[trl]'``. The loss logic itself is :func:`tip_gkd_loss`, usable without TRL.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Mapping, Optional

import torch

from ..loss import TIPDistillationLoss
from ..types import TIPLossOutput
from .models import sequence_tip_loss

_IMPORT_ERROR: Optional[ImportError] = None
try:  # optional dependency; GKD lives in trl.experimental since TRL 1.x (its import warns that it is experimental)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDConfig, GKDTrainer
except ImportError as _err:  # pragma: no cover - exercised only without TRL (or with an older layout)
    try:
        from trl import GKDConfig, GKDTrainer
    except ImportError:
        GKDConfig = GKDTrainer = None
        _IMPORT_ERROR = _err

TRL_MISSING = "TIPGKDTrainer needs TRL: pip install 'tipkernels[trl]' (or pip install trl)"
_LOGGED = ("selected_fraction", "reverse_kl", "forward_kl", "entropy_norm", "q1_selected", "q2_selected",
           "q3_selected", "q4_selected")


def tip_gkd_loss(loss_fn: TIPDistillationLoss, model: torch.nn.Module, teacher: torch.nn.Module,
                 inputs: Mapping[str, torch.Tensor]) -> TIPLossOutput:
    """The TIP loss of a TRL GKD batch.

    Args:
        loss_fn: the :class:`tipkernels.TIPDistillationLoss` to apply.
        model, teacher: Hugging Face causal LMs (wrappers such as DDP or PEFT are unwrapped).
        inputs: TRL's batch: ``input_ids`` int64 ``[B, T]``, ``attention_mask`` ``[B, T]``, ``labels`` int64
            ``[B, T]`` equal to the token on completion tokens and -100 elsewhere (prompt, padding).

    Returns:
        :class:`tipkernels.TIPLossOutput` over hidden positions ``[B, T-1]`` (position ``i`` scores token
        ``i + 1``).
    """
    for key in ("input_ids", "labels"):
        if key not in inputs:
            raise KeyError(f"the batch has no {key!r} (keys: {sorted(inputs)})")
    labels = inputs["labels"]
    return sequence_tip_loss(loss_fn, model, teacher, inputs["input_ids"], inputs.get("attention_mask"),
                             labels != -100)


if GKDTrainer is not None:

    class TIPGKDTrainer(GKDTrainer):
        """TRL's ``GKDTrainer`` with :class:`tipkernels.TIPDistillationLoss` as its loss.

        Same arguments as ``GKDTrainer`` plus ``tip_loss``: a ``TIPDistillationLoss`` (default: rule "soft_or",
        ratio 0.5, ``divergence="jsd"`` with ``args.beta``). Logs the mean selected fraction, KLs, normalised
        entropy and selected-quadrant shares under ``tip/*`` with TRL's own logs.

        The loss of a micro-batch is the mean over its selected tokens; the Trainer divides it by the number of
        gradient-accumulation steps (``loss_is_scaled_for_ga = False``). Note that ``GKDTrainer`` itself requires
        equal student/teacher ``vocab_size`` (the TIP loss alone accepts a padded teacher).
        """

        loss_is_scaled_for_ga = False  # transformers' Trainer: divide our mean loss by the accumulation steps

        def __init__(self, *args, tip_loss: Optional[TIPDistillationLoss] = None, **kwargs):
            super().__init__(*args, **kwargs)
            if tip_loss is None:
                tip_loss = TIPDistillationLoss(rule="soft_or", ratio=0.5, divergence="jsd", beta=self.beta)
            if not isinstance(tip_loss, TIPDistillationLoss):
                raise TypeError(f"tip_loss must be a tipkernels.TIPDistillationLoss, got {type(tip_loss).__name__}")
            self.tip_loss = tip_loss
            self._tip_logs: Dict[str, List[float]] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.teacher_model.eval()
            out = tip_gkd_loss(self.tip_loss, model, self.teacher_model, inputs)
            for k in _LOGGED:
                if k in out.metrics:
                    self._tip_logs.setdefault(k, []).append(float(out.metrics[k]))
            return (out.loss, out) if return_outputs else out.loss

        def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
            if self._tip_logs and "loss" in logs:
                for k, v in self._tip_logs.items():
                    logs[f"tip/{k}"] = sum(v) / len(v)
                self._tip_logs = {}
            super().log(logs, *args, **kwargs)

else:  # pragma: no cover

    class TIPGKDTrainer:  # type: ignore[no-redef]
        """Placeholder: TRL is not installed."""

        def __init__(self, *args, **kwargs):
            raise ImportError(TRL_MISSING) from _IMPORT_ERROR


__all__ = ["TIPGKDTrainer", "tip_gkd_loss", "GKDConfig"]
