"""tk.divergence_from_logits: value and d logits against the float64 truth, every backend and divergence."""

from __future__ import annotations

import torch

from tests._harness import (ALL_BACKENDS, DIV_IDS, DIVS, DTYPES, INTERPRETED, assert_close64, assert_rule, axis,
                            gradient_floors, grid, logits_case, noncontig, run_from_logits, shape_for,
                            truth_from_logits, upstream)


@grid("backend,kind,beta,reduction,variant,dtype", axis(ALL_BACKENDS), axis(DIVS, DIV_IDS), axis(["none", "mean"]),
      axis(["plain", "T2.5", "BLD", "noncontig", "scaled_x100"]),
      axis(DTYPES + [torch.float64], ["fp32", "bf16", "fp64"]),
      drop=lambda backend, kind, beta, reduction, variant, dtype: backend == "triton" and (
          dtype == torch.float64 or INTERPRETED and variant not in ("plain", "noncontig")),
      slow=lambda backend, kind, beta, reduction, variant, dtype: backend == "reference" or dtype == torch.bfloat16)
def test_divergence_from_logits(backend, kind, beta, reduction, variant, dtype):
    n = shape_for(backend)[0]
    lead = (1, n) if variant == "BLD" else None
    s, u = logits_case(backend, dtype, seed=8, lead=lead, scale=10.0 if variant == "scaled_x100" else 1.0)
    temperature = 2.5 if variant == "T2.5" else 0.7
    go = upstream(reduction, s.shape[:-1])
    layout = noncontig if variant == "noncontig" else None
    args = (kind, beta, temperature, reduction, go)
    fast = run_from_logits(s, u, backend, *args, layout=layout)
    assert fast["d_logits"].dtype == dtype and fast["d_logits"].shape == s.shape
    truth = truth_from_logits(s, u, *args)
    floors = gradient_floors(go, temperature) if variant == "scaled_x100" else None
    if dtype == torch.float64:
        assert_close64(fast, truth, what=variant)
    else:
        assert_rule(fast, run_from_logits(s, u, "reference", *args), truth, dtype, f"{kind} {variant}", floors)
