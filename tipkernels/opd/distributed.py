"""Multi-process OPD on ``torch.distributed``: the student under DDP or FSDP2, the teacher replicated.

What a step does on each of the ``P`` ranks (``OPDConfig.parallel = "ddp" | "fsdp"``)::

    global prompt stream (same RNG on every rank) ──take P·batch_size──▶ rank r keeps its slice of batch_size
    rollouts: student.generate on this rank's prompts (DDP: the unwrapped module; FSDP2: the sharded root's
              registered ``generate``, with ``synced_gpus`` so every rank runs the same number of forwards)
    loss:     the wrapped module's forward = body + fused TIP loss (the lm_head is used inside it, so FSDP2 has
              it unsharded and reduce-scatters its gradient); selection statistics over the global batch
              (``TIPDistillationLoss(data_process_group=WORLD)``)
    backward: gradients averaged over ranks by DDP (all-reduce) or FSDP2 (reduce-scatter)

**Loss normalisation.** ``TIPDistillationLoss`` returns this rank's weighted mean ``ℓ_r = S_r / W_r`` (``S_r`` the
weighted divergence sum over its selected tokens, ``W_r`` their total weight). DDP and FSDP2 *average* gradients over
ranks, so back-propagating ``ℓ_r`` would optimise ``(1/P) Σ_r ℓ_r``, which equals the global mean
``Σ_r S_r / Σ_r W_r`` only when every rank selects the same weight. We back-propagate instead
``ℓ_r · W_r · P / W`` with ``W = Σ_r W_r`` (one scalar all-reduce per micro-batch): the average over ranks is then
exactly ``Σ_r S_r / W``, the loss one process computes on the whole global batch, and so is the gradient. The
logged ``loss`` is that global value. With ``grad_accum`` micro-batches the step's objective is the mean of the
micro-batches' global losses, as in one process.

Only rank 0 writes ``metrics.jsonl``, the figure and checkpoints and shows the progress bar; metrics are reduced
over ranks first (token-weighted means, summed counts, max of time and memory). Checkpoints have the single-process
layout (``student/`` via ``save_pretrained``, full weights; ``trainer_state.pt`` with a full optimizer state) plus
every rank's RNG states, so a run resumes under DDP, FSDP2 or one process.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint
from .models import body, sequence_tip_loss, unwrap

Tensor = torch.Tensor
_RANK_SEED_STRIDE = 1_000_003


def _torchrun_env() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def resolve_mode(parallel: str) -> str:
    """``"none"``, ``"ddp"`` or ``"fsdp"``: ``"auto"`` is DDP when a process group of more than one rank is
    initialised (or the ``torchrun`` environment describes one), else none."""
    if parallel != "auto":
        return parallel
    if dist.is_available() and dist.is_initialized():
        return "ddp" if dist.get_world_size() > 1 else "none"
    return "ddp" if _torchrun_env() else "none"


def device_for(device: Optional[str]) -> Optional[torch.device]:
    """The device of this rank: a bare ``"cuda"`` under ``torchrun`` becomes ``cuda:$LOCAL_RANK``."""
    if device is None:
        return None
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev


class StudentLoss(nn.Module):
    """What DDP/FSDP2 wrap: the student (its only submodule) and a forward that returns the TIP loss output.

    The teacher and the loss module are held outside the module tree, so they are neither synchronised nor
    sharded; the lm_head weight is read inside ``forward``, where FSDP2 has it unsharded.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, loss_fn: nn.Module, *, synced_generate: bool):
        super().__init__()
        self.model = student
        self._outside = (teacher, loss_fn)  # a tuple: not registered as submodules
        self._synced_generate = synced_generate

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_mask: Tensor, generator=None):
        teacher, loss_fn = self._outside
        return sequence_tip_loss(loss_fn, self.model, teacher, input_ids, attention_mask, token_mask,
                                 generator=generator)

    def generate(self, *args, **kwargs):
        if self._synced_generate:
            kwargs.setdefault("synced_gpus", True)  # every rank keeps stepping until all ranks are done
        return self.model.generate(*args, **kwargs)

    @property
    def generation_config(self):
        return getattr(self.model, "generation_config", None)


class _Bookkeeping:
    """A view of a trainer for :func:`checkpoint.restore_trainer` that restores everything except the weights and
    the optimizer (loaded beforehand through ``torch.distributed.checkpoint`` under FSDP2)."""

    class _Empty(nn.Module):
        pass

    class _NoOptimizer:
        def load_state_dict(self, _state):
            pass

    def __init__(self, trainer):
        object.__setattr__(self, "_t", trainer)
        object.__setattr__(self, "student", self._Empty())
        object.__setattr__(self, "optimizer", self._NoOptimizer())

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_t"), name)

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_t"), name, value)


class Distributed:
    """The data-parallel state of an :class:`~tipkernels.opd.OPDTrainer` (``trainer._dist``)."""

    def __init__(self, mode: str, device_type: str):
        if not dist.is_available():
            raise RuntimeError("OPDConfig.parallel needs torch.distributed, which this torch build lacks")
        if not dist.is_initialized():
            if not _torchrun_env():
                raise ValueError(f"OPDConfig.parallel={mode!r} needs torch.distributed: launch with torchrun "
                                 f"(which sets RANK/WORLD_SIZE/MASTER_ADDR) or call "
                                 f"torch.distributed.init_process_group first")
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
            # the group is ours: tear it down while the interpreter is still whole (gloo's threads racing the
            # interpreter's finalisation can abort the process after training has finished)
            atexit.register(_destroy_if_initialized)
        self.mode = mode
        self.group = dist.group.WORLD
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.is_main = self.rank == 0
        self.comm_device = torch.device("cpu")
        self.wrapper: Optional[StudentLoss] = None
        self.module: Optional[nn.Module] = None  # DDP(wrapper) or the fully_shard-ed wrapper

    # ------------------------------------------------------------------------------------------- set-up

    def wrap(self, student: nn.Module, teacher: nn.Module, loss_fn: nn.Module, device: torch.device) -> None:
        """Wrap the student (in place for FSDP2: its parameters become DTensor shards). Call before the
        optimizer is built."""
        if dist.get_backend(self.group) == "nccl":
            self.comm_device = device
        student = unwrap(student)
        self.wrapper = StudentLoss(student, teacher, loss_fn, synced_generate=self.mode == "fsdp")
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            self.module = DDP(self.wrapper, device_ids=ids)  # broadcasts rank 0's weights
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        with torch.no_grad():  # every rank shards the same weights: rank 0's
            for t in list(student.parameters()) + list(student.buffers()):
                dist.broadcast(t.data, 0, group=self.group)
        mesh = init_device_mesh(device.type, (self.world,))
        for layer in decoder_layers(student):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.wrapper, mesh=mesh)  # the root: embeddings, final norm, lm_head
        register_fsdp_forward_method(self.wrapper, "generate")
        self.module = self.wrapper

    def seed(self, config) -> None:
        """Distinct sampling streams per rank (rank 0 keeps the single-process seed)."""
        if self.rank:
            torch.manual_seed(config.seed + _RANK_SEED_STRIDE * self.rank)

    def selection_seed(self, seed: int) -> int:
        return seed + 1 + _RANK_SEED_STRIDE * self.rank

    # ---------------------------------------------------------------------------------------- one step

    def shard(self, prompts: Sequence[Any]) -> List[Any]:
        """This rank's contiguous slice of the global batch's prompts."""
        per = len(prompts) // self.world
        return list(prompts[self.rank * per:(self.rank + 1) * per])

    def generation_model(self, student: nn.Module) -> nn.Module:
        return self.wrapper if self.mode == "fsdp" else student

    def sync(self, last: bool):
        """Gradient synchronisation only on the last micro-batch of a step."""
        if self.mode == "ddp":
            return contextlib.nullcontext() if last else self.module.no_sync()
        self.module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def loss_scale(self, out) -> float:
        """``W_r · P / W``: makes the rank average of ``ℓ_r · scale`` the global weighted mean (module docstring)."""
        w_local = out.selection.weights.detach().double().sum().to(self.comm_device)
        w = w_local.clone()
        dist.all_reduce(w, group=self.group)
        w_local, w = float(w_local), float(w)
        return w_local * self.world / w if w > 0 else 0.0

    def sum_floats(self, values: Sequence[float], op=None) -> List[float]:
        t = torch.tensor(list(values), dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=self.group)
        return t.tolist()

    def reduce_step(self, loss_total: float, valid: float, selected: float, resp: float,
                    sums: Dict[str, float], weights: Dict[str, float]):
        """Sum the step's accumulators over ranks (``resp`` is averaged: each rank adds its mean length)."""
        keys = sorted(sums)
        flat = self.sum_floats([loss_total, valid, selected, resp] + [sums[k] for k in keys]
                               + [weights[k] for k in keys])
        n = len(keys)
        loss_total, valid, selected, resp = flat[:4]
        sums = dict(zip(keys, flat[4:4 + n]))
        weights = dict(zip(keys, flat[4 + n:]))
        return loss_total, valid, selected, resp / self.world, sums, weights

    def reduce_record(self, rec: Dict[str, float]) -> None:
        """Max over ranks of the step time and peak memory."""
        rec["step_time_s"], rec["peak_mem_mb"] = self.sum_floats([rec["step_time_s"], rec["peak_mem_mb"]],
                                                                 dist.ReduceOp.MAX)

    def mean_dict(self, values: Dict[str, float]) -> Dict[str, float]:
        keys = sorted(values)
        got = self.sum_floats([values[k] for k in keys])
        return {k: v / self.world for k, v in zip(keys, got)}

    @staticmethod
    def grad_norm(norm) -> float:
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # -------------------------------------------------------------------------------------- checkpoints

    def _rank_rng(self, trainer) -> Dict[str, Any]:
        state = {"python": random.getstate(), "torch": torch.get_rng_state(),
                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                 "selection": trainer._selection_gen.get_state()}
        try:
            import numpy as np

            state["numpy"] = np.random.get_state()
        except ImportError:  # pragma: no cover
            pass
        return state

    def _full_state(self, trainer):
        """(model state dict or None, optimizer state dict): full ones on rank 0 under FSDP2 (collective)."""
        if self.mode != "fsdp":
            return None, trainer.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = self.wrapper.model
        return (get_model_state_dict(model, options=opts),
                get_optimizer_state_dict(model, trainer.optimizer, options=opts))

    def save_checkpoint(self, trainer, path: Optional[Union[str, Path]] = None) -> Path:
        """Collective: every rank calls it; rank 0 writes the checkpoint (atomic, with manifest), then all wait."""
        default = path is None
        path = Path(path) if path is not None else trainer.output_dir / f"checkpoint-{trainer.step}"
        sd, optim = self._full_state(trainer)
        rngs: List[Any] = [None] * self.world
        dist.all_gather_object(rngs, self._rank_rng(trainer), group=self.group)
        error = None
        if self.is_main:
            try:
                state = checkpoint.trainer_state(trainer)
                state.update(optimizer=optim, rank_rng=rngs, world_size=self.world, parallel=self.mode)
                model = self.wrapper.model

                def fill(tmp: Path) -> None:
                    model.save_pretrained(tmp / checkpoint.WEIGHTS_DIR, state_dict=sd, safe_serialization=True)
                    if hasattr(trainer.tokenizer, "save_pretrained"):
                        trainer.tokenizer.save_pretrained(tmp / checkpoint.WEIGHTS_DIR)
                    torch.save(state, tmp / checkpoint.STATE_FILE)

                checkpoint.write_atomic(path, trainer.step, fill)
                if default:
                    checkpoint.prune(trainer.output_dir, trainer.config.keep_checkpoints, trainer.step)
            except Exception as e:  # re-raised after the barrier so that the other ranks do not hang
                error = e
        failed = self.sum_floats([1.0 if error is not None else 0.0])[0]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"rank 0 failed to write checkpoint {path}")
        return path

    def load_checkpoint(self, trainer, path: Union[str, Path]) -> None:
        """Every rank reads ``path`` (a shared filesystem) and restores it; FSDP2 loads the full weights and
        optimizer state into its shards. A checkpoint of a different world size resumes with warning: the
        per-rank RNG streams then restart from rank-offset seeds."""
        sd, state, _ = checkpoint.read(path)
        if self.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            model = self.wrapper.model
            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, sd, options=opts)
            optim = _keyed_by_name(state["optimizer"], model, trainer.optimizer)
            set_optimizer_state_dict(model, trainer.optimizer, optim_state_dict=optim, options=opts)
            checkpoint.restore_trainer(_Bookkeeping(trainer), {}, state, path)
        else:
            checkpoint.restore_trainer(trainer, sd, state, path)
        rngs = state.get("rank_rng")
        if rngs is not None and len(rngs) == self.world:
            mine = rngs[self.rank]
            random.setstate(mine["python"])
            torch.set_rng_state(mine["torch"])
            if mine.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(mine["cuda"])
            trainer._selection_gen.set_state(mine["selection"])
            if mine.get("numpy") is not None:
                import numpy as np

                np.random.set_state(mine["numpy"])
        else:
            if self.is_main:
                warnings.warn(f"checkpoint {path} was written by {len(rngs) if rngs else 1} process(es), this run "
                              f"has {self.world}: the per-rank RNG streams restart from seeds")
            self.seed(trainer.config)
            trainer._selection_gen.manual_seed(self.selection_seed(trainer.config.seed) + trainer.step)
        dist.barrier(group=self.group)


def _keyed_by_name(optim: Dict[str, Any], model: nn.Module, optimizer) -> Dict[str, Any]:
    """A plain ``optimizer.state_dict()`` (parameters numbered in param-group order, as one process or DDP saves
    it) re-keyed by parameter name, the form ``set_optimizer_state_dict`` takes; named ones are returned as is."""
    groups = optim.get("param_groups", [])
    if not any(isinstance(i, int) for g in groups for i in g["params"]):
        return optim
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {order[i]: v for i, v in optim["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in groups]}


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: modules of the classes named in the HF model's
    ``_no_split_modules``, else the members of the decoder body's ``nn.ModuleList``s."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names] if names else []
    if not layers:
        layers = [m for ml in body(model, "student").modules() if isinstance(ml, nn.ModuleList) for m in ml]
    return layers


def _destroy_if_initialized() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def setup(config, eval_fn=None) -> Optional[Distributed]:
    """The trainer's distributed state for ``config.parallel`` (None for one process)."""
    mode = resolve_mode(config.parallel)
    if mode == "none":
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            warnings.warn("a torch.distributed process group is initialised but OPDConfig.parallel='none': every "
                          "rank trains its own copy independently (set parallel='ddp' or 'fsdp')")
        return None
    dev = device_for(config.device)
    if mode == "fsdp" and eval_fn is not None:
        raise ValueError("eval_fn is not supported with OPDConfig.parallel='fsdp' (the student's weights are "
                         "sharded); evaluate a saved checkpoint instead, or use parallel='ddp'")
    return Distributed(mode, dev.type if dev is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
