"""On-policy distillation with TIP selection in a plain PyTorch loop, for any Hugging Face causal LM pair.

    python examples/plain_pytorch_opd.py                                   # tiny models built in code, no downloads
    python examples/plain_pytorch_opd.py --student DIR --teacher DIR       # local save_pretrained directories

The loop is the whole recipe; tipkernels supplies the loss:

1. the student samples responses to prompts (``model.generate``);
2. the response mask covers generated tokens up to and including the first EOS;
3. both models' *bodies* give final hidden states (no ``[tokens, vocab]`` logits), the lm_head weights come from
   ``get_output_embeddings()``; the hidden state at position i scores the token at i+1;
4. ``TIPDistillationLoss`` scores every response token, keeps the informative ones, and back-propagates through
   those only.
"""

import argparse

import torch

import tipkernels as tk
from tipkernels.opd.models import final_hidden_states, lm_head


def load(args):
    if args.student:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.student, local_files_only=True)
        tok.pad_token = tok.pad_token or tok.eos_token
        student = AutoModelForCausalLM.from_pretrained(args.student, local_files_only=True)
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher, local_files_only=True)
        prompts = ["Question: what is 17 + 25?\nAnswer:", "Write a haiku about the sea.\n"]
        return tok, student, teacher, prompts
    # tiny stand-ins (untrained teacher: the loss still falls towards it)
    from tipkernels.opd.demo import ModelSize, build_model, build_tokenizer

    tok = build_tokenizer()
    student = build_model(ModelSize(hidden=32, layers=1, heads=2, ffn=64), len(tok), seed=0)
    teacher = build_model(ModelSize(hidden=64, layers=2, heads=4, ffn=128), len(tok), seed=1)
    return tok, student, teacher, ["3141>", "27>", "99810>", "5>"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", help="local student model directory (default: a tiny model built in code)")
    p.add_argument("--teacher", help="local teacher model directory")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rule", default="soft_or")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--max-new-tokens", type=int, default=8)
    args = p.parse_args()
    if bool(args.student) != bool(args.teacher):
        p.error("give both --student and --teacher, or neither")
    torch.manual_seed(0)
    tok, student, teacher, prompts = load(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    student.to(device).train()
    teacher.to(device).eval().requires_grad_(False)
    loss_fn = tk.TIPDistillationLoss(rule=args.rule, ratio=args.ratio, divergence="reverse_kl")
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    eos = student.generation_config.eos_token_id or tok.eos_token_id

    for step in range(args.steps):
        # 1. rollouts from the student (left-padded prompts)
        with torch.no_grad():
            student.eval()
            seq = student.generate(**enc, do_sample=True, max_new_tokens=args.max_new_tokens,
                                   pad_token_id=tok.pad_token_id, eos_token_id=eos)
            student.train()
        P = enc["input_ids"].shape[1]
        # 2. response mask: generated tokens up to and including the first EOS
        gen = seq[:, P:]
        is_eos = torch.isin(gen, torch.tensor([eos] if isinstance(eos, int) else list(eos), device=device))
        resp = (is_eos.long().cumsum(1) - is_eos.long()) == 0
        attn = torch.cat([enc["attention_mask"], resp.long()], 1)
        token_mask = torch.cat([torch.zeros_like(enc["attention_mask"], dtype=torch.bool), resp], 1)
        # 3. final hidden states of both bodies over positions 0..T-2; position i scores token i+1
        ids, a = seq[:, :-1], attn[:, :-1]
        with torch.no_grad():
            h_t = final_hidden_states(teacher, ids, a)
        h_s = final_hidden_states(student, ids, a)
        (W_s, b_s), (W_t, b_t) = lm_head(student), lm_head(teacher)
        mask = token_mask[:, 1:]
        # 4. the TIP loss: one scoring pass, selection, backward over the selected tokens only
        out = loss_fn(h_s, W_s, h_t, W_t, mask, student_bias=b_s, teacher_bias=b_t)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        m = out.metrics
        print(f"step {step:3d}  loss {out.loss.item():.4f}  KL(all) {m['reverse_kl']:.4f}  "
              f"selected {m['selected_tokens']:.0f}/{m['valid_tokens']:.0f}")
    # The same in one call: tipkernels.opd.sequence_tip_loss(loss_fn, student, teacher, seq, attn, token_mask)


if __name__ == "__main__":
    main()
