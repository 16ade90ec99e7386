"""Peak memory of one OPD training step against the TIP retention ratio (the paper's Table of
peak memory: Qwen3 8B→4B 72.0 / 38.1 / 35.5 / 35.3 GB at 100 / 50 / 20 / 10% of the tokens).

One step = teacher body forward under ``no_grad`` + student body forward + the distillation loss over the
selected response tokens + ``backward`` + ``AdamW.step``, for three loss implementations:

* ``materialized_all``: both lm_heads applied to every position (``[B, T-1, V]`` logits in the model dtype, the
  student's kept for backward), as OPD code that calls ``model(...).logits`` does; the selection statistics are
  computed from those logits (no grad, row chunks); the fp32 KL (log-softmax of both) is evaluated at the
  selected rows only.
* ``materialized_selected``: a no-grad scoring pass forms logits in row chunks (a bounded budget) to get the
  statistics; after the selection the logits of both models are formed at the selected rows only and the fp32 KL
  is evaluated there.
* ``fused``: ``tk.TIPDistillationLoss`` on the final hidden states and lm_head weights (tipkernels; ``auto``
  backend: triton on CUDA, the chunked torch backend on the CPU): no ``[tokens, vocab]`` tensor at all.
* ``fused_topk@K`` (K = 20, 64, 128): the sparse-teacher path of ``tipkernels opd --teacher-topk K``: the
  teacher's top-K log-probabilities per position are taken from its hidden states over vocabulary chunks
  (``tipkernels.opd.topk_logprobs``, no grad), then ``tk.TIPDistillationLoss(...)(h_s, W_s, mask=mask,
  teacher_topk=...)`` (tail "bucket"). A teacher served elsewhere sends the same ``[B, T-1, K]`` message, and its
  weights are then not in the process at all.

All three select with the same TIP rule (``--rule``, default ``soft_or``) from the same statistics. Random
weights (memory does not depend on them): Hugging Face Qwen3 causal LMs built from configs, no download.

Measurement, one fresh process per (impl, ratio) cell, optimizer state initialised before the measured step
(as in every step after the first):

* ``--device cpu``: peak resident set during the step (``VmHWM`` after a reset), at scaled-down shapes, fp32.
  Large allocations are forced to ``mmap`` (``mallopt(M_MMAP_THRESHOLD, 1 MiB)``) so freed tensors leave the
  resident set at once, as they leave the CUDA allocator's count. Cells are forked from this process.
* ``--device cuda``: ``torch.cuda.max_memory_allocated`` over the step after ``--warmup`` steps (Triton
  compilation), real Qwen3-4B/8B widths and vocabulary with fewer layers, bf16; cells run as subprocesses.

``peak_mib`` is the whole process's peak (weights, gradients, optimizer state and activations included, like the
paper's figures; on the CPU also the interpreter and libraries, the same for every cell).

    PYTHONPATH=. python benchmarks/reproduce_memory.py --device cpu                      # ≈1.5 min on 2 cores
    PYTHONPATH=. python benchmarks/reproduce_memory.py --device cpu --quick --json /tmp/m.json   # ≈15 s (CI)
    PYTHONPATH=. python benchmarks/reproduce_memory.py --device cuda --out-dir runs/memory-cuda  # real widths
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import json
import os
import sys
import time
from typing import Dict, List

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import tipkernels as tk  # noqa: E402
from benchmarks.harness import lib  # noqa: E402
from benchmarks.harness.inputs import dtype_of  # noqa: E402
from benchmarks.harness.memory import MIB, malloc_for_memory, step_peak  # noqa: E402
from benchmarks.harness.report import (  # noqa: E402
    env_markdown, markdown_table, parse_csv, pyplot, save_figure, style_axis, write_json, write_text,
)
from benchmarks.harness.runner import run_in_fork, run_json_worker  # noqa: E402

TOPK_IMPLS = ("fused_topk@20", "fused_topk@64", "fused_topk@128")
IMPLS = ("materialized_all", "materialized_selected", "fused") + TOPK_IMPLS
RATIOS = (1.0, 0.5, 0.2, 0.1)
#: The paper's peak memory (GB) at 100 / 50 / 20 / 10% of the tokens.
PAPER = {
    "Qwen3 8B→4B": (72.0, 38.1, 35.5, 35.3),
    "Qwen2.5 14B→1.5B": (35.8, 19.7, 15.0, 14.9),
}


@dataclasses.dataclass
class Shapes:
    """Model and batch shapes of one run (student like Qwen3-4B, teacher like Qwen3-8B by default)."""

    vocab: int
    s_hidden: int
    s_inter: int
    s_layers: int
    s_heads: int
    s_kv_heads: int
    t_hidden: int
    t_inter: int
    t_layers: int
    t_heads: int
    t_kv_heads: int
    head_dim: int
    batch: int
    prompt_len: int
    response_len: int
    dtype: str


PRESETS = {
    # Qwen3-4B (2560 wide, MLP 9728, 32/8 heads of 128, tied embeddings) and Qwen3-8B (4096, 12288, untied).
    "cuda": Shapes(vocab=151936, s_hidden=2560, s_inter=9728, s_layers=4, s_heads=32, s_kv_heads=8,
                   t_hidden=4096, t_inter=12288, t_layers=4, t_heads=32, t_kv_heads=8, head_dim=128,
                   batch=4, prompt_len=256, response_len=1792, dtype="bf16"),
    # The same proportions scaled down 8× in width and 4× in vocabulary, fp32.
    "cpu": Shapes(vocab=37984, s_hidden=320, s_inter=1216, s_layers=2, s_heads=5, s_kv_heads=1,
                  t_hidden=512, t_inter=1536, t_layers=2, t_heads=8, t_kv_heads=2, head_dim=64,
                  batch=2, prompt_len=128, response_len=896, dtype="fp32"),
    "quick": Shapes(vocab=32768, s_hidden=64, s_inter=160, s_layers=1, s_heads=2, s_kv_heads=1,
                    t_hidden=96, t_inter=256, t_layers=1, t_heads=3, t_kv_heads=1, head_dim=32,
                    batch=2, prompt_len=16, response_len=368, dtype="fp32"),
}


def log(msg: str) -> None:
    print(f"[reproduce_memory] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ models


def build_models(sh: Shapes, device: torch.device):
    """Student (tied embeddings, like Qwen3-4B) and teacher (untied, like Qwen3-8B) with random weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    def make(hidden, inter, layers, heads, kv, tied):
        cfg = Qwen3Config(vocab_size=sh.vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, head_dim=sh.head_dim,
                          max_position_embeddings=max(4096, sh.prompt_len + sh.response_len),
                          tie_word_embeddings=tied, attn_implementation="sdpa")
        old = torch.get_default_dtype()
        try:
            torch.set_default_dtype(dtype_of(sh.dtype))
            with device:
                model = Qwen3ForCausalLM(cfg)
        finally:
            torch.set_default_dtype(old)
        return model.to(device=device, dtype=dtype_of(sh.dtype))

    torch.manual_seed(0)
    student = make(sh.s_hidden, sh.s_inter, sh.s_layers, sh.s_heads, sh.s_kv_heads, True).train()
    teacher = make(sh.t_hidden, sh.t_inter, sh.t_layers, sh.t_heads, sh.t_kv_heads, False).eval()
    teacher.requires_grad_(False)
    return student, teacher


def make_batch(sh: Shapes, device: torch.device):
    """Token ids ``[B, T]``, attention mask and the response-token mask (the last ``response_len`` tokens)."""
    g = torch.Generator().manual_seed(1)
    total = sh.prompt_len + sh.response_len
    ids = torch.randint(0, sh.vocab, (sh.batch, total), generator=g).to(device)
    attn = torch.ones_like(ids)
    token_mask = torch.zeros(sh.batch, total, dtype=torch.bool, device=device)
    token_mask[:, sh.prompt_len:] = True
    return ids, attn, token_mask


# ------------------------------------------------------------------------------------------ materialised loss


def _stats_of_logits(s: torch.Tensor, u: torch.Tensor) -> Dict[str, torch.Tensor]:
    """fp32 entropy, normalised entropy, reverse and forward KL of rows of logits (no grad), by the library's
    reference formulas."""
    s, u = s.float(), u.float()
    ent = lib.reference.entropy(s)
    return {"entropy": ent, "entropy_norm": ent / math.log(s.shape[-1]), "reverse_kl": lib.reference.reverse_kl(s, u),
            "forward_kl": lib.reference.forward_kl(s, u)}


@torch.no_grad()
def chunked_stats(student_rows, teacher_rows, n: int, vocab: int, shape, budget_bytes: int) -> tk.TokenStats:
    """Statistics of ``n`` rows whose logits ``student_rows(r0, r1)`` / ``teacher_rows(r0, r1)`` are formed a row
    chunk at a time (about ``budget_bytes`` of fp32 temporaries alive)."""
    rows = max(1, budget_bytes // (vocab * 4 * 9))  # both logits + up to 7 [rows, V] temporaries of a KL
    parts: Dict[str, list] = {}
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        for k, v in _stats_of_logits(student_rows(r0, r1), teacher_rows(r0, r1)).items():
            parts.setdefault(k, []).append(v)
    return tk.TokenStats(**{k: torch.cat(v).reshape(shape) for k, v in parts.items()})


def kl_rows(s: torch.Tensor, u: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean fp32 reverse KL of rows of logits (differentiable in ``s``; the reference formula)."""
    kl = lib.reference.reverse_kl(s.float(), u.float())
    w = weights.to(kl.dtype)
    return (kl * w).sum() / w.sum().clamp_min(1e-30)


# ------------------------------------------------------------------------------------------------ one step


def opd_step(impl: str, student, teacher, opt, batch, *, rule: str, ratio: float, budget_bytes: int) -> dict:
    """One OPD training step with the loss implementation ``impl``; returns the loss and selected count."""
    final_hidden_states, lm_head = lib.opd_models().final_hidden_states, lib.opd_models().lm_head
    ids, attn, token_mask = batch
    ids_in, attn_in = ids[:, :-1], attn[:, :-1]
    mask = token_mask[:, 1:] & attn_in.bool()  # hidden position i scores token i+1
    w_s, _ = lm_head(student, "student")
    w_t, _ = lm_head(teacher, "teacher")
    with torch.no_grad():
        h_t = final_hidden_states(teacher, ids_in, attn_in, who="teacher")
    h_s = final_hidden_states(student, ids_in, attn_in, who="student")
    vocab = w_s.shape[0]
    n = mask.numel()
    if impl == "fused":
        out = tk.TIPDistillationLoss(rule=rule, ratio=ratio, compute_metrics=False)(
            h_s, w_s, h_t, w_t.detach(), mask)
        loss, selected = out.loss, out.selection.mask
    elif impl in TOPK_IMPLS:
        from tipkernels.opd import topk_logprobs

        with torch.no_grad():  # the teacher's [B, T-1, K] message (what a served teacher sends)
            topk = topk_logprobs(h_t, w_t, int(impl.split("@")[1]), vocab_size=vocab)
        del h_t
        out = tk.TIPDistillationLoss(rule=rule, ratio=ratio, compute_metrics=False)(
            h_s, w_s, mask=mask, teacher_topk=topk)
        loss, selected = out.loss, out.selection.mask
    elif impl == "materialized_all":
        s_logits = F.linear(h_s, w_s)                       # [B, T-1, V], kept for backward
        with torch.no_grad():
            u_logits = F.linear(h_t, w_t)
        s_flat, u_flat = s_logits.detach().reshape(n, vocab), u_logits.reshape(n, vocab)
        stats = chunked_stats(lambda a, b: s_flat[a:b], lambda a, b: u_flat[a:b], n, vocab, mask.shape,
                              budget_bytes)
        sel = tk.select_tokens(stats, mask, rule=rule, ratio=ratio)
        loss = kl_rows(s_logits[sel.mask], u_logits[sel.mask], sel.weights[sel.mask])
        selected = sel.mask
        del s_flat, u_flat
    elif impl == "materialized_selected":
        hs_flat, ht_flat = h_s.detach().reshape(n, -1), h_t.reshape(n, -1)
        stats = chunked_stats(lambda a, b: F.linear(hs_flat[a:b], w_s.detach()),
                              lambda a, b: F.linear(ht_flat[a:b], w_t), n, vocab, mask.shape, budget_bytes)
        sel = tk.select_tokens(stats, mask, rule=rule, ratio=ratio)
        s = F.linear(h_s[sel.mask], w_s)                    # logits of the selected rows only
        with torch.no_grad():
            u = F.linear(h_t[sel.mask], w_t)
        loss = kl_rows(s, u, sel.weights[sel.mask])
        selected = sel.mask
    else:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": float(loss.detach()), "selected": int(selected.sum()), "tokens": int(mask.sum())}


def _init_optimizer_state(student, opt) -> None:
    """Allocate AdamW's moments (a zero-gradient step) so the measured step is a steady-state one."""
    for p in student.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure_cell(config: dict) -> dict:
    """One (impl, ratio) cell in this (fresh) process: build, warm up, measure one step's peak memory."""
    sh = Shapes(**config["shapes"])
    device = torch.device(config["device"])
    impl, ratio = config["impl"], config["ratio"]
    if device.type == "cpu":
        malloc_for_memory()
    student, teacher = build_models(sh, device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6)
    batch = make_batch(sh, device)
    _init_optimizer_state(student, opt)
    kwargs = dict(rule=config["rule"], ratio=ratio, budget_bytes=config["budget_bytes"])
    # A short batch first runs every code path once (lazy imports, thread pools, kernel code pages), so the
    # measured step holds only what its shapes need; then the full-size warm-up steps (compilation on CUDA).
    small = dataclasses.replace(sh, batch=1, prompt_len=8, response_len=56)
    opd_step(impl, student, teacher, opt, make_batch(small, device), **kwargs)
    for _ in range(config["warmup"]):
        opd_step(impl, student, teacher, opt, batch, **kwargs)
    gc.collect()
    t0 = time.perf_counter()
    info = {}
    peak = step_peak(lambda: info.update(opd_step(impl, student, teacher, opt, batch, **kwargs)), device,
                     cuda_warmup=False)
    base, peak, method = peak.base, peak.peak, peak.method
    return {"impl": impl, "ratio": ratio, "peak_mib": peak / MIB, "base_mib": base / MIB,
            "step_extra_mib": (peak - base) / MIB, "seconds": time.perf_counter() - t0, "method": method, **info}


# ------------------------------------------------------------------------------------------------ report


def check_goals(records: List[dict]) -> List[dict]:
    """The two claims of the memory table, evaluated on the measured records."""
    peak = {(r["impl"], r["ratio"]): r["peak_mib"] for r in records}
    ratios = sorted({r["ratio"] for r in records}, reverse=True)
    out = []
    for impl in ("materialized_all", "materialized_selected"):
        vals = [peak.get((impl, q)) for q in ratios]
        if None in vals or len(vals) < 2:
            continue
        falls = vals[-1] < vals[0] and all(b <= a * 1.01 for a, b in zip(vals, vals[1:]))
        out.append({"claim": f"{impl}: peak falls as the ratio falls",
                    "measured": " → ".join(f"{v:.0f}" for v in vals) + " MiB", "met": "yes" if falls else "no"})
    worst = []
    for q in ratios:
        mats = [peak[(i, q)] for i in ("materialized_all", "materialized_selected") if (i, q) in peak]
        if ("fused", q) in peak and mats:
            worst.append((q, peak[("fused", q)], min(mats)))
    if worst:
        ok = all(f <= m for _, f, m in worst)
        out.append({"claim": "fused ≤ best materialised at every ratio",
                    "measured": ", ".join(f"{q:g}: {f:.0f} vs {m:.0f}" for q, f, m in worst) + " MiB",
                    "met": "yes" if ok else "no"})
    return out


def tables(records: List[dict], ratios) -> str:
    peak = {(r["impl"], r["ratio"]): r for r in records}
    ref = peak.get(("materialized_all", 1.0))
    rows = []
    for impl in IMPLS:
        row = {"impl": impl}
        for q in ratios:
            r = peak.get((impl, q))
            if r is None:
                continue
            rel = f" ({r['peak_mib'] / ref['peak_mib']:.2f})" if ref else ""
            row[f"{q:g}"] = f"{r['peak_mib']:.0f}{rel}"
        rows.append(row)
    for name, gb in PAPER.items():
        rows.append({"impl": f"paper, {name} (GB)",
                     **{f"{q:g}": f"{v:.1f} ({v / gb[0]:.2f})" for q, v in zip(RATIOS, gb) if q in ratios}})
    cols = ["impl"] + [f"{q:g}" for q in ratios]
    heads = ["peak MiB (÷ materialized_all at 1.0)"] + [f"ρ={q:g}" for q in ratios]
    extra_rows = []
    for impl in IMPLS:
        row = {"impl": impl}
        for q in ratios:
            r = peak.get((impl, q))
            if r is not None:
                row[f"{q:g}"] = f"{r['step_extra_mib']:.0f}"
        extra_rows.append(row)
    sel = {q: peak[("fused", q)]["selected"] for q in ratios if ("fused", q) in peak}
    tok = next(iter(peak.values()))["tokens"] if peak else 0
    return "\n\n".join([
        markdown_table(rows, cols, heads),
        "The step's own part (peak minus the memory held before the step: weights, optimizer state, batch), MiB:",
        markdown_table(extra_rows, cols, ["impl"] + [f"ρ={q:g}" for q in ratios]),
        "Selected tokens: " + ", ".join(f"ρ={q:g}: {n}/{tok}" for q, n in sel.items()),
    ])


def plot(records: List[dict], ratios, path: str, title: str) -> None:
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.4))
    for impl, style in zip(IMPLS, ("o-", "s--", "^-", "v:", "D:", "x:")):
        pts = [(100 * r["ratio"], r["peak_mib"]) for q in ratios for r in records
               if r["impl"] == impl and r["ratio"] == q]
        if pts:
            ax.plot(*zip(*pts), style, label=impl)
    for name, gb in PAPER.items():
        bx.plot([100 * q for q in RATIOS], gb, "o-", label=name)
    for axis, unit, what, qs in ((ax, "MiB", title, ratios), (bx, "GB", "the TIP paper (materialised OPD)", RATIOS)):
        style_axis(axis, "tokens trained on (%)", f"peak memory ({unit})", title=what, xticks=[100 * q for q in qs],
                   invert_x=True, from_zero=True)
    save_figure(fig, path, dpi=72)


# ------------------------------------------------------------------------------------------------ driver


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="tiny shapes (CI smoke run, seconds)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--ratios", default=",".join(f"{q:g}" for q in RATIOS))
    p.add_argument("--rule", default="soft_or", help="TIP selection rule (the same for every impl)")
    for f in dataclasses.fields(Shapes):
        p.add_argument("--" + f.name.replace("_", "-"), type=str if f.name == "dtype" else int, default=None,
                       help="preset: " + ", ".join(f"{k} {getattr(v, f.name)}" for k, v in PRESETS.items()))
    p.add_argument("--warmup", type=int, default=None, help="steps before the measured one (default: 1 on CUDA, 0 "
                   "on the CPU)")
    p.add_argument("--score-budget-mib", type=int, default=None,
                   help="fp32 temporaries of a materialised variant's no-grad scoring chunk (default: the torch "
                   "torch backend's tile budget, backends.chunked.tile_budget_bytes())")
    p.add_argument("--threads", type=int, default=0, help="torch threads per CPU cell (0: torch's default)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per cell")
    p.add_argument("--out-dir", default=None, help="where the Markdown table and the PNG go "
                   "(default runs/reproduce_memory-<device>[-quick])")
    p.add_argument("--json", default=None, help="also write the records [{impl, ratio, peak_mib, …}] here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    preset = PRESETS["quick" if a.quick else a.device]
    a.shapes = dataclasses.replace(preset, **{f.name: getattr(a, f.name) for f in dataclasses.fields(Shapes)
                                              if getattr(a, f.name) is not None})
    try:
        dtype_of(a.shapes.dtype)
    except ValueError as err:
        p.error(f"--dtype: {err}")
    a.impls = parse_csv(a.impls)
    for impl in a.impls:
        if impl not in IMPLS:
            p.error(f"unknown impl {impl!r}; expected some of {','.join(IMPLS)}")
    a.ratios = parse_csv(a.ratios, float)
    if a.score_budget_mib is None:
        a.score_budget_mib = max(1, lib.tile_budget_bytes() // MIB)
    if a.warmup is None:
        a.warmup = 1 if a.device == "cuda" else 0
    if a.out_dir is None:
        a.out_dir = os.path.join("runs", f"reproduce_memory-{a.device}" + ("-quick" if a.quick else ""))
    return a


def run(args) -> List[dict]:
    """Every (impl, ratio) cell in its own process; returns the records."""
    import transformers.models.qwen3.modeling_qwen3  # noqa: F401 - imported once, before the cells fork
    lib.opd_models()  # imported once, before the cells fork

    records = []
    cells = [(impl, q) for q in args.ratios for impl in args.impls]
    t0 = time.perf_counter()
    for i, (impl, q) in enumerate(cells, 1):
        config = {"shapes": dataclasses.asdict(args.shapes), "device": args.device, "impl": impl, "ratio": q,
                  "rule": args.rule, "warmup": args.warmup, "budget_bytes": args.score_budget_mib * MIB}
        if args.device == "cuda":
            rec = run_json_worker([os.path.abspath(__file__), "--worker", json.dumps(config)], timeout=args.timeout)
        else:
            rec = run_in_fork(measure_cell, config, threads=args.threads or torch.get_num_threads(),
                              timeout=args.timeout)
        records.append(rec)
        log(f"{i}/{len(cells)} {impl} ρ={q:g}: peak {rec['peak_mib']:.0f} MiB (step {rec['step_extra_mib']:.0f} "
            f"MiB, {rec['seconds']:.1f} s; {time.perf_counter() - t0:.0f} s so far)")
    return records


def report(records: List[dict], args) -> str:
    sh = args.shapes
    n_tok = records[0]["tokens"] if records else 0
    head = (f"# Peak memory of one OPD step vs retention ratio ({args.device}{', --quick' if args.quick else ''})\n\n"
            f"Student: Qwen3 architecture, hidden {sh.s_hidden}, MLP {sh.s_inter}, {sh.s_layers} layers, tied "
            f"embeddings; teacher: hidden {sh.t_hidden}, MLP {sh.t_inter}, {sh.t_layers} layers; vocabulary "
            f"{sh.vocab}; {sh.dtype}; batch {sh.batch} × ({sh.prompt_len} prompt + {sh.response_len} response) "
            f"tokens ({n_tok} scored response tokens); rule `{args.rule}`; AdamW; "
            f"{records[0]['method'] if records else ''}, one fresh process per cell.")
    return "\n\n".join([head, env_markdown(args.device), tables(records, args.ratios),
                        markdown_table(check_goals(records), ["claim", "measured", "met"])]) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure_cell(json.loads(args.worker))))
        return 0
    t0 = time.perf_counter()
    records = run(args)
    text = report(records, args) + f"\nFinished in {time.perf_counter() - t0:.0f} s.\n"
    print(text)
    write_text(os.path.join(args.out_dir, "memory.md"), text)
    try:
        plot(records, args.ratios, os.path.join(args.out_dir, "memory.png"),
             f"one OPD step, {args.device}, V={args.shapes.vocab}")
    except ImportError as err:  # matplotlib is optional (the bench/dev extras)
        log(f"no plot: {err}")
    write_json(args.json, records)
    log(f"wrote {args.out_dir}/memory.md, memory.png" + (f" and {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
