"""tipkernels: fused kernels for token-importance on-policy distillation (TIP).

Per-token softmax statistics, entropy and teacher–student divergences straight from hidden states and lm_head
weights, chunked over the vocabulary (never ``[tokens, vocab]`` logits); token-importance selection rules; and a
drop-in loss that differentiates only the selected tokens. See docs/design.md for the math.
"""

from .options import set_options
from .loss import TIPDistillationLoss
from .ops import divergence_from_logits, fused_linear_divergence, fused_linear_entropy, token_stats
from .selection import quadrant_shares, quadrants, select_tokens
from .types import Selection, TeacherTopK, TIPLossOutput, TokenStats

__version__ = "0.1.0"

__all__ = [
    "token_stats",
    "fused_linear_divergence",
    "fused_linear_entropy",
    "divergence_from_logits",
    "select_tokens",
    "quadrants",
    "quadrant_shares",
    "TIPDistillationLoss",
    "set_options",
    "TokenStats",
    "TeacherTopK",
    "Selection",
    "TIPLossOutput",
]
