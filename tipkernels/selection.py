"""Token-importance (TIP) scores, quadrants and selection rules (docs/design.md §6).

Every rule scores the valid tokens of a ``[B, L]`` batch and keeps a budget of them: ``⌊ρ·m⌋`` of each sequence's
``m`` valid tokens (``budget="per_sequence"``, the paper's) or ``⌊ρ·M⌋`` of the batch's ``M`` (``"per_batch"``).
``h`` is ``stats.entropy_norm`` and ``δ`` is ``stats.reverse_kl``.

============== =======================================================================================
rule           what is kept
============== =======================================================================================
all            every valid token (the budget is ignored)
random         uniform sample without replacement
entropy_topk   the largest ``h``
entropy_sample sample without replacement with probability ∝ ``h`` (Gumbel-top-k); tokens with ``h = 0``
               are never chosen, so fewer than the budget are kept when fewer have ``h > 0``
soft_or        largest ``ĥ + δ̂ − ĥ·δ̂`` (paper Eq. 7–8): ``ĥ`` = ``h`` clipped at its ``clip_quantile``
               quantile over the batch's valid tokens, then min-max normalised; ``δ̂`` = min-max normalised ``δ``
q3             largest ``KL(q‖p)·(1 − ĥ)`` (paper §7.3): confident tokens the teacher disagrees with
divergence     the largest ``δ``
============== =======================================================================================

Quantiles and min-max ranges are taken over the whole batch's valid tokens. Ties go to the earlier position
(row-major for ``per_batch``). ``⌊ρ·m⌋`` may be 0 for short sequences; that is the paper's rule and is kept.
Everything runs as whole-batch tensor ops on the stats' device: no Python loop over sequences, no host sync.
"""

from __future__ import annotations

import numbers
from typing import Dict, Optional, Tuple

import torch

from .inputs import BUDGETS, RULES, SAMPLING_RULES, check_choice, check_fraction, check_mask
from .types import Selection, TokenStats

Tensor = torch.Tensor

QUADRANTS = ("Q1", "Q2", "Q3", "Q4")

_RULE_FIELDS = {
    "all": (),
    "random": (),
    "entropy_topk": ("entropy_norm",),
    "entropy_sample": ("entropy_norm",),
    "soft_or": ("entropy_norm", "reverse_kl"),
    "q3": ("entropy_norm", "forward_kl"),
    "divergence": ("reverse_kl",),
}
_INF = float("inf")


# ----------------------------------------------------------------------------------------------- validation


def _check_threshold(name: str, value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
        raise ValueError(f"{name} must be None (batch median) or a number, got {value!r}")
    return float(value)


def _rows(stats: TokenStats, mask: Tensor, names: tuple, who: str) -> Tuple[Dict[str, Tensor], Tensor]:
    """Validate, then view the mask and the named fields as ``[B, L]`` (``[N]`` becomes ``[1, N]``).

    Fields are computed on in at least fp32 (fp64 stats stay fp64)."""
    stats.require(*names, who=who)
    valid = check_mask(mask, stats.shape)
    fields = {}
    for n in names:
        x = getattr(stats, n).reshape(valid.shape)
        fields[n] = x.to(torch.promote_types(x.dtype, torch.float32))
    return fields, valid


# ----------------------------------------------------------------------------------------------- helpers


def _all_gather_flat(x: Tensor, group) -> Tensor:
    """The flattened ``x`` of every rank of ``group``, concatenated in rank order (sizes may differ by rank)."""
    import torch.distributed as dist

    x = x.flatten()
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.numel()], device=x.device), group=group)
    sizes = [int(n) for n in torch.cat(sizes).tolist()]
    padded = torch.zeros(max(sizes), dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _global(x: Tensor, valid: Tensor, group) -> Tuple[Tensor, Tensor]:
    """``(x, valid)`` of the whole data-parallel batch (every rank's entries), or the local ones without a group."""
    if group is None:
        return x, valid
    return _all_gather_flat(x, group), _all_gather_flat(valid, group)


def _masked_quantile(x: Tensor, valid: Tensor, q: float) -> Tensor:
    """``torch.quantile(x[valid], q)`` (linear interpolation) as a 0-dim tensor, without a host sync; 0 if empty.

    Invalid entries become +inf so that the first ``n`` sorted values are exactly the valid ones."""
    srt = torch.where(valid, x, _INF).flatten().sort().values
    n = valid.sum()
    rank = (n - 1).clamp_min(0).to(x.dtype) * q  # in x's dtype, as torch.quantile
    below, above = rank.long().reshape(1), rank.ceil().long().reshape(1)
    out = torch.lerp(srt.gather(0, below), srt.gather(0, above), rank - below.to(x.dtype)).squeeze(0)
    return torch.where(n > 0, out, torch.zeros_like(out))


def _minmax(x: Tensor, valid: Tensor, group=None) -> Tensor:
    """Min-max normalise ``x`` over its valid entries (of every rank of ``group``) to [0, 1]; 0 where invalid
    or when max == min."""
    lo_hi = torch.stack([-torch.where(valid, x, _INF).amin(), torch.where(valid, x, -_INF).amax()])
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(lo_hi, op=dist.ReduceOp.MAX, group=group)
    lo, span = -lo_hi[0], lo_hi[1] + lo_hi[0]
    return torch.where(valid & (span > 0), (x - lo) / span, torch.zeros_like(x))


def _entropy_hat(h: Tensor, valid: Tensor, clip_quantile: float, group=None) -> Tensor:
    """``ĥ``: entropy clipped at its ``clip_quantile`` quantile over the valid tokens (of the whole data-parallel
    batch with a ``group``), then min-max normalised."""
    clip = _masked_quantile(*_global(h, valid, group), clip_quantile)
    return _minmax(torch.minimum(h, clip), valid, group)


def _budget(count: Tensor, ratio: float) -> Tensor:
    """``⌊ρ·m⌋`` per entry of ``count`` (int64); the 1e-9 absorbs float error so that 0.3·10 gives 3."""
    return torch.floor(count.double() * ratio + 1e-9).long()


def _top_k(keys: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
    """Keep the ``k[r]`` largest keys of each row ``r``; ties go to the earlier column.

    keys: float ``[R, C]``, with ``-inf`` (or NaN) on entries that must never be kept; k: int64 ``[R]``.
    Returns ``(kept bool [R, C], next_key [R])``, ``next_key`` being the ``(k+1)``-th largest key (``-inf`` if none).
    """
    keys = torch.where(keys.isnan(), -_INF, keys)
    srt, order = keys.sort(dim=1, descending=True, stable=True)
    cols = keys.shape[1]
    take = (torch.arange(cols, device=keys.device) < k[:, None]) & (srt > -_INF)
    kept = torch.zeros_like(take).scatter_(1, order, take)
    nxt = srt.gather(1, k.clamp(max=cols - 1)[:, None]).squeeze(1)
    return kept, torch.where(k < cols, nxt, -_INF)


def _score(rule: str, f: Dict[str, Tensor], valid: Tensor, clip_quantile: float, group=None) -> Tensor:
    """The deterministic score of ``entropy_*``, ``soft_or``, ``q3`` and ``divergence`` (any value on invalid)."""
    if rule in ("entropy_topk", "entropy_sample"):
        return f["entropy_norm"]
    if rule == "divergence":
        return f["reverse_kl"]
    h_hat = _entropy_hat(f["entropy_norm"], valid, clip_quantile, group)
    if rule == "soft_or":
        d_hat = _minmax(f["reverse_kl"], valid, group)
        return h_hat + d_hat - h_hat * d_hat
    return f["forward_kl"] * (1 - h_hat)  # q3


# ----------------------------------------------------------------------------------------------- public API


def select_tokens(
    stats: TokenStats,
    mask: Tensor,
    *,
    rule: str = "soft_or",
    ratio: float = 0.5,
    budget: str = "per_sequence",
    generator: Optional[torch.Generator] = None,
    importance_weights: bool = False,
    clip_quantile: float = 0.98,
    process_group=None,
) -> Selection:
    """Pick the tokens a TIP rule trains on.

    Args:
        stats: :class:`TokenStats` shaped ``[B, L]`` (or ``[N]``, taken as one sequence); only the fields the rule
            reads must be set: ``entropy_norm`` (entropy rules, soft_or, q3), ``reverse_kl`` (soft_or,
            divergence), ``forward_kl`` (q3).
        mask: bool, the stats' shape; True on valid (response) tokens.
        rule: one of :data:`RULES` (see the module docstring).
        ratio: ρ in (0, 1]; each budget group keeps ``⌊ρ·m⌋`` of its ``m`` valid tokens (0 is possible).
        budget: ``"per_sequence"`` (a group per row) or ``"per_batch"`` (one group; ties row-major).
        generator: the ``torch.Generator`` for ``random``/``entropy_sample`` (on the stats' device).
        importance_weights: only for :data:`SAMPLING_RULES`. Weights ``w_i = (K / M') / π_i`` on selected tokens,
            ``K`` the number selected, ``M'`` the number of tokens that can be selected (valid, in a group whose
            budget is ≥ 1, and ``h > 0`` for entropy_sample), ``π_i`` the inclusion probability: exactly
            ``k/m`` for ``random``; for ``entropy_sample``, whose marginal inclusion probabilities have no closed
            form, the conditional one of Gumbel-top-k, ``π_i = 1 − exp(−exp(log h_i − κ))`` with ``κ`` the
            ``(k+1)``-th largest perturbed key of the group (Kool et al. 2019, priority sampling); it is exactly
            unbiased. Thus ``Σ_sel w·ℓ / K`` is an unbiased estimate of the mean of ``ℓ`` over those ``M'``
            tokens (all valid tokens in the usual case), and ``E[Σ_sel w] = K`` so ``Σ w·ℓ / Σ w`` is consistent.
            Default: weight 1 on every selected token.
        clip_quantile: the quantile (linear interpolation, as ``torch.quantile``) at which ``soft_or``/``q3``
            clip the entropy before normalising it.
        process_group: data parallelism: a ``torch.distributed`` group whose ranks each hold a part of the batch.
            The batch statistics (``soft_or``/``q3``'s entropy quantile, both min-max ranges), the
            ``per_batch`` budget and its top-k, and the importance weights' normalisation are then taken over the
            whole global batch (O(tokens) communication), so the deterministic rules select exactly what one
            process would on the concatenated batch. Default None: every rank on its own part.

    Returns:
        :class:`Selection` shaped like ``mask``: ``mask`` bool (a subset of the valid mask), ``weights`` float32
        (0 off the selection), ``scores`` float32, 0 on invalid tokens: the rule's score; ``h`` for
        ``entropy_sample`` (its sampling weight), the uniform keys for ``random``, 1 for ``all``.
    """
    check_choice("rule", rule, RULES)
    check_choice("budget", budget, BUDGETS)
    ratio = check_fraction("ratio", ratio)
    clip_quantile = check_fraction("clip_quantile", clip_quantile)
    if importance_weights and rule not in SAMPLING_RULES:
        raise ValueError(f"importance_weights=True needs a sampling rule {SAMPLING_RULES}, got rule={rule!r}")
    f, valid = _rows(stats, mask, _RULE_FIELDS[rule], f"select_tokens(rule={rule!r})")

    def out(kept: Tensor, weights: Tensor, scores: Tensor) -> Selection:
        zero = torch.zeros((), dtype=torch.float32, device=valid.device)
        scores = torch.where(valid, scores.float(), zero)
        return Selection(kept.reshape(mask.shape), weights.float().reshape(mask.shape), scores.reshape(mask.shape))

    if rule == "all" or valid.numel() == 0:
        return out(valid.clone(), valid.float(), valid.float())
    if rule == "random":
        scores = torch.rand(valid.shape, generator=generator, device=valid.device)
        keys = scores
    elif rule == "entropy_sample":
        scores = f["entropy_norm"]
        u = torch.rand(valid.shape, generator=generator, device=valid.device, dtype=scores.dtype)
        keys = scores.log() - (-u.clamp_min(torch.finfo(u.dtype).tiny).log()).log()  # log h + Gumbel(0, 1)
    else:
        scores = keys = _score(rule, f, valid, clip_quantile, process_group)

    if budget == "per_batch" and process_group is not None:
        # One group over every rank's tokens (rank order, then row-major); this rank keeps its own slice.
        start = _exclusive_offset(valid.numel(), valid.device, process_group)
        all_valid, all_keys = _global(valid, valid, process_group)[1], _global(keys, valid, process_group)[0]
        k = _budget(all_valid.sum().reshape(1), ratio)
        kept_all, nxt = _top_k(torch.where(all_valid, all_keys, -_INF).reshape(1, -1), k)
        kept = kept_all[:, start:start + valid.numel()]
        groups, gvalid, group_size = 1, valid.reshape(1, -1), all_valid.sum().reshape(1)
    else:
        groups = 1 if budget == "per_batch" else valid.shape[0]
        gvalid = valid.reshape(groups, -1)
        group_size = gvalid.sum(1)
        k = _budget(group_size, ratio)
        gkeys = torch.where(gvalid, keys.reshape(groups, -1), -_INF)
        kept, nxt = _top_k(gkeys, k)
    if not importance_weights:
        return out(kept, kept, scores)

    # Inclusion probabilities of each group's members, and who could have been selected at all.
    possible = gvalid & (k >= 1)[:, None]
    if rule == "random":
        pi = (k / group_size.clamp_min(1))[:, None].expand(gvalid.shape)
    else:
        log_h = scores.reshape(groups, -1).log()
        possible = possible & (log_h > -_INF)
        pi = -torch.expm1(-torch.exp(log_h - nxt[:, None]))
    pi = pi.clamp_min(torch.finfo(pi.dtype).tiny)
    counts = torch.stack([kept.sum(), possible.sum()]).double()
    if process_group is not None:
        import torch.distributed as dist

        dist.all_reduce(counts, group=process_group)
    scale = counts[0] / counts[1].clamp_min(1)
    weights = torch.where(kept, scale / pi, torch.zeros_like(pi))
    return out(kept, weights, scores)


def _exclusive_offset(n: int, device: torch.device, group) -> int:
    """Where this rank's ``n`` entries start in the rank-ordered concatenation over ``group``."""
    import torch.distributed as dist

    sizes = _all_gather_flat(torch.tensor([n], device=device), group)
    return int(sizes[: dist.get_rank(group)].sum())


def quadrants(
    stats: TokenStats,
    mask: Tensor,
    *,
    entropy_threshold: Optional[float] = None,
    divergence_threshold: Optional[float] = None,
) -> Tensor:
    """The TIP quadrant of every token: int64, shaped like ``mask`` (``[B, L]`` or ``[N]``).

    1 = Q1 high ``h`` / high ``δ``, 2 = Q2 high ``h`` / low ``δ``, 3 = Q3 low ``h`` / high ``δ`` (overconfident),
    4 = Q4 low ``h`` / low ``δ`` (solved); 0 where ``mask`` is False. ``h = stats.entropy_norm``,
    ``δ = stats.reverse_kl``.

    Thresholds: a number is an absolute threshold (``h`` in [0, 1], ``δ`` in nats). ``None`` (the default) is
    the median of the batch's valid tokens (linear interpolation, as ``torch.quantile(…, 0.5)``): the paper
    gives no numbers, and a batch median yields balanced quadrants whatever the scale of the KL (which
    shrinks as training proceeds and differs between model pairs). "High" means strictly above the threshold;
    ties go to "low", so with the median default at most half the tokens are "high" on each axis.
    """
    ht = _check_threshold("entropy_threshold", entropy_threshold)
    dt = _check_threshold("divergence_threshold", divergence_threshold)
    f, valid = _rows(stats, mask, ("entropy_norm", "reverse_kl"), "quadrants")
    if valid.numel() == 0:
        return torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
    h, d = f["entropy_norm"], f["reverse_kl"]
    ht = _masked_quantile(h, valid, 0.5) if ht is None else ht
    dt = _masked_quantile(d, valid, 0.5) if dt is None else dt
    quad = 1 + 2 * (h <= ht).long() + (d <= dt).long()
    return torch.where(valid, quad, 0).reshape(mask.shape)


def quadrant_shares(quad: Tensor, among: Optional[Tensor] = None) -> Dict[str, float]:
    """Share of each quadrant among the tokens of ``among`` (default: every valid token).

    Args:
        quad: int64 from :func:`quadrants` (0 = invalid, ignored).
        among: optional bool mask of ``quad``'s shape, e.g. ``selection.mask``.

    Returns:
        ``{"Q1": s1, "Q2": s2, "Q3": s3, "Q4": s4}``, Python floats summing to 1 (all 0.0 when no token counts).
        One host sync.
    """
    if among is None:
        among = quad > 0
    else:
        check_mask(among, quad.shape, what="quad's shape")
    counts = torch.bincount(torch.where(among, quad, 0).flatten().long(), minlength=5)[1:5].tolist()
    total = sum(counts)
    return {name: (c / total if total else 0.0) for name, c in zip(QUADRANTS, counts)}
