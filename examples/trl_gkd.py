"""TRL's GKD trainer with the TIP loss: ``TIPGKDTrainer`` is ``trl.experimental.gkd.GKDTrainer`` whose
``compute_loss`` is :class:`tipkernels.TIPDistillationLoss` over final hidden states (no full logits).

    pip install 'tipkernels[trl]'
    python examples/trl_gkd.py                                  # tiny models built in code, no downloads
    python examples/trl_gkd.py --student DIR --teacher DIR      # local model directories (same vocab_size)

Everything else is TRL's: the dataset/collator, on-policy generation (``lmbda``: the share of batches with
student rollouts), accelerate, logging (the TIP metrics appear as ``tip/*``).
"""

import argparse
import warnings

import torch

import tipkernels as tk
from tipkernels.opd.trl import GKDConfig, TIPGKDTrainer


def collator(tok):
    """Prompt/completion rows → the batch GKDTrainer expects (labels -100 on prompt and padding)."""

    def collate(rows):
        prompts = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
        full = [p + tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                for p, r in zip(prompts, rows)]
        W, P = max(map(len, full)), max(map(len, prompts))
        ids = torch.full((len(rows), W), tok.pad_token_id)
        attn, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        p_ids, p_attn = torch.full((len(rows), P), tok.pad_token_id), torch.zeros((len(rows), P), dtype=torch.long)
        for i, (p, f) in enumerate(zip(prompts, full)):
            ids[i, :len(f)], attn[i, :len(f)] = torch.tensor(f), 1
            labels[i, len(p):len(f)] = torch.tensor(f[len(p):])
            p_ids[i, P - len(p):], p_attn[i, P - len(p):] = torch.tensor(p), 1  # prompts left-padded
        return {"input_ids": ids, "attention_mask": attn, "labels": labels, "prompts": p_ids,
                "prompt_attention_mask": p_attn}

    return collate


def main():
    from datasets import Dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student")
    p.add_argument("--teacher")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--output-dir", default="runs/trl_gkd")
    args = p.parse_args()
    if args.student:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.student, local_files_only=True)
        tok.pad_token = tok.pad_token or tok.eos_token
        student = AutoModelForCausalLM.from_pretrained(args.student, local_files_only=True)
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher, local_files_only=True)
        rows = [{"prompt": "Question: 12 + 30 =", "completion": " 42"}] * 16
    else:
        from tipkernels.opd.demo import ModelSize, build_model, build_tokenizer

        tok = build_tokenizer()
        student = build_model(ModelSize(hidden=32, layers=1, heads=2, ffn=64), len(tok), seed=0)
        teacher = build_model(ModelSize(hidden=64, layers=2, heads=4, ffn=128), len(tok), seed=1)
        rows = [{"prompt": s + ">", "completion": "".join(sorted(s))} for s in ("3141", "27", "99810", "5", "8082")]
    tok.padding_side = "left"
    config = GKDConfig(output_dir=args.output_dir, per_device_train_batch_size=4, max_steps=args.steps,
                       lmbda=1.0, beta=0.5, max_new_tokens=8, learning_rate=1e-3, logging_steps=1,
                       save_strategy="no", report_to=[], temperature=1.0, use_cpu=not torch.cuda.is_available(),
                       bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    trainer = TIPGKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=Dataset.from_list(rows),
                            processing_class=tok, data_collator=collator(tok),
                            tip_loss=tk.TIPDistillationLoss(rule="soft_or", ratio=0.5, divergence="jsd", beta=0.5))
    trainer.train()
    for rec in trainer.state.log_history:
        if "loss" in rec:
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()})


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        main()
