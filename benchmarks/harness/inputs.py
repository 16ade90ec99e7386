"""The one input generator of every benchmark: random student/teacher hidden states and lm_heads."""

from __future__ import annotations

import math
from typing import Tuple

import torch

#: dtype names the scripts' ``--dtype`` flags accept.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
SHORT_DTYPES = ("bf16", "fp16", "fp32")


def dtype_of(name: str) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` → ``torch.bfloat16`` (and fp16, fp32); ValueError naming the choices."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def make_inputs(n: int, v: int, d_s: int, d_t: int, dtype: torch.dtype, device, seed: int = 0,
                logit_scale: float = 2.0) -> Tuple[torch.Tensor, ...]:
    """``(h_s [n, d_s], w_s [v, d_s], h_t [n, d_t], w_t [v, d_t])`` in ``dtype`` on ``device``: standard normal
    hidden states, lm_heads scaled so the logits have standard deviation ≈ ``logit_scale`` (never zeros).

    The student's tensors require grad; the teacher's do not. The same ``seed`` gives the same tensors.
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, std=1.0):
        t = torch.randn(*shape, generator=g, device=device, dtype=dtype)
        return t.mul_(std) if std != 1.0 else t

    h_s = randn(n, d_s).requires_grad_(True)
    w_s = randn(v, d_s, std=logit_scale / math.sqrt(d_s)).requires_grad_(True)
    h_t = randn(n, d_t)
    w_t = randn(v, d_t, std=logit_scale / math.sqrt(d_t))
    return h_s, w_s, h_t, w_t


def clear_grads(inputs) -> None:
    """Drop the student's gradients (``inputs[0]``, ``inputs[1]``)."""
    inputs[0].grad = None
    inputs[1].grad = None
