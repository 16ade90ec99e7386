"""``tipkernels demo``: on-policy distillation with TIP selection on a synthetic task, no downloads.

Tasks (:mod:`tipkernels.opd.tasks`): ``sort`` (the quick default, ``"50391>"`` → ``"01359"``, responses of 5–9
tokens) and ``add`` (5-digit addition written out column by column with the carry, responses of 32–33 tokens:
the regime where a retention ratio of 0.2 still keeps ≥ 6 tokens of every sequence). A char-level tokenizer is
built in code (``tokenizers`` WordLevel wrapped in ``PreTrainedTokenizerFast``, so ``generate``,
``save_pretrained`` and ``AutoTokenizer`` all work). Two tiny Llama-architecture models are built from configs: a
teacher, trained supervised to high accuracy, and a smaller student, pre-trained only briefly so that it starts
weak (``add``: until a check set first reaches 20%; its accuracy jumps from 0 to near 1 within a few dozen
steps, so a fixed step count would start some seeds at 0 and others near the teacher). The student is then
distilled on its own rollouts with :class:`OPDTrainer` and a TIP rule; greedy held-out accuracy (the task's answer
checker, and the per-digit accuracy of the answer beside it) is measured before and after. ``--compare`` repeats
the distillation from the same starting student for several ``rule@ratio`` entries, over one or more seeds, and
writes a table (a toy analogue of the TIP paper's Table 5) and a figure of accuracy against steps.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .config import OPDConfig
from .rollout import decode_responses, generate
from .tasks import DIGITS, Task, digit_score, get_task, sort_task
from .trainer import OPDTrainer, lr_lambda, peak_memory_mb

SPECIALS = ("<pad>", "<eos>")
SEP = ">"


# ------------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(chars: str = DIGITS + SEP):
    """A char-level ``PreTrainedTokenizerFast``: ``<pad>`` = 0, ``<eos>`` = 1, then one id per character of
    ``chars`` in order (default: the digits and ``>``, the sort task's vocabulary)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(chars, str) or not chars or len(set(chars)) != len(chars):
        raise ValueError(f"chars must be a non-empty string of distinct characters, got {chars!r}")
    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(chars))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>")


# ----------------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    ffn: int


TEACHER = ModelSize(hidden=128, layers=3, heads=4, ffn=256)
STUDENT = ModelSize(hidden=64, layers=2, heads=4, ffn=128)


def build_model(size: ModelSize, vocab_size: int, seed: int, max_positions: int = 64):
    """A tiny ``LlamaForCausalLM`` (untied lm_head) with weights drawn from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=size.hidden, intermediate_size=size.ffn,
                      num_hidden_layers=size.layers, num_attention_heads=size.heads,
                      num_key_value_heads=size.heads, max_position_embeddings=max_positions, pad_token_id=0,
                      eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    return model


def supervised_train(model, tokenizer, task: Task, *, steps: int, batch_size: int, lr: float, seed: int,
                     desc: str = "supervised", progress: bool = True, check=None, check_every: int = 0,
                     log=None) -> float:
    """Teacher-forced cross-entropy on the answers (prompt tokens masked); returns the last loss.

    ``check``: optional ``check(model) -> bool`` called every ``check_every`` steps (the model in eval mode);
    training stops early once it returns True (the schedule stays the one of ``steps`` steps, so a run that stops
    at step k is the first k steps of the full one). ``log``: optional callable for one line per check.
    Only sets up the demo's models (the vocabulary is tiny); distillation never forms full logits.
    """
    device = next(model.parameters()).device
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(OPDConfig(steps=steps, warmup_steps=min(50, steps // 10), min_lr_ratio=0.05)))
    eos = tokenizer.eos_token_id
    model.train()
    loss = torch.tensor(float("nan"))
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc, dynamic_ncols=True)
    for step in it:
        if check is not None and check_every and step and step % check_every == 0:
            model.eval()
            done = check(model)
            model.train()
            if log is not None:
                log(f"{desc}: step {step}, loss {loss.item():.4f}, target {'reached' if done else 'not reached'}")
            if done:
                break
        rows, labels = [], []
        for _ in range(batch_size):
            p, a = task.sample(rng)
            ip, ia = tokenizer(p)["input_ids"], tokenizer(a)["input_ids"] + [eos]
            rows.append(ip + ia)
            labels.append([-100] * len(ip) + ia)
        width = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows], device=device)
        lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels], device=device)
        lens = torch.tensor([len(r) for r in rows], device=device)
        attn = torch.arange(width, device=device)[None] < lens[:, None]
        loss = model(input_ids=ids, attention_mask=attn.long(), labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if progress:
            it.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model, tokenizer, examples: Sequence[Tuple[str, str]], batch_size: int = 512,
             task: Optional[Task] = None) -> Dict[str, float]:
    """Greedy decoding on ``(prompt, target)`` pairs: "accuracy" (``task.check(prompt, response)`` when a task is
    given, else exact match with the target) and "digit_accuracy" (the mean of ``task.score``, else of
    :func:`~tipkernels.opd.tasks.digit_score` against the target: partial credit, a smoother signal)."""
    correct, digits = 0, 0.0
    max_new = task.max_new_tokens if task is not None else max(len(a) for _, a in examples) + 1
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        roll = generate(model, tokenizer, [p for p, _ in chunk], max_new_tokens=max_new, temperature=0.0)
        outs = decode_responses(tokenizer, roll)
        for out, (p, a) in zip(outs, chunk):
            correct += task.check(p, out) if task is not None else out == a
            digits += task.score(p, out) if task is not None else digit_score(a, out)
    return {"accuracy": correct / len(examples), "digit_accuracy": digits / len(examples)}


def accuracy(model, tokenizer, examples: Sequence[Tuple[str, str]], batch_size: int = 512,
             task: Optional[Task] = None) -> float:
    """The "accuracy" of :func:`evaluate`."""
    return evaluate(model, tokenizer, examples, batch_size, task)["accuracy"]


# --------------------------------------------------------------------------------------------- compare entries


@dataclass(frozen=True)
class Entry:
    """One ``--compare`` entry: a rule at a retention ratio (``all`` always keeps every token, ρ = 1)."""

    rule: str
    ratio: float

    @property
    def label(self) -> str:
        return "all" if self.rule == "all" else f"{self.rule}@{self.ratio:g}"


def parse_compare(text: str, default_ratio: float) -> List[Entry]:
    """Parse ``--compare``: comma-separated ``RULE`` or ``RULE@RATIO`` entries.

    ``RULE`` alone takes ``default_ratio`` (``--ratio``); ``all`` takes no ratio (or ``all@1``). Raises
    ValueError naming the entry for an unknown rule, a ratio that is not a number in (0, 1], an empty entry or a
    duplicate. Example: ``all,random@0.2,entropy_sample@0.5,soft_or@0.2,q3@0.2``.
    """
    from ..inputs import RULES

    if not isinstance(text, str) or not text.strip():
        raise ValueError("--compare needs at least one entry, e.g. all,soft_or@0.2,q3@0.2")
    out: List[Entry] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise ValueError(f"--compare {text!r} has an empty entry")
        rule, at, rtext = item.partition("@")
        rule = rule.strip()
        if rule not in RULES:
            raise ValueError(f"--compare entry {item!r}: unknown rule {rule!r}; choose from {', '.join(RULES)}")
        if at:
            try:
                ratio = float(rtext)
            except ValueError:
                raise ValueError(f"--compare entry {item!r}: ratio {rtext!r} is not a number") from None
        else:
            ratio = 1.0 if rule == "all" else default_ratio
        if not (math.isfinite(ratio) and 0 < ratio <= 1):
            raise ValueError(f"--compare entry {item!r}: ratio must lie in (0, 1], got {ratio:g}")
        if rule == "all" and ratio != 1.0:
            raise ValueError(f"--compare entry {item!r}: 'all' keeps every token, so its ratio is 1; write 'all'")
        e = Entry(rule, ratio)
        if e in out:
            raise ValueError(f"--compare entry {item!r} is listed twice")
        out.append(e)
    return out


# ----------------------------------------------------------------------------------------------- settings


@dataclass
class DemoSettings:
    """Sizes and schedules of the demo for one task (``quick`` shrinks them for CI)."""

    task: Task = field(default_factory=sort_task)
    teacher_steps: int = 700
    teacher_lr: float = 2e-3
    student_warmup_steps: int = 60
    sft_batch: int = 64
    lr_sft_student: float = 2e-3
    opd_steps: int = 300
    opd_batch: int = 32
    opd_lr: float = 2e-3
    n_prompts: int = 2000
    n_eval: int = 500
    eval_interval: int = 25
    max_positions: int = 64
    teacher_target: float = 0.0  # > 0: stop the teacher's training once a check set reaches this accuracy
    teacher_check_every: int = 250
    # > 0: stop the student's warm start once a check set reaches this accuracy (a task whose accuracy jumps from
    # 0 to near 1 within a few dozen steps has no fixed step count that starts every seed weak but not at zero)
    student_target: float = 0.0
    student_check_every: int = 10

    @classmethod
    def for_task(cls, name: str, quick: bool = False) -> "DemoSettings":
        """The default (or ``quick``) settings of the registered task ``name``."""
        get_task(name)  # ValueError for an unknown name
        if name == "sort":
            if quick:
                return cls(task=sort_task(3, 6), teacher_steps=300, student_warmup_steps=30, opd_steps=100,
                           n_eval=300, eval_interval=10)
            return cls()
        from .tasks import add_task

        if quick:  # a smoke test of the pipeline: 3–4-digit sums, a barely trained teacher
            return cls(task=add_task(3, 4), teacher_steps=80, sft_batch=32, student_warmup_steps=20, opd_steps=8,
                       opd_batch=16, n_prompts=200, n_eval=48, eval_interval=4, max_positions=48,
                       student_target=ADD_STUDENT_TARGET)
        return cls(task=add_task(), teacher_steps=1000, teacher_lr=3e-3, teacher_target=0.98,
                   teacher_check_every=100, student_warmup_steps=ADD_WARMUP_STEPS,
                   student_target=ADD_STUDENT_TARGET, opd_steps=ADD_OPD_STEPS, opd_lr=1e-3,
                   opd_batch=32, n_eval=200, eval_interval=10, max_positions=64)

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls.for_task("sort", quick=True)


ADD_WARMUP_STEPS = 600  # at most; the warm start stops at ADD_STUDENT_TARGET
ADD_STUDENT_TARGET = 0.2
ADD_OPD_STEPS = 80


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _reaches(model, *, tokenizer, examples, task, target: float) -> bool:
    """Whether ``model``'s greedy accuracy on ``examples`` reaches ``target`` (the teacher's early stop)."""
    return accuracy(model, tokenizer, examples, task=task) >= target


def teacher_cache_path(settings: DemoSettings, seed: int, vocab_size: int, cache: Path) -> Path:
    """Where the teacher of ``settings`` (trained from ``seed``) is cached under ``cache``: the name hashes every
    setting that shapes its training."""
    t = settings.task
    desc = [t.name, t.summary, t.min_response, t.max_response]
    key = hashlib.sha1(json.dumps([desc, asdict(TEACHER), settings.teacher_steps, settings.teacher_lr,
                                   settings.sft_batch, settings.max_positions, settings.teacher_target,
                                   settings.teacher_check_every, seed, vocab_size]).encode()).hexdigest()[:10]
    return Path(cache) / f"teacher-{t.name}-{key}"


def _teacher(settings: DemoSettings, tokenizer, seed: int, device, cache: Optional[Path], progress: bool,
             log=None):
    """Train (or load from ``cache``) the teacher; returns (model, seconds spent, loaded?)."""
    from transformers import AutoModelForCausalLM

    path = teacher_cache_path(settings, seed, len(tokenizer), cache) if cache is not None else None
    t0 = time.perf_counter()
    if path is not None and (path / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(path).to(device).eval(), time.perf_counter() - t0, True
    teacher = build_model(TEACHER, len(tokenizer), seed=seed, max_positions=settings.max_positions).to(device)
    check = None
    if settings.teacher_target:  # stop once a held-out check set (disjoint seed from eval and prompts) is solved
        check_set = settings.task.examples(128, seed=seed + 3000)
        check = partial(_reaches, tokenizer=tokenizer, examples=check_set, task=settings.task,
                        target=settings.teacher_target)

    supervised_train(teacher, tokenizer, settings.task, steps=settings.teacher_steps, batch_size=settings.sft_batch,
                     lr=settings.teacher_lr, seed=seed + 10, desc="teacher (supervised)", progress=progress,
                     check=check, check_every=settings.teacher_check_every, log=log)
    if path is not None:
        teacher.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return teacher, time.perf_counter() - t0, False


def starting_student(settings: DemoSettings, tokenizer, seed: int, device, progress: bool = False):
    """The starting student of ``seed``: initialised from ``seed + 1``, warm-started supervised (data from
    ``seed + 20``) for ``settings.student_warmup_steps`` steps, or until a check set of its own reaches
    ``settings.student_target``. Returns (model in eval mode, warm-start steps taken)."""
    tk = settings.task
    base = build_model(STUDENT, len(tokenizer), seed=seed + 1, max_positions=settings.max_positions).to(device)
    checks: List[bool] = []
    reach = partial(_reaches, tokenizer=tokenizer, examples=tk.examples(128, seed=seed + 4000), task=tk,
                    target=settings.student_target)  # disjoint seeds from the eval set, prompts, teacher's check

    def check(model) -> bool:
        checks.append(reach(model))
        return checks[-1]

    supervised_train(base, tokenizer, tk, steps=settings.student_warmup_steps, batch_size=settings.sft_batch,
                     lr=settings.lr_sft_student, seed=seed + 20, desc="student warm start", progress=progress,
                     check=check if settings.student_target else None, check_every=settings.student_check_every)
    warm = settings.student_check_every * len(checks) if checks and checks[-1] else settings.student_warmup_steps
    return base, warm


def _summary(history: List[Dict[str, float]]) -> Dict[str, float]:
    sel = sum(r["selected_tokens"] for r in history)
    val = sum(r["valid_tokens"] for r in history)
    out = {"tokens_trained": sel, "tokens_valid": val, "fraction": sel / val if val else 0.0}
    for q in range(1, 5):  # selected-token quadrant shares, token-weighted over the run
        out[f"Q{q}"] = sum(r.get(f"q{q}_selected", 0.0) * r["selected_tokens"] for r in history) / sel if sel else 0.0
    tail = history[-max(1, len(history) // 5):]
    out["kl_end"] = sum(r["reverse_kl"] for r in tail) / len(tail)
    out["response_len"] = sum(r["response_len"] for r in history) / len(history)
    return out


# ----------------------------------------------------------------------------------------- loss-step memory


def loss_step_memory_mb(forward, backward, device: torch.device, params=()) -> float:
    """Memory of one loss step in MiB: ``out = forward()`` then ``backward(out)``; called twice (warm-up, measured).

    CUDA: the peak allocated during the step above what was allocated before it (``max_memory_allocated`` after
    ``reset_peak_memory_stats``). Elsewhere (the CPU has no allocator statistics): the bytes of the distinct
    tensors the forward saves for the backward (``saved_tensors_hooks``), leaving out ``params`` (the weights,
    which exist anyway) — the activation memory that dominates the step's peak and that selection reduces.
    """
    backward(forward())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        backward(forward())
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base) / 2**20
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: Dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    backward(out)
    return sum(seen.values()) / 2**20


def _measure_loss_step(entry: Entry, student, teacher, tokenizer, prompts, settings, backend, device,
                       seed: int) -> float:
    """Memory (:func:`loss_step_memory_mb`) of one OPD loss step of ``entry`` (student and teacher bodies, the
    TIP loss, backward) on a fixed batch of the starting student's rollouts (the same batch for every entry)."""
    from ..loss import TIPDistillationLoss
    from .models import sequence_tip_loss

    model = copy.deepcopy(student).train()
    loss_fn = TIPDistillationLoss(rule=entry.rule, ratio=entry.ratio, backend=backend)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        roll = generate(model, tokenizer, prompts[:settings.opd_batch], max_new_tokens=settings.task.max_new_tokens,
                        temperature=1.0, device=device)
    gen = torch.Generator(device=device)

    def forward():
        gen.manual_seed(seed)
        return sequence_tip_loss(loss_fn, model, teacher, roll.input_ids, roll.attention_mask, roll.response_mask,
                                 generator=gen)

    def backward(out):
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    return loss_step_memory_mb(forward, backward, device, params=list(model.parameters()))


# -------------------------------------------------------------------------------------------------- the demo


def _spread(values: Sequence[float]) -> Tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    vals = [float(v) for v in values]
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _run_seed(job: Dict[str, object], log=None) -> Dict[str, object]:
    """One seed of :func:`run_demo`: the starting student (initialisation and warm start from the seed), the loss
    step's memory (first seed of a comparison only), then every entry from that student. ``job["teacher"]``: the
    model, or a directory to load it from (a worker process). Returns "before", "memory", "runs" (per label),
    "first_runs" (with histories; first seed only) and "log" (the lines logged)."""
    lines: List[str] = []

    def say(msg: str) -> None:
        lines.append(msg)
        if log is not None:
            log(msg)
        else:
            print(msg, flush=True)

    settings = DemoSettings.for_task(job["task"], quick=job["quick"])
    if job["steps"] is not None:
        settings = replace(settings, opd_steps=job["steps"])
    tk, dev, s = settings.task, torch.device(job["device"]), job["seed"]
    first, multi = s == job["first_seed"], job["compare"] or job["seeds"] > 1
    tokenizer = job.get("tokenizer") or build_tokenizer(tk.vocab)
    teacher = job["teacher"]
    if isinstance(teacher, str):
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(teacher).to(dev).eval()
    if job.get("teacher_topk"):  # the sparse path: the loss sees the teacher's top-k log-probabilities only
        from .topk_teacher import HFTopKTeacher

        teacher = HFTopKTeacher(teacher, job["teacher_topk"], vocab_size=len(tokenizer))
    eval_set, train_prompts, progress = job["eval_set"], job["train_prompts"], job["progress"]
    out_dir = Path(job["output_dir"])
    base, warm = starting_student(settings, tokenizer, s, dev, progress)
    start = evaluate(base, tokenizer, eval_set, task=tk)
    before = start["accuracy"]
    n_s = sum(p.numel() for p in base.parameters())
    say(f"seed {s}: student {n_s / 1e3:.0f}k params, brief supervised warm start "
        f"({warm} steps" + (f", stopped at a check set's {settings.student_target:.0%}" if warm <
                            settings.student_warmup_steps else "") + f"), held-out accuracy {before:.1%} "
        f"(digits {start['digit_accuracy']:.1%})")
    memory: Dict[str, Optional[float]] = {}
    if first and multi:  # the loss step's memory: one fixed batch, the same for every entry
        for e in job["entries"]:
            memory[e.label] = _measure_loss_step(e, base, teacher, tokenizer, train_prompts, settings,
                                                 job["backend"], dev, s)

    def eval_fn(model):
        return evaluate(model, tokenizer, eval_set, task=tk)

    runs: Dict[str, Dict[str, object]] = {}
    first_runs: Dict[str, Dict[str, object]] = {}
    for e in job["entries"]:
        student = copy.deepcopy(base)
        sub = (f"opd-{e.label}" if job["compare"] else "opd") + (f"-seed{s}" if job["seeds"] > 1 else "")
        cfg = OPDConfig(rule=e.rule, ratio=e.ratio, backend=job["backend"], max_new_tokens=tk.max_new_tokens,
                        rollout_temperature=1.0, batch_size=settings.opd_batch, steps=settings.opd_steps,
                        lr=settings.opd_lr, warmup_steps=max(1, settings.opd_steps // 20), min_lr_ratio=0.1,
                        grad_clip=1.0, seed=s, eval_interval=settings.eval_interval,
                        output_dir=str(out_dir / sub), progress=progress, plot=False, save_final=not multi)
        trainer = OPDTrainer(student, teacher, tokenizer, train_prompts, cfg, eval_fn=eval_fn)
        t0 = time.perf_counter()
        history = trainer.train()
        secs = time.perf_counter() - t0
        after = history[-1].get("eval_accuracy", float("nan"))
        digits_after = history[-1].get("eval_digit_accuracy", float("nan"))
        summ = _summary(history)
        run = {"seed": s, "accuracy_before": before, "accuracy_after": after,
               "digit_accuracy_before": start["digit_accuracy"], "digit_accuracy_after": digits_after,
               "seconds": secs, "curve": [(r["step"], r["accuracy"]) for r in trainer.eval_history],
               "digit_curve": [(r["step"], r["digit_accuracy"]) for r in trainer.eval_history], **summ}
        runs[e.label] = run
        if first:
            first_runs[e.label] = {**run, "history": history, "evals": trainer.eval_history}
        say(f"OPD {e.label} seed {s}: {settings.opd_steps} steps in {secs:.1f}s; student accuracy "
            f"{before:.1%} -> {after:.1%} (digits {start['digit_accuracy']:.1%} -> {digits_after:.1%}); trained on "
            f"{summ['tokens_trained']:.0f} of {summ['tokens_valid']:.0f} response tokens ({summ['fraction']:.1%}); "
            f"selected quadrant shares "
            + " ".join(f"Q{q} {summ[f'Q{q}']:.0%}" for q in range(1, 5)))
    return {"before": before, "digits_before": start["digit_accuracy"], "warm_steps": warm, "memory": memory,
            "runs": runs, "first_runs": first_runs, "log": lines}


def run_demo(*, quick: bool = False, task: str = "sort", rule: str = "soft_or", ratio: float = 0.5,
             compare=None, seeds: int = 1, jobs: int = 1, steps: Optional[int] = None, seed: int = 0,
             output_dir: str = "runs/demo", backend: str = "auto", device: str = "auto", progress: bool = True,
             cache_teacher: bool = True, teacher_target: Optional[float] = None, log=print,
             teacher_topk: Optional[int] = None) -> Dict[str, object]:
    """Run the demo and return its results (also printed through ``log`` and written to ``output_dir``).

    ``compare``: None (one run of ``rule`` at ``ratio``), a string in ``--compare`` syntax (see
    :func:`parse_compare`), or a list of rule names (each at ``ratio``) or :class:`Entry`. ``seeds``: how many
    seeds (``seed``, ``seed + 1``, ...); each seed draws its own starting student (initialisation and warm start)
    and its own OPD sampling, shared by every entry of that seed. The teacher is trained once (from ``seed``).
    ``jobs`` > 1 runs the seeds in that many processes (same results up to floating-point summation order).
    ``teacher_target``: stop the teacher's supervised training at the first check (every
    ``teacher_check_every`` steps) where a held-out check set reaches this accuracy (default: the task's).
    ``teacher_topk``: distil every entry from the teacher's top-k log-probabilities only
    (:class:`tipkernels.opd.topk_teacher.HFTopKTeacher`, the path of a teacher served elsewhere; ``k`` at most
    the vocabulary) instead of its full distribution.

    Returns a dict with "task", "teacher_accuracy" and "teacher_digit_accuracy", "student_accuracy_before" (the
    mean over seeds; the first seed's alone for one seed), "student_accuracy_before_per_seed",
    "student_digit_accuracy_before_per_seed", "student_warm_start_steps_per_seed", "entries" (per label: "rule",
    "ratio", "per_seed" (list of per-run dicts: "accuracy_after", "digit_accuracy_after", "tokens_trained",
    "fraction", "Q1".."Q4", "kl_end", "response_len", "seconds", "curve" [(step, accuracy)], "digit_curve"
    [(step, per-digit accuracy)]), the same keys as "<key>_mean"/"<key>_std", and "loss_step_memory_mb"), "runs"
    (per label — the rule's name when ``compare`` is None — the first seed's run with its "history" and "evals",
    for the single-run figure), "table" (Markdown), "figure", "peak_mem_mb", "seconds".
    """
    t_start = time.perf_counter()
    settings = DemoSettings.for_task(task, quick=quick)
    if steps is not None:
        settings = replace(settings, opd_steps=steps)
    if teacher_target is not None:
        if not (isinstance(teacher_target, (int, float)) and 0 < teacher_target <= 1):
            raise ValueError(f"teacher_target must lie in (0, 1], got {teacher_target!r}")
        settings = replace(settings, teacher_target=float(teacher_target))
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int ≥ 1, got {seeds!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int ≥ 1, got {jobs!r}")
    if not compare:  # None or empty: a single run of ``rule``
        compare = None
        entries = [Entry(rule, 1.0 if rule == "all" else ratio)]
    elif isinstance(compare, str):
        entries = parse_compare(compare, ratio)
    else:
        entries = [c if isinstance(c, Entry) else Entry(c, 1.0 if c == "all" else ratio) for c in compare]
    for e in entries:  # validate every entry before any training
        OPDConfig(rule=e.rule, ratio=e.ratio, backend=backend)
    multi = compare is not None or seeds > 1
    dev = _device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    random.seed(seed)
    torch.manual_seed(seed)
    tk = settings.task
    tokenizer = build_tokenizer(tk.vocab)
    if teacher_topk is not None and (isinstance(teacher_topk, bool) or not isinstance(teacher_topk, int)
                                     or not 1 <= teacher_topk <= len(tokenizer)):
        raise ValueError(f"teacher_topk must be an int in [1, {len(tokenizer)}] (the {tk.name} task's vocabulary), "
                         f"got {teacher_topk!r}")
    eval_set = tk.examples(settings.n_eval, seed=seed + 1000)
    train_prompts = [p for p, _ in tk.examples(settings.n_prompts, seed=seed + 2000)]
    lens = [len(a) + 1 for _, a in eval_set]
    log(f"task {tk.name}: {tk.summary}; responses {min(lens)}-{max(lens)} tokens (mean {statistics.fmean(lens):.1f})"
        f" with EOS; device {dev}; {'quick' if quick else 'default'} settings; {len(entries)} entr"
        f"{'y' if len(entries) == 1 else 'ies'} x {seeds} seed{'s' if seeds > 1 else ''}, {settings.opd_steps} "
        f"OPD steps each")

    teacher, t_teacher, cached = _teacher(settings, tokenizer, seed, dev, out_dir if cache_teacher else None,
                                          progress, log)
    teacher_eval = evaluate(teacher, tokenizer, eval_set, task=tk)
    teacher_acc = teacher_eval["accuracy"]
    n_t = sum(p.numel() for p in teacher.parameters())
    log(f"teacher: {n_t / 1e3:.0f}k params, {'loaded from cache' if cached else 'trained'} in {t_teacher:.1f}s, "
        f"held-out accuracy {teacher_acc:.1%} (digits {teacher_eval['digit_accuracy']:.1%})")

    per_seed: Dict[str, List[Dict[str, object]]] = {e.label: [] for e in entries}
    first_runs: Dict[str, Dict[str, object]] = {}
    befores: List[float] = []
    digit_befores: List[float] = []
    warm_steps: List[int] = []
    memory: Dict[str, Optional[float]] = {}
    common = dict(task=task, quick=quick, steps=steps, entries=entries, first_seed=seed, seeds=seeds,
                  compare=compare is not None, eval_set=eval_set, train_prompts=train_prompts, backend=backend,
                  device=str(dev), output_dir=str(out_dir), teacher_topk=teacher_topk)
    if jobs > 1 and seeds > 1:  # one process per seed; each loads the teacher from disk
        import concurrent.futures
        import multiprocessing
        import tempfile

        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            teacher.save_pretrained(tmp)
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(min(jobs, seeds), mp_context=ctx) as pool:
                done = list(pool.map(_run_seed, [dict(common, seed=seed + i, teacher=tmp, progress=False)
                                                 for i in range(seeds)]))
    else:
        done = [_run_seed(dict(common, seed=seed + i, teacher=teacher, tokenizer=tokenizer, progress=progress),
                          log=log) for i in range(seeds)]
    for i, res in enumerate(done):
        if jobs > 1 and seeds > 1:
            for line in res["log"]:
                log(line)
        befores.append(res["before"])
        digit_befores.append(res["digits_before"])
        warm_steps.append(res["warm_steps"])
        memory.update(res["memory"])
        for e in entries:
            per_seed[e.label].append(res["runs"][e.label])
        if i == 0:
            first_runs = res["first_runs"]

    results: Dict[str, Dict[str, object]] = {}
    for e in entries:
        runs = per_seed[e.label]
        agg: Dict[str, object] = {"rule": e.rule, "ratio": e.ratio, "per_seed": runs,
                                  "loss_step_memory_mb": memory.get(e.label)}
        for k in ("accuracy_after", "digit_accuracy_after", "tokens_trained", "fraction", "Q1", "Q2", "Q3", "Q4",
                  "kl_end", "seconds", "response_len"):
            agg[f"{k}_mean"], agg[f"{k}_std"] = _spread([r[k] for r in runs])
        results[e.label] = agg
    before_mean, before_std = _spread(befores)
    if compare is None:  # one rule: keyed by its name, as before per-entry ratios existed
        results = {entries[0].rule: results[entries[0].label]}
        first_runs = {entries[0].rule: first_runs[entries[0].label]}

    peak = peak_memory_mb(dev)
    figure = None
    table = None
    try:
        if multi:
            figure = plot_compare(results, out_dir / "compare.png", before=befores,
                                  title=f"tipkernels demo ({tk.name}): held-out accuracy during OPD, mean and "
                                        f"min–max band over {seeds} seed{'s' if seeds > 1 else ''}")
        else:
            from .plot import plot_run

            only = first_runs[entries[0].rule]
            figure = plot_run(only["history"], out_dir / "opd_run.png", evals=only["evals"],
                              title=f"tipkernels demo ({tk.name}): OPD, rule={entries[0].rule}, "
                                    f"ratio={entries[0].ratio:g}")
    except ImportError as err:
        log(f"no figure (matplotlib is missing: pip install matplotlib): {str(err).splitlines()[0]}")
        figure = None

    total = time.perf_counter() - t_start
    if multi:
        table = format_table(results, before_mean, before_std, seeds=seeds, steps=settings.opd_steps, device=dev,
                             digits_before=_spread(digit_befores))
        (out_dir / "compare.md").write_text(
            f"# tipkernels demo --task {tk.name}: {len(entries)} entries x {seeds} seeds, {settings.opd_steps} OPD "
            f"steps\n\nTask: {tk.summary}; responses {min(lens)}-{max(lens)} tokens with EOS. Teacher held-out "
            f"accuracy {teacher_acc:.1%} (digits {teacher_eval['digit_accuracy']:.1%}); starting student "
            f"{before_mean:.1%} ± {before_std:.1%} (digits {statistics.fmean(digit_befores):.1%}). Total "
            f"{total:.0f}s.\n\n{table}\n")
        log("")
        log(table)
    mem = "peak GPU memory allocated" if dev.type == "cuda" else "peak process RSS"
    log(f"\n{mem}: {peak:.0f} MiB; figure: {figure if figure else '(none)'}; total {total:.1f}s")
    summary = {"task": tk.name, "task_summary": tk.summary, "settings": {
                   k: v for k, v in asdict(replace(settings, task=None)).items() if k != "task"},
               "response_len_eval": {"min": min(lens), "max": max(lens), "mean": statistics.fmean(lens)},
               "teacher_accuracy": teacher_acc, "teacher_digit_accuracy": teacher_eval["digit_accuracy"],
               "student_accuracy_before": befores[0] if seeds == 1 else before_mean,
               "student_accuracy_before_per_seed": befores, "student_digit_accuracy_before_per_seed": digit_befores,
               "student_warm_start_steps_per_seed": warm_steps, "seeds": [seed + i for i in range(seeds)],
               "ratio": ratio, "peak_mem_mb": peak, "figure": str(figure) if figure else None, "seconds": total,
               "table": table, "entries": results,
               "runs": {k: {kk: vv for kk, vv in v.items() if kk not in ("history", "evals")}
                        for k, v in first_runs.items()}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["runs"] = first_runs
    return summary


def _pm(mean: float, std: float, pct: bool = True, seeds: int = 1) -> str:
    if pct:
        return f"{mean:.1%}" + (f" ± {std:.1%}" if seeds > 1 else "")
    return f"{mean:.0f}" + (f" ± {std:.0f}" if seeds > 1 else "")


def format_table(results: Dict[str, Dict[str, object]], before: float, before_std: float = 0.0, *, seeds: int = 1,
                 steps: Optional[int] = None, device: Optional[torch.device] = None,
                 digits_before: Optional[Tuple[float, float]] = None) -> str:
    """A Markdown table of the compared entries (mean ± sample standard deviation over seeds). ``digits_before``:
    the starting student's per-digit accuracy (mean, std); the digit columns appear when it is given."""
    mem = ("loss-step peak (MiB)" if device is not None and device.type == "cuda"
           else "loss-step saved activations (MiB)")
    dig = digits_before is not None
    cols = ["rule", "ρ", "acc. before", "acc. after"] + (["digits before", "digits after"] if dig else []) + [
        "tokens trained", "share", "Q1", "Q2", "Q3", "Q4", "KL end", mem, "time/run"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for label, v in results.items():
        rho = "1" if v["rule"] == "all" else f"{v['ratio']:g}"
        m = v.get("loss_step_memory_mb")
        cells = [v["rule"], rho, _pm(before, before_std, seeds=seeds),
                 _pm(v["accuracy_after_mean"], v["accuracy_after_std"], seeds=seeds)]
        if dig:
            cells += [_pm(*digits_before, seeds=seeds),
                      _pm(v["digit_accuracy_after_mean"], v["digit_accuracy_after_std"], seeds=seeds)]
        cells += [_pm(v["tokens_trained_mean"], v["tokens_trained_std"], pct=False, seeds=seeds),
                  f"{v['fraction_mean']:.0%}", *(f"{v[f'Q{q}_mean']:.0%}" for q in range(1, 5)),
                  f"{v['kl_end_mean']:.3f}", "n/a" if m is None else f"{m:.1f}", f"{v['seconds_mean']:.0f}s"]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\n\nMean ± sample standard deviation over {seeds} seeds" if seeds > 1 else "\n\nOne seed") + \
        (f", {steps} OPD steps per run" if steps else "") + \
        ("; acc.: exact match of the greedy answer; digits: its per-digit accuracy" if dig else "") + \
        "; Q1–Q4: quadrant shares of the selected tokens (token-weighted over the run). Loss-step memory: one OPD " \
        "loss step on one fixed batch of the starting student's rollouts; " + \
        ("the CUDA peak above the step's start." if device is not None and device.type == "cuda" else
         "on the CPU, the bytes the forward saves for the backward (weights excluded).")
    return "\n".join(lines) + note


def plot_compare(results: Dict[str, Dict[str, object]], path, *, before: Sequence[float] = (),
                 title: Optional[str] = None) -> Path:
    """Held-out accuracy (exact match, and per digit where the runs recorded it) against OPD steps per entry (mean
    over seeds, min–max band), and the quadrant shares of the selected tokens per entry (stacked bars). Raises
    ImportError without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("matplotlib is needed for the comparison figure") from e
    from .plot import save_figure

    keys = [("curve", "held-out accuracy (exact match)")]
    if all("digit_curve" in r for v in results.values() for r in v["per_seed"]):
        keys.append(("digit_curve", "held-out per-digit accuracy"))
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(6.5 * len(keys) + 5, 4.4),
                             gridspec_kw={"width_ratios": [1.4] * len(keys) + [1]})
    for ax, (key, name) in zip(axes, keys):
        for label, v in results.items():
            curves = [dict(r[key]) for r in v["per_seed"]]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            vals = [[c[s] for c in curves] for s in steps]
            mean = [statistics.fmean(x) for x in vals]
            line, = ax.plot(steps, mean, marker="o", ms=2.5, label=label)
            if len(curves) > 1:
                ax.fill_between(steps, [min(x) for x in vals], [max(x) for x in vals], color=line.get_color(),
                                alpha=0.12)
        ax.set_xlabel("OPD step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    bx = axes[-1]
    labels = list(results)
    bottom = [0.0] * len(labels)
    for q, c in zip(range(1, 5), ("tab:red", "tab:orange", "tab:purple", "tab:green")):
        vals = [results[lab][f"Q{q}_mean"] for lab in labels]
        bx.bar(labels, vals, bottom=bottom, color=c, label=f"Q{q}")
        bottom = [b + x for b, x in zip(bottom, vals)]
    bx.set_title("quadrants of the selected tokens")
    bx.tick_params(axis="x", labelrotation=45, labelsize=7)
    bx.legend(fontsize=7)
    return save_figure(fig, path, title, dpi=90, title_size=10)
