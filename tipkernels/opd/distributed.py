"""Multi-process OPD on ``torch.distributed``: the student under DDP or FSDP2, the teacher replicated or sharded.

What a step does on each of the ``P`` ranks (``OPDConfig.parallel = "ddp" | "fsdp"``)::

    global prompt stream (same RNG on every rank) ──take P·batch_size──▶ rank r keeps its slice of batch_size
    rollouts: student.generate on this rank's prompts (DDP: the unwrapped module; FSDP2: the sharded root's
              registered ``generate``, with ``synced_gpus`` so every rank runs the same number of forwards)
    loss:     the wrapped module's forward = body + fused TIP loss (the lm_head is used inside it, so FSDP2 has
              it unsharded and reduce-scatters its gradient); selection statistics over the global batch
              (``TIPDistillationLoss(data_process_group=WORLD)``)
    backward: gradients averaged over ranks by DDP (all-reduce) or FSDP2 (reduce-scatter)

**Sharded teacher** (``OPDConfig.teacher_parallel = "fsdp"``). Each rank holds ``1/P`` of the teacher's parameters
(FSDP2 ``fully_shard`` per decoder layer, the embeddings, the body and the root, all with
``reshard_after_forward=True``). The
teacher's forward (under ``no_grad``, inside the loss call) all-gathers one layer's parameters, runs it and frees
them; the lm_head is all-gathered for the loss and freed after it. Nothing else changes: the hidden states and
weights the loss sees are the replicated teacher's, so are the loss and the gradients. The teacher is never
trained, so there is no backward through it and no gradient communication.

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
layout (``student/`` via ``save_pretrained``, full weights; the trainer state with a full optimizer state and every
rank's RNG states), written and read by the same trainer code as in one process, so a run resumes under DDP, FSDP2
or one process. :class:`Distributed` is the data-parallel :class:`~tipkernels.opd.process.ProcessContext`
(docs/design.md §9).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .models import body, sequence_tip_loss, unwrap
from .process import ProcessContext, prepare_rng_state

Tensor = torch.Tensor


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


class Distributed(ProcessContext):
    """Data parallelism over a ``torch.distributed`` process group: the :class:`ProcessContext` of DDP and FSDP2
    (``trainer.process``)."""

    def __init__(self, mode: str, device_type: str, teacher_parallel: str = "replicate"):
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
        self.teacher_parallel = teacher_parallel
        self.group = dist.group.WORLD
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.comm_device = torch.device("cpu")
        self.wrapper: Optional[StudentLoss] = None
        self.module: Optional[nn.Module] = None  # DDP(wrapper) or the fully_shard-ed wrapper

    # ------------------------------------------------------------------------------------------- set-up

    def wrap(self, student: nn.Module, teacher: nn.Module, loss_fn: nn.Module, device: torch.device) -> None:
        """Wrap the student (in place for FSDP2: its parameters become DTensor shards). Call before the
        optimizer is built."""
        if dist.get_backend(self.group) == "nccl":
            self.comm_device = device
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        student = unwrap(student)
        mesh = init_device_mesh(device.type, (self.world,)) if "fsdp" in (self.mode, self.teacher_parallel) \
            else None
        if self.teacher_parallel == "fsdp":
            shard_teacher(unwrap(teacher), mesh)
        self.wrapper = StudentLoss(student, teacher, loss_fn, synced_generate=self.mode == "fsdp")
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            self.module = DDP(self.wrapper, device_ids=ids)  # broadcasts rank 0's weights
            return
        with torch.no_grad():  # every rank shards the same weights: rank 0's
            for t in list(student.parameters()) + list(student.buffers()):
                dist.broadcast(t.data, 0, group=self.group)
        for layer in decoder_layers(student):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.wrapper, mesh=mesh)  # the root: embeddings, final norm, lm_head
        register_fsdp_forward_method(self.wrapper, "generate")
        self.module = self.wrapper

    # ---------------------------------------------------------------------------------------- one step

    def generation_model(self, student: nn.Module) -> nn.Module:
        return self.wrapper if self.mode == "fsdp" else student

    def loss(self, input_ids, attention_mask, token_mask, generator=None):
        """Through DDP/FSDP2, so that the backward synchronises gradients."""
        return self.module(input_ids, attention_mask, token_mask, generator=generator)

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
        """Sum the step's accumulators over ranks (``resp`` is averaged: each rank adds its mean length;
        ``loss_total`` was accumulated as this rank's share ``ℓ_r · scale / P`` of the global loss)."""
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

    # -------------------------------------------------------------------------------------- checkpoints
    # The checkpoint has the single-process layout: full weights, a full optimizer state (keyed by parameter
    # index as one process or DDP saves it, by name as FSDP2 does), plus every rank's RNG states.

    def gather(self, obj):
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def full_model_state(self, model: nn.Module):
        if self.mode != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
        if self.mode != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state(self, model: nn.Module, sd: Dict[str, torch.Tensor], where: Any) -> None:
        if self.mode != "fsdp":
            return super().load_model_state(model, sd, where)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True))

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
        if self.mode != "fsdp":
            return super().load_optimizer_state(model, optimizer, state)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_state_dict=_keyed_by_name(state, model, optimizer),
                                 options=StateDictOptions(full_state_dict=True))

    def on_main(self, fn, what: str):
        """Rank 0 runs ``fn``; its exception is re-raised after every rank has learnt of it (no rank hangs)."""
        error, result = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # re-raised after the reduction so that the other ranks do not hang
                error = e
        failed = self.sum_floats([1.0 if error is not None else 0.0])[0]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"rank 0 failed to {what}")
        return result

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def restore_rng(self, saved, selection, seed, step, where):
        """This rank's saved streams when the checkpoint was written by as many processes; otherwise rank 0's
        on every rank, then the per-rank streams restart from rank-offset seeds (with a warning)."""
        if len(saved) == self.world:
            return prepare_rng_state(saved[self.rank], selection)
        apply = prepare_rng_state(saved[0], selection)

        def restart() -> None:
            apply()
            if self.is_main:
                warnings.warn(f"{where} was written by {len(saved)} process(es), this run has "
                              f"{self.world}: the per-rank RNG streams restart from seeds")
            if self.rank:
                torch.manual_seed(self.rank_seed(seed))
            selection.manual_seed(self.rank_seed(seed) + 1 + step)

        return restart

    def close(self) -> None:
        _destroy_if_initialized()


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


def decoder_layers(model: nn.Module, who: str = "student") -> List[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: modules of the classes named in the HF model's
    ``_no_split_modules``, else the members of the decoder body's ``nn.ModuleList``s."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names] if names else []
    if not layers:
        layers = [m for ml in body(model, who).modules() if isinstance(ml, nn.ModuleList) for m in ml]
    return layers


def shard_teacher(teacher: nn.Module, mesh) -> None:
    """Shard a frozen teacher's parameters over ``mesh`` with FSDP2, in place, for inference.

    Units: each decoder layer, the input embeddings, then the decoder body (the final norm: the loss calls the
    body directly, so it must be an FSDP unit of its own), then the root (the lm_head and anything left). Every unit reshards
    after its forward, the body too (an explicit ``reshard_after_forward=True`` overrides FSDP2's keep-the-root-
    unsharded default, which suits training only). Parameters move to the mesh's device unit by unit, so a
    teacher on the CPU never has more than one unit's full weights on the device.

    Every rank must hold the same weights (load the same checkpoint on each): each keeps its own slice.
    Tied input/output embeddings are refused (ValueError): one parameter cannot live in two units.
    """
    from torch.distributed.fsdp import fully_shard

    head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    inp = teacher.get_input_embeddings() if hasattr(teacher, "get_input_embeddings") else None
    if head is not None and inp is not None and getattr(head, "weight", None) is getattr(inp, "weight", 0):
        raise ValueError("teacher_parallel='fsdp' needs a teacher with untied input and output embeddings "
                         "(tie_word_embeddings=False); use teacher_parallel='replicate' for this teacher")
    teacher.requires_grad_(False)
    for layer in decoder_layers(teacher, "teacher"):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    if inp is not None and any(True for _ in inp.parameters()):  # a unit of its own: not held for the whole body
        fully_shard(inp, mesh=mesh, reshard_after_forward=True)
    fully_shard(body(teacher, "teacher"), mesh=mesh, reshard_after_forward=True)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True)


def _destroy_if_initialized() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def setup(config, eval_fn=None) -> ProcessContext:
    """The trainer's :class:`ProcessContext` for ``config.parallel``: the single-process one, or
    :class:`Distributed` for DDP/FSDP2."""
    mode = resolve_mode(config.parallel)
    teacher_parallel = getattr(config, "teacher_parallel", "replicate")
    if mode == "none" and teacher_parallel == "fsdp":
        raise ValueError("OPDConfig.teacher_parallel='fsdp' needs data parallelism: launch with torchrun (or "
                         "initialise a process group of more than one rank) and set parallel='ddp' or 'fsdp'")
    if mode == "none":
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            warnings.warn("a torch.distributed process group is initialised but OPDConfig.parallel='none': every "
                          "rank trains its own copy independently (set parallel='ddp' or 'fsdp')")
        return ProcessContext()
    dev = device_for(config.device)
    if mode == "fsdp" and eval_fn is not None:
        raise ValueError("eval_fn is not supported with OPDConfig.parallel='fsdp' (the student's weights are "
                         "sharded); evaluate a saved checkpoint instead, or use parallel='ddp'")
    return Distributed(mode, dev.type if dev is not None else ("cuda" if torch.cuda.is_available() else "cpu"),
                       teacher_parallel)
