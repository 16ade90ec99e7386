"""Triton backend (registry name "triton"): the fused kernels behind the contract of
:class:`tipkernels.backends.Backend`.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported; tests).
float64 inputs are computed in fp32 (gradients are returned in float64). Every entry point takes an optional
``config`` dict overriding any key of the resolved launch config (:mod:`.config`).

Layout: :mod:`.config` (block sizes, tuned tables, validation, one resolution per op call), :mod:`.launch` (the
recordable launch and argument packing), :mod:`.common` (``tl`` helpers shared by the kernels), :mod:`.stats` (the
statistics and JSD kernels, their launchers and the host-side merge), :mod:`.backward` (the backward kernels and
their launchers, both strategies), :mod:`.cublas` (the cuBLAS-chunk strategy: cuBLAS logits, Triton epilogues,
and the gradient in the forward's sweep), :mod:`.strategy` (which of them runs a call: the entry points below),
:mod:`.aot` (ahead-of-time sm_90 compiles of the recorded launches). A call ``fused_linear_divergence(...,
backend="triton")`` goes :mod:`tipkernels.ops.divergence` → :mod:`tipkernels.ops.core` (``RowValues``) →
:func:`.stats.forward_stats` / :func:`.backward.backward` → ``stats_kernel`` / ``dlogits_kernel`` (docs/design.md
§3, §4).
"""

from __future__ import annotations

from . import aot  # noqa: F401 - ahead-of-time compiles of the recorded launches (tests, benchmarks)
from . import cublas as _cublas  # noqa: F401 - imports the kernel modules before their names are rebound below
from .config import plan
from .launch import Launch, recorded_launches
from .strategy import backward, forward_stats, fused_value_and_grad, grad_strategy, jsd_forward, jsd_sums

# Capability flags of the backend contract (tipkernels.backends.Backend).
name = "triton"
autograd_native = False
supports_vocab_parallel = True
has_jsd_sums = True

__all__ = ["forward_stats", "jsd_sums", "jsd_forward", "backward", "grad_strategy", "fused_value_and_grad", "plan",
           "recorded_launches", "Launch"]
