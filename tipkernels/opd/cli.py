"""The ``tipkernels`` console script: ``tipkernels demo`` and ``tipkernels opd``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from ..inputs import BACKENDS, BUDGETS, DIVERGENCES, RULES, TAILS
from .config import PARALLEL, SCHEDULES, TEACHER_PARALLEL, OPDConfig
from .tasks import TASKS

_DTYPES = ("auto", "float32", "bfloat16", "float16")


class SetupError(Exception):
    """Bad input found before training; printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tipkernels", description="On-policy distillation with token-importance (TIP) "
                                "selection over fused, logits-free kernels.")
    sub = p.add_subparsers(dest="command", metavar="{demo,opd}")
    sub.required = True

    d = sub.add_parser("demo", help="embedded demo: train a tiny teacher on a synthetic task, distil a smaller "
                       "student on-policy with TIP selection (no downloads)",
                       description="Train a tiny teacher supervised on a synthetic task (sort: digit sorting, the "
                       "quick default; add: 5-digit addition with a carry scratchpad, 32-33-token responses), "
                       "distil a smaller, weakly pre-trained student on its own rollouts with a TIP rule, and report "
                       "held-out accuracy before/after, tokens trained on, quadrant shares, peak memory and a figure.")
    d.add_argument("--task", default="sort", choices=tuple(TASKS),
                   help="sort (default, ~1-2 min; responses 5-9 tokens) or add (responses 32-33 tokens, the TIP "
                        "paper's regime where ρ=0.2 keeps ≥ 6 tokens per sequence)")
    d.add_argument("--quick", action="store_true", help="smaller task and schedules (CI, well under a minute)")
    d.add_argument("--rule", default="soft_or", choices=RULES, help="TIP rule (default soft_or)")
    d.add_argument("--ratio", type=float, default=0.5, help="retention ratio ρ in (0, 1] (default 0.5); with "
                   "--compare, the ratio of entries written without @RATIO")
    d.add_argument("--compare", default=None, metavar="ENTRIES",
                   help="comma-separated RULE or RULE@RATIO entries run side by side from the same student, e.g. "
                        "all,random@0.2,entropy_sample@0.5,entropy_sample@0.2,soft_or@0.5,soft_or@0.2,q3@0.2 "
                        "(a RULE without @ takes --ratio; 'all' takes none); writes a table and a figure")
    d.add_argument("--seeds", type=int, default=1, help="seeds per entry (mean ± standard deviation over seeds; "
                   "each seed draws its own starting student)")
    d.add_argument("--teacher-target", type=float, default=None, metavar="ACC",
                   help="stop the teacher's training once a held-out check set reaches this accuracy (default: "
                        "sort none, add 0.98; checked every 100 steps)")
    d.add_argument("--jobs", type=int, default=1, help="processes running the seeds in parallel (default 1)")
    d.add_argument("--steps", type=int, default=None, help="OPD steps (default: sort 300, add 80; fewer with "
                   "--quick)")
    d.add_argument("--seed", type=int, default=0, help="first seed")
    d.add_argument("--output-dir", default="runs/demo", help="metrics, figure, summary (default runs/demo)")
    d.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="kernel backend (auto: triton on CUDA, torch on CPU)")
    d.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    d.add_argument("--teacher-topk", type=int, default=None, metavar="K",
                   help="distil from the teacher's top-K log-probabilities only (the path of a teacher served "
                        "elsewhere), K at most the task's vocabulary (13 tokens)")
    d.add_argument("--no-cache", action="store_true", help="retrain the teacher even if a cached one exists")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")

    o = sub.add_parser("opd", help="distil a local student model from a local teacher on a prompts file",
                       description="On-policy distillation of a local Hugging Face causal LM (a save_pretrained "
                       "directory) from a local teacher sharing its tokenizer. Prompts: JSONL, one "
                       '{"prompt": "..."} per line. No downloads: directories must exist locally.')
    o.add_argument("--student", required=True, metavar="DIR", help="student model directory (trained in place: "
                   "checkpoints go to --output-dir)")
    o.add_argument("--teacher", required=True, metavar="DIR", help="teacher model directory")
    o.add_argument("--prompts", required=True, metavar="FILE.jsonl", help='one {"prompt": "..."} per line')
    o.add_argument("--tokenizer", metavar="DIR", default=None, help="tokenizer directory (default: --student)")
    o.add_argument("--rule", default="soft_or", choices=RULES)
    o.add_argument("--ratio", type=float, default=0.5)
    o.add_argument("--divergence", default="reverse_kl", choices=DIVERGENCES)
    o.add_argument("--beta", type=float, default=0.5, help="JSD β (TRL convention)")
    o.add_argument("--temperature", type=float, default=1.0, help="logit temperature of the loss")
    o.add_argument("--budget", default="per_sequence", choices=BUDGETS)
    o.add_argument("--max-new-tokens", type=int, default=256)
    o.add_argument("--rollout-temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    o.add_argument("--top-p", type=float, default=1.0)
    o.add_argument("--top-k", type=int, default=0)
    o.add_argument("--rollouts-per-prompt", type=int, default=1)
    o.add_argument("--batch-size", type=int, default=4, help="prompts per micro-batch")
    o.add_argument("--grad-accum", type=int, default=1)
    o.add_argument("--steps", type=int, default=100)
    o.add_argument("--lr", type=float, default=1e-6)
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--warmup-steps", type=int, default=10)
    o.add_argument("--schedule", default="cosine", choices=SCHEDULES)
    o.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm (0 = off)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--save-interval", type=int, default=0, help="steps between checkpoints (0: only the last)")
    o.add_argument("--output-dir", default="runs/opd")
    o.add_argument("--backend", default="auto", choices=BACKENDS)
    o.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    o.add_argument("--dtype", default="auto", choices=_DTYPES, help="load both models in this dtype")
    o.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="resume from a checkpoint directory (default: the latest in --output-dir)")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--parallel", default="auto", choices=PARALLEL,
                   help="data parallelism under torchrun: ddp, fsdp (FSDP2, the student sharded) or none; auto "
                        "(default): ddp when launched by torchrun with more than one process, else none. "
                        "--batch-size is per process")
    o.add_argument("--teacher-topk", type=int, default=None, metavar="K",
                   help="distil from the teacher's top-K log-probabilities per token (the sparse path a teacher "
                        "served elsewhere takes), computed locally over vocabulary chunks, instead of its full "
                        "distribution")
    o.add_argument("--tail", default="bucket", choices=TAILS,
                   help="with --teacher-topk: bucket (default; the K ids plus one bin for the rest of the "
                        "vocabulary) or renormalize (both distributions renormalised over the K ids)")
    o.add_argument("--teacher-parallel", default="replicate", choices=TEACHER_PARALLEL,
                   help="replicate (default): every process holds the whole teacher; fsdp: the teacher's weights "
                        "sharded across the processes (FSDP2), one layer gathered at a time, for teachers larger "
                        "than one GPU")
    return p


def _model_dir(path: str, who: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise SetupError(f"--{who} {path!r} does not exist (only local model directories are supported)")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise SetupError(f"--{who} {path!r} is not a Hugging Face model directory (no config.json); "
                         f"create one with model.save_pretrained(DIR)")
    return p


def _has_tokenizer(p: Path) -> bool:
    return any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _run_opd(args) -> int:
    import torch

    from .prompts import load_prompts
    from .trainer import OPDTrainer

    try:
        s_dir, t_dir = _model_dir(args.student, "student"), _model_dir(args.teacher, "teacher")
        tok_dir = Path(args.tokenizer) if args.tokenizer else s_dir
        if not _has_tokenizer(tok_dir):
            raise SetupError(f"no tokenizer files in {str(tok_dir)!r}; pass --tokenizer DIR")
        prompts = load_prompts(args.prompts)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        config = OPDConfig(rule=args.rule, ratio=args.ratio, divergence=args.divergence, beta=args.beta,
                           temperature=args.temperature, budget=args.budget, backend=args.backend,
                           max_new_tokens=args.max_new_tokens, rollout_temperature=args.rollout_temperature,
                           top_p=args.top_p, top_k=args.top_k, rollouts_per_prompt=args.rollouts_per_prompt,
                           batch_size=args.batch_size, grad_accum=args.grad_accum, steps=args.steps, lr=args.lr,
                           weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, schedule=args.schedule,
                           grad_clip=args.grad_clip, seed=args.seed, save_interval=args.save_interval,
                           output_dir=args.output_dir, progress=not args.no_progress, device=device,
                           parallel=args.parallel, teacher_parallel=args.teacher_parallel, tail=args.tail)
        if args.teacher_topk is not None and args.teacher_topk < 1:
            raise SetupError(f"--teacher-topk must be ≥ 1, got {args.teacher_topk}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        teacher_tok = AutoTokenizer.from_pretrained(t_dir, local_files_only=True) if _has_tokenizer(t_dir) else None
        kw = {"local_files_only": True}
        if args.dtype != "auto":
            kw["dtype"] = getattr(torch, args.dtype)
        student = AutoModelForCausalLM.from_pretrained(s_dir, **kw)
        teacher = AutoModelForCausalLM.from_pretrained(t_dir, **kw)
        if args.teacher_topk is not None:  # the sparse path: the loss sees only the teacher's top-k
            from .models import lm_head
            from .topk_teacher import HFTopKTeacher

            if args.teacher_parallel != "replicate":
                raise SetupError("--teacher-topk runs the teacher whole on each process: use --teacher-parallel "
                                 "replicate")
            teacher = HFTopKTeacher(teacher.to(device), args.teacher_topk,
                                    vocab_size=lm_head(student, "student")[0].shape[0], temperature=args.temperature)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        trainer = OPDTrainer(student, teacher, tokenizer, prompts, config, teacher_tokenizer=teacher_tok)
        if args.resume is not None:
            trainer.load_checkpoint(args.resume)  # "latest": the newest that reads cleanly
    except (SetupError, ValueError, TypeError, FileNotFoundError, OSError) as e:
        print(f"tipkernels opd: error: {e}", file=sys.stderr)
        return 2
    history = trainer.train()
    trainer.process.close()  # launched by torchrun: the process group goes; rank 0 reports
    if not trainer.process.is_main:
        return 0
    last = history[-1] if history else {}
    print(json.dumps({k: last[k] for k in ("step", "loss", "reverse_kl", "selected_fraction", "peak_mem_mb")
                      if k in last}))
    print(f"metrics: {trainer.output_dir / 'metrics.jsonl'}; checkpoint: {trainer.output_dir}/checkpoint-{trainer.step}")
    return 0


def _run_demo(args) -> int:
    from .demo import parse_compare, run_demo

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading/saving bars of the tiny models are noise here
    try:
        OPDConfig(ratio=args.ratio)
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be ≥ 1, got {args.steps}")
        if args.seeds < 1:
            raise ValueError(f"--seeds must be ≥ 1, got {args.seeds}")
        if args.jobs < 1:
            raise ValueError(f"--jobs must be ≥ 1, got {args.jobs}")
        if args.teacher_topk is not None and args.teacher_topk < 1:
            raise ValueError(f"--teacher-topk must be ≥ 1, got {args.teacher_topk}")
        if args.teacher_target is not None and not 0 < args.teacher_target <= 1:
            raise ValueError(f"--teacher-target must lie in (0, 1], got {args.teacher_target}")
        compare = parse_compare(args.compare, args.ratio) if args.compare is not None else None
    except (ValueError, TypeError) as e:
        print(f"tipkernels demo: error: {e}", file=sys.stderr)
        return 2
    run_demo(quick=args.quick, task=args.task, rule=args.rule, ratio=args.ratio, compare=compare, seeds=args.seeds,
             jobs=args.jobs, steps=args.steps, seed=args.seed, output_dir=args.output_dir, backend=args.backend,
             device=args.device, progress=not args.no_progress, cache_teacher=not args.no_cache,
             teacher_target=args.teacher_target, teacher_topk=args.teacher_topk)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _run_demo(args)
    return _run_opd(args)


if __name__ == "__main__":
    sys.exit(main())
