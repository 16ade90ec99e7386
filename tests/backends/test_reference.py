"""The reference backend's per-row formulas (the float64 truth of every other test) against formulas written out
here independently: log_softmax KLs, an explicit mixture for JSD, TRL's special-cased β limits, the padded-teacher
renormalisation; the chunked torch backend through the public API is held to the same formulas."""

from __future__ import annotations

from typing import Dict

import pytest
import torch
import torch.nn.functional as F

import tipkernels as tk

from tests._harness import PAD, leaf, make_case, reference

Tensor = torch.Tensor


def plain_formulas(s: Tensor, u_padded: Tensor, beta: float) -> Dict[str, Tensor]:
    """Written out independently of tipkernels: TRL's generalised JSD with its special-cased β limits."""
    v = s.shape[-1]
    u = u_padded[:, :v]  # the teacher renormalised over the student's vocabulary
    logp, logq = F.log_softmax(s, -1), F.log_softmax(u, -1)
    p, q = logp.exp(), logq.exp()
    out = {
        "student_lse": torch.log(torch.exp(s - s.max(-1, keepdim=True).values).sum(-1)) + s.max(-1).values,
        "entropy": -(p * torch.log(p)).sum(-1),
        "teacher_entropy": -(q * torch.log(q)).sum(-1),
        "reverse_kl": F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1),  # Σ p (log p − log q)
        "forward_kl": (q * (torch.log(q) - torch.log(p))).sum(-1),
    }
    if beta == 0.0:
        out["jsd"] = F.kl_div(logp, logq, reduction="none", log_target=True).sum(-1)  # KL(q || p)
    elif beta == 1.0:
        out["jsd"] = F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)  # KL(p || q)
    else:
        m = beta * q + (1 - beta) * p
        out["jsd"] = beta * (q * torch.log(q / m)).sum(-1) + (1 - beta) * (p * torch.log(p / m)).sum(-1)
    return out


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_reference_matches_plain_formulas(backend, beta, tiles_3x16):
    """Cross-checks tipkernels.backends.reference (and the torch backend, chunked) with formulas written out here."""
    n, v, ds, dt = 29, 101, 40, 19
    case = make_case(n, v, ds, dt, dtype=torch.float64, seed=9)
    temperature = 0.7
    s = ((case.hs @ case.ws.t() + case.bs) / temperature).requires_grad_(True)
    u_full = (case.ht @ case.wt.t() + case.bt) / temperature  # includes the huge padding columns
    assert u_full.shape[1] == v + PAD and (u_full[:, v:] > 1e3).all()
    plain = plain_formulas(s, u_full, beta)
    # reference's per-row formulas
    u = u_full[:, :v]
    for name, want in [("entropy", reference.entropy(s)), ("reverse_kl", reference.reverse_kl(s, u)),
                       ("forward_kl", reference.forward_kl(s, u)), ("jsd", reference.jsd(s, u, beta))]:
        torch.testing.assert_close(want, plain[name], rtol=1e-12, atol=1e-12, msg=name)
    # the backend through the public API, values and gradients (d logits via d bias = Σ_rows d logits)
    stats = tk.token_stats(case.hs, case.ws, case.ht, case.wt, student_bias=case.bs, teacher_bias=case.bt,
                           temperature=temperature, backend=backend)
    for name in ("student_lse", "entropy", "teacher_entropy", "reverse_kl", "forward_kl"):
        torch.testing.assert_close(getattr(stats, name), plain[name].detach(), rtol=1e-12, atol=1e-12, msg=name)
    go = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (d_s,) = torch.autograd.grad((plain["jsd"] * go).sum(), s)
    hs, ws, bs = leaf(case.hs), leaf(case.ws), leaf(case.bs)
    out = tk.fused_linear_divergence(hs, ws, case.ht, case.wt, teacher_bias=case.bt, student_bias=bs,
                                     divergence="jsd", beta=beta, temperature=temperature, backend=backend)
    torch.testing.assert_close(out.detach(), plain["jsd"].detach(), rtol=1e-12, atol=1e-12)
    (out * go).sum().backward()
    # d logits -> parameters by the chain rule through s = (h W^T + b) / T
    torch.testing.assert_close(bs.grad, d_s.sum(0) / temperature, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hs.grad, d_s @ case.ws / temperature, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ws.grad, d_s.t() @ case.hs / temperature, rtol=1e-10, atol=1e-12)
    # the analytic gradient of docs/design.md §2: (1-β) p (log p - log m - KL(p||m)) (forward KL at β=0: p - q)
    p, q = torch.softmax(s.detach(), -1), torch.softmax(u.detach(), -1)
    if beta == 0.0:
        analytic = p - q
    elif beta == 1.0:
        analytic = p * (torch.log(p / q) - (p * torch.log(p / q)).sum(-1, keepdim=True))
    else:
        m = beta * q + (1 - beta) * p
        kl_pm = (p * torch.log(p / m)).sum(-1, keepdim=True)
        analytic = (1 - beta) * p * (torch.log(p / m) - kl_pm)
    torch.testing.assert_close(d_s, analytic * go[:, None], rtol=1e-9, atol=1e-12)
