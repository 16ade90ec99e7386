"""Vocabulary parallelism on CPU with the gloo backend: P processes, each with a contiguous lm_head shard, give
the single-process results (values on every rank, the complete hidden-state gradient, each rank its own weight
shard's gradient). Shards are uneven (the last is shorter) and the teacher vocabulary is padded."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import tipkernels as tk

from tests.spawn_helpers import free_port, spawn

pytestmark = pytest.mark.slow  # each test spawns gloo process groups

N_B, N_L, DS, DT, V, PAD = 3, 7, 12, 9, 37, 5
STAT_NAMES = ("student_lse", "teacher_lse", "entropy", "entropy_norm", "teacher_entropy", "reverse_kl",
              "forward_kl", "student_argmax", "teacher_argmax", "label_logprob")


def _inputs():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    hs, ws, bs = r(N_B, N_L, DS), r(V, DS) / 2, r(V)
    ht, wt, bt = r(N_B, N_L, DT), r(V + PAD, DT) / 2, r(V + PAD)
    labels = torch.randint(0, V, (N_B, N_L), generator=g)
    labels[0, :3] = -100
    mask = torch.rand(N_B, N_L, generator=g) > 0.2
    return hs, ws, bs, ht, wt, bt, labels, mask


def _bounds(rank: int, world: int):
    """Rank r holds rows [r·ceil(V/P), ...): the last shard is shorter; the teacher's last shard also holds the
    padding rows."""
    per = -(-V // world)
    lo, hi = rank * per, min(V, (rank + 1) * per)
    return lo, hi, (hi if rank < world - 1 else V + PAD)


TOL = {"torch": dict(rtol=1e-10, atol=1e-12), "triton": dict(rtol=2e-4, atol=2e-5)}  # triton: fp32 kernels


def _close(a, b, what, backend="torch"):
    if a.dtype in (torch.int64,):
        assert torch.equal(a, b), what
    else:
        torch.testing.assert_close(a, b.to(a.dtype), **TOL[backend], msg=what)


#: logit transforms: scales != 1 on both models, caps small enough that tanh saturates for the largest logits.
TRANSFORMS = dict(student_logit_scale=4.0, student_softcap=3.0, teacher_logit_scale=0.5, teacher_softcap=2.0)


def _worker(rank: int, world: int, port: int, backend: str, tf: dict):
    """The parallel run on ``backend`` against the single-process run on the same backend; ``tf``: the logit
    transform keywords, given to every op."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = dist.group.WORLD
        hs, ws, bs, ht, wt, bt, labels, mask = _inputs()
        lo, hi, thi = _bounds(rank, world)
        ws_r, bs_r, wt_r, bt_r = ws[lo:hi], bs[lo:hi], wt[lo:thi], bt[lo:thi]

        # token_stats: every field, labels as global ids
        full = tk.token_stats(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, labels=labels, temperature=1.3,
                              backend=backend, **tf)
        part = tk.token_stats(hs, ws_r, ht, wt_r, student_bias=bs_r, teacher_bias=bt_r, labels=labels,
                              temperature=1.3, backend=backend, process_group=group, **tf)
        ent_tf = dict(logit_scale=tf.get("student_logit_scale", 1.0), softcap=tf.get("student_softcap"))
        for name in STAT_NAMES:
            _close(getattr(part, name), getattr(full, name), name, backend)

        # differentiable ops: values, complete d hidden, this shard's d weight / d bias
        go = torch.randn(N_B, N_L, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        for kind in ("reverse_kl", "forward_kl", "jsd", "entropy"):
            leaves_full = [t.clone().requires_grad_() for t in (hs, ws, bs)]
            leaves_part = [t.clone().requires_grad_() for t in (hs, ws_r, bs_r)]
            if kind == "entropy":
                a = tk.fused_linear_entropy(leaves_full[0], leaves_full[1], bias=leaves_full[2], backend=backend,
                                            **ent_tf)
                b = tk.fused_linear_entropy(leaves_part[0], leaves_part[1], bias=leaves_part[2], backend=backend,
                                            process_group=group, **ent_tf)
            else:
                kw = dict(teacher_bias=bt, divergence=kind, beta=0.3, temperature=0.8, **tf)
                a = tk.fused_linear_divergence(leaves_full[0], leaves_full[1], ht, wt, student_bias=leaves_full[2],
                                               backend=backend, **kw)
                kw["teacher_bias"] = bt_r
                b = tk.fused_linear_divergence(leaves_part[0], leaves_part[1], ht, wt_r,
                                               student_bias=leaves_part[2], backend=backend, process_group=group,
                                               **kw)
            _close(b, a, f"{kind} value", backend)
            (a * go).sum().backward()
            (b * go).sum().backward()
            _close(leaves_part[0].grad, leaves_full[0].grad, f"{kind} d_hidden", backend)
            _close(leaves_part[1].grad, leaves_full[1].grad[lo:hi], f"{kind} d_weight shard", backend)
            _close(leaves_part[2].grad, leaves_full[2].grad[lo:hi], f"{kind} d_bias shard", backend)

        # the TIP loss: same statistics, same selection, same loss and gradients
        for rule, divergence in (("soft_or", "reverse_kl"), ("q3", "jsd")):
            hf, wf = hs.clone().requires_grad_(), ws.clone().requires_grad_()
            hp, wp = hs.clone().requires_grad_(), ws_r.clone().requires_grad_()
            kw = dict(rule=rule, ratio=0.3, divergence=divergence, beta=0.6, backend=backend, **tf)
            ref = tk.TIPDistillationLoss(**kw)(hf, wf, ht, wt, mask)
            got = tk.TIPDistillationLoss(**kw, process_group=group)(hp, wp, ht, wt_r, mask)
            assert torch.equal(got.selection.mask, ref.selection.mask), rule
            _close(got.loss, ref.loss, f"{rule} loss", backend)
            got.loss.backward()
            ref.loss.backward()
            _close(hp.grad, hf.grad, f"{rule} d_hidden", backend)
            _close(wp.grad, wf.grad[lo:hi], f"{rule} d_weight shard", backend)
            assert got.metrics["selected_tokens"] == ref.metrics["selected_tokens"]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,backend,tf", [(2, "torch", {}), (3, "torch", {}), (2, "triton", {}),
                                              (2, "torch", TRANSFORMS), (2, "triton", TRANSFORMS)],
                         ids=["2-torch", "3-torch", "2-triton", "2-torch-transforms", "2-triton-transforms"])
def test_vocab_parallel_equals_single_process(world, backend, tf):
    spawn(_worker, (world, free_port(), backend, tf), nprocs=world)


def _limits_worker(rank: int, world: int, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        hs, ws, bs, ht, wt, bt, labels, mask = _inputs()
        lo, hi, thi = _bounds(rank, world)
        with pytest.raises(ValueError, match="reference"):
            tk.fused_linear_entropy(hs, ws[lo:hi], backend="reference", process_group=dist.group.WORLD)
        with pytest.raises(ValueError, match="labels out of range"):
            bad = labels.clone()
            bad[1, 1] = V
            tk.token_stats(hs, ws[lo:hi], labels=bad, backend="torch", process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_limits_are_clear_errors():
    spawn(_limits_worker, (2, free_port()), nprocs=2)


def test_process_group_without_init_is_a_clear_error():
    hs, ws, *_ = _inputs()
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="not initialised"):
        tk.fused_linear_entropy(hs, ws, backend="torch", process_group=object())


def _selection_worker(rank: int, world: int, port: int):
    """Each rank holds some sequences of the batch (uneven split); with the group, the deterministic rules select
    exactly what one process selects on the whole batch; without it, each rank normalises on its own part."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(5)
        b, length = 5, 11
        stats = tk.TokenStats(entropy_norm=torch.rand(b, length, generator=g) ** 3,
                              reverse_kl=torch.rand(b, length, generator=g) * 4,
                              forward_kl=torch.rand(b, length, generator=g) * 2)
        mask = torch.rand(b, length, generator=g) > 0.25
        rows = [0, 1, 2] if rank == 0 else [3, 4]
        part = stats.map(lambda t: t[rows])
        group = dist.group.WORLD
        differs = False
        for rule in ("soft_or", "q3", "entropy_topk", "divergence"):
            for budget in ("per_sequence", "per_batch"):
                whole = tk.select_tokens(stats, mask, rule=rule, ratio=0.3, budget=budget)
                mine = tk.select_tokens(part, mask[rows], rule=rule, ratio=0.3, budget=budget, process_group=group)
                assert torch.equal(mine.mask, whole.mask[rows]), (rule, budget)
                torch.testing.assert_close(mine.scores, whole.scores[rows], rtol=1e-6, atol=1e-7)
                alone = tk.select_tokens(part, mask[rows], rule=rule, ratio=0.3, budget=budget)
                differs |= not torch.equal(alone.scores, whole.scores[rows])
        assert differs  # the option matters: per-rank normalisation gives other scores
        # importance weights are normalised over the global batch
        w = tk.select_tokens(part, mask[rows], rule="random", ratio=0.5, budget="per_batch", process_group=group,
                             importance_weights=True, generator=torch.Generator().manual_seed(rank))
        n_valid = int(mask.sum())
        k = int(0.5 * n_valid)
        kept = torch.tensor([int(w.mask.sum())])
        dist.all_reduce(kept)
        assert int(kept) == k
        torch.testing.assert_close(w.weights[w.mask], torch.ones(int(w.mask.sum())))  # (K/M)/(k/M) = 1
    finally:
        dist.destroy_process_group()


def test_data_parallel_selection_equals_whole_batch():
    spawn(_selection_worker, (2, free_port()), nprocs=2)


def _topk_inputs(k: int = 6):
    """A top-k teacher over the global vocabulary (ids on every shard), padding ids, a -inf log-probability."""
    g = torch.Generator().manual_seed(3)
    dense = torch.log_softmax(torch.randn(N_B * N_L, V, generator=g, dtype=torch.float64) * 2, -1)
    lp, ids = dense.topk(k, -1)
    ids[1, -1], ids[4, 1:] = -1, -1
    lp[2, 0] = -float("inf")
    lp = torch.where(ids >= 0, lp, torch.zeros_like(lp))
    return ids.reshape(N_B, N_L, k), lp.reshape(N_B, N_L, k)


def _topk_worker(rank: int, world: int, port: int, backend: str, tf: dict):
    """teacher_topk under vocabulary parallelism against one process on the same backend: token_stats, every
    divergence and tail (values, d hidden, the shard's d weight / d bias), the TIP loss."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = dist.group.WORLD
        hs, ws, bs, _, _, _, labels, mask = _inputs()
        if backend == "triton":
            hs, ws, bs = hs.float(), ws.float(), bs.float()
        ids, lp = _topk_inputs()
        lo, hi, _ = _bounds(rank, world)
        topk = tk.TeacherTopK(ids, lp)
        full = tk.token_stats(hs, ws, teacher_topk=topk, student_bias=bs, labels=labels, temperature=1.3,
                              backend=backend, **tf)
        part = tk.token_stats(hs, ws[lo:hi], teacher_topk=topk, student_bias=bs[lo:hi], labels=labels,
                              temperature=1.3, backend=backend, process_group=group, **tf)
        for name in ("student_lse", "entropy", "entropy_norm", "reverse_kl", "forward_kl", "student_argmax",
                     "teacher_argmax", "teacher_lse", "label_logprob"):
            _close(getattr(part, name), getattr(full, name), name, backend)
        go = torch.randn(N_B, N_L, generator=torch.Generator().manual_seed(1), dtype=hs.dtype)
        for kind, beta in (("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)):
            for tail in ("bucket", "renormalize"):
                leaves_full = [t.clone().requires_grad_() for t in (hs, ws, bs)]
                leaves_part = [t.clone().requires_grad_() for t in (hs, ws[lo:hi], bs[lo:hi])]
                kw = dict(teacher_topk=topk, divergence=kind, beta=beta, tail=tail, temperature=0.8,
                          backend=backend, **tf)
                a = tk.fused_linear_divergence(leaves_full[0], leaves_full[1], student_bias=leaves_full[2], **kw)
                b = tk.fused_linear_divergence(leaves_part[0], leaves_part[1], student_bias=leaves_part[2],
                                               process_group=group, **kw)
                what = f"{kind} {tail}"
                fin = torch.isfinite(a)
                assert torch.equal(fin, torch.isfinite(b)), what
                _close(b[fin], a[fin], f"{what} value", backend)
                (torch.where(fin, a, 0) * go).sum().backward()
                (torch.where(fin, b, 0) * go).sum().backward()
                _close(leaves_part[0].grad, leaves_full[0].grad, f"{what} d_hidden", backend)
                _close(leaves_part[1].grad, leaves_full[1].grad[lo:hi], f"{what} d_weight shard", backend)
                _close(leaves_part[2].grad, leaves_full[2].grad[lo:hi], f"{what} d_bias shard", backend)
        hf, wf = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        hp, wp = hs.clone().requires_grad_(), ws[lo:hi].clone().requires_grad_()
        kw = dict(rule="q3", ratio=0.4, divergence="jsd", beta=0.6, backend=backend, **tf)
        ref = tk.TIPDistillationLoss(**kw)(hf, wf, mask=mask, teacher_topk=topk)
        got = tk.TIPDistillationLoss(**kw, process_group=group)(hp, wp, mask=mask, teacher_topk=topk)
        assert torch.equal(got.selection.mask, ref.selection.mask)
        _close(got.loss, ref.loss, "loss", backend)
        got.loss.backward()
        ref.loss.backward()
        _close(hp.grad, hf.grad, "loss d_hidden", backend)
        _close(wp.grad, wf.grad[lo:hi], "loss d_weight shard", backend)
    finally:
        dist.destroy_process_group()


STUDENT_TRANSFORMS = dict(student_logit_scale=4.0, student_softcap=3.0)


@pytest.mark.parametrize("world,backend,tf", [(2, "torch", {}), (3, "torch", STUDENT_TRANSFORMS),
                                              (2, "triton", STUDENT_TRANSFORMS)],
                         ids=["2-torch", "3-torch-transforms", "2-triton-transforms"])
def test_vocab_parallel_topk_equals_single_process(world, backend, tf):
    spawn(_topk_worker, (world, free_port(), backend, tf), nprocs=world)
