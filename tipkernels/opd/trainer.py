"""``OPDTrainer``: on-policy distillation of a Hugging Face causal LM with TIP token selection.

One optimizer step = ``grad_accum`` micro-batches of::

    prompts ──student.generate──▶ rollouts (response mask: up to and including EOS)
            ──teacher body, no_grad──▶ h_t [B, T-1, D_t]
              (or a top-k teacher, no_grad──▶ TeacherTopK [B, T-1, K]: its top-k log-probabilities)
            ──student body──▶ h_s [B, T-1, D_s]        (hidden i scores token i+1; no logits formed)
            ──TIPDistillationLoss(h_s, W_s, h_t, W_t, mask)──▶ loss ──backward──▶
              (or TIPDistillationLoss(h_s, W_s, mask=mask, teacher_topk=...))
then grad clipping, AdamW, and the warm-up + cosine schedule.

Everything that depends on the number of processes goes through ``trainer.process``, a
:class:`~tipkernels.opd.process.ProcessContext` (one process, or DDP/FSDP2). The trainer owns its state
(:meth:`OPDTrainer.state_dict` / :meth:`OPDTrainer.load_state_dict`); :mod:`tipkernels.opd.checkpoint` only stores
it (docs/design.md §9).
"""

from __future__ import annotations

import json
import math
import random
import resource
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..loss import TIPDistillationLoss
from . import checkpoint, distributed
from .config import OPDConfig
from .models import check_vocab, is_topk_teacher, lm_head, logit_transform, unwrap
from .process import legacy_rng_state, python_rng_list, python_rng_tuple, rng_state
from .rollout import Rollouts, generate, pad_id

Tensor = torch.Tensor
Prompt = Union[str, Sequence[int]]

# the entries of OPDTrainer.state_dict() that load_state_dict needs
STATE_KEYS = ("step", "optimizer", "scheduler", "history", "eval_history", "config", "prompt_order", "prompt_rng",
              "rng")


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
            fewer. It is put in eval mode and never receives gradients. Or a *top-k teacher* (a teacher served
            elsewhere, or precomputed): a callable ``teacher(input_ids [B, T], attention_mask [B, T]) ->
            tipkernels.TeacherTopK`` with ids/logprobs ``[B, T-1, K]``, called under ``no_grad`` on each
            micro-batch's whole sequences; ``[b, i]`` holds the teacher's log-probabilities of token ``i+1`` of row
            ``b`` (the positions of the student's hidden states ``h_s [B, T-1, D]`` it is compared with; see
            :mod:`tipkernels.opd.topk_teacher` for adapters: a local model, vLLM/SGLang, offline files). The loss
            then takes ``teacher_topk=`` with ``config.tail``; the trainer neither moves nor wraps it (it returns
            tensors on any device; they are moved to the student's) and ``teacher_parallel`` must be
            "replicate".
        tokenizer: the shared tokenizer (needs a pad or EOS token; EOS ends responses).
        prompts: list of prompt strings (or token-id lists), sampled without replacement, reshuffled each epoch.
        config: :class:`OPDConfig` (default ``OPDConfig()``).
        eval_fn: optional ``eval_fn(student) -> dict[str, float]``, called every ``eval_interval`` steps and at
            the end; its values are logged with an ``eval_`` prefix.
        teacher_tokenizer: optional; if given it must have the student tokenizer's vocabulary.

    All checks (prompts, vocabularies, devices, dtypes) run in the constructor, before any training.
    ``train()`` returns the list of per-step metric dicts (keys: "step", "loss", "lr", "grad_norm",
    "valid_tokens", "selected_tokens", "selected_fraction", "entropy", "entropy_norm", "reverse_kl",
    "forward_kl", "teacher_entropy" (not with a top-k teacher, which does not give it) and their "*_selected"
    means, "q1_valid".."q4_selected" quadrant shares,
    "response_len", "step_time_s", "peak_mem_mb", and "eval_*" on evaluation steps). They are also appended to
    ``output_dir/metrics.jsonl``; the figure goes to ``output_dir/opd_run.png``; checkpoints to
    ``output_dir/checkpoint-<step>/`` (``student/`` via ``save_pretrained`` in safetensors, plus
    :meth:`state_dict` in ``trainer_state.json`` and ``trainer_state.pt``, and ``manifest.json`` with every file's
    size and SHA-256; written atomically, verified on load without unpickling anything arbitrary, the newest
    ``keep_checkpoints`` kept; see :mod:`tipkernels.opd.checkpoint` and docs/design.md §9).

    ``process``: the :class:`~tipkernels.opd.process.ProcessContext` the loop runs on (``rank``, ``world``,
    ``is_main``; data-parallel under ``config.parallel``).
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
        sparse = is_topk_teacher(teacher)
        if sparse and config.teacher_parallel != "replicate":
            raise ValueError(f"OPDConfig.teacher_parallel={config.teacher_parallel!r} shards a teacher model; a top-k "
                             f"teacher ({type(teacher).__name__}) has none: use teacher_parallel='replicate'")
        self.process = distributed.setup(config, eval_fn)
        device = distributed.device_for(config.device) if config.device else next(student.parameters()).device
        sharded_teacher = config.teacher_parallel == "fsdp"  # moved to the device shard by shard, in wrap()
        if config.device:
            student.to(device)
            if not sharded_teacher and not sparse:
                teacher.to(device)
        t_dev = device if sparse else next(teacher.parameters()).device
        if t_dev != device and not (sharded_teacher and t_dev.type == "cpu"):
            raise ValueError(f"student is on {device} but teacher on {t_dev}: put both on one device "
                             f"(or set OPDConfig.device)")
        self.device = device
        self.student, self.teacher, self.tokenizer = student, teacher, tokenizer
        self.sparse_teacher = sparse
        self.eval_fn = eval_fn
        if not sparse:
            teacher.eval()
            teacher.requires_grad_(False)
        (a_s, c_s), (a_t, c_t) = logit_transform(student, "student"), logit_transform(teacher, "teacher")
        self.loss_fn = TIPDistillationLoss(rule=config.rule, ratio=config.ratio, divergence=config.divergence,
                                           beta=config.beta, temperature=config.temperature,
                                           budget=config.budget, backend=config.backend,
                                           importance_weights=config.importance_weights,
                                           data_process_group=self.process.group,
                                           student_logit_scale=a_s, student_softcap=c_s,
                                           teacher_logit_scale=a_t, teacher_softcap=c_t, tail=config.tail)
        self.process.wrap(student, teacher, self.loss_fn, device)  # before the optimizer: FSDP2 shards the student
        t_dev = device if sparse else next(teacher.parameters()).device
        if t_dev != device:  # pragma: no cover - wrap() places a sharded teacher's shards on the device
            raise ValueError(f"the teacher's shards are on {t_dev}, the student on {device}")
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
        # Our own RNG streams (saved in checkpoints): prompt order (the same on every rank), and the sampling
        # rules' selection (per rank, like the global torch RNG the rollouts sample from).
        self._prompt_rng = random.Random(config.seed)
        self._order: List[int] = []
        rank_seed = self.process.rank_seed(config.seed)
        self._selection_gen = torch.Generator(device=device)
        self._selection_gen.manual_seed(rank_seed + 1)
        torch.manual_seed(rank_seed)

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
        if prompts is None:  # the global batch's prompts, this rank's slice
            prompts = self.process.shard(self._next_prompts(c.batch_size * self.process.world))
        return generate(self.process.generation_model(self.student), self.tokenizer, prompts,
                        max_new_tokens=c.max_new_tokens, temperature=c.rollout_temperature, top_p=c.top_p,
                        top_k=c.top_k, num_return_sequences=c.rollouts_per_prompt, device=self.device)

    def loss(self, rollouts: Rollouts):
        """:class:`tipkernels.TIPLossOutput` of the student on ``rollouts`` (differentiable; no step taken)."""
        return self.process.loss(rollouts.input_ids, rollouts.attention_mask, rollouts.response_mask,
                                 generator=self._selection_gen)

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
        proc = self.process
        for i in range(n_micro):
            roll = self.rollout() if rollouts is None else rollouts[i]
            with proc.sync(i == n_micro - 1):
                out = self.loss(roll)
                scale = proc.loss_scale(out)  # data-parallel: the global weighted mean (tipkernels.opd.distributed)
                (out.loss * scale / n_micro).backward()
            loss_total += float(out.loss.detach()) * (scale / proc.world)
            m = out.metrics
            valid += m["valid_tokens"]
            selected += m["selected_tokens"]
            resp += float(roll.response_lengths.float().mean())
            for k, v in m.items():
                if k in ("valid_tokens", "selected_tokens", "selected_fraction"):
                    continue
                if self.sparse_teacher and k.startswith("teacher_entropy"):
                    continue  # NaN: a top-k teacher does not give its entropy
                w = m["selected_tokens"] if ("selected" in k) else m["valid_tokens"]
                sums[k] = sums.get(k, 0.0) + v * w
                weights[k] = weights.get(k, 0.0) + w
        loss_total, valid, selected, resp, sums, weights = proc.reduce_step(loss_total, valid, selected, resp,
                                                                            sums, weights)
        clip = c.grad_clip if c.grad_clip > 0 else float("inf")
        grad_norm = proc.grad_norm(torch.nn.utils.clip_grad_norm_(self.params, clip))
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
        proc.reduce_record(rec)
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
        res = self.process.mean_dict(res)  # every rank evaluates; the mean over ranks is logged
        self.eval_history.append({"step": self.step, **res})
        return {f"eval_{k}": v for k, v in res.items()}

    def train(self, resume_from: Optional[Union[str, Path]] = None) -> List[Dict[str, float]]:
        """Run until ``config.steps`` optimizer steps; returns ``history`` (all steps, including resumed ones).

        ``resume_from``: a checkpoint directory or ``"latest"``, as for :meth:`load_checkpoint`. A run killed
        after checkpoint k and resumed replays steps k+1.. exactly as the uninterrupted run would (same prompts,
        rollouts and losses; bitwise on the CPU).
        """
        c = self.config
        main = self.process.is_main  # only rank 0 writes files and shows the bar
        if resume_from is not None:
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

    # ----------------------------------------------------------------------------------- state and checkpoints

    def state_dict(self) -> Dict[str, Any]:
        """Everything besides the student's weights needed to continue bit-identically (docs/design.md §9).

        Keys: ``step``; ``optimizer`` and ``scheduler`` (their state dicts); ``history`` and ``eval_history``;
        ``config`` (``OPDConfig.to_dict()``); ``num_prompts``, ``prompt_order`` (the rest of the current epoch)
        and ``prompt_rng`` (the prompt shuffler's Python ``random`` state, as a list); ``rng``: one
        :func:`~tipkernels.opd.process.rng_state` per rank (Python's and NumPy's states as lists; torch's CPU,
        CUDA and selection generators as uint8 tensors); ``world_size`` and ``parallel``.

        Made only of tensors, numbers, strings, None, lists, tuples and dicts, so that a checkpoint stores it as
        JSON plus a weights-only tensor file. Like torch's state dicts it references live optimizer tensors
        (``copy.deepcopy`` it to keep it across further steps). Under ``parallel`` this is collective (every rank
        calls it); with FSDP2 the optimizer state is complete on rank 0 only."""
        return {
            "step": self.step,
            "optimizer": self.process.optimizer_state(unwrap(self.student), self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "history": [dict(r) for r in self.history],
            "eval_history": [dict(r) for r in self.eval_history],
            "config": self.config.to_dict(),
            "num_prompts": len(self.prompts),
            "prompt_order": list(self._order),
            "prompt_rng": python_rng_list(self._prompt_rng.getstate()),
            "rng": self.process.gather(rng_state(self._selection_gen)),
            "world_size": self.process.world,
            "parallel": self.process.mode,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned: optimizer, scheduler, step, histories, prompt order and this
        rank's RNG streams (the weights are the checkpoint's ``student/``, see :meth:`load_checkpoint`).

        Everything is checked before anything changes: a malformed state raises ValueError and leaves the trainer
        as it was. Warns when the state was written with other prompts or another rule, ratio, divergence, tail,
        batch size, accumulation, rollouts per prompt or seed. Under ``parallel`` every rank calls it; a state
        written by another number of processes restarts the per-rank streams from seeds (with a warning)."""
        self._prepare_state(state, "the trainer state")()

    def _prepare_state(self, state: Any, where: str) -> Callable[[], None]:
        """Check ``state`` (ValueError naming ``where``) and return the function that applies it."""
        if not isinstance(state, dict):
            raise ValueError(f"{where} must be a dict, got {type(state).__name__}")
        lacking = [k for k in STATE_KEYS if k not in state]
        if lacking:
            raise ValueError(f"{where} lacks {lacking}")
        step = state["step"]
        if type(step) is not int or step < 0:
            raise ValueError(f"{where}: step must be an int ≥ 0, got {step!r}")
        for name in ("history", "eval_history"):
            if not isinstance(state[name], list) or not all(isinstance(r, dict) for r in state[name]):
                raise ValueError(f"{where}: {name} must be a list of dicts")
        order = state["prompt_order"]
        if not isinstance(order, list) or not all(type(i) is int and i >= 0 for i in order):
            raise ValueError(f"{where}: prompt_order must be a list of prompt indices")
        if any(i >= len(self.prompts) for i in order):
            raise ValueError(f"{where}: its prompt order indexes past this trainer's {len(self.prompts)} prompts")
        try:
            prompt_rng = python_rng_tuple(state["prompt_rng"])
        except ValueError as e:
            raise ValueError(f"{where}: prompt_rng is {e}") from None
        rngs = state["rng"]
        if not isinstance(rngs, (list, tuple)) or not rngs:
            raise ValueError(f"{where}: rng must be a non-empty list of per-rank RNG states")
        try:
            restore_rng = self.process.restore_rng(list(rngs), self._selection_gen, self.config.seed, step, where)
        except ValueError as e:
            raise ValueError(f"{where}: rng: {e}") from None
        optim = state["optimizer"]
        groups = optim.get("param_groups") if isinstance(optim, dict) else None
        if not isinstance(groups, list) or not isinstance(optim.get("state"), dict):
            raise ValueError(f"{where}: optimizer is not an optimizer state dict")
        if all(type(i) is int for g in groups for i in g.get("params", [])):  # keyed by index (not FSDP2's names)
            got = [len(g.get("params", [])) for g in groups]
            want = [len(g["params"]) for g in self.optimizer.param_groups]
            if got != want:
                raise ValueError(f"{where}: the optimizer state has parameter groups of sizes {got}, this "
                                 f"trainer's optimizer {want}")
        if not isinstance(state["scheduler"], dict):
            raise ValueError(f"{where}: scheduler is not a scheduler state dict")
        saved, current = state["config"], self.config.to_dict()
        if not isinstance(saved, dict):
            raise ValueError(f"{where}: config must be a dict")
        n = state.get("num_prompts")
        if n is not None and n != len(self.prompts):
            warnings.warn(f"{where} was written with {n} prompts, this trainer has {len(self.prompts)}: the data "
                          f"order will not continue the original run's")
        for name in ("rule", "ratio", "divergence", "tail", "batch_size", "grad_accum", "rollouts_per_prompt", "seed"):
            if name in saved and saved[name] != current[name]:
                warnings.warn(f"resuming with {name}={current[name]!r}, {where} used {saved[name]!r}")

        def apply() -> None:
            self.process.load_optimizer_state(unwrap(self.student), self.optimizer, optim)
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = step
            self.history = [dict(r) for r in state["history"]]
            self.eval_history = [dict(r) for r in state["eval_history"]]
            self._prompt_rng.setstate(prompt_rng)
            self._order = list(order)
            restore_rng()

        return apply

    def save_checkpoint(self, path: Optional[Union[str, Path]] = None) -> Path:
        """Save ``student/`` (``save_pretrained``, safetensors, with the tokenizer), :meth:`state_dict`
        (``trainer_state.json`` and ``trainer_state.pt``) and ``manifest.json`` (sizes and SHA-256 of the files,
        written last) to ``path`` (default ``output_dir/checkpoint-<step>``), atomically: written into a temporary
        sibling directory, fsynced, then renamed. After a save to the default location, only the newest
        ``config.keep_checkpoints`` checkpoints are kept. Returns the directory. See
        :mod:`tipkernels.opd.checkpoint`. Under ``parallel`` every rank must call it (rank 0 writes)."""
        default = path is None
        path = Path(path) if path is not None else self.output_dir / f"checkpoint-{self.step}"
        model = unwrap(self.student)
        weights = self.process.full_model_state(model)  # None: the model's own
        state = self.state_dict()
        tokenizer = self.tokenizer

        def write_weights(directory: Path) -> None:
            model.save_pretrained(directory, state_dict=weights, safe_serialization=True)
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(directory)

        def write() -> None:
            checkpoint.save(path, self.step, state, write_weights)
            if default:
                checkpoint.prune(self.output_dir, self.config.keep_checkpoints, self.step)

        self.process.on_main(write, f"write checkpoint {path}")
        return path

    def latest_checkpoint(self) -> Path:
        """The newest *complete* checkpoint of ``output_dir`` (manifest present, every file's size and digest
        matching); partial or corrupted ones are skipped with a warning naming them. FileNotFoundError if none."""
        return checkpoint.latest(self.output_dir)

    def load_checkpoint(self, path: Union[str, Path]) -> Path:
        """Restore the student's weights and :meth:`load_state_dict` from the checkpoint directory ``path``, or,
        with ``path="latest"``, from the newest checkpoint of ``output_dir`` that reads cleanly (partial,
        corrupted or refused ones are skipped with a warning naming them; FileNotFoundError if there is none).
        Returns the directory loaded.

        The checkpoint is verified against its manifest and read whole before anything is applied, and nothing
        is unpickled beyond tensors and plain containers (docs/design.md §9): a partial, corrupted, legacy or
        tampered checkpoint raises :class:`tipkernels.opd.checkpoint.CheckpointError` (a ValueError) naming the
        file and the problem, and leaves the trainer untouched. Under ``parallel`` every rank calls it."""
        if isinstance(path, str) and path == "latest":
            path, weights, state = checkpoint.read_latest(self.output_dir)
        else:
            path = Path(path)
            weights, state, _ = checkpoint.read(path)
        apply = self._prepare_state(state, f"checkpoint {path}")
        self.process.load_model_state(unwrap(self.student), weights, path)
        apply()
        self.process.barrier()
        return path


def legacy_state(old: Dict[str, Any]) -> Dict[str, Any]:
    """The trainer state of a format-1 checkpoint (``trainer_state.pt`` as this trainer pickled it: top-level
    ``python_rng``/``torch_rng``/``cuda_rng``/``numpy_rng``/``selection_rng`` of rank 0, ``rank_rng`` of every rank
    when data-parallel) in the :meth:`OPDTrainer.state_dict` layout. Used by
    :func:`tipkernels.opd.checkpoint.convert_legacy`."""
    rank0 = {"python": old["python_rng"], "numpy": old.get("numpy_rng"), "torch": old["torch_rng"],
             "cuda": old.get("cuda_rng"), "selection": old["selection_rng"]}
    return {"step": int(old["step"]), "optimizer": old["optimizer"], "scheduler": old["scheduler"],
            "history": list(old["history"]), "eval_history": list(old.get("eval_history", [])),
            "config": dict(old["config"]), "num_prompts": old.get("num_prompts"),
            "prompt_order": [int(i) for i in old["prompt_order"]],
            "prompt_rng": python_rng_list(old["prompt_rng"]),
            "rng": [legacy_rng_state(r) for r in (old.get("rank_rng") or [rank0])],
            "world_size": int(old.get("world_size", 1)), "parallel": old.get("parallel", "none")}
