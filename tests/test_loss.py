"""TIPDistillationLoss: value and gradient against float64 materialised logits over the same selected tokens."""

import pytest
import torch

import tipkernels as tk
from tipkernels.selection import RULES

from tests._harness import DEVICE, reference, torch_backend, triton_backend

B, L, DS, DT, V = 3, 13, 24, 19, 37


def _inputs(dtype=torch.float64, seed=0, pad=5):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, L, DS, generator=g, dtype=torch.float64)
    ws = torch.randn(V, DS, generator=g, dtype=torch.float64) / 3
    ht = torch.randn(B, L, DT, generator=g, dtype=torch.float64)
    wt = torch.randn(V + pad, DT, generator=g, dtype=torch.float64) / 3
    bs = torch.randn(V, generator=g, dtype=torch.float64)
    mask = torch.rand(B, L, generator=g) > 0.3
    mask[1] = False  # an empty sequence
    mask[2, :] = True
    cast = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return cast(hs).requires_grad_(), cast(ws).requires_grad_(), cast(ht), cast(wt), cast(bs).requires_grad_(), \
        mask.to(DEVICE)


def _truth(hs, ws, bs, ht, wt, sel_mask, weights, divergence, beta, temperature):
    """Weighted mean of the divergence over the selected tokens, in float64 on materialised logits."""
    leaves = [t.detach().double().requires_grad_() for t in (hs, ws, bs)]
    h, w, b = leaves
    s = (h[sel_mask] @ w.t() + b) / temperature
    u = (ht.double()[sel_mask] @ wt.double()[:V].t()) / temperature
    vals = reference.divergence(s, u, divergence, beta)
    wsel = weights.double()[sel_mask]
    loss = (vals * wsel).sum() / wsel.sum().clamp_min(1e-300)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if sel_mask.any() else [torch.zeros_like(x)
                                                                                          for x in leaves]
    return loss.detach(), grads


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
def test_loss_matches_float64_reference_on_selected_tokens(rule, divergence, beta):
    hs, ws, ht, wt, bs, mask = _inputs()
    fn = tk.TIPDistillationLoss(rule=rule, ratio=0.4, divergence=divergence, beta=beta, temperature=1.7,
                                backend="torch")
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    out = fn(hs, ws, ht, wt, mask, student_bias=bs, generator=gen)
    sel = out.selection
    assert not (sel.mask & ~mask).any()
    if rule == "all":
        assert torch.equal(sel.mask, mask)
    truth, tgrads = _truth(hs, ws, bs, ht, wt, sel.mask, sel.weights, divergence, beta, 1.7)
    assert torch.allclose(out.loss.detach(), truth, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(out.loss, [hs, ws, bs])
    for g, t in zip(grads, tgrads):
        assert torch.allclose(g, t, rtol=1e-9, atol=1e-12)
    # unselected rows get exactly zero gradient
    assert grads[0][~sel.mask].abs().max() == 0


def test_stats_match_token_stats_on_valid_tokens():
    hs, ws, ht, wt, bs, mask = _inputs()
    out = tk.TIPDistillationLoss(rule="soft_or", ratio=0.5, backend="torch")(hs, ws, ht, wt, mask, student_bias=bs)
    full = tk.token_stats(hs, ws, ht, wt, student_bias=bs, backend="reference")
    for name in ("student_lse", "teacher_lse", "entropy", "entropy_norm", "reverse_kl", "forward_kl"):
        got, want = getattr(out.stats, name), getattr(full, name)
        assert torch.allclose(got[mask], want[mask], rtol=1e-10, atol=1e-12), name
        assert (got[~mask] == 0).all(), name
    m = out.metrics
    assert m["valid_tokens"] == mask.sum().item()
    assert m["selected_tokens"] == out.selection.mask.sum().item()
    assert m["selected_fraction"] == pytest.approx(m["selected_tokens"] / m["valid_tokens"])
    assert m["reverse_kl"] == pytest.approx(full.reverse_kl[mask].mean().item())
    assert m["entropy"] == pytest.approx(full.entropy[mask].mean().item())
    assert sum(m[f"q{i}_valid"] for i in range(1, 5)) == pytest.approx(1.0)
    assert sum(m[f"q{i}_selected"] for i in range(1, 5)) == pytest.approx(1.0)


def test_backward_touches_only_selected_rows_and_forward_is_not_repeated(monkeypatch):
    hs, ws, ht, wt, bs, mask = _inputs()
    calls = {"forward_rows": [], "backward_rows": []}
    fwd, bwd = torch_backend.forward_stats, torch_backend.backward

    def counting_forward(prob):
        calls["forward_rows"].append(prob.num_rows)
        return fwd(prob)

    def counting_backward(prob, kind, grad_rows, saved, beta=0.5):
        calls["backward_rows"].append(int((grad_rows != 0).sum()))
        return bwd(prob, kind, grad_rows, saved, beta)

    monkeypatch.setattr(torch_backend, "forward_stats", counting_forward)
    monkeypatch.setattr(torch_backend, "backward", counting_backward)
    out = tk.TIPDistillationLoss(rule="entropy_topk", ratio=0.2, backend="torch")(hs, ws, ht, wt, mask)
    out.loss.backward()
    n_sel = int(out.selection.mask.sum())
    assert 0 < n_sel < int(mask.sum())
    assert calls["forward_rows"] == [int(mask.sum())]  # one scoring pass over the valid rows, nothing more
    assert calls["backward_rows"] == [n_sel]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_empty_selection_gives_zero_connected_loss(backend):
    hs, ws, ht, wt, bs, mask = _inputs()
    fn = tk.TIPDistillationLoss(rule="soft_or", ratio=0.05, backend=backend)  # ⌊0.05·m⌋ = 0 for every row
    out = fn(hs, ws, ht, wt, mask)
    assert out.selection.mask.sum() == 0
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    g = torch.autograd.grad(out.loss, [hs, ws])
    assert all(torch.isfinite(x).all() and (x == 0).all() for x in g)
    out = fn(hs, ws, ht, wt, torch.zeros_like(mask))
    assert out.loss.item() == 0.0 and out.metrics["selected_fraction"] == 0.0


def test_ratio_one_equals_all_and_fused_mean():
    hs, ws, ht, wt, bs, mask = _inputs()
    a = tk.TIPDistillationLoss(rule="soft_or", ratio=1.0, backend="torch")(hs, ws, ht, wt, mask).loss
    b = tk.TIPDistillationLoss(rule="all", backend="torch")(hs, ws, ht, wt, mask).loss
    c = tk.fused_linear_divergence(hs, ws, ht, wt, weights=mask.double(), reduction="mean", backend="torch")
    assert torch.allclose(a, b) and torch.allclose(a, c)


def test_bf16_inputs_follow_design_tolerance():
    hs, ws, ht, wt, bs, mask = _inputs(torch.bfloat16)
    out = tk.TIPDistillationLoss(rule="q3", ratio=0.5, backend="torch")(hs, ws, ht, wt, mask)
    truth, _ = _truth(hs, ws, torch.zeros(V, dtype=torch.float64, device=DEVICE), ht, wt, out.selection.mask,
                      out.selection.weights, "reverse_kl", 0.5, 1.0)
    ref = tk.TIPDistillationLoss(rule="q3", ratio=0.5, backend="reference")(hs, ws, ht, wt, mask)
    assert torch.equal(ref.selection.mask, out.selection.mask)
    err = (out.loss.double() - truth).abs().item()
    ref_err = (ref.loss.double() - truth).abs().item()
    assert err <= ref_err + 1e-2 * max(1.0, truth.abs().item())


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(ratio=0.0), ValueError, "ratio"),
        (dict(ratio=1.5), ValueError, "ratio"),
        (dict(rule="bogus"), ValueError, "rule"),
        (dict(budget="per_token"), ValueError, "budget"),
        (dict(divergence="l2"), ValueError, "divergence"),
        (dict(beta=2.0), ValueError, "beta"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_configuration(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        tk.TIPDistillationLoss(**kwargs)


def test_bad_mask():
    hs, ws, ht, wt, bs, mask = _inputs()
    fn = tk.TIPDistillationLoss(backend="torch")
    with pytest.raises(ValueError, match=r"mask shape \(3, 12\).*\(3, 13\)"):
        fn(hs, ws, ht, wt, mask[:, :12])
    with pytest.raises(TypeError, match="mask must be a bool"):
        fn(hs, ws, ht, wt, mask.float())
    with pytest.raises(ValueError, match="teacher is required"):
        fn(hs, ws, None, None, mask)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's inf arithmetic in masked lanes
@pytest.mark.parametrize("rule,divergence,beta", [("soft_or", "reverse_kl", 0.5), ("entropy_topk", "jsd", 0.3),
                                                  ("q3", "forward_kl", 0.5)])
def test_triton_backend_loss_and_row_compaction(monkeypatch, rule, divergence, beta):
    """The loss on the Triton backend (interpreted here, compiled on a GPU): fp32 inputs against the float64
    truth over the same selected tokens; one scoring pass over the valid rows; backward over selected rows."""
    hs, ws, ht, wt, bs, mask = _inputs(torch.float32, seed=4)
    calls = {"forward_rows": [], "backward_rows": []}
    fwd, bwd = triton_backend.forward_stats, triton_backend.backward

    def counting_forward(prob, **kw):
        calls["forward_rows"].append(prob.num_rows)
        return fwd(prob, **kw)

    def counting_backward(prob, kind, grad_rows, saved, beta=0.5, **kw):
        calls["backward_rows"].append((prob.num_rows, int((grad_rows != 0).sum())))
        return bwd(prob, kind, grad_rows, saved, beta, **kw)

    monkeypatch.setattr(triton_backend, "forward_stats", counting_forward)
    monkeypatch.setattr(triton_backend, "backward", counting_backward)
    fn = tk.TIPDistillationLoss(rule=rule, ratio=0.3, divergence=divergence, beta=beta, temperature=1.3,
                                backend="triton")
    out = fn(hs, ws, ht, wt, mask, student_bias=bs)
    grads = torch.autograd.grad(out.loss, [hs, ws, bs])
    n_sel, n_valid = int(out.selection.mask.sum()), int(mask.sum())
    assert 0 < n_sel < n_valid
    assert calls["forward_rows"] == [n_valid]
    assert calls["backward_rows"] == [(n_sel, n_sel)]  # the autograd function only ever sees selected rows
    truth, tgrads = _truth(hs, ws, bs, ht, wt, out.selection.mask, out.selection.weights, divergence, beta, 1.3)
    assert abs(out.loss.item() - truth.item()) <= 5e-4 * max(1.0, abs(truth.item()))
    for g, t in zip(grads, tgrads):
        assert (g.double() - t).abs().max().item() <= 5e-4 * t.abs().max().item()
    assert grads[0][~out.selection.mask].abs().max() == 0
