"""tk.fused_linear_entropy: value and gradients against the float64 truth, every backend, reduction and layout."""

from __future__ import annotations

import torch

from tests._harness import (ALL_BACKENDS, DTYPES, INTERPRETED, assert_close64, assert_rule, axis, gradient_floors,
                            grid, make_case, noncontig, run_entropy, shape_for, truth_entropy, upstream)


@grid("backend,reduction,variant,dtype", axis(ALL_BACKENDS), axis(["none", "sum", "mean"]),
      axis(["plain", "T2.5", "BLD", "noncontig", "no_bias", "scaled_x100"]),
      axis(DTYPES + [torch.float64], ["fp32", "bf16", "fp64"]),
      drop=lambda backend, reduction, variant, dtype: backend == "triton" and (
          dtype == torch.float64 or INTERPRETED and reduction == "sum"),
      slow=lambda backend, reduction, variant, dtype: backend == "reference" or dtype == torch.bfloat16)
def test_fused_linear_entropy(backend, reduction, variant, dtype):
    n, v, ds, dt = shape_for(backend)
    kw, temperature, layout = {}, 0.7, None
    if variant == "T2.5":
        temperature = 2.5
    elif variant == "BLD":
        kw["lead"] = (1, n)
    elif variant == "noncontig":
        layout = noncontig
    elif variant == "no_bias":
        kw["student_bias"] = False
    elif variant == "scaled_x100":
        kw["scale"] = 10.0
    case = make_case(n, v, ds, dt, teacher="none", dtype=dtype, seed=7, **kw)
    go = upstream(reduction, case.lead)
    fast = run_entropy(case, backend, temperature, reduction, go, layout=layout)
    truth = truth_entropy(case, temperature, reduction, go)
    floors = gradient_floors(go, temperature, case.hs, case.ws) if variant == "scaled_x100" else None
    if dtype == torch.float64:
        assert_close64(fast, truth, what=variant)
    else:
        assert_rule(fast, run_entropy(case, "reference", temperature, reduction, go), truth, dtype, variant,
                    floors)
