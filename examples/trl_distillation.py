"""TRL's stable on-policy distillation trainer with the TIP loss: ``TIPDistillationTrainer`` is
``trl.DistillationTrainer`` whose loss is :class:`tipkernels.TIPDistillationLoss` over final hidden states and
lm_head weights (no ``[tokens, vocab]`` logits), on the tokens TIP selects.

    pip install 'tipkernels[trl]'
    python examples/trl_distillation.py                                  # tiny models built in code, no downloads
    python examples/trl_distillation.py --student DIR --teacher DIR      # local model directories (same vocab_size)

The swap is one line: ``DistillationTrainer(...)`` → ``TIPDistillationTrainer(..., tip_loss=...)``. Everything
else is TRL's: prompt-only datasets, student rollouts, ``num_items_in_batch`` normalisation, tool masks,
accelerate, logging (the TIP metrics appear as ``tip/*`` next to TRL's ``entropy`` and ``completions/*``).
"""

import argparse
import warnings

import torch

import tipkernels as tk
from tipkernels.opd.trl import DistillationConfig, TIPDistillationTrainer


def main():
    from datasets import Dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student")
    p.add_argument("--teacher")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--output-dir", default="runs/trl_distillation")
    args = p.parse_args()
    if args.student:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.student, local_files_only=True)
        tok.pad_token = tok.pad_token or tok.eos_token
        student = AutoModelForCausalLM.from_pretrained(args.student, local_files_only=True)
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher, local_files_only=True)
        rows = [{"prompt": [{"role": "user", "content": "What is 12 + 30?"}]}] * 16
    else:
        from tipkernels.opd.demo import ModelSize, build_model, build_tokenizer

        tok = build_tokenizer()
        student = build_model(ModelSize(hidden=32, layers=1, heads=2, ffn=64), len(tok), seed=0)
        teacher = build_model(ModelSize(hidden=64, layers=2, heads=4, ffn=128), len(tok), seed=1)
        rows = [{"prompt": s + ">"} for s in ("3141", "27", "99810", "5", "8082", "613", "4", "70")]
    tok.padding_side = "left"  # TRL's requirement
    config = DistillationConfig(output_dir=args.output_dir, per_device_train_batch_size=4, max_steps=args.steps,
                                beta=0.5, temperature=1.0, max_completion_length=8, learning_rate=1e-3,
                                logging_steps=1, save_strategy="no", report_to=[],
                                use_cpu=not torch.cuda.is_available(),
                                bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    trainer = TIPDistillationTrainer(  # was: trl.DistillationTrainer(model=..., teacher_model=..., ...)
        model=student, teacher_model=teacher, args=config, train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        tip_loss=tk.TIPDistillationLoss(rule="soft_or", ratio=0.5, divergence="jsd", beta=0.5, temperature=1.0))
    trainer.train()
    for rec in trainer.state.log_history:
        if "loss" in rec:
            keep = ("step", "loss", "entropy", "tip/selected_fraction", "tip/q1_selected", "tip/q2_selected",
                    "tip/q3_selected", "tip/q4_selected", "tip/entropy_norm")
            print({k: round(rec[k], 4) if isinstance(rec[k], float) else rec[k] for k in keep if k in rec})


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        main()
