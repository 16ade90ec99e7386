"""``OPDTrainer``: on-policy distillation of a Hugging Face causal LM with TIP token selection.

One optimizer step = ``grad_accum`` micro-batches of::

    prompts ──student.generate──▶ rollouts (response mask: up to and including EOS)
            ──teacher body, no_grad──▶ h_t [B, T-1, D_t]
            ──student body──▶ h_s [B, T-1, D_s]        (hidden i scores token i+1; no logits formed)
            ──TIPDistillationLoss(h_s, W_s, h_t, W_t, mask)──▶ loss ──backward──▶
then grad clipping, AdamW, and the warm-up + cosine schedule.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..loss import TIPDistillationLoss
from . import checkpoint, distributed
from .config import OPDConfig
from .models import check_vocab, lm_head, sequence_tip_loss, unwrap
from .rollout import Rollouts, generate, pad_id

Tensor = torch.Tensor
Prompt = Union[str, Sequence[int]]

STATE_FILE = checkpoint.STATE_FILE
_AVERAGED = ("entropy", "entropy_norm", "reverse_kl", "forward_kl", "teacher_entropy")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: CUDA ``max_memory_allocated`` on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def lr_lambda(config: OPDConfig) -> Callable[[int], float]:
    """Multiplier of ``config.lr`` at step ``s``: linear warm-up over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio`` at ``steps`` (or constant)."""
    warm, total, floor = config.warmup_steps, config.steps, config.min_lr_ratio

    def f(s: int) -> float:
        if warm and s < warm:
            return (s + 1) / warm
        if config.schedule == "constant":
            return 1.0
        t = min(1.0, (s - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def check_prompts(prompts) -> List[Prompt]:
    """A non-empty list of non-empty strings or token-id lists (TypeError/ValueError otherwise)."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings or token-id lists, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: OPD needs at least one prompt")
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise ValueError(f"prompts[{i}] is an empty string")
        elif isinstance(p, Sequence) and len(p) > 0 and all(isinstance(t, int) and t >= 0 for t in p):
            pass
        else:
            raise TypeError(f"prompts[{i}] must be a non-empty string or list of token ids, got {p!r:.80}")
    return list(prompts)


class OPDTrainer:
    """On-policy distillation of ``student`` towards ``teacher`` on the student's own rollouts.

    Args:
        student: a Hugging Face causal LM (``*ForCausalLM``), trained in place.
        teacher: a Hugging Face causal LM sharing the tokenizer; its lm_head may have more rows (padding) but not
            fewer. It is put in eval mode and never receives gradients.
        tokenizer: the shared tokenizer (needs a pad or EOS token; EOS ends responses).
        prompts: list of prompt strings (or token-id lists), sampled without replacement, reshuffled each epoch.
        config: :class:`OPDConfig` (default ``OPDConfig()``).
        eval_fn: optional ``eval_fn(student) -> dict[str, float]``, called every ``eval_interval`` steps and at
            the end; its values are logged with an ``eval_`` prefix.
        teacher_tokenizer: optional; if given it must have the student tokenizer's vocabulary.

    All checks (prompts, vocabularies, devices, dtypes) run in the constructor, before any training.
    ``train()`` returns the list of per-step metric dicts (keys: "step", "loss", "lr", "grad_norm",
    "valid_tokens", "selected_tokens", "selected_fraction", "entropy", "entropy_norm", "reverse_kl",
    "forward_kl", "teacher_entropy" and their "*_selected" means, "q1_valid".."q4_selected" quadrant shares,
    "response_len", "step_time_s", "peak_mem_mb", and "eval_*" on evaluation steps). They are also appended to
    ``output_dir/metrics.jsonl``; the figure goes to ``output_dir/opd_run.png``; checkpoints to
    ``output_dir/checkpoint-<step>/`` (``student/`` via ``save_pretrained`` in safetensors, plus
    ``trainer_state.pt`` with optimizer, scheduler, RNG states and step, and ``manifest.json`` with every file's
    size and SHA-256; written atomically, verified on load, the newest ``keep_checkpoints`` kept).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, tokenizer, prompts: Sequence[Prompt],
                 config: Optional[OPDConfig] = None, *, eval_fn: Optional[Callable[[nn.Module], Dict]] = None,
                 teacher_tokenizer=None):
        if config is None:
            config = OPDConfig()
        if not isinstance(config, OPDConfig):
            raise TypeError(f"config must be an OPDConfig, got {type(config).__name__}")
        self.config = config
        self.prompts = check_prompts(prompts)
        if tokenizer is None:
            raise ValueError("a tokenizer is required (it pads prompts and defines EOS)")
        pad_id(tokenizer)  # raises if it can neither pad nor stop
        if not hasattr(unwrap(student), "generate"):
            raise TypeError(f"student must be a Hugging Face causal LM with generate(), got {type(student).__name__}")
        check_vocab(student, teacher, tokenizer, teacher_tokenizer)
        self._dist = distributed.setup(config, eval_fn)  # None in one process
        device = distributed.device_for(config.device) if config.device else next(student.parameters()).device
        if config.device:
            student.to(device)
            teacher.to(device)
        t_dev = next(teacher.parameters()).device
        if t_dev != device:
            raise ValueError(f"student is on {device} but teacher on {t_dev}: put both on one device "
                             f"(or set OPDConfig.device)")
        self.device = device
        self.student, self.teacher, self.tokenizer = student, teacher, tokenizer
        self.eval_fn = eval_fn
        teacher.eval()
        teacher.requires_grad_(False)
        self.loss_fn = TIPDistillationLoss(rule=config.rule, ratio=config.ratio, divergence=config.divergence,
                                           beta=config.beta, temperature=config.temperature,
                                           budget=config.budget, backend=config.backend,
                                           importance_weights=config.importance_weights,
                                           data_process_group=self._dist.group if self._dist else None)
        if self._dist is not None:  # before the optimizer: FSDP2 replaces the parameters with shards
            self._dist.wrap(student, teacher, self.loss_fn, device)
        params = [p for p in student.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the student has no trainable parameters")
        ws, _ = lm_head(student, "student")
        if not ws.requires_grad:
            warnings.warn("the student's lm_head weight is frozen: only the body is trained")
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.step = 0
        self.history: List[Dict[str, float]] = []
        self.eval_history: List[Dict[str, float]] = []
        self.output_dir = Path(config.output_dir)
        # Our own RNG streams (saved in checkpoints): prompt order, and the sampling rules' selection.
        self._prompt_rng = random.Random(config.seed)
        self._order: List[int] = []
        self._selection_gen = torch.Generator(device=device)
        self._selection_gen.manual_seed(config.seed + 1)
        torch.manual_seed(config.seed)  # rollouts sample from the global torch RNG
        if self._dist is not None:
            self._selection_gen.manual_seed(self._dist.selection_seed(config.seed))
            self._dist.seed(config)

    # ------------------------------------------------------------------------------------------------ one step

    def _next_prompts(self, n: int) -> List[Prompt]:
        out = []
        while len(out) < n:
            if not self._order:
                self._order = list(range(len(self.prompts)))
                self._prompt_rng.shuffle(self._order)
            out.append(self.prompts[self._order.pop()])
        return out

    def rollout(self, prompts: Optional[Sequence[Prompt]] = None) -> Rollouts:
        """Student rollouts for ``prompts`` (default: the next ``batch_size`` prompts of the shuffled stream)."""
        c = self.config
        if prompts is None and self._dist is not None:  # the global batch's prompts, this rank's slice
            prompts = self._dist.shard(self._next_prompts(c.batch_size * self._dist.world))
        prompts = self._next_prompts(c.batch_size) if prompts is None else prompts
        model = self.student if self._dist is None else self._dist.generation_model(self.student)
        return generate(model, self.tokenizer, prompts, max_new_tokens=c.max_new_tokens,
                        temperature=c.rollout_temperature, top_p=c.top_p, top_k=c.top_k,
                        num_return_sequences=c.rollouts_per_prompt, device=self.device)

    def loss(self, rollouts: Rollouts):
        """:class:`tipkernels.TIPLossOutput` of the student on ``rollouts`` (differentiable; no step taken)."""
        if self._dist is not None:  # through DDP/FSDP2, so that the backward synchronises gradients
            return self._dist.module(rollouts.input_ids, rollouts.attention_mask, rollouts.response_mask,
                                     generator=self._selection_gen)
        return sequence_tip_loss(self.loss_fn, self.student, self.teacher, rollouts.input_ids,
                                 rollouts.attention_mask, rollouts.response_mask, generator=self._selection_gen)

    def train_step(self, rollouts: Optional[Sequence[Rollouts]] = None) -> Dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics (also kept in ``history``).

        ``rollouts``: optional fixed micro-batches (one per accumulation step) instead of fresh student rollouts.
        """
        c = self.config
        t0 = time.perf_counter()
        self.student.train()
        self.optimizer.zero_grad(set_to_none=True)
        n_micro = c.grad_accum if rollouts is None else len(rollouts)
        sums: Dict[str, float] = {}
        weights: Dict[str, float] = {}
        loss_total, valid, selected, resp = 0.0, 0.0, 0.0, 0.0
        dd = self._dist
        for i in range(n_micro):
            roll = self.rollout() if rollouts is None else rollouts[i]
            scale = 1.0
            with (dd.sync(i == n_micro - 1) if dd is not None else contextlib.nullcontext()):
                out = self.loss(roll)
                if dd is not None:  # global weighted mean over ranks (see tipkernels.opd.distributed)
                    scale = dd.loss_scale(out)
                    (out.loss * scale / n_micro).backward()
                else:
                    (out.loss / n_micro).backward()
            loss_total += float(out.loss.detach()) * (scale / dd.world if dd is not None else 1.0)
            m = out.metrics
            valid += m["valid_tokens"]
            selected += m["selected_tokens"]
            resp += float(roll.response_lengths.float().mean())
            for k, v in m.items():
                if k in ("valid_tokens", "selected_tokens", "selected_fraction"):
                    continue
                w = m["selected_tokens"] if ("selected" in k) else m["valid_tokens"]
                sums[k] = sums.get(k, 0.0) + v * w
                weights[k] = weights.get(k, 0.0) + w
        if dd is not None:
            loss_total, valid, selected, resp, sums, weights = dd.reduce_step(loss_total, valid, selected, resp,
                                                                             sums, weights)
        clip = c.grad_clip if c.grad_clip > 0 else float("inf")
        grad_norm = distributed.Distributed.grad_norm(torch.nn.utils.clip_grad_norm_(self.params, clip))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        rec: Dict[str, float] = {"step": self.step, "loss": loss_total / n_micro, "lr": lr, "grad_norm": grad_norm,
                                 "valid_tokens": valid, "selected_tokens": selected,
                                 "selected_fraction": selected / valid if valid else 0.0}
        rec.update({k: (sums[k] / weights[k] if weights[k] else 0.0) for k in sorted(sums)})
        rec["response_len"] = resp / n_micro
        rec["step_time_s"] = time.perf_counter() - t0
        rec["peak_mem_mb"] = peak_memory_mb(self.device)
        if dd is not None:
            dd.reduce_record(rec)
        self.history.append(rec)
        return rec

    # ------------------------------------------------------------------------------------------------ the loop

    def evaluate(self) -> Dict[str, float]:
        """``eval_fn(student)`` with an ``eval_`` prefix on its keys ({} without an eval_fn); also appended,
        with the step and unprefixed, to ``eval_history``."""
        if self.eval_fn is None:
            return {}
        was = self.student.training
        self.student.eval()
        try:
            res = {k: float(v) for k, v in self.eval_fn(self.student).items()}
        finally:
            self.student.train(was)
        if self._dist is not None:  # every rank evaluates; the mean over ranks is logged
            res = self._dist.mean_dict(res)
        self.eval_history.append({"step": self.step, **res})
        return {f"eval_{k}": v for k, v in res.items()}

    def train(self, resume_from: Optional[Union[str, Path]] = None) -> List[Dict[str, float]]:
        """Run until ``config.steps`` optimizer steps; returns ``history`` (all steps, including resumed ones).

        ``resume_from``: a checkpoint directory (a partial or corrupted one raises ``CheckpointError``, a
        ValueError), or ``"latest"`` for the newest complete one in ``output_dir`` (partial or corrupted ones are
        skipped with a warning). A run killed after checkpoint k and resumed replays steps k+1.. exactly as the
        uninterrupted run would (same prompts, rollouts and losses; bitwise on the CPU).
        """
        c = self.config
        main = self._dist is None or self._dist.is_main  # only rank 0 writes files and shows the bar
        if resume_from == "latest" and self._dist is not None:
            self._dist.load_checkpoint(self, checkpoint.latest(self.output_dir))
        elif resume_from == "latest":
            checkpoint.load_latest(self, self.output_dir)  # skips partial/corrupted ones with a warning
        elif resume_from is not None:
            self.load_checkpoint(resume_from)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.output_dir / "metrics.jsonl"
        if main:
            with open(metrics_path, "w") as f:  # rewritten from the (possibly resumed) history
                for rec in self.history:
                    f.write(json.dumps(rec) + "\n")
        if self.eval_fn is not None and self.step == 0 and not self.eval_history:
            self.evaluate()  # the starting point
        bar = None
        if c.progress and main:
            from tqdm.auto import tqdm

            bar = tqdm(total=c.steps, initial=self.step, desc=f"OPD {c.rule}@{c.ratio:g}", dynamic_ncols=True)
        try:
            while self.step < c.steps:
                rec = self.train_step()
                last = self.step == c.steps
                if self.eval_fn is not None and ((c.eval_interval and self.step % c.eval_interval == 0) or last):
                    rec.update(self.evaluate())
                if main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                if bar is not None:
                    post = {"loss": f"{rec['loss']:.4f}", "sel": f"{rec['selected_fraction']:.2f}",
                            "kl": f"{rec.get('reverse_kl', 0.0):.3f}"}
                    post.update({k[5:]: f"{v:.3f}" for k, v in rec.items() if k.startswith("eval_")})
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if (c.save_interval and self.step % c.save_interval == 0) or (last and c.save_final):
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        if c.plot and self.history and main:
            self.plot()
        return self.history

    def plot(self, path: Optional[Union[str, Path]] = None) -> Optional[Path]:
        """Write the run figure (default ``output_dir/opd_run.png``); warns and returns None without matplotlib."""
        from .plot import MISSING, plot_run

        path = Path(path) if path is not None else self.output_dir / "opd_run.png"
        try:
            return plot_run(self.history, path, title=f"OPD, rule={self.config.rule}, ratio={self.config.ratio:g}",
                            evals=self.eval_history)
        except ImportError:
            warnings.warn(MISSING)
            return None

    # ------------------------------------------------------------------------------------------ checkpointing

    def save_checkpoint(self, path: Optional[Union[str, Path]] = None) -> Path:
        """Save ``student/`` (``save_pretrained``, safetensors, with the tokenizer), ``trainer_state.pt``
        (optimizer, scheduler, step, history, config, prompt order and every RNG state) and ``manifest.json``
        (sizes and SHA-256 of the files, written last) to ``path`` (default ``output_dir/checkpoint-<step>``),
        atomically: written into a temporary sibling directory, fsynced, then renamed. After a save to the
        default location, only the newest ``config.keep_checkpoints`` checkpoints are kept. Returns the directory.
        See :mod:`tipkernels.opd.checkpoint`. Under ``parallel`` every rank must call it (rank 0 writes)."""
        if self._dist is not None:
            return self._dist.save_checkpoint(self, path)
        default = path is None
        path = Path(path) if path is not None else self.output_dir / f"checkpoint-{self.step}"
        checkpoint.save_trainer(self, path)
        if default:
            checkpoint.prune(self.output_dir, self.config.keep_checkpoints, self.step)
        return path

    def latest_checkpoint(self) -> Path:
        """The newest *complete* checkpoint of ``output_dir`` (manifest present, every file's size and digest
        matching); partial or corrupted ones are skipped with a warning naming them. FileNotFoundError if none."""
        return checkpoint.latest(self.output_dir)

    def load_checkpoint(self, path: Union[str, Path]) -> None:
        """Restore the student's weights, optimizer, scheduler, step, history, prompt order and RNG states from
        ``path``, after verifying it against its manifest: a partial or corrupted checkpoint raises
        :class:`tipkernels.opd.checkpoint.CheckpointError` (a ValueError) naming the file and the problem, and
        leaves the trainer untouched."""
        if self._dist is not None:
            return self._dist.load_checkpoint(self, path)
        checkpoint.load_trainer(self, path)


load_weights = checkpoint.load_weights  # kept importable from here
