"""Backends: the contract, the registry and :func:`get_backend` (docs/design.md §3).

A backend computes per-row quantities of a :class:`tipkernels.inputs.Problem`. Four implement :class:`Backend`:

- ``"reference"`` (:mod:`.reference`): materialises ``[N, V]`` logits; autograd does the backward. The truth in tests.
- ``"torch"`` (:mod:`.chunked`): vocabulary-chunked PyTorch, never ``[N, V]``. (The module is not called
  ``torch.py``: importing a submodule sets it as an attribute of this package, so ``tipkernels.backends.torch``
  would shadow the ``torch`` module in this namespace.)
- ``"triton"`` (:mod:`.triton`): the fused Triton kernels; imported only when asked for (it needs triton, and CUDA
  or ``TRITON_INTERPRET=1``). The same shadowing holds for it: nothing here refers to the ``triton`` package.
- :class:`.vocab_parallel.VocabParallelBackend`: wraps one of the others when a ``process_group`` is given.

Callers branch on the capability flags of :class:`Backend`, never on which backend they hold.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable, Dict, Protocol, Tuple, runtime_checkable

import torch

from ..inputs import BACKENDS, Problem, check_choice

Tensor = torch.Tensor


@runtime_checkable
class Backend(Protocol):
    """The contract every backend implements (a module or an object).

    Capability flags:
        name: the registry name ("torch", "triton", "reference"; a vocabulary-parallel wrapper has its local's).
        autograd_native: the backend materialises the logits and ``value`` is differentiable by ordinary autograd
            (the reference); otherwise the ops run the fused :class:`tipkernels.ops.core.RowValues` function,
            whose backward calls ``backward``. Such a backend also gives ``student_logits(prob)`` (the
            materialised ``[N, V]`` logits a top-k teacher's logits are gathered from, docs/design.md §1).
        supports_vocab_parallel: it can run on a vocabulary shard under :class:`.vocab_parallel.VocabParallelBackend`
            (needs ``jsd_sums`` and a backward that reads only the saved global LSEs and values).
        has_jsd_sums: it implements ``jsd_sums`` (the reference gives ``jsd_forward`` only).

    Methods (all per-row outputs are ``[N]``; none keeps a graph):

    ``forward_stats(prob) -> dict``:
        student_lse, entropy (fp32), student_argmax (int64); with a teacher also teacher_lse, teacher_entropy,
        reverse_kl, forward_kl (fp32), teacher_argmax (int64); with labels also label_logprob (fp32; 0 where the
        label is IGNORE_INDEX). fp64 inputs give fp64 on the torch and reference backends.
    ``jsd_sums(prob, student_lse, teacher_lse, beta) -> (kl_qm, kl_pm)`` (when ``has_jsd_sums``):
        per-row sums over this problem's vocabulary of q (log q - log m) and p (log p - log m), unclamped, with p and
        q normalised by the given LSEs (so that vocabulary shards can add them up).
    ``jsd_forward(prob, student_lse, teacher_lse, beta) -> (jsd, kl_pm)``:
        per-row JSD(β) and KL(p ‖ m) (the latter is what the gradient needs); ``combine_jsd`` of the sums where a
        backend has ``jsd_sums``.
    ``backward(prob, kind, grad_rows, saved, beta) -> (d_student, d_weight, d_bias)``:
        kind in :data:`tipkernels.inputs.KINDS`; grad_rows fp32 ``[N]`` is the upstream gradient of each row's value
        (rows where it is 0 are skipped); saved holds the per-row tensors the kind's gradient needs (student_lse
        always; teacher_lse for KL/JSD; :data:`tipkernels.inputs.SAVED_VALUE` [kind]). d_student is d hidden
        ``[N, Ds]`` (or d logits ``[N, V]`` when the student is given as logits), d_weight ``[V, Ds]`` and d_bias
        ``[V]`` (None when absent), each in its input's dtype.
    ``value(prob, kind, beta) -> Tensor`` (only when ``autograd_native``): the differentiable per-row values.
    ``plan(prob) -> Problem``: called once per op call before the others; returns ``prob`` carrying whatever the
        backend resolves per call in ``prob.backend_config`` (the triton backend: its launch config), which the
        other methods then reuse. Rows taken with ``prob.rows`` keep it.

    Optional (the torch and triton backends; :func:`tipkernels.ops.core.reduced_row_values` looks them up):
    ``grad_strategy(prob, upstream_known) -> "fused_grad" | "recompute"`` and
    ``fused_value_and_grad(prob, kind, beta, row_grad) -> (values, d_hidden, d_weight, d_bias)``: the gradient
        formed in the forward's sweep when each row's upstream gradient is known up to one scalar (reductions
        "sum"/"mean"), so the backward recomputes nothing (docs/design.md §2); ``kind`` a dense kind, or, where
        the backend sets ``fused_row_functions = True`` (the torch backend), a row function of the student's
        logits (a top-k teacher's bucket, :class:`tipkernels.ops.topk.BucketRows`).
    """

    name: str
    autograd_native: bool
    supports_vocab_parallel: bool
    has_jsd_sums: bool

    def plan(self, prob: Problem) -> Problem: ...

    def forward_stats(self, prob: Problem) -> Dict[str, Tensor]: ...

    def jsd_forward(self, prob: Problem, student_lse: Tensor, teacher_lse: Tensor,
                    beta: float) -> Tuple[Tensor, Tensor]: ...

    def backward(self, prob: Problem, kind: str, grad_rows: Tensor, saved: Dict[str, Tensor],
                 beta: float = 0.5): ...


def _load_triton(device: torch.device):
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got tensors on {device}); on the CPU use backend='torch', "
            "or set TRITON_INTERPRET=1 before importing triton to run the kernels in Triton's interpreter"
        )
    try:
        return importlib.import_module(".triton", __name__)
    except ModuleNotFoundError as err:  # no triton installed (or the kernels are absent)
        raise NotImplementedError(f"the triton backend is not available here: {err}") from err


#: name -> loader(device) of the backend; modules are imported on first use.
REGISTRY: Dict[str, Callable[[torch.device], Backend]] = {
    "torch": lambda device: importlib.import_module(".chunked", __name__),
    "reference": lambda device: importlib.import_module(".reference", __name__),
    "triton": _load_triton,
}
assert set(REGISTRY) == set(BACKENDS) - {"auto"}, "every backend name is in inputs.BACKENDS"


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend name for ``name`` (one of :data:`tipkernels.inputs.BACKENDS`) and tensors on
    ``device``: "auto" is "triton" on CUDA, "torch" elsewhere."""
    check_choice("backend", name, BACKENDS)
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return name


def get_backend(name: str, device: torch.device, process_group=None, local_vocab: int = 0) -> Backend:
    """The backend ``name`` ("auto" resolved once, here) for tensors on ``device``.

    With ``process_group`` it is wrapped in a :class:`.vocab_parallel.VocabParallelBackend` over this rank's
    ``local_vocab`` lm_head rows (construction is collective: every rank of the group must call this)."""
    be = REGISTRY[resolve(name, device)](device)
    if process_group is None:
        return be
    if not be.supports_vocab_parallel:
        raise ValueError(f"backend={be.name!r} cannot run vocabulary-parallel (its backward recomputes the local "
                         "softmax); use backend='torch' or 'triton' with a process_group")
    from .vocab_parallel import VocabParallelBackend

    return VocabParallelBackend(be, process_group, local_vocab, device)


__all__ = ["Backend", "REGISTRY", "resolve", "get_backend"]
