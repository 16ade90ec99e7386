"""Public ops: one module per op family, all dispatching through :mod:`tipkernels.ops.core`."""

from .divergence import divergence_from_logits, fused_linear_divergence
from .entropy import fused_linear_entropy
from .stats import token_stats

__all__ = ["token_stats", "fused_linear_divergence", "fused_linear_entropy", "divergence_from_logits"]
