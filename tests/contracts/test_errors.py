"""Bad input gets a ValueError/TypeError naming the argument and the shapes (docs/design.md §3).

Each case calls a public op with one argument wrong and checks the exception type and that the message names
what is wrong (the argument, and the shapes or values involved), before any backend runs.
"""

from __future__ import annotations

import math

import pytest
import torch

import tipkernels as tk

N, V, DS, DT = 6, 11, 8, 5


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return dict(
        hs=torch.randn(N, DS, generator=g).to(dtype),
        ws=torch.randn(V, DS, generator=g).to(dtype),
        ht=torch.randn(N, DT, generator=g).to(dtype),
        wt=torch.randn(V + 3, DT, generator=g).to(dtype),
    )


def div(**over):
    x = inputs()
    args = dict(student_hidden=x["hs"], student_weight=x["ws"], teacher_hidden=x["ht"], teacher_weight=x["wt"])
    args.update(over)
    return tk.fused_linear_divergence(**args)


# (what, call, exception, words the message must contain)
CASES = [
    ("hidden size vs weight", lambda: div(student_weight=torch.randn(V, DS + 1)), ValueError,
     ["student_hidden", f"{DS}", f"({V}, {DS + 1})"]),
    ("teacher hidden size vs weight", lambda: div(teacher_weight=torch.randn(V, DT + 2)), ValueError,
     ["teacher_hidden", f"({V}, {DT + 2})"]),
    ("token counts", lambda: div(teacher_hidden=torch.randn(N + 1, DT)), ValueError,
     ["token counts", f"({N},)", f"({N + 1}, {DT})"]),
    ("token counts [B, L]", lambda: div(student_hidden=torch.randn(2, 3, DS), teacher_hidden=torch.randn(3, 2, DT)),
     ValueError, ["token counts", "(2, 3)", "(3, 2, 5)"]),
    ("teacher vocabulary smaller", lambda: div(teacher_weight=torch.randn(V - 1, DT)), ValueError,
     ["teacher vocabulary", f"{V - 1}", f"{V}"]),
    ("teacher logits vocabulary smaller", lambda: tk.divergence_from_logits(torch.randn(N, V), torch.randn(N, V - 2)),
     ValueError, ["teacher vocabulary", f"{V - 2}"]),
    ("hidden rank", lambda: div(student_hidden=torch.randn(DS)), ValueError, ["student_hidden", "dims", f"({DS},)"]),
    ("integer hidden", lambda: div(student_hidden=torch.ones(N, DS, dtype=torch.int64)), TypeError,
     ["student_hidden", "int64"]),
    ("mixed dtypes", lambda: div(teacher_hidden=torch.randn(N, DT, dtype=torch.float64)), TypeError,
     ["mixed dtypes", "teacher_hidden: torch.float64", "student_hidden: torch.float32"]),
    ("not a tensor", lambda: div(student_weight=[[1.0]]), TypeError, ["student_weight", "list"]),
    ("student bias shape", lambda: div(student_bias=torch.randn(V + 1)), ValueError, ["student_bias", f"({V + 1},)"]),
    ("teacher bias without weight", lambda: tk.fused_linear_divergence(
        inputs()["hs"], inputs()["ws"], teacher_logits=torch.randn(N, V), teacher_bias=torch.randn(V)),
     ValueError, ["teacher_bias"]),
    ("teacher twice", lambda: div(teacher_logits=torch.randn(N, V)), ValueError, ["teacher_logits", "not both"]),
    ("no teacher", lambda: div(teacher_hidden=None, teacher_weight=None), ValueError, ["teacher is required"]),
    ("half a teacher", lambda: div(teacher_weight=None), ValueError, ["teacher_hidden", "teacher_weight"]),
    ("labels out of range", lambda: tk.token_stats(inputs()["hs"], inputs()["ws"],
                                                   labels=torch.tensor([0, 1, V, 2, 3, 4])), ValueError,
     ["labels out of range", "labels[2]", f"{V}"]),
    ("negative label", lambda: tk.token_stats(inputs()["hs"], inputs()["ws"],
                                              labels=torch.tensor([0, -1, 1, 2, 3, 4])), ValueError,
     ["labels out of range", "labels[1]", "-100"]),
    ("float labels", lambda: tk.token_stats(inputs()["hs"], inputs()["ws"], labels=torch.zeros(N)), TypeError,
     ["labels", "integer"]),
    ("labels shape", lambda: tk.token_stats(inputs()["hs"], inputs()["ws"], labels=torch.zeros(N + 1,
                                                                                               dtype=torch.long)),
     ValueError, ["labels", f"({N + 1},)", f"({N},)"]),
    ("temperature 0", lambda: div(temperature=0.0), ValueError, ["temperature", "0.0"]),
    ("temperature negative", lambda: tk.fused_linear_entropy(inputs()["hs"], inputs()["ws"], temperature=-1),
     ValueError, ["temperature", "-1"]),
    ("temperature nan", lambda: div(temperature=math.nan), ValueError, ["temperature", "nan"]),
    ("temperature inf", lambda: div(temperature=math.inf), ValueError, ["temperature", "inf"]),
    ("temperature str", lambda: div(temperature="1"), TypeError, ["temperature", "str"]),
    ("beta > 1", lambda: div(divergence="jsd", beta=1.5), ValueError, ["beta", "1.5"]),
    ("beta < 0", lambda: div(divergence="jsd", beta=-0.1), ValueError, ["beta", "-0.1"]),
    ("unknown divergence", lambda: div(divergence="kl"), ValueError, ["divergence", "'kl'", "reverse_kl"]),
    ("unknown reduction", lambda: div(reduction="avg"), ValueError, ["reduction", "'avg'", "mean"]),
    ("unknown backend", lambda: div(backend="cuda"), ValueError, ["backend", "'cuda'", "triton"]),
    ("weights shape", lambda: div(weights=torch.ones(N + 1)), ValueError, ["weights", f"({N + 1},)", f"({N},)"]),
    ("integer weights", lambda: div(weights=torch.ones(N, dtype=torch.long)), TypeError, ["weights"]),
    ("NaN hidden", lambda: div(student_hidden=inputs()["hs"].index_put((torch.tensor([4]), torch.tensor([2])),
                                                                      torch.tensor(math.nan))),
     ValueError, ["student_hidden", "non-finite", "(4, 2)", "check_finite=False"]),
    ("Inf teacher weight", lambda: div(teacher_weight=inputs()["wt"].index_put((torch.tensor([12]), torch.tensor([0])),
                                                                              torch.tensor(math.inf))),
     ValueError, ["teacher_weight", "non-finite", "(12, 0)"]),
    ("NaN logits", lambda: tk.divergence_from_logits(torch.randn(N, V), torch.full((N, V), math.nan)), ValueError,
     ["teacher_logits", "non-finite", "(0, 0)"]),
]


@pytest.mark.parametrize("what,call,exc,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_names_argument_and_shapes(what, call, exc, words):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{what}: {word!r} not in {message!r}"


def test_check_finite_opt_out():
    """With the check off, a NaN input flows through (NaN out, no exception); the option is restored after."""
    x = inputs()
    hs = x["hs"].clone()
    hs[1, 3] = math.nan
    with tk.set_options(check_finite=False):
        out = tk.fused_linear_divergence(hs, x["ws"], x["ht"], x["wt"], backend="torch")
        assert torch.isnan(out[1]) and torch.isfinite(out[0])
    with pytest.raises(ValueError, match="student_hidden"):
        tk.fused_linear_divergence(hs, x["ws"], x["ht"], x["wt"], backend="torch")


def test_set_options_rejects_unknown_and_non_bool():
    with pytest.raises(ValueError, match="unknown option"):
        tk.set_options(check_nan=True)
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        tk.set_options(check_finite=1)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        div(backend="triton")


def test_entropy_and_token_stats_validate_too():
    x = inputs()
    with pytest.raises(ValueError, match="student_hidden's hidden size"):
        tk.fused_linear_entropy(x["hs"], x["wt"])
    with pytest.raises(ValueError, match="unknown reduction"):
        tk.fused_linear_entropy(x["hs"], x["ws"], reduction="max")
    with pytest.raises(ValueError, match="teacher vocabulary"):
        tk.token_stats(x["hs"], x["ws"], teacher_logits=torch.randn(N, V - 1))
