"""The roofline: predicted time per phase and strategy of the fused linear divergence from its matmul FLOPs and HBM
bytes, against a matmul rate and a copy bandwidth (measured by the GPU plan; defaults: an H200's 790 TFLOP/s bf16
and 4.3 TB/s, benchmarks/TUNING.md).

Each phase is a sequence of steps; a step takes ``max(flops / rate, bytes / bandwidth)`` (a step's own compute and
traffic overlap, consecutive steps do not). The steps of each strategy (docs/design.md §2, §4):

- ``fused`` (the fused Triton kernels): the logits never leave registers. Scoring/forward: one GEMM-sized step
  reading the inputs once. Backward ("matmul" strategy): the logits recomputed, the 16-bit ``dS`` written once and
  read by the two cuBLAS gradient products.
- ``cublas`` (cuBLAS chunks): the forward's GEMMs write fp32 chunks (their writes overlap the GEMMs), then the
  epilogue reads both models' chunks once (a bandwidth-bound step). Backward: chunks recomputed, the ``dS`` kernel
  reads them and writes the 16-bit ``dS``, the gradient products read it.
- ``fused_grad`` (cuBLAS chunks, the gradient in the forward's sweep): the step is the forward's GEMMs, the
  statistics epilogue, the ``dS`` pass (one more read of both blocks) and the gradient products; the ``d weight``
  product also reads and writes its accumulator once per row block.

``predict`` returns seconds per phase; ``floors`` the FLOP-only floors of TUNING.md (scoring ``2·N·V·(D_s+D_t)``,
step with recompute that twice plus ``4·N·V·D_s``, step with the gradient in the sweep the scoring plus
``4·N·V·D_s``). The harness never imports tipkernels here: the numbers are arithmetic on the shape.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

#: An H200's measured bf16 matmul rate (TFLOP/s) and device-to-device copy bandwidth (TB/s, read + write).
H200_TFLOPS = 790.0
H200_TBS = 4.3

STRATEGIES = ("fused", "cublas", "fused_grad")
PHASES = ("scoring", "forward", "backward", "step")

Step = Tuple[str, float, float]  # (what, flops, bytes)


def steps(strategy: str, phase: str, n: int, v: int, d_s: int, d_t: int, *, itemsize: int = 2, ratio: float = 1.0,
          sweep_rows: Optional[int] = None, jsd: bool = False) -> List[Step]:
    """The steps of ``phase`` ("scoring", "forward", "backward", "step") under ``strategy``; ``ratio`` the share of
    rows differentiated (the TIP loss), ``sweep_rows`` fused_grad's row block (default: 706, what 1 GiB holds at
    V=151936 with a 16-bit ``dS``), ``jsd``: the JSD's second pass over the logits."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
    nv, m = float(n) * v, ratio * n
    inputs = itemsize * (n * (d_s + d_t) + v * (d_s + d_t))
    gemm_fwd = 2.0 * nv * (d_s + d_t)
    fp32_pass = 4.0 * nv * 2  # both models' fp32 logits, read once
    out: List[Step] = []
    if strategy == "fused_grad":
        if phase in ("scoring", "forward"):
            return steps("cublas", phase, n, v, d_s, d_t, itemsize=itemsize, jsd=jsd)
        if phase == "backward":
            return [("scale the stored gradients", 0.0, itemsize * (n * d_s + v * d_s) * 2)]
        rows = sweep_rows or 706
        blocks = math.ceil(n / rows)
        out = [("logit GEMMs (fp32 out)", gemm_fwd, inputs + fp32_pass), ("statistics epilogue", 0.0, fp32_pass)]
        if jsd:
            out.append(("JSD epilogue", 0.0, fp32_pass))
        out += [("dS kernel", 0.0, fp32_pass + itemsize * nv),
                ("d h = dS·W", 2.0 * nv * d_s, itemsize * (nv + v * d_s + n * d_s)),
                ("d W += dSᵀ·h", 2.0 * nv * d_s, itemsize * (nv + n * d_s) + 2 * itemsize * blocks * v * d_s)]
        return out
    forward = ([("fused stats kernel", gemm_fwd, inputs)] if strategy == "fused" else
               [("logit GEMMs (fp32 out)", gemm_fwd, inputs + fp32_pass), ("statistics epilogue", 0.0, fp32_pass)])
    if jsd:
        forward += ([("fused JSD kernel", gemm_fwd, inputs)] if strategy == "fused" else
                    [("logit GEMMs again", gemm_fwd, inputs + fp32_pass), ("JSD epilogue", 0.0, fp32_pass)])
    mv = m * v
    backward = ([("dS kernel (logits recomputed)", 2.0 * mv * (d_s + d_t), inputs + itemsize * mv)]
                if strategy == "fused" else
                [("logit GEMMs (fp32 out)", 2.0 * mv * (d_s + d_t), inputs + 4.0 * mv * 2),
                 ("dS kernel", 0.0, 4.0 * mv * 2 + itemsize * mv)])
    backward += [("d h = dS·W", 2.0 * mv * d_s, itemsize * (mv + v * d_s + m * d_s)),
                 ("d W = dSᵀ·h", 2.0 * mv * d_s, itemsize * (mv + m * d_s + v * d_s))]
    if phase in ("scoring", "forward"):
        return forward
    if phase == "backward":
        return backward
    return forward + backward


def step_seconds(step: Step, tflops: float, tbs: float) -> float:
    _, flops, nbytes = step
    return max(flops / (tflops * 1e12), nbytes / (tbs * 1e12))


def predict(strategy: str, phase: str, n: int, v: int, d_s: int, d_t: int, *, tflops: float = H200_TFLOPS,
            tbs: float = H200_TBS, **kw) -> float:
    """Predicted seconds of ``phase`` under ``strategy`` (see :func:`steps` for the keywords)."""
    return sum(step_seconds(s, tflops, tbs) for s in steps(strategy, phase, n, v, d_s, d_t, **kw))


def floors(n: int, v: int, d_s: int, d_t: int, tflops: float = H200_TFLOPS) -> Dict[str, float]:
    """FLOP-only floors (seconds): scoring, step with recompute, step with the gradient in the sweep."""
    fwd = 2.0 * n * v * (d_s + d_t)
    grad = 4.0 * n * v * d_s
    rate = tflops * 1e12
    return {"scoring": fwd / rate, "step (recompute)": (2 * fwd + grad) / rate, "step (gradient in the sweep)":
            (fwd + grad) / rate}


def table(n: int, v: int, d_s: int, d_t: int, *, tflops: float = H200_TFLOPS, tbs: float = H200_TBS,
          measured: Optional[Dict[Tuple[str, str], float]] = None, strategies: Sequence[str] = STRATEGIES,
          phases: Sequence[str] = PHASES, others: Optional[Dict[str, Dict[str, float]]] = None, **kw) -> str:
    """Markdown: per strategy and phase the predicted time, and ``measured[(strategy, phase)]`` (seconds) with its
    ratio to the prediction where given; ``others`` adds rows of measured seconds alone (``{name: {phase: s}}``)."""
    measured = measured or {}
    head = "| strategy | " + " | ".join(phases) + " |"
    lines = [f"Roofline at N={n}, V={v}, D_s={d_s}, D_t={d_t} against {tflops:.4g} TFLOP/s and {tbs:.3g} TB/s "
             "(cell: predicted ms; measured ms and measured / predicted where measured):", "", head,
             "|" + " --- |" * (len(phases) + 1)]
    for s in strategies:
        cells = []
        for p in phases:
            pred = predict(s, p, n, v, d_s, d_t, tflops=tflops, tbs=tbs, **kw)
            got = measured.get((s, p))
            cells.append(f"{pred * 1e3:.3g}" + (f"; **{got * 1e3:.3g}** ({got / pred:.2f}×)" if got else ""))
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    for name, times in (others or {}).items():
        lines.append(f"| {name} (measured) | " + " | ".join(
            f"**{times[p] * 1e3:.3g}**" if times.get(p) else "–" for p in phases) + " |")
    fl = floors(n, v, d_s, d_t, tflops)
    lines += ["", "FLOP floors: " + ", ".join(f"{k} {x * 1e3:.3g} ms" for k, x in fl.items()) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(8192, 151936, 4096, 4096))
