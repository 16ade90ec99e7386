"""Drop-in use in TRL: :class:`TIPDistillationTrainer` makes :class:`tipkernels.TIPDistillationLoss` the loss of
TRL's stable ``trl.DistillationTrainer``; :class:`TIPGKDTrainer` does the same for ``GKDTrainer``
(``trl.experimental.gkd``). Both keep TRL's data handling, on-policy generation, accelerate/DeepSpeed plumbing and
logging.

``TIPDistillationTrainer`` overrides only ``DistillationTrainer._compute_loss`` (the part that turns TRL's final
hidden states and lm_head weights into a loss): TRL's own ``_get_last_hidden_state`` still runs both bodies
(through ``_forward_redirection``, so FSDP/DeepSpeed gather their shards), and TRL's ``compute_loss`` still
derives ``num_items_in_batch`` from the generated completions and logs the entropy. The chunked JSD
(``trl.kernels.chunked_divergence``) is replaced by the TIP loss over the same hidden states and mask.

``TIPGKDTrainer`` replaces ``compute_loss``: instead of both models' full logits and TRL's generalised JSD over every
completion token, the student and teacher bodies give final hidden states, and the TIP loss scores every
completion token once (fused, logits-free), selects the informative ones and differentiates only those.
Completion tokens are TRL's ``labels != -100``; token ``j`` is scored by the hidden state at ``j - 1``, as in
TRL's own shift. The default loss is TRL's: ``divergence="jsd"`` with the trainer's ``beta`` (β=0 forward KL,
β=1 reverse KL), temperature 1; pass ``tip_loss=`` to choose the rule, ratio and divergence.

``pip install 'tipkernels[trl]'``. The GKD loss logic itself is :func:`tip_gkd_loss`, usable without TRL.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..loss import TIPDistillationLoss
from ..types import TIPLossOutput
from .models import full_tensor, lm_head, sequence_tip_loss, tip_loss_for

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

_STABLE_IMPORT_ERROR: Optional[ImportError] = None
try:  # the stable on-policy distillation trainer (TRL >= 1.x)
    from trl import DistillationConfig, DistillationTrainer
except ImportError as _err:  # pragma: no cover - exercised only without TRL or with an older TRL
    DistillationConfig = DistillationTrainer = None
    _STABLE_IMPORT_ERROR = _err

TRL_STABLE_MISSING = ("TIPDistillationTrainer needs TRL >= 1.0 with trl.DistillationTrainer: "
                      "pip install 'tipkernels[trl]' (or pip install -U trl)")
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


def _check_tip_loss(tip_loss: Any) -> TIPDistillationLoss:
    if not isinstance(tip_loss, TIPDistillationLoss):
        raise TypeError(f"tip_loss must be a tipkernels.TIPDistillationLoss, got {type(tip_loss).__name__}")
    return tip_loss


def _full_head(weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A plain (gathered) lm_head in ``dtype``. Under FSDP2 the weight is a DTensor: it is gathered once per
    call (its backward reduces the gradient back to the shards), as TRL's own loss does."""
    weight, bias = full_tensor(weight), full_tensor(bias)
    return weight.to(dtype), None if bias is None else bias.to(dtype)


if DistillationTrainer is not None:

    class TIPDistillationTrainer(DistillationTrainer):
        """TRL's ``DistillationTrainer`` with :class:`tipkernels.TIPDistillationLoss` as its loss.

        Same arguments as ``trl.DistillationTrainer`` plus ``tip_loss``: a ``TIPDistillationLoss``. The default
        maps TRL's config: ``divergence="jsd"`` with ``args.beta`` (β=0 forward KL, β=1 reverse KL, TRL's mixture
        ``m = (1-β) p_student + β p_teacher``) and ``args.temperature`` (which TRL also uses for sampling), rule
        "soft_or", ratio 0.5. With ``rule="all"`` the loss and its gradients are TRL's.

        Only ``_compute_loss`` is replaced. The hidden states are TRL's (``_get_last_hidden_state``: ``[B, C, H]``
        aligned to the ``C`` completion tokens), the mask is TRL's ``completion_mask * tool_mask``. The
        normalisation is TRL's: ``Σ_selected w·D / num_items_in_batch`` (the generated-token count of the whole
        generation batch, divided by the process count), or ``/ #valid local tokens`` when TRL passes none
        (evaluation). So a selected token weighs exactly what it weighs in TRL and unselected ones weigh 0; with
        ratio ρ the loss is about ρ times TRL's, and gradient accumulation stays exact.

        Under several processes the selection statistics (Soft-OR's ranges, per-batch budgets) are this
        process's micro-batch's, as TRL's loss is per process; ``tip_loss=TIPDistillationLoss(...,
        data_process_group=group)`` makes them global (a collective inside the loss: every rank must call it).

        TIP metrics (this process's micro-batches, averaged over the logging window) go to TRL's metric store
        and appear in its logs as ``tip/selected_fraction``, ``tip/q1_selected`` .. ``tip/q4_selected``,
        ``tip/entropy_norm``, ``tip/reverse_kl``, ``tip/forward_kl``, next to TRL's own ``entropy``.

        Models whose logits carry a scale or a soft-cap (Gemma 2, Cohere, Granite, ...) have them read from their
        configs and applied in the loss (:func:`tipkernels.opd.models.tip_loss_for`), as TRL does.
        """

        def __init__(self, *args, tip_loss: Optional[TIPDistillationLoss] = None, **kwargs):
            super().__init__(*args, **kwargs)
            if tip_loss is None:
                tip_loss = TIPDistillationLoss(rule="soft_or", ratio=0.5, divergence="jsd", beta=self.beta,
                                               temperature=self.temperature)
            self.tip_loss = _check_tip_loss(tip_loss)
            if self.tip_loss.temperature != self.temperature:
                warnings.warn(f"tip_loss.temperature={self.tip_loss.temperature} differs from the config's "
                              f"temperature={self.temperature} (which TRL uses for sampling); the loss uses "
                              f"tip_loss's", stacklevel=2)
            if self.tip_loss.divergence == "jsd" and self.tip_loss.beta != self.beta:
                warnings.warn(f"tip_loss.beta={self.tip_loss.beta} differs from the config's beta={self.beta}; "
                              f"the loss uses tip_loss's", stacklevel=2)

        def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
            # TRL's contract: (loss, detached sum of the student's per-token entropy, #valid tokens), local.
            input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            loss_mask = inputs["completion_mask"]
            if "tool_mask" in inputs:  # tool results are not the model's tokens
                loss_mask = loss_mask * inputs["tool_mask"]
            logits_to_keep = inputs["completion_ids"].size(1)
            multimodal = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "pixel_attention_mask",
                                                 "spatial_shapes", "image_sizes", "token_type_ids",
                                                 "mm_token_type_ids", "image_position_ids") if k in inputs}

            h_s = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep,
                                              **multimodal)
            self.teacher_model.eval()
            unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
            with torch.no_grad():  # through the teacher's wrapper, so a sharded teacher gathers its layers
                h_t = self._forward_redirection(self.teacher_model, unwrapped_teacher, self._get_last_hidden_state,
                                                unwrapped_teacher, input_ids, attention_mask, logits_to_keep,
                                                **multimodal)
            ws, bs = lm_head(unwrapped_student, "student")
            wt, bt = lm_head(unwrapped_teacher, "teacher")
            # One dtype for the fused ops: the hidden states' (bf16 under autocast/mixed precision).
            dt = h_s.dtype
            ws, bs = _full_head(ws, bs, dt)
            with torch.no_grad():
                wt, bt = _full_head(wt, bt, dt)
            h_s = h_s.to(ws.device)
            h_t = h_t.to(ws.device, dt)
            mask = loss_mask.to(ws.device) != 0
            with torch.autocast(h_s.device.type, enabled=False):  # the kernels choose their accumulation
                # the models' logit scales / soft-caps (Gemma 2, Cohere, Granite, ...) as TRL reads them
                loss_fn = tip_loss_for(self.tip_loss, unwrapped_student, unwrapped_teacher)
                out = loss_fn(h_s, ws, h_t, wt, mask, student_bias=bs, teacher_bias=bt)

            sel = out.selection.mask
            n_valid = mask.sum()
            # out.loss = Σ_sel w·D / Σ_sel w; TRL's normalisation wants Σ_sel w·D / N.
            w_sum = (out.selection.weights * sel).sum().to(out.loss.dtype)
            total = out.loss * w_sum
            if num_items_in_batch is None:
                loss = total / n_valid.clamp(min=1)
            else:
                if isinstance(num_items_in_batch, torch.Tensor):
                    num_items_in_batch = num_items_in_batch.to(total.device)
                loss = total / num_items_in_batch
            entropy_sum = (out.stats.entropy.detach() * mask).sum()

            mode = "train" if self.model.training else "eval"
            for k in _LOGGED:
                if k in out.metrics:
                    self._metrics[mode][f"tip/{k}"].append(float(out.metrics[k]))
            return loss, entropy_sum, n_valid

else:  # pragma: no cover

    class TIPDistillationTrainer:  # type: ignore[no-redef]
        """Placeholder: TRL (with ``trl.DistillationTrainer``) is not installed."""

        def __init__(self, *args, **kwargs):
            raise ImportError(TRL_STABLE_MISSING) from _STABLE_IMPORT_ERROR


__all__ = ["TIPDistillationTrainer", "DistillationConfig", "TIPGKDTrainer", "tip_gkd_loss", "GKDConfig"]
