"""Vocabulary parallelism: each rank of a ``torch.distributed`` group holds a contiguous shard of the lm_head rows.

Rank ``r`` of ``P`` passes the rows ``[o_r, o_r + V_r)`` of the student's (and teacher's) lm_head, shards ordered
by rank; every rank passes the same hidden states. :class:`VocabParallelBackend` wraps any backend (it implements
the backend contract of :class:`tipkernels.backends.Backend`) and turns shard-local statistics into global ones with a few
all-reduces of per-token scalars: O(N) communication per pass, never O(N·V).

The math (docs/design.md §5: the quantities of §1 split over shards). With shard-local LSEs ``Ls_r`` / ``Lt_r`` and the global
``Ls = logsumexp_r Ls_r`` (all-reduce max, then sum), the shard's share of the mass is ``π_r = e^{Ls_r − Ls}`` for the
student and ``τ_r = e^{Lt_r − Lt}`` for the teacher, and for the shard-normalised statistics ``H_r, KL_r, ...``:

- ``H = Σ_r π_r (H_r − log π_r)`` (and likewise the teacher entropy with ``τ``),
- ``KL(p‖q) = Σ_r π_r (KL_r(p‖q) + log π_r − log τ_r)``, ``KL(q‖p) = Σ_r τ_r (KL_r(q‖p) + log τ_r − log π_r)``,
- ``log p(label) = log p_r(label) + log π_r`` on the rank that owns the label,
- argmax: the shard whose largest logit is the global maximum (ties to the lower rank),
- JSD: with the global LSEs each shard's unclamped ``Σ q (log q − log m)`` and ``Σ p (log p − log m)`` are the
  global sums restricted to it (one more all-reduce, in JSD's second pass).

The backward needs no new math: the gradient tile of docs/design.md §2 only reads the *global* LSEs and per-row values,
which the forward saved, so each rank's local backward gives the gradient of its own weight shard exactly, and
the hidden-state gradients of the ranks are summed with one all-reduce of ``[N, D]``.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..inputs import IGNORE_INDEX, Problem, combine_jsd
from .chunked import transform_logits

Tensor = torch.Tensor


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    return dist


class VocabParallelBackend:
    """A backend over this rank's vocabulary shard whose outputs are the global (all-vocabulary) values.

    Args:
        local: the backend computing on the shard (:mod:`tipkernels.backends.chunked`, :mod:`...triton`).
        group: the ``torch.distributed`` process group whose ranks hold the shards, in rank order.
        local_vocab: the number of student lm_head rows this rank holds (``V_r``).

    Construction is collective (an all-gather of the shard sizes): every rank of ``group`` must construct it.
    ``vocab_size`` is the global ``V``; ``vocab_offset`` this rank's first row.
    """

    autograd_native = False
    supports_vocab_parallel = False  # a shard of a shard is not supported
    has_jsd_sums = False

    def __init__(self, local, group, local_vocab: int, device: torch.device):
        dist = _dist()
        if local_vocab < 1:
            raise ValueError(f"every rank must hold at least one lm_head row; this rank holds {local_vocab}")
        if not local.supports_vocab_parallel:
            raise ValueError(f"backend={local.name!r} cannot run vocabulary-parallel")
        self.local, self.group, self.name = local, group, local.name
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        sizes = torch.zeros(self.world, dtype=torch.int64, device=device)
        sizes[self.rank] = int(local_vocab)
        dist.all_reduce(sizes, group=group)
        self.sizes = [int(s) for s in sizes.tolist()]
        self.vocab_offset = sum(self.sizes[: self.rank])
        self.vocab_size = sum(self.sizes)

    # ---------------------------------------------------------------------------------------- collectives

    def _sum(self, t: Tensor) -> Tensor:
        _dist().all_reduce(t, group=self.group)
        return t

    def _lse(self, local_lse: Tensor) -> Tensor:
        """Global logsumexp of the per-rank LSEs (all-reduce max, then sum of rescaled exponentials)."""
        dist = _dist()
        top = local_lse.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        total = self._sum(torch.exp(local_lse - top))
        return top + torch.log(total)

    def _argmax(self, local_idx: Tensor, local_max: Tensor) -> Tensor:
        """Global argmax from each shard's argmax and its logit; ties go to the lower global index."""
        dist = _dist()
        best = local_max.clone()
        dist.all_reduce(best, op=dist.ReduceOp.MAX, group=self.group)
        big = torch.iinfo(torch.int64).max
        cand = torch.where(local_max == best, local_idx + self.vocab_offset, torch.full_like(local_idx, big))
        dist.all_reduce(cand, op=dist.ReduceOp.MIN, group=self.group)
        return cand

    # ---------------------------------------------------------------------------------------- the contract

    def plan(self, prob: Problem) -> Problem:
        return self.local.plan(prob)

    def forward_stats(self, prob: Problem) -> Dict[str, Tensor]:
        raw = self.local.forward_stats(prob)
        out = {}
        ls_r = raw["student_lse"].double()
        ls = self._lse(ls_r)
        log_pi = ls_r - ls
        pi = log_pi.exp()
        dtype = raw["student_lse"].dtype
        out["student_lse"] = ls.to(dtype)
        out["entropy"] = self._sum(pi * (raw["entropy"].double() - log_pi)).to(dtype)
        out["student_argmax"] = self._argmax(raw["student_argmax"], _logit_at(prob, "student", raw["student_argmax"]))
        if prob.has_teacher:
            lt_r = raw["teacher_lse"].double()
            lt = self._lse(lt_r)
            log_tau = lt_r - lt
            tau = log_tau.exp()
            out["teacher_lse"] = lt.to(dtype)
            out["teacher_entropy"] = self._sum(tau * (raw["teacher_entropy"].double() - log_tau)).to(dtype)
            rkl = self._sum(pi * (raw["reverse_kl"].double() + log_pi - log_tau))
            fkl = self._sum(tau * (raw["forward_kl"].double() + log_tau - log_pi))
            out["reverse_kl"] = rkl.clamp_min(0).to(dtype)
            out["forward_kl"] = fkl.clamp_min(0).to(dtype)
            out["teacher_argmax"] = self._argmax(raw["teacher_argmax"],
                                                 _logit_at(prob, "teacher", raw["teacher_argmax"]))
        if prob.labels is not None:
            owned = prob.labels != IGNORE_INDEX
            lp = torch.where(owned, raw["label_logprob"].double() + log_pi, torch.zeros_like(log_pi))
            out["label_logprob"] = self._sum(lp).to(dtype)
        return out

    def jsd_forward(self, prob: Problem, student_lse: Tensor, teacher_lse: Tensor, beta: float):
        # With the global LSEs, p, q and m are the global distributions restricted to this shard: the shards'
        # unclamped sums add up to the global KL(q‖m) and KL(p‖m).
        kl_qm, kl_pm = self.local.jsd_sums(prob, student_lse, teacher_lse, beta)
        both = self._sum(torch.stack([kl_qm, kl_pm]).double())
        return combine_jsd(both[0].to(kl_qm.dtype), both[1].to(kl_pm.dtype), beta)

    def backward(self, prob: Problem, kind: str, grad_rows: Tensor, saved: Dict[str, Tensor], beta: float = 0.5):
        d_student, d_weight, d_bias = self.local.backward(prob, kind, grad_rows, saved, beta)
        if prob.student_is_linear:
            self._sum(d_student)  # each shard's columns contribute to every hidden-state gradient
        return d_student, d_weight, d_bias


def _logit_at(prob: Problem, side: str, index: Tensor) -> Tensor:
    """The (transformed, temperature-scaled) logit of each row at column ``index[row]``: O(N·D), no [N, V] tile."""
    hidden, weight, bias, logits = (
        (prob.student_hidden, prob.student_weight, prob.student_bias, prob.student_logits) if side == "student"
        else (prob.teacher_hidden, prob.teacher_weight, prob.teacher_bias, prob.teacher_logits))
    if hidden is not None:
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        z = (hidden.to(dtype) * weight.index_select(0, index).to(dtype)).sum(-1)
        if bias is not None:
            z = z + bias.index_select(0, index).to(dtype)
    else:
        z = logits.gather(1, index[:, None])[:, 0]
        z = z.double() if z.dtype == torch.float64 else z.float()
    scale, cap = (prob.student_scale, prob.student_cap) if side == "student" else (prob.teacher_scale, prob.teacher_cap)
    return transform_logits(z, scale, cap, prob.temperature)


def shard_labels(labels: Optional[Tensor], backend: VocabParallelBackend) -> Optional[Tensor]:
    """Global labels -> this shard's local indices (IGNORE_INDEX where another rank owns the label).

    Raises a ValueError for labels outside ``[0, V)`` (global ``V``) other than IGNORE_INDEX."""
    if labels is None:
        return None
    if not isinstance(labels, Tensor) or labels.is_floating_point():
        return labels  # build_problem gives the TypeError
    lo, hi = backend.vocab_offset, backend.vocab_offset + backend.sizes[backend.rank]
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= backend.vocab_size))
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"labels out of range: labels{list(first)} = {int(labels[first])}, expected "
                         f"0 <= label < {backend.vocab_size} (the global vocabulary) or {IGNORE_INDEX}")
    mine = (labels >= lo) & (labels < hi)
    return torch.where(mine, labels - lo, torch.full_like(labels, IGNORE_INDEX))


def global_vocab(backend, prob: Problem) -> int:
    """The vocabulary size that normalises the entropy: the global one under vocabulary parallelism."""
    return backend.vocab_size if isinstance(backend, VocabParallelBackend) else prob.vocab_size


__all__ = ["VocabParallelBackend", "shard_labels", "global_vocab"]
