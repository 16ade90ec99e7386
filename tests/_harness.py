"""The shared test harness: inputs, devices, the float64 truth, the pass rule and memory probes.

Every test module imports what it shares from here (never from another test module). It is also the one place
where the tests import library internals (the backends' modules, the problem type, the options; the public API,
``tipkernels.selection`` and ``tipkernels.opd`` are imported directly), re-exported below, so that a move of those
modules inside the package touches only this file.

Two input builders: :func:`make_case` (the public ops' inputs: token dims, biases, a padded teacher as hidden
states + lm_head or as logits, labels) and :func:`make_problem` (the backend-level :class:`Problem`).

The truth is computed in float64 from the *same* (already rounded) input values: the logits are formed by plain
matmuls and fed to ``reference``'s per-row formulas, and autograd gives the gradients.

The pass rule (docs/design.md §8): ``err(fast path) <= err(reference in the input dtype) + TOL[dtype]``, where
``err`` is :func:`scaled_err`: the max-abs difference to the truth divided by the scale of the truth (max |truth|,
floored at 1 for values, so small values are compared absolutely; not floored for gradients, so a gradient is
compared relative to its own largest entry). TOL: fp32 5e-4, bf16/fp16 1e-2 (fp64: 1e-10, fp64 against fp64).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import pickle
import shlex
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import tipkernels as tk
from tipkernels.opd import OPDConfig
from tipkernels.opd import checkpoint as ckpt
from tipkernels.opd.demo import ModelSize, build_model
from tipkernels.opd.models import position_ids

# ---------------------------------------------------------------------------------- library internals
# The only imports of tipkernels' internal modules in the test suite: tests import them from here
# (tests/backends/test_triton_compile.py's compile subprocess too).
from tipkernels.backends import chunked as torch_backend  # noqa: F401 - re-exported
from tipkernels.backends import reference
from tipkernels.inputs import IGNORE_INDEX, Problem, build_problem
from tipkernels.options import deterministic_scope, options  # noqa: F401 - re-exported

try:
    from tipkernels.backends import triton as triton_backend
except ModuleNotFoundError as e:  # only a missing triton (a Linux-only dependency) leaves the triton backend out
    if e.name != "triton":
        raise
    triton_backend = None
HAS_TRITON_BACKEND = triton_backend is not None

Tensor = torch.Tensor

ROOT = Path(__file__).resolve().parents[1]  # the repository
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HAS_CUDA = DEVICE.type == "cuda"
#: Fast paths under test; "reference" is added where comparing it with itself still checks the API plumbing.
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON_BACKEND else [])
ALL_BACKENDS = BACKENDS + ["reference"]
TOL = {torch.float32: 5e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.bfloat16]
#: (divergence, beta) pairs: every divergence, JSD at both exact limits and inside.
DIVS = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0)]
DIV_IDS = ["rkl", "fkl", "jsd0", "jsd0.3", "jsd1"]
PAD = 7  # extra teacher vocabulary rows
HUGE = 1e4  # what the padding rows hold; any leak into the distributions would dominate them


# ------------------------------------------------------------------------------------ parametrisation


def grid(argnames: str, *axes, drop=None, slow=None):
    """``pytest.mark.parametrize`` over the product of ``axes`` minus the combinations ``drop(*values)`` names.

    Each axis is a list of ``(id, value)`` pairs (a tuple value spreads over several argnames). Dropped
    combinations are never generated (rather than generated and skipped). Combinations ``slow(*values)`` names
    are marked ``slow``: CI runs them, the fast subset (``-m "not slow"``) leaves them out.
    """
    params = []
    for combo in itertools.product(*axes):
        values = []
        for _, v in combo:
            values.extend(v if isinstance(v, tuple) else (v,))
        if drop is not None and drop(*values):
            continue
        marks = [pytest.mark.slow] if slow is not None and slow(*values) else []
        params.append(pytest.param(*values, id="-".join(i for i, _ in combo), marks=marks))
    return pytest.mark.parametrize(argnames, params)


def axis(values, ids=None):
    ids = ids or [str(v) for v in values]
    return list(zip(ids, values))


def slow(*values, id=None):
    """``pytest.param(*values)`` marked ``slow`` (left out of the fast subset, run by CI)."""
    return pytest.param(*values, id=id, marks=pytest.mark.slow)


#: Under Triton's interpreter (no GPU) some combinations whose code path is shared Python are left to the
#: other backends, to keep CI short; compiled on a GPU every combination runs.
INTERPRETED = DEVICE.type == "cpu"


def shape_for(backend: str):
    """(N, V, D_s, D_t): odd, D_s != D_t, none a multiple of a block; tiny for Triton's interpreter, larger
    (several tiles of the default blocks in every dimension) when the kernels are compiled on a GPU."""
    if backend == "triton":
        return (13, 37, 24, 19) if DEVICE.type == "cpu" else (131, 1031, 200, 72)
    return 29, 101, 40, 19


# ----------------------------------------------------------------------------------------------- inputs


@dataclass
class Case:
    """One problem's inputs. Teacher tensors may be padded (V_t > V); ``lead`` is the token dims."""

    lead: tuple
    vocab: int
    hs: Tensor
    ws: Tensor
    bs: Optional[Tensor]
    ht: Optional[Tensor] = None
    wt: Optional[Tensor] = None
    bt: Optional[Tensor] = None
    tl: Optional[Tensor] = None  # teacher logits instead of ht/wt/bt
    labels: Optional[Tensor] = None
    #: logit-transform keywords of the ops (student_logit_scale, student_softcap, teacher_logit_scale,
    #: teacher_softcap); empty: the identity.
    transforms: dict = field(default_factory=dict)

    def cast(self, dtype: torch.dtype) -> "Case":
        c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return replace(self, hs=c(self.hs), ws=c(self.ws), bs=c(self.bs), ht=c(self.ht), wt=c(self.wt),
                       bt=c(self.bt), tl=c(self.tl))

    @property
    def teacher_kwargs(self) -> dict:
        return dict(teacher_logits=self.tl, teacher_bias=self.bt, **self.transforms)

    def transform(self, side: str):
        """(scale, cap) of ``side`` ("student" or "teacher")."""
        return (self.transforms.get(f"{side}_logit_scale", 1.0), self.transforms.get(f"{side}_softcap"))

    @property
    def entropy_kwargs(self) -> dict:
        """The student's transform under fused_linear_entropy's keyword names."""
        scale, cap = self.transform("student")
        return dict(logit_scale=scale, softcap=cap)


def make_case(n, vocab, ds, dt, *, seed=0, lead=None, pad=PAD, student_bias=True, teacher="linear",
              teacher_bias=True, labels=False, scale=1.0, dtype=torch.float32, transforms=None) -> Case:
    """Random inputs with logits of std ~2 (times ``scale**2``); padding rows/columns hold huge values.

    ``transforms``: the ops' logit-transform keywords (see :attr:`Case.transforms`), carried by the case."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    lead = (n,) if lead is None else tuple(lead)
    assert math.prod(lead) == n
    hs = randn(*lead, ds) * scale
    ws = randn(vocab, ds) * (2.0 / math.sqrt(ds)) * scale
    bs = randn(vocab) * 0.5 if student_bias else None
    case = Case(lead=lead, vocab=vocab, hs=hs, ws=ws, bs=bs, transforms=dict(transforms or {}))
    vt = vocab + pad
    if teacher == "linear":
        wt = randn(vt, dt) * (2.0 / math.sqrt(dt)) * scale
        wt[vocab:] = 50.0
        case.ht = randn(*lead, dt) * scale
        case.wt = wt
        if teacher_bias:
            bt = randn(vt) * 0.5
            bt[vocab:] = HUGE
            case.bt = bt
    elif teacher == "logits":
        tl = randn(*lead, vt) * 2.0 * scale**2
        tl[..., vocab:] = HUGE
        case.tl = tl
    if labels:
        lab = torch.randint(0, vocab, lead, generator=g)
        lab.view(-1)[::4] = -100
        lab.view(-1)[1] = vocab - 1
        lab.view(-1)[2] = 0
        case.labels = lab
    case = case.cast(dtype)
    if DEVICE.type != "cpu":
        case = _to_device(case)
    return case


def _to_device(case: Case) -> Case:
    m = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return replace(case, hs=m(case.hs), ws=m(case.ws), bs=m(case.bs), ht=m(case.ht), wt=m(case.wt),
                   bt=m(case.bt), tl=m(case.tl), labels=m(case.labels))


def noncontig(t: Optional[Tensor]) -> Optional[Tensor]:
    """The same values in a non-contiguous layout: first two dims stored transposed, the last dim strided by 2."""
    if t is None:
        return None
    if t.dim() == 1:
        out = torch.zeros(2 * t.shape[0], dtype=t.dtype, device=t.device)[1::2]
    elif t.dim() == 2:
        out = torch.zeros(2 * t.shape[1], t.shape[0], dtype=t.dtype, device=t.device).t()[:, 1::2]
    else:
        shape = [t.shape[1], t.shape[0], *t.shape[2:-1], 2 * t.shape[-1]]
        out = torch.zeros(shape, dtype=t.dtype, device=t.device).transpose(0, 1)[..., 1::2]
    out.copy_(t)
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


def leaf(t: Optional[Tensor], layout=None) -> Optional[Tensor]:
    if t is None:
        return None
    t = t.detach().clone() if layout is None else layout(t.detach())
    return t.requires_grad_(True)


# ------------------------------------------------------------------------------------------- the truth


def transform64(z: Tensor, temperature: float, scale: float = 1.0, cap: Optional[float] = None) -> Tensor:
    """``c·tanh(a·z/c)/T`` (``a·z/T`` without a cap) in float64: scale, soft-cap, temperature (TRL's order)."""
    z = z.double() * scale
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return z / temperature


def _logits64(hidden, weight, bias, temperature, vocab, scale=1.0, cap=None):
    """Float64 logits over the first ``vocab`` entries (a padded teacher is cut there), transformed."""
    d = hidden.shape[-1]
    s = hidden.double().reshape(-1, d) @ weight[:vocab].double().t()
    if bias is not None:
        s = s + bias[:vocab].double()
    return transform64(s, temperature, scale, cap)


def truth_student(case: Case, temperature: float):
    """Float64 leaves (hidden, weight, bias) and the student logits built from them."""
    hs = case.hs.detach().double().requires_grad_(True)
    ws = case.ws.detach().double().requires_grad_(True)
    bs = None if case.bs is None else case.bs.detach().double().requires_grad_(True)
    return (hs, ws, bs), _logits64(hs, ws, bs, temperature, case.vocab, *case.transform("student"))


def truth_teacher(case: Case, temperature: float) -> Tensor:
    if case.tl is not None:
        return transform64(case.tl.reshape(-1, case.tl.shape[-1])[:, : case.vocab], temperature,
                           *case.transform("teacher"))
    return _logits64(case.ht, case.wt, case.bt, temperature, case.vocab, *case.transform("teacher"))


def reduce_truth(values: Tensor, lead, reduction: str, weights: Optional[Tensor]) -> Tensor:
    values = values.reshape(lead)
    if weights is not None:
        values = values * weights.double()
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    denom = weights.double().sum() if weights is not None else torch.tensor(float(values.numel()))
    return values.sum() / denom if float(denom) != 0 else values.sum() * 0


def upstream(reduction: str, lead, seed: int = 123) -> Tensor:
    """A random upstream gradient (fp32-representable), shaped like the op's output."""
    g = torch.Generator().manual_seed(seed)
    if reduction == "none":
        return torch.randn(*lead, generator=g).double().to(DEVICE)
    return torch.tensor(1.7, dtype=torch.float64, device=DEVICE)


def backprop(out: Tensor, go: Tensor) -> None:
    (out.double() * go).sum().backward()


def grads_of(hs, ws, bs, prefix="") -> Dict[str, Tensor]:
    out = {"d_hidden": hs.grad, "d_weight": ws.grad}
    if bs is not None:
        out["d_bias"] = bs.grad
    return out


def truth_divergence(case, kind, beta, temperature, reduction, weights, go):
    (hs, ws, bs), s = truth_student(case, temperature)
    u = truth_teacher(case, temperature)
    out = reduce_truth(reference.divergence(s, u, kind, beta), case.lead, reduction, weights)
    backprop(out, go)
    return {"value": out.detach(), **grads_of(hs, ws, bs)}


def run_divergence(case, backend, kind, beta, temperature, reduction, weights, go, layout=None):
    hs, ws, bs = leaf(case.hs, layout), leaf(case.ws, layout), leaf(case.bs, layout)
    ht, wt = (case.ht, case.wt) if layout is None else (noncontig(case.ht), noncontig(case.wt))
    out = tk.fused_linear_divergence(hs, ws, ht, wt, divergence=kind, beta=beta, temperature=temperature,
                                     student_bias=bs, weights=weights, reduction=reduction, backend=backend,
                                     **case.teacher_kwargs)
    backprop(out, go)
    return {"value": out.detach(), **grads_of(hs, ws, bs)}


def truth_entropy(case, temperature, reduction, go):
    (hs, ws, bs), s = truth_student(case, temperature)
    out = reduce_truth(reference.entropy(s), case.lead, reduction, None)
    backprop(out, go)
    return {"value": out.detach(), **grads_of(hs, ws, bs)}


def run_entropy(case, backend, temperature, reduction, go, layout=None):
    hs, ws, bs = leaf(case.hs, layout), leaf(case.ws, layout), leaf(case.bs, layout)
    out = tk.fused_linear_entropy(hs, ws, bias=bs, temperature=temperature, reduction=reduction, backend=backend,
                                  **case.entropy_kwargs)
    backprop(out, go)
    return {"value": out.detach(), **grads_of(hs, ws, bs)}


def run_kind(case, backend, kind, beta, temperature, reduction, weights, go):
    """:func:`run_entropy` for ``kind`` "entropy" (``beta``, ``weights`` unused), else :func:`run_divergence`."""
    if kind == "entropy":
        return run_entropy(case, backend, temperature, reduction, go)
    return run_divergence(case, backend, kind, beta, temperature, reduction, weights, go)


def truth_kind(case, kind, beta, temperature, reduction, weights, go):
    """The float64 truth of :func:`run_kind`."""
    if kind == "entropy":
        return truth_entropy(case, temperature, reduction, go)
    return truth_divergence(case, kind, beta, temperature, reduction, weights, go)



def logits_case(backend, dtype, seed, lead=None, pad=PAD, scale=1.0):
    """Student logits [*lead, V] and padded teacher logits [*lead, V + pad] (padding columns hold HUGE)."""
    n, v, _, _ = shape_for(backend)
    g = torch.Generator().manual_seed(seed)
    lead = (n,) if lead is None else lead
    s = torch.randn(*lead, v, generator=g, dtype=torch.float64) * 2 * scale
    u = torch.randn(*lead, v + pad, generator=g, dtype=torch.float64) * 2 * scale
    u[..., v:] = HUGE
    return s.to(dtype).to(DEVICE), u.to(dtype).to(DEVICE)


def run_from_logits(s, u, backend, kind, beta, temperature, reduction, go, layout=None):
    s = leaf(s, layout)
    u = u.clone().requires_grad_(True)  # must get no gradient
    out = tk.divergence_from_logits(s, u, divergence=kind, beta=beta, temperature=temperature,
                                    reduction=reduction, backend=backend)
    backprop(out, go)
    assert u.grad is None
    return {"value": out.detach(), "d_logits": s.grad}


def truth_from_logits(s, u, kind, beta, temperature, reduction, go):
    v = s.shape[-1]
    s64 = s.detach().double().requires_grad_(True)
    u64 = u.detach().double().reshape(-1, u.shape[-1])[:, :v] / temperature
    values = reference.divergence(s64.reshape(-1, v) / temperature, u64, kind, beta)
    out = reduce_truth(values, s.shape[:-1], reduction, None)
    backprop(out, go)
    return {"value": out.detach(), "d_logits": s64.grad}


# ------------------------------------------------------------------------------------- a top-k teacher


def make_topk(case: Case, k: int, *, seed=5, pad=True, neg_inf=False, dtype=torch.float32):
    """A teacher's top-k ``(ids, logprobs)`` shaped ``[*case.lead, k]`` (on DEVICE) and its dense float64 log-softmax
    ``[N, V]``: random teacher logits of std 2 over the student's vocabulary, the k largest log-probabilities in
    random order. ``pad``: a few rows lose some ids to the padding ``-1`` (one row keeps only one id); ``neg_inf``:
    some kept ids get log-probability ``-inf`` (the teacher gives them no mass)."""
    g = torch.Generator().manual_seed(seed)
    n, v = math.prod(case.lead), case.vocab
    dense = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1)
    lp, ids = dense.topk(k, -1)
    perm = torch.argsort(torch.rand(n, k, generator=g), 1)
    lp, ids = lp.gather(1, perm), ids.gather(1, perm)
    if pad and k > 1:
        ids[1, -1] = -1
        ids[3, : k - 1] = -1
        ids[n - 1, k // 2] = -1
    if neg_inf and k > 1:
        lp[2, 0] = -math.inf
        lp[n - 2, -1] = -math.inf
    lp = torch.where(ids >= 0, lp, torch.zeros_like(lp))  # padding entries are ignored: any value
    shape = (*case.lead, k)
    return ids.reshape(shape).to(DEVICE), lp.to(dtype).reshape(shape).to(DEVICE), dense


def topk_bins64(s: Tensor, ids: Tensor, logprobs: Tensor, tail: str, floors=None):
    """The float64 truth of the bins (docs/design.md §1) from materialised logits ``s [N, V]``: probabilities
    ``[N, K+1]`` (bucket: the K ids, then the rest of the vocabulary summed from the logits outside the ids, and
    ``max(0, 1 − Q)`` for the teacher; both rests 0 when the ids cover the vocabulary) or ``[N, K]``
    (renormalize). Padding ids have probability 0 on both sides. ``floors``: ``(δ_p [N], δ_q)``, the smallest rests
    (docs/design.md §1) applied to rows that do not cover the vocabulary (the test inputs' rests are far above them
    unless a test builds them so)."""
    ids, lp = ids.reshape(s.shape[0], -1).to(s.device), logprobs.reshape(s.shape[0], -1).double().to(s.device)
    valid = ids >= 0
    safe = ids.clamp_min(0)
    p_full = torch.softmax(s, -1)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    p_k = torch.where(valid, p_full.gather(1, safe), zero)
    q_k = torch.where(valid, lp.exp(), zero)
    if tail == "renormalize":
        return p_k / p_k.sum(1, keepdim=True), q_k / q_k.sum(1, keepdim=True)
    inside = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    rows = torch.arange(s.shape[0], device=s.device)[:, None].expand_as(ids)
    inside[rows[valid], ids[valid]] = True
    rest_p = torch.where(inside, zero, p_full).sum(1)
    covered = valid.sum(1) == s.shape[1]
    rest_q = torch.where(covered, zero, (1 - q_k.sum(1)).clamp_min(0))
    if floors is not None:
        rest_p = torch.where(covered, zero, torch.maximum(rest_p, floors[0].to(s.dtype)))
        rest_q = torch.where(covered, zero, rest_q.clamp_min(floors[1]))
    return torch.cat([p_k, rest_p[:, None]], 1), torch.cat([q_k, rest_q[:, None]], 1)


def _kl64(a: Tensor, b: Tensor) -> Tensor:
    """``Σ a log(a / b)`` per row; terms with ``a = 0`` are exactly 0 (with zero gradient)."""
    live = a > 0
    one = torch.ones((), dtype=a.dtype, device=a.device)
    a_safe, b_safe = torch.where(live, a, one), torch.where(live, b, one)
    return torch.where(live, a * (torch.log(a_safe) - torch.log(b_safe)), torch.zeros_like(a)).sum(1)


def bin_divergence64(p: Tensor, q: Tensor, kind: str, beta: float) -> Tensor:
    """A divergence between distributions over bins, float64 (TRL's JSD; β = 0 / 1 the forward / reverse KL)."""
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    if kind == "reverse_kl":
        return _kl64(p, q)
    if kind == "forward_kl":
        return _kl64(q, p)
    m = beta * q + (1 - beta) * p
    return beta * _kl64(q, m) + (1 - beta) * _kl64(p, m)


def truth_topk(case, ids, logprobs, kind, beta, tail, temperature, reduction, weights, go):
    """Values and float64 gradients of the top-k divergence, from materialised float64 logits."""
    (hs, ws, bs), s = truth_student(case, temperature)
    values = bin_divergence64(*topk_bins64(s, ids, logprobs, tail), kind, beta)
    out = reduce_truth(values, case.lead, reduction, weights)
    backprop(out, go)
    return {"value": out.detach(), **grads_of(hs, ws, bs)}


def run_topk(case, backend, ids, logprobs, kind, beta, tail, temperature, reduction, weights, go, **kw):
    """``tk.fused_linear_divergence(teacher_topk=...)`` on ``case``'s student (its student transform) and backprop."""
    hs, ws, bs = leaf(case.hs), leaf(case.ws), leaf(case.bs)
    scale, cap = case.transform("student")
    out = tk.fused_linear_divergence(hs, ws, teacher_topk=tk.TeacherTopK(ids, logprobs), divergence=kind, beta=beta,
                                     tail=tail, temperature=temperature, student_bias=bs, weights=weights,
                                     reduction=reduction, backend=backend, student_logit_scale=scale,
                                     student_softcap=cap, **kw)
    backprop(out, go)
    return {"value": out.detach(), **grads_of(hs, ws, bs)}


# -------------------------------------------------------------------------------------------- the rule


def scaled_err(x: Tensor, truth: Tensor, floor: float) -> float:
    """``max |x - truth| / max(max |truth|, floor)`` in float64 (1 replaces a zero scale)."""
    assert x is not None, "missing tensor"
    assert x.shape == truth.shape, f"shape {tuple(x.shape)} != {tuple(truth.shape)}"
    x, truth = x.double(), truth.double()
    if truth.numel() == 0:
        return 0.0
    assert torch.isfinite(x).all(), "non-finite entries"
    scale = max(truth.abs().max().item(), floor) or 1.0
    return (x - truth).abs().max().item() / scale


def gradient_floors(go: Tensor, temperature: float, hidden: Optional[Tensor] = None,
                    weight: Optional[Tensor] = None) -> Dict[str, float]:
    """The scale of each gradient map: ``|go|·|W|/T`` for d hidden, ``|go|·|h|/T`` for d weight, ``|go|/T``
    for d bias and d logits (a per-row logit gradient of size O(1), pushed through the chain rule).

    With logits of ~1e2 both softmaxes are one-hot and the true KL/JSD gradients are ~1e-16: every entry is the
    cancellation of O(1) terms, and fp32 logits carry an absolute error of ulp(1e2) ≈ 1e-5 whichever way they are
    formed. Such gradients are judged on this scale, not relative to their own vanishing size."""
    g = go.abs().max().item() / temperature
    floors = {"d_bias": g, "d_logits": g}
    if hidden is not None:
        floors.update(d_hidden=g * weight.abs().max().item(), d_weight=g * hidden.abs().max().item())
    return floors


def assert_rule(fast: Dict[str, Tensor], same_dtype_ref: Dict[str, Tensor], truth: Dict[str, Tensor],
                dtype: torch.dtype, what: str = "", floors: Optional[Dict[str, float]] = None) -> None:
    """The pass rule (docs/design.md §8): each value/gradient of ``fast`` is within the same-dtype reference's error
    + TOL[dtype].

    ``floors`` (see :func:`gradient_floors`) replaces the default floor of a gradient's scale (0: relative to
    its own largest entry); only the extreme-logit variants pass it."""
    tol = TOL[dtype]
    assert fast.keys() == truth.keys(), (fast.keys(), truth.keys())
    for key, t in truth.items():
        floor = 1.0 if key == "value" else (floors or {}).get(key, 0.0)
        assert fast[key].dtype == same_dtype_ref[key].dtype, f"{what} {key}: dtype {fast[key].dtype}"
        e_fast = scaled_err(fast[key], t, floor)
        e_ref = scaled_err(same_dtype_ref[key], t, floor)
        assert e_fast <= e_ref + tol, f"{what} {key}: err {e_fast:.3g} > reference-in-{dtype} {e_ref:.3g} + {tol}"


def assert_close64(fast: Dict[str, Tensor], truth: Dict[str, Tensor], tol: float = 1e-10, what: str = ""):
    for key, t in truth.items():
        e = scaled_err(fast[key], t, 1.0 if key == "value" else 0.0)
        assert e <= tol, f"{what} {key}: err {e:.3g}"


def check_elementwise(name, got, truth, same_dtype_ref, tol, *, relative_to_max=False, atol=0.0):
    """The pass rule elementwise: |got - truth| <= |ref_in_dtype - truth| + tol * scale + atol (scale: 1 + |truth|,
    or max |truth| with ``relative_to_max``)."""
    got, truth, r = got.double().cpu(), truth.double().cpu(), same_dtype_ref.double().cpu()
    assert got.shape == truth.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = truth.abs().max().clamp_min(1e-30) if relative_to_max else 1.0 + truth.abs()
    err, ref_err = (got - truth).abs(), (r - truth).abs()
    bad = err > ref_err + tol * scale + atol
    assert not bad.any(), (
        f"{name}: max err {err.max().item():.3g} (ref in dtype {ref_err.max().item():.3g}, scale "
        f"{float(scale.max()):.3g}) at {bad.nonzero()[:5].flatten().tolist()}"
    )


# ---------------------------------------------------------------------------------------------- memory


class NumelRecorder(TorchDispatchMode):
    """Records (numel, op, bytes) of every tensor each op returns (in-place ops return their target: counted
    too)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.sizes.append((t.numel(), str(func), t.numel() * t.element_size()))
        return out


# ------------------------------------------------------------------------- backend-level problems


def make_problem(variant="linear", dtype=torch.float32, *, n=13, vocab=37, ds=24, dt=19, pad=5,
                 temperature=0.7, scale=1.0, seed=0):
    """A backend-level :class:`Problem` (what the backends receive) of the given variant: biases, a padded teacher
    vocabulary and labels (with ignores) included."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    hs, ws, bs = rnd(n, ds), rnd(vocab, ds) / ds ** 0.5 * 2 * scale, rnd(vocab) * 0.5
    ht, wt, bt = rnd(n, dt), rnd(vocab + pad, dt) / dt ** 0.5 * 2 * scale, rnd(vocab + pad) * 0.5
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[1::4] = IGNORE_INDEX
    kw = dict(labels=labels, temperature=temperature)
    if variant == "strided":  # hidden states and weights as non-contiguous views (made in the dtype)
        hs = rnd(ds, n).to(dtype).t()
        ht = rnd(n, dt + 7).to(dtype)[:, 3:3 + dt]
        ws = (rnd(ds, vocab) / ds ** 0.5 * 2).to(dtype).t()
    cast = lambda t: t.to(dtype)  # noqa: E731  (a no-op on tensors already in dtype)
    if variant == "student_logits":
        s = cast((hs @ ws.t() + bs) * 3)
        prob, _ = build_problem(None, None, cast(ht), cast(wt), student_logits=s, teacher_bias=cast(bt), **kw)
    elif variant == "teacher_logits":
        u = cast(rnd(n, vocab + pad) * 3 * scale)
        prob, _ = build_problem(cast(hs), cast(ws), student_bias=cast(bs), teacher_logits=u, temperature=2.0,
                                labels=labels)
    elif variant == "student_only":
        prob, _ = build_problem(cast(hs), cast(ws), student_bias=cast(bs), **kw)
    else:
        prob, _ = build_problem(cast(hs), cast(ws), cast(ht), cast(wt), student_bias=cast(bs),
                                teacher_bias=cast(bt), **kw)
    if variant == "strided":
        assert not prob.student_hidden.is_contiguous() and not prob.student_weight.is_contiguous()
        assert not prob.teacher_hidden.is_contiguous()
    return problem_to(prob, device=DEVICE)


def problem_to(prob: Problem, dtype=None, device=None) -> Problem:
    conv = lambda t: None if t is None else t.to(device=device or t.device, dtype=dtype or t.dtype)  # noqa
    fields = ("student_hidden", "student_weight", "student_bias", "student_logits", "teacher_hidden",
              "teacher_weight", "teacher_bias", "teacher_logits")
    kw = {f: conv(getattr(prob, f)) for f in fields}
    labels = None if prob.labels is None else prob.labels.to(device or prob.labels.device)
    return Problem(**kw, labels=labels, temperature=prob.temperature, **prob.transforms())


def f64(prob):
    return problem_to(prob, dtype=torch.float64)


# ---------------------------------------------------------------- ahead-of-time sm_90 compiles (no GPU)
# tests/backends/test_triton_compile.py and test_triton_cublas_compile.py: each module is also its worker script
# (``python <module> OUT.json``, a compiling Triton: ``aot.compile_env``) that records the backend's launches for
# its cases and compiles them with ``triton_backend.aot`` (:func:`aot_worker`); the test side runs it once
# (:func:`aot_report`). A case is a dict: ``dtype`` (torch name), ``student`` / ``teacher`` "L" (linear), "Lb"
# (linear + bias), "Z" (logits) or "" (no teacher), ``labels`` None / "i64" / "i32", ``config`` "default" /
# "odd" / "small" (:data:`AOT_SHAPES`), ``strided`` False / "hidden" / "weight" / True, ``caps`` "" / "student" /
# "teacher" / "both" (logit soft-caps, with scales != 1 on both).

#: D=4096-like (V a multiple of 16 like most real vocabularies; "odd": one that is not, e.g. 50257), and the
#: interpreter tests' odd shapes ("small").
AOT_SHAPES = {"default": dict(n=24, vocab=1536, ds=4096, dt=5120), "odd": dict(n=24, vocab=1000, ds=4096, dt=5120),
              "small": dict(n=13, vocab=203, ds=40, dt=56)}


def aot_problem(case: dict) -> Problem:
    """The :class:`Problem` of a compile case, of uninitialised tensors (nothing runs, only launches are
    recorded). ``strided``: "hidden" (a transposed hidden-state view), "weight" (a transposed weight view), any
    other true value: a cut padded vocabulary of logits (a model given as logits)."""
    dt = getattr(torch, case["dtype"])
    shape = AOT_SHAPES[case["config"]]
    n, v = shape["n"], shape["vocab"]
    empty = lambda *s: torch.empty(*s, dtype=dt)  # noqa: E731  (values do not matter: nothing runs)

    def model(spec, d):
        if spec == "":
            return {}
        if spec == "Z":
            z = empty(n, v + 8)[:, :v] if case["strided"] else empty(n, v)  # a cut padded vocabulary
            return dict(logits=z)
        h = empty(d, n).t() if case["strided"] == "hidden" else empty(n, d)
        w = empty(d, v).t() if case["strided"] == "weight" else empty(v + 8, d)[:v]
        out = dict(hidden=h, weight=w)
        if spec == "Lb":
            out["bias"] = empty(v)
        return out

    s, t = model(case["student"], shape["ds"]), model(case["teacher"], shape["dt"])
    labels = None
    if case["labels"]:
        labels = torch.zeros(n, dtype={"i64": torch.int64, "i32": torch.int32}[case["labels"]])
    caps = case.get("caps", "")
    return Problem(student_hidden=s.get("hidden"), student_weight=s.get("weight"), student_bias=s.get("bias"),
                   student_logits=s.get("logits"), teacher_hidden=t.get("hidden"), teacher_weight=t.get("weight"),
                   teacher_bias=t.get("bias"), teacher_logits=t.get("logits"), labels=labels, temperature=0.7,
                   student_scale=0.5 if caps else 1.0, teacher_scale=2.0 if caps else 1.0,
                   student_cap=30.0 if caps in ("student", "both") else None,
                   teacher_cap=50.0 if caps in ("teacher", "both") else None)


def aot_worker(out_path: str, records: Dict[str, list], jobs: int = 2) -> None:
    """Compile the distinct specialisations of ``records`` (``{case id: [Launch, ...]}``) for sm_90 and write the
    JSON report: ``triton`` (version), ``target``, ``cases`` (``{case id: [index into specs, ...]}``), ``specs``
    (``aot.compile_all``'s dicts) and ``seconds`` (from the call, compiles included; recording is before)."""
    import triton

    aot = triton_backend.aot
    t0 = time.perf_counter()
    work, cases = aot.distinct(records)
    specs = aot.compile_all(work, jobs=jobs)
    report = dict(triton=triton.__version__, target=list(aot.TARGET_SM90), cases=cases, specs=specs,
                  seconds=time.perf_counter() - t0)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


def aot_report(worker_file: str, timeout: float = 600) -> dict:
    """Run the compile worker ``python worker_file OUT.json`` in a compiling Triton with a fresh cache (so every
    kernel really compiles) and return its report (:func:`aot_worker`); asserts that it succeeded."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        env = dict(os.environ, **triton_backend.aot.compile_env(os.path.join(tmp, "cache")), PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, os.path.abspath(worker_file), out], env=env, cwd=str(ROOT),
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"compile worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        with open(out) as f:
            return json.load(f)


#: The float statistics of a backend's ``forward_stats`` (the argmaxes are checked by :func:`check_argmax`).
STAT_KEYS = ("student_lse", "entropy", "teacher_lse", "teacher_entropy", "reverse_kl", "forward_kl",
             "label_logprob")


def check_argmax(name, got, logits64):
    """``got`` (int64 ``[N]``) is the argmax of ``logits64 [N, V]`` on every row whose top two are clearly apart."""
    if logits64.shape[1] == 1:
        assert torch.all(got == 0), name
        return
    top2 = logits64.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3 * (1 + top2[:, 0].abs())
    assert got.dtype == torch.int64
    assert torch.equal(got.cpu()[clear.cpu()], logits64.argmax(-1).cpu()[clear.cpu()]), name


def check_jsd(prob, jsd, kl_pm, beta, tol):
    """A backend's ``jsd_forward`` output (JSD and KL(p||m), fp32 ``[N]``) against the float64 reference by
    :func:`check_elementwise`; returns the reference JSD computed in the input dtype (for further checks)."""
    tj, tk_pm = reference.jsd_forward(f64(prob), None, None, beta)
    sj, sk = reference.jsd_forward(prob, None, None, beta)
    assert jsd.dtype == kl_pm.dtype == torch.float32
    check_elementwise("jsd", jsd, tj, sj, tol)
    check_elementwise("kl_pm", kl_pm, tk_pm, sk, tol)
    return sj


def check_stats(prob, out, tol):
    """A backend's ``forward_stats`` output ``out`` against the float64 reference by :func:`check_elementwise`
    (fp32 ``[N]`` each), the argmaxes, and zero label log-probabilities on ignored rows."""
    truth = reference.forward_stats(f64(prob))
    same = reference.forward_stats(prob)
    assert set(out) == set(truth), (sorted(out), sorted(truth))
    for k in STAT_KEYS:
        if k in truth:
            assert out[k].dtype == torch.float32 and out[k].shape == (prob.num_rows,)
            check_elementwise(k, out[k], truth[k], same[k], tol)
    check_argmax("student_argmax", out["student_argmax"], reference.student_logits(f64(prob)))
    if prob.has_teacher:
        check_argmax("teacher_argmax", out["teacher_argmax"], reference.teacher_logits(f64(prob)))
    if prob.labels is not None:
        assert torch.all(out["label_logprob"][prob.labels == IGNORE_INDEX] == 0)



# ---------------------------------------------------------------------------------------------------- OPD
# Tiny Hugging Face models built in code (no downloads) for tests/opd/: the distributed tests' spawned workers
# import these too.

SMALL_MODEL = ModelSize(hidden=32, layers=1, heads=2, ffn=64)
BIG_MODEL = ModelSize(hidden=48, layers=2, heads=2, ffn=96)
PROMPTS = ["3>", "5301>", "98>", "4417>", "271>", "6>", "05>", "8832>"]


def opd_models(tok, *, teacher_extra_rows=3, seed=0):
    """A student and a bigger teacher whose vocabulary is padded by ``teacher_extra_rows``."""
    student = build_model(SMALL_MODEL, len(tok), seed=seed)
    teacher = build_model(BIG_MODEL, len(tok) + teacher_extra_rows, seed=seed + 100)  # padded teacher vocabulary
    return student, teacher


def opd_config(tmp_path, **kw):
    """A short OPD run's config on the torch backend (3 steps of 4 prompts), written under ``tmp_path/run``."""
    base = dict(rule="soft_or", ratio=0.5, max_new_tokens=6, batch_size=4, steps=3, lr=3e-3, warmup_steps=1,
                seed=0, output_dir=str(tmp_path / "run"), progress=False, plot=False, backend="torch")
    base.update(kw)
    return OPDConfig(**base)


def save_cli_inputs(tmp_path, tok, student, teacher, prompts=PROMPTS):
    """The ``opd`` command's inputs under ``tmp_path``: ``student/`` and ``teacher/`` (each model saved with the
    tokenizer) and ``prompts.jsonl`` (``prompts``); returns the three paths."""
    s_dir, t_dir = tmp_path / "student", tmp_path / "teacher"
    for model, d in ((student, s_dir), (teacher, t_dir)):
        model.save_pretrained(d)
        tok.save_pretrained(d)
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return s_dir, t_dir, path


# Tiny models whose logits are transformed (scale, soft-cap), for the logit-transform tests of the OPD loop.

TINY_LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)


def gemma2_model(vocab, softcap, seed=0):
    """A tiny Gemma 2 (final_logit_softcapping), lm_head scaled up so that its logits reach the cap."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=vocab, head_dim=16, final_logit_softcapping=softcap, attn_logit_softcapping=None,
                       sliding_window=16, **TINY_LM)
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(200.0)
    return model.eval()


def granite_model(vocab, logits_scaling, seed=1):
    """A tiny Granite: logits divided by ``logits_scaling``."""
    from transformers import GraniteConfig, GraniteForCausalLM

    cfg = GraniteConfig(vocab_size=vocab, logits_scaling=logits_scaling, **TINY_LM)
    torch.manual_seed(seed)
    model = GraniteForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    return model.eval()


def model_logprobs64(model, ids, attn, vocab):
    """Float64 log-softmax ``[B, T-1, vocab]`` of a model's real logits at the loop's positions (hidden i scores
    token i+1)."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn)).logits
    return torch.log_softmax(logits.double()[:, :-1, :vocab], -1)


# ------------------------------------------------- checkpoints whose full unpickling would run a command


class RunsCode:
    """Pickles to ``os.system("touch <marker>")``: unpickling it in full runs the command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def rehash(ck, *rels):
    """Rewrite ``ck``'s manifest so the sizes and digests of ``rels`` match their current content."""
    m = json.loads((ck / "manifest.json").read_text())
    for rel in rels:
        data = (ck / rel).read_bytes()
        m["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ck / "manifest.json").write_text(json.dumps(m))
    return m


def plant_code_running_state(ck, marker, how="torch.save"):
    """Replace ``ck/trainer_state.pt`` by a pickle whose full loading would touch ``marker``, shaped like a real
    state file, and rewrite the manifest so that every size and SHA-256 matches: only the reader stands between
    the file and the command."""
    step = ckpt.read_manifest(ck)["step"]
    payload = {"step": step, "entries": {"optimizer": RunsCode(marker)}}
    st = ck / "trainer_state.pt"
    if how == "torch.save":
        torch.save(payload, st)
    else:
        st.write_bytes(pickle.dumps(payload, protocol=2))
    rehash(ck, "trainer_state.pt")
    assert ckpt.verify(ck)["step"] == step  # the manifest vouches for the planted file
    return st


def assert_payload_is_live(st, marker):
    """The planted file really runs its command when unpickled in full (so the refusal above is what saved us)."""
    assert not marker.exists()
    torch.load(st, weights_only=False) if zipfile.is_zipfile(st) else pickle.loads(st.read_bytes())
    assert marker.exists()
    marker.unlink()
