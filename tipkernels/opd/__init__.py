"""The thin on-policy distillation (OPD) loop over Hugging Face causal LMs, its CLI and the embedded demo.

- :class:`OPDConfig`, :class:`OPDTrainer`: rollouts with ``generate`` → teacher/student final hidden states →
  :class:`tipkernels.TIPDistillationLoss` → AdamW (see ``trainer.py``).
- :func:`sequence_tip_loss`: the TIP loss of a student against a teacher on given token sequences (the shared piece
  of the trainer, the TRL adapter and ``examples/plain_pytorch_opd.py``).
- :func:`run_demo`: ``tipkernels demo``.
- Top-k teachers (a teacher served elsewhere or precomputed, seen through its top-k log-probabilities; see
  :mod:`tipkernels.opd.topk_teacher`): :class:`HFTopKTeacher`, :class:`ServedTopKTeacher`,
  :class:`PrecomputedTopKTeacher`, :func:`topk_logprobs`, the vLLM/SGLang converters and the file readers/writers.
"""

from .config import OPDConfig
from .demo import run_demo
from .models import check_vocab, final_hidden_states, lm_head, logit_transform, sequence_tip_loss
from .prompts import load_prompts
from .rollout import Rollouts, generate
from .topk_teacher import (HFTopKTeacher, PrecomputedTopKTeacher, ServedTopKTeacher, TopKTable,
                           from_sglang_input_logprobs, from_vllm_prompt_logprobs, pack_rows, read_topk_jsonl,
                           read_topk_safetensors, topk_logprobs, unpack_rows, write_topk_jsonl,
                           write_topk_safetensors)
from .trainer import OPDTrainer

__all__ = ["OPDConfig", "OPDTrainer", "run_demo", "sequence_tip_loss", "final_hidden_states", "lm_head", "logit_transform",
           "check_vocab", "load_prompts", "generate", "Rollouts", "HFTopKTeacher", "ServedTopKTeacher",
           "PrecomputedTopKTeacher", "TopKTable", "topk_logprobs", "from_vllm_prompt_logprobs",
           "from_sglang_input_logprobs", "pack_rows", "unpack_rows", "read_topk_safetensors", "write_topk_safetensors",
           "read_topk_jsonl", "write_topk_jsonl"]
