"""The thin on-policy distillation (OPD) loop over Hugging Face causal LMs, its CLI and the embedded demo.

- :class:`OPDConfig`, :class:`OPDTrainer`: rollouts with ``generate`` → teacher/student final hidden states →
  :class:`tipkernels.TIPDistillationLoss` → AdamW (see ``trainer.py``).
- :func:`sequence_tip_loss`: the TIP loss of a student against a teacher on given token sequences (the shared piece
  of the trainer, the TRL adapter and ``examples/plain_pytorch_opd.py``).
- :func:`run_demo`: ``tipkernels demo``.
"""

from .config import OPDConfig
from .demo import run_demo
from .models import check_vocab, final_hidden_states, lm_head, logit_transform, sequence_tip_loss
from .prompts import load_prompts
from .rollout import Rollouts, generate
from .trainer import OPDTrainer

__all__ = ["OPDConfig", "OPDTrainer", "run_demo", "sequence_tip_loss", "final_hidden_states", "lm_head", "logit_transform",
           "check_vocab", "load_prompts", "generate", "Rollouts"]
