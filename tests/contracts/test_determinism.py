"""Deterministic mode (docs/design.md §8): ``tk.set_options(deterministic=True)``.

Bitwise-identical outputs and gradients across repeated runs (same inputs, same process), for the torch backend
and the triton backend (interpreted here at tiny shapes, compiled on a GPU), every op and the TIP loss; the flag
turns on ``torch.use_deterministic_algorithms`` inside the torch/reference backends and restores it afterwards.
"""

from __future__ import annotations

import pytest
import torch

import tipkernels as tk

from tests._harness import DEVICE, deterministic_scope, make_case, options, slow, torch_backend

REPEATS = 3


def one_run(backend, case, kind, beta):
    """Every public op once: values, stats and gradients, as a flat dict of tensors."""
    hs, ws, bs = (t.detach().clone().requires_grad_(True) for t in (case.hs, case.ws, case.bs))
    out = {}
    if kind == "entropy":
        val = tk.fused_linear_entropy(hs, ws, bias=bs, temperature=0.7, backend=backend)
    else:
        val = tk.fused_linear_divergence(hs, ws, case.ht, case.wt, student_bias=bs, teacher_bias=case.bt,
                                         divergence=kind, beta=beta, temperature=0.7, backend=backend)
    go = torch.randn(val.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    (val * go).sum().backward()
    out.update(value=val.detach(), d_hidden=hs.grad, d_weight=ws.grad, d_bias=bs.grad)
    st = tk.token_stats(case.hs, case.ws, case.ht, case.wt, student_bias=case.bs, teacher_bias=case.bt,
                        backend=backend)
    out.update({f"stats.{k}": v for k, v in st.as_dict().items()})
    s = (case.hs.float() @ case.ws.float().t()).detach().requires_grad_(True)
    u = case.hs.float() @ case.ws.float().t() * 0.5 + 1
    lv = tk.divergence_from_logits(s, u, divergence="jsd" if kind == "entropy" else kind, beta=beta, backend=backend)
    lv.sum().backward()
    out.update(logits_value=lv.detach(), d_logits=s.grad)
    hs2, ws2 = case.hs.detach().clone().requires_grad_(True), case.ws.detach().clone().requires_grad_(True)
    mask = torch.ones(case.hs.shape[0], dtype=torch.bool, device=DEVICE).reshape(1, -1)
    mask[0, ::4] = False
    loss = tk.TIPDistillationLoss(rule="soft_or", ratio=0.5, backend=backend)(
        hs2.reshape(1, *hs2.shape), ws2, case.ht.reshape(1, *case.ht.shape), case.wt, mask)
    loss.loss.backward()
    out.update(tip_loss=loss.loss.detach(), tip_d_hidden=hs2.grad, tip_d_weight=ws2.grad)
    return out


_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
           torch.float16: torch.int16}


def _bits(t):
    """The tensor's bit pattern (so that -0.0 vs 0.0 or NaN payloads would count as differences)."""
    return t.view(_INT_OF[t.dtype]) if t.is_floating_point() else t


def assert_bitwise(runs):
    first = runs[0]
    for other in runs[1:]:
        assert first.keys() == other.keys()
        for key, t in first.items():
            assert t.dtype == other[key].dtype and t.shape == other[key].shape, key
            assert torch.equal(_bits(t), _bits(other[key])), key


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("jsd", 0.3), ("entropy", 0.0)],
                         ids=["rkl", "jsd0.3", "ent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["torch", slow("triton")])
def test_bitwise_identical_across_runs(backend, dtype, kind, beta):
    """With deterministic=True, repeated runs give bit-identical values, stats and gradients (several row and
    vocabulary chunks for torch; several vocabulary splits and backward blocks for triton)."""
    n, v = (13, 37) if backend == "triton" else (29, 101)
    case = make_case(n, v, 24, 19, dtype=dtype, seed=21)
    with tk.set_options(deterministic=True):
        runs = [one_run(backend, case, kind, beta) for _ in range(REPEATS)]
    assert_bitwise(runs)
    assert torch.isfinite(runs[0]["d_hidden"]).all() and runs[0]["d_hidden"].abs().sum() > 0


@pytest.mark.slow
def test_torch_chunked_runs_bitwise(monkeypatch):
    """Tiny tiles (3 rows x 16 columns: many chunks, ragged ends) are reproduced bit for bit too."""
    monkeypatch.setattr(torch_backend, "tile_shape", lambda n, v, budget_bytes=None: (min(3, max(n, 1)), min(16, v)))
    case = make_case(29, 101, 24, 19, seed=22)
    with tk.set_options(deterministic=True):
        runs = [one_run("torch", case, "jsd", 0.3) for _ in range(REPEATS)]
    assert_bitwise(runs)


def test_deterministic_flag_scopes_torch_deterministic_algorithms(monkeypatch):
    """The flag turns torch.use_deterministic_algorithms on inside the backends only, and restores it."""
    seen = []
    real = torch_backend.grad_logits_tile

    def spy(*args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_backend, "grad_logits_tile", spy)
    case = make_case(7, 11, 5, 3, seed=23)
    before = torch.are_deterministic_algorithms_enabled()
    for flag in (False, True):
        with tk.set_options(deterministic=flag):
            assert options.deterministic is flag
            hs = case.hs.detach().clone().requires_grad_(True)
            tk.fused_linear_divergence(hs, case.ws, case.ht, case.wt, backend="torch").sum().backward()
            assert torch.are_deterministic_algorithms_enabled() is before  # restored after each op
        assert seen and seen[-1] is (flag or before), (flag, seen)
    assert options.deterministic is False
    with tk.set_options(deterministic=True):
        with pytest.raises(RuntimeError, match="boom"):
            with deterministic_scope():
                assert torch.are_deterministic_algorithms_enabled()
                raise RuntimeError("boom")
        assert torch.are_deterministic_algorithms_enabled() is before  # restored on error too


def test_deterministic_mode_changes_no_value():
    """On and off give the same bits here (the CPU kernels are already deterministic): the flag costs no accuracy."""
    case = make_case(29, 101, 24, 19, seed=24)
    off = one_run("torch", case, "reverse_kl", 0.5)
    with tk.set_options(deterministic=True):
        on = one_run("torch", case, "reverse_kl", 0.5)
    assert_bitwise([off, on])
