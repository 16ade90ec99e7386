"""Print per-token statistics of a random student/teacher pair, and check them against the materialised reference.

    python examples/token_stats.py [--n 8] [--vocab 1000] [--backend torch]
"""

import argparse

import torch

import tipkernels as tk


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="token rows")
    ap.add_argument("--vocab", type=int, default=1000, help="student vocabulary (the teacher's is padded by 64)")
    ap.add_argument("--d-student", type=int, default=64)
    ap.add_argument("--d-teacher", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "reference"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    g = torch.Generator().manual_seed(args.seed)
    h_s = torch.randn(args.n, args.d_student, generator=g)
    w_s = torch.randn(args.vocab, args.d_student, generator=g) / args.d_student**0.5
    h_t = torch.randn(args.n, args.d_teacher, generator=g)
    w_t = torch.randn(args.vocab + 64, args.d_teacher, generator=g) / args.d_teacher**0.5

    stats = tk.token_stats(h_s, w_s, h_t, w_t, temperature=args.temperature, backend=args.backend)
    ref = tk.token_stats(h_s.double(), w_s.double(), h_t.double(), w_t.double(), temperature=args.temperature,
                         backend="reference")
    cols = ["entropy", "entropy_norm", "teacher_entropy", "reverse_kl", "forward_kl", "student_argmax",
            "teacher_argmax"]
    print("| token | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for i in range(args.n):
        cells = [f"{getattr(stats, c)[i].item():.4f}" if getattr(stats, c).is_floating_point()
                 else str(getattr(stats, c)[i].item()) for c in cols]
        print(f"| {i} | " + " | ".join(cells) + " |")
    worst = max((getattr(stats, c).double() - getattr(ref, c)).abs().max().item() for c in cols[:5])
    print(f"\nmax |fused - float64 reference| over the float fields: {worst:.2e}")


if __name__ == "__main__":
    main()
