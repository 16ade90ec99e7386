"""The variant registry: named implementations of the same quantity, the mean reverse KL of a fused linear
layer, each a callable ``loss(h_s [N, D_s], w_s [V, D_s], h_t [N, D_t], w_t [V, D_t]) -> scalar`` differentiable
in ``h_s`` and ``w_s`` (and, for the library's backends, ``score(...)``: the no-grad scoring pass).

Names: ``triton``, ``torch``, ``reference`` (tipkernels' backends; ``reference`` materialises ``[N, V]`` logits;
``triton`` runs the strategy "auto" picks), ``triton_fused``, ``triton_cublas``, ``triton_fused_grad`` (the triton
backend with its strategy forced, :data:`TRITON_STRATEGIES`: the GPU plan's cells and the suite's grid compare them),
``compiled`` (torch.compile of the torch backend), ``compiled_ref`` (torch.compile of the materialised formula of
the library's reference backend), and the peers ``trl`` (TRL's ChunkedDivergenceFunction, β=1) and ``liger``
(Liger-Kernel's LigerFusedLinearJSD, jsd_beta=1), each where importable: a peer that is not installed is a
variant with ``unavailable`` set, never an error.

The sparse-teacher variants (a teacher served elsewhere, seen through its top-K log-probabilities; docs/design.md
§9), at each K of :data:`TOPK_KS`: ``topk_triton@K`` and ``topk_torch@K`` (``tk.fused_linear_divergence(h_s,
w_s, teacher_topk=...)``, forward KL, ``tail="bucket"``) and ``topk_chunked@K``, the chunked PyTorch top-k
forward KL of the VeOmni/verl kind (student logits formed in row chunks, log-softmax, gathered at the K ids,
``Σ_k q_k (log q_k − log p_k)``). Their loss takes the same four tensors: the teacher's top-K is computed once
from ``(h_t, w_t)`` (vocabulary-chunked, :func:`tipkernels.opd.topk_logprobs`) and cached, so a
cell times what the student's side of a served-teacher step costs. They are not in the GPU suite's default list;
name them with ``--variants``.

Also the step closures the scripts time: the all-token loss step and the TIP loss step.
"""

from __future__ import annotations

import glob
import inspect
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

import tipkernels as tk

from . import lib
from .inputs import clear_grads
from .runner import REPO_ROOT, describe_error

#: The triton backend's strategies (docs/design.md §4), as ``tk.set_options(triton_config=...)``, in the GPU plan's
#: order (benchmarks/harness/roofline.py's ``STRATEGIES``). fused_grad forms the gradient in the forward's sweep (the
#: loss's reduction "mean" gives every row's upstream gradient there); its row block: 1 GiB.
TRITON_STRATEGIES = {
    "fused": {"strategy": "fused", "grad_strategy": "recompute"},
    "cublas": {"strategy": "cublas", "grad_strategy": "recompute"},
    "fused_grad": {"strategy": "cublas", "grad_strategy": "fused_grad", "sweep_mib": 1024},
}
STRATEGY_VARIANTS = tuple(f"triton_{s}" for s in TRITON_STRATEGIES)
#: The dense-teacher variants (the GPU suite's default list).
DENSE_NAMES = ("triton", *STRATEGY_VARIANTS, "torch", "reference", "compiled", "compiled_ref", "trl", "liger")
BACKENDS = ("triton", "torch", "reference")
#: K of the sparse-teacher variants, and their names ``topk_<impl>@K``.
TOPK_KS = (20, 64, 128)
TOPK_IMPLS = ("triton", "torch", "chunked")
TOPK_NAMES = tuple(f"topk_{impl}@{k}" for impl in TOPK_IMPLS for k in TOPK_KS)
NAMES = DENSE_NAMES + TOPK_NAMES
#: Variants with a no-grad scoring pass (``tk.token_stats``): the backends, the forced strategies but fused_grad
#: (whose scoring pass is cublas's: no gradient, nothing to fuse), and the sparse-teacher variants but the baseline.
SCORING = (BACKENDS + ("triton_fused", "triton_cublas")
           + tuple(n for n in TOPK_NAMES if not n.startswith("topk_chunked")))
#: Rows per chunk of the chunked top-k baseline (each chunk's ``[rows, V]`` fp32 logits live at a time).
TOPK_CHUNK_ROWS = 512

LABELS = {
    "triton": "tk.fused_linear_divergence(backend='triton')",
    "torch": "tk.fused_linear_divergence(backend='torch') (chunked PyTorch)",
    "reference": "tk.fused_linear_divergence(backend='reference') (materialised [N, V] logits, autograd)",
    "triton_fused": "backend='triton', strategy 'fused' (fused kernels; the backward recomputes the logits)",
    "triton_cublas": "backend='triton', strategy 'cublas' (cuBLAS logit chunks + Triton epilogues; recompute backward)",
    "triton_fused_grad": "backend='triton', strategy 'cublas' + grad_strategy 'fused_grad' (gradient in the forward's "
                         "sweep)",
    "compiled": "torch.compile of a function calling tk.fused_linear_divergence(backend='torch')",
    "compiled_ref": "torch.compile of the materialised formula (the reference backend's reverse_kl on both logits)",
    "trl": "trl ChunkedDivergenceFunction(beta=1.0) = reverse KL (chunked, no [N, V] logits)",
    "liger": "liger_kernel LigerFusedLinearJSD(jsd_beta=1.0) = reverse KL; computes its gradients inside forward",
}
for _k in TOPK_KS:
    LABELS.update({
        f"topk_triton@{_k}": f"tk.fused_linear_divergence(teacher_topk=top-{_k}, forward_kl, tail='bucket', "
                             f"backend='triton')",
        f"topk_torch@{_k}": f"tk.fused_linear_divergence(teacher_topk=top-{_k}, forward_kl, tail='bucket', "
                            f"backend='torch')",
        f"topk_chunked@{_k}": f"chunked PyTorch top-{_k} forward KL (VeOmni/verl kind): {TOPK_CHUNK_ROWS}-row "
                              f"chunks of log_softmax(h·Wᵀ) under checkpoint, gathered at the ids",
    })


@dataclass
class Variant:
    name: str
    loss: Optional[Callable] = None          # (h_s, w_s, h_t, w_t) -> scalar loss, differentiable in h_s, w_s
    score: Optional[Callable] = None         # (h_s, w_s, h_t, w_t) -> per-token statistics, no grad
    unavailable: Optional[str] = None        # why it cannot run here (every cell prints this)
    compiled: bool = False
    notes: List[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return LABELS[self.name]


def backend_loss(backend: str, divergence: str = "reverse_kl") -> Callable:
    """``tk.fused_linear_divergence(..., reduction="mean", backend=backend)`` as a variant's loss."""
    def loss(h_s, w_s, h_t, w_t):
        return tk.fused_linear_divergence(h_s, w_s, h_t, w_t, divergence=divergence, reduction="mean",
                                          backend=backend)
    return loss


def with_triton_config(fn: Callable, over: dict) -> Callable:
    """``fn`` called under ``tk.set_options(triton_config=over)`` (forward and, through autograd, backward: the
    backward reads the config saved by the forward's call)."""
    def call(*args, **kwargs):
        with tk.set_options(triton_config=over):
            return fn(*args, **kwargs)
    return call


def materialised_reverse_kl(h_s, w_s, h_t, w_t):
    """Mean reverse KL on materialised fp32 logits, as a trainer would write it, with the library's reference
    formula (the compiled baseline)."""
    return lib.reference.reverse_kl((h_s @ w_s.t()).float(), (h_t @ w_t.t()).float()).mean()


def parse_topk(name: str):
    """``"topk_torch@64"`` → ``("torch", 64)``; None for a dense variant's name."""
    if not name.startswith("topk_") or "@" not in name:
        return None
    impl, k = name[len("topk_"):].split("@", 1)
    return impl, int(k)


_TOPK_CACHE: dict = {}


def teacher_topk_of(h_t, w_t, k: int):
    """The teacher's top-``k`` log-probabilities ``[N, k]`` of ``(h_t, w_t)``, computed once per tensors and k
    (vocabulary-chunked, fp32; what a served teacher would send)."""
    from tipkernels.opd import topk_logprobs

    key = (h_t.data_ptr(), w_t.data_ptr(), tuple(h_t.shape), tuple(w_t.shape), h_t.dtype, k)
    if key not in _TOPK_CACHE:
        _TOPK_CACHE.clear()  # one input set at a time
        _TOPK_CACHE[key] = topk_logprobs(h_t, w_t, k)
    return _TOPK_CACHE[key]


def topk_backend_loss(backend: str, k: int, divergence: str = "forward_kl", tail: str = "bucket") -> Callable:
    """``tk.fused_linear_divergence(h_s, w_s, teacher_topk=top-k of (h_t, w_t), reduction="mean")``."""
    def loss(h_s, w_s, h_t, w_t):
        return tk.fused_linear_divergence(h_s, w_s, teacher_topk=teacher_topk_of(h_t, w_t, k),
                                          divergence=divergence, tail=tail, reduction="mean", backend=backend)
    return loss


def _chunk_topk_forward_kl(h, w, ids, logq):
    logp = torch.log_softmax((h @ w.t()).float(), -1)
    valid = ids >= 0
    lpk = logp.gather(-1, ids.clamp_min(0))
    logq = logq.float()
    return torch.where(valid, logq.exp() * (logq - lpk), torch.zeros_like(lpk)).sum()


def chunked_topk_forward_kl(h_s, w_s, topk, rows: int = TOPK_CHUNK_ROWS):
    """The chunked PyTorch top-k forward KL (the VeOmni/verl approach), mean over rows: per chunk of ``rows``
    tokens, ``log_softmax(h·Wᵀ)`` in fp32, gathered at the teacher's ids, ``Σ_k q_k (log q_k − log p_k)`` (no
    tail term); each chunk under ``torch.utils.checkpoint`` so that the backward holds one chunk's logits."""
    from torch.utils.checkpoint import checkpoint

    ids, logq = topk
    total = h_s.new_zeros((), dtype=torch.float32)
    for r0 in range(0, h_s.shape[0], rows):
        r1 = r0 + rows
        total = total + checkpoint(_chunk_topk_forward_kl, h_s[r0:r1], w_s, ids[r0:r1], logq[r0:r1],
                                   use_reentrant=False)
    return total / h_s.shape[0]


def _set_dynamo_limits() -> None:
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))


def _liger_class(wheel: Optional[str] = None):
    """LigerFusedLinearJSD, importing liger_kernel from a wheel in .whl/ (or ``wheel``) when it is not installed."""
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
        return LigerFusedLinearJSD
    except ImportError as first:
        wheels = [wheel] if wheel else sorted(glob.glob(os.path.join(REPO_ROOT, ".whl", "liger_kernel-*.whl")))
        if not wheels:
            raise ImportError(f"liger_kernel is not installed ({first}) and no liger_kernel-*.whl in .whl/") from first
        target = tempfile.mkdtemp(prefix="liger_")
        with zipfile.ZipFile(wheels[-1]) as z:
            z.extractall(target)
        sys.path.insert(0, target)
        for name in [m for m in sys.modules if m == "liger_kernel" or m.startswith("liger_kernel.")]:
            del sys.modules[name]
        from liger_kernel.transformers import LigerFusedLinearJSD
        return LigerFusedLinearJSD


def _liger(v: Variant, device: torch.device, wheel: Optional[str]) -> None:
    if device.type != "cuda":
        v.unavailable = "n/a (needs CUDA)"
        return
    try:
        cls = _liger_class(wheel)
    except Exception as err:  # noqa: BLE001 - a missing peer is a status, not a failure
        v.unavailable = "not installed"
        v.notes.append(f"liger: {describe_error(err, 300)}")
        return
    module = cls(jsd_beta=1.0, temperature=1.0)
    if "shift_labels" in inspect.signature(module.forward).parameters:
        v.loss = lambda hs, ws, ht, wt: module(hs, ws, ht, wt, None)
    else:
        v.loss = lambda hs, ws, ht, wt: module(hs, ws, ht, wt)
    import liger_kernel
    v.notes.append(f"liger_kernel {getattr(liger_kernel, '__version__', '?')} from "
                   f"{os.path.dirname(liger_kernel.__file__)}")


def _trl(v: Variant) -> None:
    try:
        import trl
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    except Exception as err:  # noqa: BLE001 - a missing peer is a status, not a failure
        v.unavailable = "not installed"
        v.notes.append(f"trl: {describe_error(err, 300)}")
        return

    def loss(h_s, w_s, h_t, w_t):
        per_token, _entropy = ChunkedDivergenceFunction.apply(h_s, w_s, None, h_t, w_t, None, 1.0)
        return per_token.mean()

    v.loss = loss
    v.notes.append(f"trl {getattr(trl, '__version__', '?')}: ChunkedDivergenceFunction")


def build_variant(name: str, device, liger_wheel: Optional[str] = None) -> Variant:
    """The variant ``name`` (one of :data:`NAMES`) on ``device``; ``unavailable`` says why it cannot run here."""
    device = torch.device(device)
    v = Variant(name)
    topk = parse_topk(name)
    if topk is not None and name in TOPK_NAMES:
        impl, k = topk
        if impl == "chunked":
            v.loss = lambda hs, ws, ht, wt: chunked_topk_forward_kl(hs, ws, teacher_topk_of(ht, wt, k))
        elif impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            v.unavailable = "n/a (needs CUDA)"
        else:
            v.loss = topk_backend_loss(impl, k)
            v.score = lambda hs, ws, ht, wt: tk.token_stats(hs, ws, teacher_topk=teacher_topk_of(ht, wt, k),
                                                            backend=impl)
        return v
    if name in BACKENDS:
        if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            v.unavailable = "n/a (needs CUDA)"
            return v
        v.loss = backend_loss(name)
        v.score = lambda hs, ws, ht, wt: tk.token_stats(hs, ws, ht, wt, backend=name)
    elif name in STRATEGY_VARIANTS:
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            v.unavailable = "n/a (needs CUDA)"
            return v
        over = TRITON_STRATEGIES[name[len("triton_"):]]
        v.loss = with_triton_config(backend_loss("triton"), over)
        if name in SCORING:
            v.score = with_triton_config(lambda hs, ws, ht, wt: tk.token_stats(hs, ws, ht, wt, backend="triton"),
                                         over)
    elif name in ("compiled", "compiled_ref"):
        _set_dynamo_limits()
        v.loss = torch.compile(backend_loss("torch") if name == "compiled" else materialised_reverse_kl)
        v.compiled = True
    elif name == "trl":
        _trl(v)
    elif name == "liger":
        _liger(v, device, liger_wheel)
    else:
        raise ValueError(f"unknown variant {name!r}; expected one of {NAMES}")
    return v


def compile_counters() -> str:
    try:
        from torch._dynamo.utils import counters
        breaks = sum(counters["graph_break"].values())
        frames = counters["stats"].get("unique_graphs", 0)
        return f"{frames} graph(s), {breaks} graph break(s)"
    except Exception:  # noqa: BLE001
        return "graph counters unavailable"


# ------------------------------------------------------------------------------------------------- steps


def loss_step(loss: Callable, inputs) -> Callable[[], torch.Tensor]:
    """``step()``: drop the student's gradients, ``loss(*inputs).backward()``; returns the detached loss."""
    def step():
        clear_grads(inputs)
        value = loss(*inputs)
        value.backward()
        return value.detach()
    return step


def tip_step(backend: str, rule: str, ratio: float, inputs, batch: int, seq: int, *,
             seeded: bool = True) -> Callable[[], int]:
    """``step()``: drop the student's gradients, then one TIP loss step on ``inputs`` seen as ``[batch, seq]``
    tokens, all valid (``TIPDistillationLoss(rule, ratio)`` forward + backward); returns the tokens differentiated.

    ``rule="none"`` is the all-token step, ``tk.fused_linear_divergence(reduction="mean")``. ``seeded``: the
    sampling rules draw from a generator reset to seed 0 at every step.
    """
    h_s, w_s, h_t, w_t = inputs
    if rule == "none":
        inner = loss_step(backend_loss(backend), inputs)

        def step_all() -> int:
            inner()
            return h_s.shape[0]
        return step_all
    loss_fn = tk.TIPDistillationLoss(rule=rule, ratio=ratio, backend=backend, compute_metrics=False)
    hs3, ht3 = h_s.view(batch, seq, -1), h_t.view(batch, seq, -1)
    mask = torch.ones(batch, seq, dtype=torch.bool, device=h_s.device)
    gen = torch.Generator(device=h_s.device) if seeded else None

    def step() -> int:
        clear_grads(inputs)
        if gen is not None:
            gen.manual_seed(0)
        out = loss_fn(hs3, w_s, ht3, w_t, mask, generator=gen)
        out.loss.backward()
        return int(out.selection.mask.sum())
    return step
