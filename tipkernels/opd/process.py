"""How the OPD loop runs across processes, behind one small interface (docs/design.md §9).

:class:`ProcessContext` is what :class:`~tipkernels.opd.OPDTrainer` calls for everything that depends on the
number of processes: which prompts this rank takes, the loss call, gradient synchronisation, reductions of the
step's metrics, full state dicts for checkpoints, running a write on rank 0 only, and which saved RNG streams this
rank resumes. This base class is the single-process case (rank 0 of 1), where each of those is trivial;
:class:`tipkernels.opd.distributed.Distributed` overrides them for DDP and FSDP2.

The RNG state of one process is captured by :func:`rng_state` and restored through :func:`prepare_rng_state` on
every path; Python's and NumPy's states are stored as JSON-able lists, torch's as uint8 tensors.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch import nn

from .models import apply_weights, sequence_tip_loss

RANK_SEED_STRIDE = 1_000_003
T = TypeVar("T")


# --------------------------------------------------------------------------------------------- RNG states


def python_rng_list(state: Tuple) -> List[Any]:
    """``random.getstate()`` (``(3, (625 ints), gauss)``) as a JSON-able list."""
    version, internal, gauss = state
    return [int(version), [int(x) for x in internal], gauss]


def python_rng_tuple(state: Sequence[Any]) -> Tuple:
    """The inverse of :func:`python_rng_list`, checked on a scratch generator (ValueError if malformed)."""
    try:
        version, internal, gauss = state
        out = (int(version), tuple(int(x) for x in internal), None if gauss is None else float(gauss))
        random.Random().setstate(out)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"not a Python random state: {type(e).__name__}: {e}") from None
    return out


def _numpy_rng_list(state: Tuple) -> List[Any]:
    name, keys, pos, has_gauss, cached = state
    return [str(name), [int(x) for x in keys], int(pos), int(has_gauss), float(cached)]


def _numpy_rng_tuple(state: Sequence[Any]) -> Tuple:
    import numpy as np

    try:
        name, keys, pos, has_gauss, cached = state
        out = (str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
        np.random.RandomState().set_state(out)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"not a NumPy random state: {type(e).__name__}: {e}") from None
    return out


def rng_state(selection: torch.Generator) -> Dict[str, Any]:
    """Every random stream this process draws from: Python's ``random``, NumPy's global generator (if NumPy is
    installed), torch's CPU and CUDA generators, and the trainer's ``selection`` generator (sampling rules)."""
    state: Dict[str, Any] = {"python": python_rng_list(random.getstate()),
                             "torch": torch.get_rng_state(),
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                             "selection": selection.get_state(), "numpy": None}
    try:
        import numpy as np

        state["numpy"] = _numpy_rng_list(np.random.get_state())
    except ImportError:  # pragma: no cover
        pass
    return state


def legacy_rng_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """A format-1 RNG dict (tuples, a NumPy array) in the current, JSON-able form."""
    out = dict(state)
    out["python"] = python_rng_list(state["python"])
    out["numpy"] = _numpy_rng_list(state["numpy"]) if state.get("numpy") is not None else None
    out.setdefault("cuda", None)
    return out


def prepare_rng_state(state: Any, selection: torch.Generator) -> Callable[[], None]:
    """Check a :func:`rng_state` dict (ValueError naming what is wrong; the states are tried on scratch
    generators) and return the function that applies it to the global generators and ``selection``; nothing is
    changed before that function is called."""
    if not isinstance(state, dict):
        raise ValueError(f"an RNG state must be a dict, got {type(state).__name__}")
    lacking = [k for k in ("python", "torch", "selection") if k not in state]
    if lacking:
        raise ValueError(f"the RNG state lacks {lacking}")
    py = python_rng_tuple(state["python"])
    np_state = _numpy_rng_tuple(state["numpy"]) if state.get("numpy") is not None else None
    tensors = [state["torch"], state["selection"]] + list(state.get("cuda") or [])
    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 for t in tensors):
        raise ValueError("the torch RNG states must be 1-D uint8 tensors")
    for name, device in (("torch", "cpu"), ("selection", selection.device)):
        try:
            torch.Generator(device=device).set_state(state[name])
        except RuntimeError as e:
            raise ValueError(f"the {name} RNG state does not fit a {device} generator: {e}") from None

    def apply() -> None:
        random.setstate(py)
        torch.set_rng_state(state["torch"])
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        selection.set_state(state["selection"])
        if np_state is not None:
            import numpy as np

            np.random.set_state(np_state)

    return apply


# ------------------------------------------------------------------------------------------ the interface


class ProcessContext:
    """One process: the trivial implementation of the interface the trainer runs on (see the module docstring).

    Attributes: ``mode`` ("none", "ddp" or "fsdp"), ``rank``, ``world`` (number of processes), ``is_main``
    (rank 0: writes files and shows the progress bar), ``group`` (the data process group handed to
    :class:`tipkernels.TIPDistillationLoss`; None here).
    """

    mode = "none"
    rank = 0
    world = 1
    group = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------- set-up

    def wrap(self, student: nn.Module, teacher: nn.Module, loss_fn: nn.Module, device: torch.device) -> None:
        """Prepare the loss call (and, data-parallel, wrap the student). Called before the optimizer is built."""
        self._parts = (student, teacher, loss_fn)

    def rank_seed(self, seed: int) -> int:
        """This rank's seed for torch's global generator (the selection generator takes it + 1); rank 0 keeps
        ``seed``, so one process and rank 0 of many draw the same streams."""
        return seed + RANK_SEED_STRIDE * self.rank

    # ---------------------------------------------------------------------------------------- one step

    def shard(self, prompts: Sequence[T]) -> List[T]:
        """This rank's contiguous slice of a global batch's prompts (``len(prompts)`` divisible by ``world``)."""
        per = len(prompts) // self.world
        return list(prompts[self.rank * per:(self.rank + 1) * per])

    def generation_model(self, student: nn.Module) -> nn.Module:
        """What ``generate`` is called on."""
        return student

    def loss(self, input_ids, attention_mask, token_mask, generator=None):
        """The TIP loss output of the student on one micro-batch (differentiable)."""
        student, teacher, loss_fn = self._parts
        return sequence_tip_loss(loss_fn, student, teacher, input_ids, attention_mask, token_mask,
                                 generator=generator)

    def sync(self, last: bool):
        """Context of a micro-batch's forward and backward: gradients synchronise only when ``last``."""
        return contextlib.nullcontext()

    def loss_scale(self, out) -> float:
        """Factor on this rank's loss before backward (1 here; the global-mean weighting data-parallel)."""
        return 1.0

    def reduce_step(self, loss_total: float, valid: float, selected: float, resp: float,
                    sums: Dict[str, float], weights: Dict[str, float]):
        """A step's accumulators combined over ranks (unchanged here)."""
        return loss_total, valid, selected, resp, sums, weights

    def reduce_record(self, rec: Dict[str, float]) -> None:
        """Step time and peak memory of the slowest / largest rank, in place (nothing to do here)."""

    def mean_dict(self, values: Dict[str, float]) -> Dict[str, float]:
        """The mean over ranks of each value (``values`` itself here)."""
        return values

    @staticmethod
    def grad_norm(norm) -> float:
        """``clip_grad_norm_``'s result as a float (FSDP2 returns a DTensor)."""
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # -------------------------------------------------------------------------------------- checkpoints

    def gather(self, obj: T) -> List[T]:
        """``obj`` of every rank, in rank order (collective)."""
        return [obj]

    def full_model_state(self, model: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
        """The full state dict to save for ``model`` (the unwrapped student), or None for its own (collective)."""
        return None

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
        """The full optimizer state dict to save (collective; under FSDP2 complete on rank 0 only)."""
        return optimizer.state_dict()

    def load_model_state(self, model: nn.Module, sd: Dict[str, torch.Tensor], where: Any) -> None:
        """Load a full state dict into ``model`` (the unwrapped student)."""
        apply_weights(model, sd, where)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
        """Load a full optimizer state dict (as :meth:`optimizer_state` returned, from any process layout)."""
        optimizer.load_state_dict(state)

    def on_main(self, fn: Callable[[], T], what: str) -> Optional[T]:
        """Run ``fn`` on rank 0 only; every rank raises if it failed (collective). ``what`` names it in errors."""
        return fn()

    def barrier(self) -> None:
        """Wait for every rank."""

    def restore_rng(self, saved: Sequence[Dict[str, Any]], selection: torch.Generator, seed: int, step: int,
                    where: Any) -> Callable[[], None]:
        """Check the per-rank RNG states of a checkpoint (``saved[r]`` written by rank ``r``) and return the
        function that restores this rank's streams. One process resumes rank 0's streams, whatever the number of
        processes that wrote them."""
        return prepare_rng_state(saved[0], selection)

    def close(self) -> None:
        """Tear down what this context set up (the process group, data-parallel)."""
