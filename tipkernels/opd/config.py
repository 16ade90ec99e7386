"""``OPDConfig``: every knob of the thin on-policy distillation loop."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

from ..inputs import BACKENDS, BUDGETS, DIVERGENCES, RULES, SAMPLING_RULES, TAILS, check_choice, check_number

#: OPD-only choices (the library-wide ones are in :mod:`tipkernels.inputs`).
SCHEDULES = ("cosine", "constant")
PARALLEL = ("none", "auto", "ddp", "fsdp")
TEACHER_PARALLEL = ("replicate", "fsdp")


@dataclass
class OPDConfig:
    """Configuration of :class:`tipkernels.opd.OPDTrainer`.

    Loss and selection (passed to :class:`tipkernels.TIPDistillationLoss`):
        rule: TIP rule, one of ``tipkernels.inputs.RULES``; ratio: retention ratio ρ in (0, 1];
        divergence: "reverse_kl" (OPD's), "forward_kl" or "jsd"; beta: JSD's β; temperature: divides both models'
        logits in the loss; budget: "per_sequence" or "per_batch"; backend: "auto" (triton on CUDA, torch
        elsewhere), "torch", "triton" or "reference"; importance_weights: unbiased weights for sampling rules;
        tail: with a top-k teacher only, "bucket" (the K ids plus one bin for the rest of the vocabulary) or
        "renormalize" (both distributions renormalised over the K ids), docs/design.md §1 and §9.

    Rollouts (student ``generate``):
        max_new_tokens; rollout_temperature (sampling temperature; 0 = greedy); top_p; top_k (0 = off);
        rollouts_per_prompt.

    Optimisation:
        batch_size: prompts per micro-batch (each gives ``rollouts_per_prompt`` sequences);
        grad_accum: micro-batches per optimizer step; steps: optimizer steps; lr, weight_decay, adam_betas,
        adam_eps; warmup_steps (linear warm-up), then cosine decay to ``min_lr_ratio · lr`` (``schedule="cosine"``)
        or constant (``"constant"``); grad_clip: max global grad norm (0 = off).

    Bookkeeping:
        seed; eval_interval (steps between ``eval_fn`` calls; 0 = only at the end); log_interval; save_interval
        (steps between checkpoints; 0 = only the final one, when ``save_final``); keep_checkpoints (the newest
        complete checkpoints kept in output_dir, older ones deleted after each new one is complete; 0 = keep all);
        output_dir (metrics.jsonl,
        the figure, checkpoints); progress (tqdm bar); plot (PNG figure at the end, needs matplotlib);
        device (None = the student's).

    Data parallelism (:mod:`tipkernels.opd.distributed`; launch with ``torchrun``):
        parallel: "none" (one process), "ddp" (student under DistributedDataParallel), "fsdp" (student sharded
        with FSDP2 ``fully_shard``, per decoder layer plus the root) or "auto" (ddp when a process group of more
        than one rank is initialised or torchrun's environment describes one, else none). ``batch_size`` is
        then per rank: a micro-batch holds ``world_size · batch_size`` prompts, each rank its own slice;
        selection statistics are global and the loss is the global weighted mean.
        teacher_parallel: "replicate" (every rank holds the whole teacher) or "fsdp" (the teacher's parameters
        sharded with FSDP2 across the data-parallel ranks, per decoder layer plus its body and lm_head; each
        layer's parameters are gathered for its forward and freed after; inference only, the loss unchanged).
        "fsdp" needs ``parallel`` "ddp", "fsdp" or "auto" under a process group; pass the teacher on the CPU
        (it is moved to the device shard by shard).
    """

    rule: str = "soft_or"
    ratio: float = 0.5
    divergence: str = "reverse_kl"
    beta: float = 0.5
    temperature: float = 1.0
    budget: str = "per_sequence"
    backend: str = "auto"
    importance_weights: bool = False
    tail: str = "bucket"

    max_new_tokens: int = 64
    rollout_temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    rollouts_per_prompt: int = 1

    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 100
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    seed: int = 0
    eval_interval: int = 0
    save_interval: int = 0
    save_final: bool = True
    keep_checkpoints: int = 2
    output_dir: str = "runs/opd"
    progress: bool = True
    plot: bool = True
    device: Optional[str] = None
    parallel: str = "none"
    teacher_parallel: str = "replicate"

    def __post_init__(self) -> None:
        def choice(name, options):
            check_choice(f"OPDConfig.{name}", getattr(self, name), options)

        def number(name, lo, hi, **kw):
            check_number(f"OPDConfig.{name}", getattr(self, name), lo, hi, **kw)

        choice("rule", RULES)
        choice("divergence", DIVERGENCES)
        choice("budget", BUDGETS)
        choice("tail", TAILS)
        choice("backend", BACKENDS)
        choice("schedule", SCHEDULES)
        choice("parallel", PARALLEL)
        choice("teacher_parallel", TEACHER_PARALLEL)
        if self.teacher_parallel == "fsdp" and self.parallel == "none":
            raise ValueError("OPDConfig.teacher_parallel='fsdp' shards the teacher across data-parallel ranks: it "
                             "needs parallel='ddp', 'fsdp' or 'auto' (under torchrun), got parallel='none'")
        number("ratio", 0, 1, lo_open=True)
        number("beta", 0, 1)
        number("temperature", 0, math.inf, lo_open=True)
        number("rollout_temperature", 0, math.inf)
        number("top_p", 0, 1, lo_open=True)
        for name in ("max_new_tokens", "rollouts_per_prompt", "batch_size", "grad_accum", "steps"):
            number(name, 1, math.inf, integer=True)
        for name in ("top_k", "warmup_steps", "eval_interval", "save_interval", "seed"):
            number(name, 0, math.inf, integer=True)
        number("keep_checkpoints", 0, math.inf, integer=True)
        number("lr", 0, math.inf, lo_open=True)
        number("weight_decay", 0, math.inf)
        number("adam_eps", 0, math.inf, lo_open=True)
        number("min_lr_ratio", 0, 1)
        number("grad_clip", 0, math.inf)
        if self.importance_weights and self.rule not in SAMPLING_RULES:
            raise ValueError(f"OPDConfig.importance_weights=True needs a sampling rule {SAMPLING_RULES}, "
                             f"got rule={self.rule!r}")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise TypeError(f"OPDConfig.output_dir must be a non-empty str, got {self.output_dir!r}")
        self.adam_betas = tuple(float(b) for b in self.adam_betas)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict of the fields."""
        out = dataclasses.asdict(self)
        out["adam_betas"] = list(self.adam_betas)
        return out

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "OPDConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown OPDConfig fields {unknown}")
        return cls(**d)
