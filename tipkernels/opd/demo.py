"""``tipkernels demo``: on-policy distillation with TIP selection on a synthetic task, no downloads.

The task: sort a string of digits (``"50391>"`` → ``"01359"`` then EOS). A char-level tokenizer is built in code
(``tokenizers`` WordLevel wrapped in ``PreTrainedTokenizerFast``, so ``generate``, ``save_pretrained`` and
``AutoTokenizer`` all work). Two tiny Llama-architecture models are built from configs: a teacher, trained
supervised to high accuracy, and a smaller student, pre-trained only briefly so that it starts weak. The student
is then distilled on its own rollouts with :class:`OPDTrainer` and a TIP rule; greedy exact-match accuracy on a
held-out set is measured before and after. ``--compare`` repeats the distillation from the same starting student
for several rules at one retention ratio and prints a table (a toy analogue of the TIP paper's Table 5).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .config import OPDConfig
from .rollout import decode_responses, generate
from .trainer import OPDTrainer, lr_lambda, peak_memory_mb

DIGITS = "0123456789"
SPECIALS = ("<pad>", "<eos>")
SEP = ">"


# ------------------------------------------------------------------------------------------ task and tokenizer


def build_tokenizer():
    """A char-level ``PreTrainedTokenizerFast``: ``<pad>`` = 0, ``<eos>`` = 1, then the digits and ``>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(DIGITS) + (SEP,))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>")


@dataclass(frozen=True)
class SortTask:
    """Sort ``min_len``–``max_len`` random digits; the prompt ends with ``>``, the answer is the sorted digits."""

    min_len: int = 4
    max_len: int = 8

    def sample(self, rng: random.Random) -> Tuple[str, str]:
        s = "".join(rng.choice(DIGITS) for _ in range(rng.randint(self.min_len, self.max_len)))
        return s + SEP, "".join(sorted(s))

    def examples(self, n: int, seed: int) -> List[Tuple[str, str]]:
        rng = random.Random(seed)
        return [self.sample(rng) for _ in range(n)]

    @property
    def max_new_tokens(self) -> int:
        return self.max_len + 1  # the digits and EOS


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


def supervised_train(model, tokenizer, task: SortTask, *, steps: int, batch_size: int, lr: float, seed: int,
                     desc: str = "supervised", progress: bool = True) -> float:
    """Teacher-forced cross-entropy on the answers (prompt tokens masked); returns the last loss.

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
    for _ in it:
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
def accuracy(model, tokenizer, examples: Sequence[Tuple[str, str]], batch_size: int = 512) -> float:
    """Greedy-decoding exact-match accuracy on ``(prompt, answer)`` pairs."""
    correct = 0
    max_new = max(len(a) for _, a in examples) + 1
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        roll = generate(model, tokenizer, [p for p, _ in chunk], max_new_tokens=max_new, temperature=0.0)
        correct += sum(out == a for out, (_, a) in zip(decode_responses(tokenizer, roll), chunk))
    return correct / len(examples)


# -------------------------------------------------------------------------------------------------- the demo


@dataclass
class DemoSettings:
    """Sizes and schedules of the demo (``quick`` shrinks them for CI)."""

    task: SortTask = SortTask()
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

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(task=SortTask(3, 6), teacher_steps=300, student_warmup_steps=30, opd_steps=100, n_eval=300,
                   eval_interval=10)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _teacher(settings: DemoSettings, tokenizer, seed: int, device, cache: Optional[Path], progress: bool):
    """Train (or load from ``cache``) the teacher; returns (model, seconds spent, loaded?)."""
    from transformers import AutoModelForCausalLM

    key = hashlib.sha1(json.dumps([asdict(settings.task), asdict(TEACHER), settings.teacher_steps,
                                   settings.teacher_lr, settings.sft_batch, seed, len(tokenizer)]).encode()
                       ).hexdigest()[:10]
    path = cache / f"teacher-{key}" if cache is not None else None
    t0 = time.perf_counter()
    if path is not None and (path / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(path).to(device).eval(), time.perf_counter() - t0, True
    teacher = build_model(TEACHER, len(tokenizer), seed=seed).to(device)
    supervised_train(teacher, tokenizer, settings.task, steps=settings.teacher_steps, batch_size=settings.sft_batch,
                     lr=settings.teacher_lr, seed=seed + 10, desc="teacher (supervised)", progress=progress)
    if path is not None:
        teacher.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return teacher, time.perf_counter() - t0, False


def _summary(history: List[Dict[str, float]]) -> Dict[str, float]:
    sel = sum(r["selected_tokens"] for r in history)
    val = sum(r["valid_tokens"] for r in history)
    out = {"tokens_trained": sel, "tokens_valid": val, "fraction": sel / val if val else 0.0}
    for q in range(1, 5):  # selected-token quadrant shares, token-weighted over the run
        out[f"Q{q}"] = sum(r.get(f"q{q}_selected", 0.0) * r["selected_tokens"] for r in history) / sel if sel else 0.0
    tail = history[-max(1, len(history) // 5):]
    out["kl_end"] = sum(r["reverse_kl"] for r in tail) / len(tail)
    return out


def run_demo(*, quick: bool = False, rule: str = "soft_or", ratio: float = 0.5, compare: Optional[List[str]] = None,
             steps: Optional[int] = None, seed: int = 0, output_dir: str = "runs/demo", backend: str = "auto",
             device: str = "auto", progress: bool = True, cache_teacher: bool = True,
             log=print) -> Dict[str, object]:
    """Run the demo and return its results (also printed through ``log`` and written to ``output_dir``).

    Returns a dict with "teacher_accuracy", "student_accuracy_before", "runs" (per rule: "accuracy_after",
    "tokens_trained", "fraction", "Q1".."Q4", "kl_end", "seconds", "history"), "peak_mem_mb", "figure",
    "seconds".
    """
    t_start = time.perf_counter()
    settings = DemoSettings.quick() if quick else DemoSettings()
    if steps is not None:
        settings = replace(settings, opd_steps=steps)
    rules = list(compare) if compare else [rule]
    for r in rules:  # validate every rule before any training
        OPDConfig(rule=r, ratio=ratio, backend=backend)
    dev = _device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    random.seed(seed)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    task = settings.task
    eval_set = task.examples(settings.n_eval, seed=seed + 1000)
    train_prompts = [p for p, _ in task.examples(settings.n_prompts, seed=seed + 2000)]
    log(f"task: sort {task.min_len}-{task.max_len} digits ('50391>' -> '01359'); device {dev}; "
        f"{'quick' if quick else 'default'} settings")

    teacher, t_teacher, cached = _teacher(settings, tokenizer, seed, dev, out_dir if cache_teacher else None,
                                          progress)
    teacher_acc = accuracy(teacher, tokenizer, eval_set)
    n_t = sum(p.numel() for p in teacher.parameters())
    log(f"teacher: {n_t / 1e3:.0f}k params, {'loaded from cache' if cached else 'trained'} in {t_teacher:.1f}s, "
        f"held-out accuracy {teacher_acc:.1%}")

    base = build_model(STUDENT, len(tokenizer), seed=seed + 1).to(dev)
    supervised_train(base, tokenizer, task, steps=settings.student_warmup_steps, batch_size=settings.sft_batch,
                     lr=settings.lr_sft_student, seed=seed + 20, desc="student warm start", progress=progress)
    before = accuracy(base, tokenizer, eval_set)
    n_s = sum(p.numel() for p in base.parameters())
    log(f"student: {n_s / 1e3:.0f}k params, brief supervised warm start ({settings.student_warmup_steps} steps), "
        f"held-out accuracy {before:.1%}")

    def eval_fn(model):
        return {"accuracy": accuracy(model, tokenizer, eval_set)}

    results: Dict[str, Dict[str, object]] = {}
    for r in rules:
        student = copy.deepcopy(base)
        cfg = OPDConfig(rule=r, ratio=ratio, backend=backend, max_new_tokens=task.max_new_tokens,
                        rollout_temperature=1.0, batch_size=settings.opd_batch, steps=settings.opd_steps,
                        lr=settings.opd_lr, warmup_steps=max(1, settings.opd_steps // 20), min_lr_ratio=0.1,
                        grad_clip=1.0, seed=seed, eval_interval=settings.eval_interval,
                        output_dir=str(out_dir / (f"opd-{r}" if compare else "opd")), progress=progress,
                        plot=False, save_final=not compare)
        trainer = OPDTrainer(student, teacher, tokenizer, train_prompts, cfg, eval_fn=eval_fn)
        t0 = time.perf_counter()
        history = trainer.train()
        secs = time.perf_counter() - t0
        after = history[-1].get("eval_accuracy", float("nan"))
        summ = _summary(history)
        results[r] = {"accuracy_after": after, "seconds": secs, "history": history,
                      "evals": trainer.eval_history, **summ}
        log(f"OPD rule={r} ratio={ratio:g}: {settings.opd_steps} steps in {secs:.1f}s; student accuracy "
            f"{before:.1%} -> {after:.1%}; trained on {summ['tokens_trained']:.0f} of {summ['tokens_valid']:.0f} "
            f"response tokens ({summ['fraction']:.1%}); selected quadrant shares "
            + " ".join(f"Q{q} {summ[f'Q{q}']:.0%}" for q in range(1, 5)))

    peak = peak_memory_mb(dev)
    figure = None
    try:
        from .plot import plot_run

        figure = out_dir / ("compare.png" if compare else "opd_run.png")
        if compare:
            plot_run([], figure, runs={r: v["history"] for r, v in results.items()},
                     run_evals={r: v["evals"] for r, v in results.items()},
                     title=f"tipkernels demo: OPD on digit sorting, rules at ratio {ratio:g}")
        else:
            plot_run(results[rule]["history"], figure, evals=results[rule]["evals"],
                     title=f"tipkernels demo: OPD on digit sorting, rule={rule}, ratio={ratio:g}")
    except ImportError as e:
        log(f"no figure: {e}")
        figure = None

    total = time.perf_counter() - t_start
    if compare:
        log("")
        log(format_table(results, ratio, before))
    mem = "peak GPU memory allocated" if dev.type == "cuda" else "peak process RSS"
    log(f"\n{mem}: {peak:.0f} MiB; figure: {figure if figure else '(none)'}; total {total:.1f}s")
    summary = {"teacher_accuracy": teacher_acc, "student_accuracy_before": before, "ratio": ratio,
               "peak_mem_mb": peak, "figure": str(figure) if figure else None, "seconds": total,
               "runs": {r: {k: v for k, v in res.items() if k not in ("history", "evals")}
                        for r, res in results.items()}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["runs"] = results
    return summary


def format_table(results: Dict[str, Dict[str, object]], ratio: float, before: float) -> str:
    """A Markdown table of the compared rules."""
    head = ("| rule | ρ | acc. before | acc. after | tokens trained | share | Q1 | Q2 | Q3 | Q4 | KL end | time |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for r, v in results.items():
        rho = "1" if r == "all" else f"{ratio:g}"
        lines.append(f"| {r} | {rho} | {before:.1%} | {v['accuracy_after']:.1%} | {v['tokens_trained']:.0f} | "
                     f"{v['fraction']:.0%} | " + " | ".join(f"{v[f'Q{q}']:.0%}" for q in range(1, 5)) +
                     f" | {v['kl_end']:.3f} | {v['seconds']:.0f}s |")
    return "\n".join(lines)
