"""TIP selection rules and quadrants against plain per-sequence Python implementations."""

import statistics
from fractions import Fraction

import pytest
import torch

from tipkernels.selection import (
    BUDGETS,
    RULES,
    _masked_quantile,
    quadrant_shares,
    quadrants,
    select_tokens,
)
from tipkernels.types import TokenStats

DETERMINISTIC = ("entropy_topk", "soft_or", "q3", "divergence")
SEEDS = (0, 1, 2)


def make_batch(seed, B=5, L=37, dtype=torch.float64, zero_entropy=True):
    """Random stats with an empty row (0), a full row (1), a short row (2) and random rows."""
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(B, L, generator=g, dtype=dtype)
    if zero_entropy:
        h[torch.rand(B, L, generator=g) < 0.1] = 0.0
    rkl = torch.empty(B, L, dtype=dtype).exponential_(generator=g) * 0.3
    fkl = torch.empty(B, L, dtype=dtype).exponential_(generator=g) * 0.5
    mask = torch.rand(B, L, generator=g) < 0.6
    mask[0] = False
    mask[1] = True
    mask[2] = False
    mask[2, [4, 9, 30]] = True
    return TokenStats(entropy_norm=h, reverse_kl=rkl, forward_kl=fkl), mask


# ------------------------------------------------------------------ plain reference (loops over tokens)


def budget_of(ratio, m):
    return int(Fraction(str(ratio)) * m)  # exact ⌊ρ·m⌋ for a decimal ρ


def valid_positions(mask):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def ref_minmax(x, pos):
    lo, hi = min(x[p] for p in pos), max(x[p] for p in pos)
    return {p: ((x[p] - lo) / (hi - lo) if hi > lo else 0.0) for p in pos}


def ref_scores(rule, stats, mask, clip_q=0.98):
    pos = valid_positions(mask)
    h, d, f = stats.entropy_norm.tolist(), stats.reverse_kl.tolist(), stats.forward_kl.tolist()
    h = {p: h[p[0]][p[1]] for p in pos}
    d = {p: d[p[0]][p[1]] for p in pos}
    f = {p: f[p[0]][p[1]] for p in pos}
    if rule in ("entropy_topk", "entropy_sample"):
        return h
    if rule == "divergence":
        return d
    clip = torch.quantile(torch.tensor([h[p] for p in pos], dtype=torch.float64), clip_q).item()
    hh = ref_minmax({p: min(h[p], clip) for p in pos}, pos)
    if rule == "soft_or":
        dd = ref_minmax(d, pos)
        return {p: hh[p] + dd[p] - hh[p] * dd[p] for p in pos}
    return {p: f[p] * (1 - hh[p]) for p in pos}  # q3


def ref_select(scores, mask, ratio, budget):
    pos = valid_positions(mask)
    groups = [pos] if budget == "per_batch" else [[p for p in pos if p[0] == b] for b in range(mask.shape[0])]
    out = torch.zeros(mask.shape, dtype=torch.bool)
    for grp in groups:
        ranked = sorted(grp, key=lambda p: (-scores[p], p))
        for p in ranked[: budget_of(ratio, len(grp))]:
            out[p] = True
    return out


# ------------------------------------------------------------------ deterministic rules


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("rule", DETERMINISTIC)
def test_deterministic_rules_match_reference(rule, budget, seed):
    stats, mask = make_batch(seed)
    ref = ref_scores(rule, stats, mask)
    expected_scores = torch.zeros(mask.shape, dtype=torch.float64)
    for p, s in ref.items():
        expected_scores[p] = s
    for ratio in (0.1, 0.3, 0.5, 0.77, 1.0):
        sel = select_tokens(stats, mask, rule=rule, ratio=ratio, budget=budget)
        assert sel.mask.dtype == torch.bool and sel.weights.dtype == torch.float32
        assert sel.scores.dtype == torch.float32
        assert torch.equal(sel.mask, ref_select(ref, mask, ratio, budget)), (rule, budget, ratio)
        assert torch.equal(sel.weights, sel.mask.float())
        torch.testing.assert_close(sel.scores, expected_scores.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("rule", RULES)
def test_counts_subset_and_invalid_scores(rule, budget):
    stats, mask = make_batch(3, zero_entropy=False)
    m = mask.sum(1).tolist()
    for ratio in (0.1, 0.29, 0.3, 0.5, 0.7, 1.0):
        gen = torch.Generator().manual_seed(1)
        sel = select_tokens(stats, mask, rule=rule, ratio=ratio, budget=budget, generator=gen)
        assert not (sel.mask & ~mask).any()
        assert torch.all(sel.scores[~mask] == 0) and torch.all(sel.weights[~sel.mask] == 0)
        if rule == "all":
            assert torch.equal(sel.mask, mask)
        elif budget == "per_sequence":
            assert sel.mask.sum(1).tolist() == [budget_of(ratio, mi) for mi in m]
        else:
            assert sel.mask.sum().item() == budget_of(ratio, sum(m))


def test_budget_floor_edge_cases():
    cases = ((0.5, 10, 5), (0.3, 10, 3), (0.29, 100, 29), (0.7, 10, 7), (0.1, 30, 3), (0.5, 1, 0), (1.0, 37, 37))
    for ratio, m, k in cases:
        h, mask = torch.linspace(0.1, 0.9, m), torch.ones(m, dtype=torch.bool)
        sel = select_tokens(TokenStats(entropy_norm=h), mask, rule="entropy_topk", ratio=ratio)
        assert sel.mask.sum().item() == k, (ratio, m)


@pytest.mark.parametrize("rule", [r for r in RULES if r != "all"])
def test_ratio_one_equals_all(rule):
    stats, mask = make_batch(4, zero_entropy=False)
    full = select_tokens(stats, mask, rule="all")
    for budget in BUDGETS:
        gen = torch.Generator().manual_seed(0)
        sel = select_tokens(stats, mask, rule=rule, ratio=1.0, budget=budget, generator=gen)
        assert torch.equal(sel.mask, full.mask) and torch.equal(sel.weights, full.weights)


def test_all_rule():
    stats, mask = make_batch(0)
    sel = select_tokens(stats, mask, rule="all", ratio=0.2)
    assert torch.equal(sel.mask, mask)
    assert torch.equal(sel.weights, mask.float()) and torch.equal(sel.scores, mask.float())
    assert sel.count.item() == mask.sum().item()
    sel = select_tokens(TokenStats(), mask, rule="all")  # reads no field
    assert torch.equal(sel.mask, mask)


def test_ties_go_to_earlier_position():
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 1] = False
    h = torch.full((2, 6), 0.5)
    stats = TokenStats(entropy_norm=h)
    sel = select_tokens(stats, mask, rule="entropy_topk", ratio=0.6)  # k = 3 of 5, 3 of 6
    assert sel.mask.tolist() == [[True, False, True, True, False, False], [True, True, True, False, False, False]]
    sel = select_tokens(stats, mask, rule="entropy_topk", ratio=0.5, budget="per_batch")  # k = 5 of 11, row-major
    assert sel.mask.tolist() == [[True, False, True, True, True, True], [False] * 6]


def test_constant_stats_give_no_nan():
    mask = torch.tensor([[True, True, False, True]])
    stats = TokenStats(entropy_norm=torch.full((1, 4), 0.3), reverse_kl=torch.full((1, 4), 0.2),
                       forward_kl=torch.full((1, 4), 0.7))
    for rule in ("soft_or", "q3"):
        sel = select_tokens(stats, mask, rule=rule, ratio=0.34)  # k = 1
        assert torch.isfinite(sel.scores).all()
        assert sel.mask.tolist() == [[True, False, False, False]]
    assert select_tokens(stats, mask, rule="soft_or").scores.tolist() == [[0.0] * 4]
    torch.testing.assert_close(select_tokens(stats, mask, rule="q3").scores, torch.tensor([[0.7, 0.7, 0.0, 0.7]]))


def test_soft_or_clip_uses_torch_quantile():
    h = torch.tensor([[0.1, 0.2, 1.0, 0.3, 0.4, 0.9]])  # 1.0 is masked out: must not enter the quantile
    d = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False, True, True, True]])
    stats = TokenStats(entropy_norm=h, reverse_kl=d)
    clip = torch.quantile(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.9]), 0.98).item()  # rank 3.92 -> 0.4 + 0.92 * 0.5
    assert clip == pytest.approx(0.86)
    hh = [(min(x, clip) - 0.1) / (clip - 0.1) for x in (0.1, 0.2, 0.3, 0.4, 0.9)]
    dd = [0.0, 1.0, 0.5, 0.0, 0.0]
    expected = [a + b - a * b for a, b in zip(hh, dd)]
    sel = select_tokens(stats, mask, rule="soft_or", ratio=0.4)  # k = 2
    torch.testing.assert_close(sel.scores[mask], torch.tensor(expected))
    assert sel.scores[0, 5].item() == 1.0 and sel.scores[0, 2].item() == 0.0
    assert sel.mask.tolist() == [[False, True, False, False, False, True]]
    unclipped = select_tokens(stats, mask, rule="soft_or", ratio=0.4, clip_quantile=1.0)  # plain min-max
    assert unclipped.scores[0, 3].item() == pytest.approx(0.25 + 0.5 - 0.25 * 0.5)
    assert unclipped.scores[0, 4].item() == pytest.approx(0.375)
    assert sel.scores[0, 4].item() == pytest.approx(0.3 / 0.76)


def test_q3_clipping_changes_the_selection():
    # 100 tokens in [0.1, 0.3] and an outlier at 1.0: clipping at the 98th percentile spreads the bulk over [0, 1].
    h = torch.cat([torch.linspace(0.1, 0.3, 100), torch.tensor([1.0])])
    f = torch.zeros(101)
    f[98], f[0] = 1.0, 0.5  # confident-looking before clipping (h = 0.294), and the least-entropy token
    stats, mask = TokenStats(entropy_norm=h, forward_kl=f), torch.ones(101, dtype=torch.bool)
    clip = torch.quantile(h, 0.98)
    expected = f * (1 - (torch.minimum(h, clip) - 0.1) / (clip - 0.1))
    sel = select_tokens(stats, mask, rule="q3", ratio=0.01)  # k = 1
    torch.testing.assert_close(sel.scores, expected)
    assert sel.scores[98].item() == pytest.approx(0.0, abs=1e-6) and sel.mask.nonzero().flatten().tolist() == [0]
    unclipped = select_tokens(stats, mask, rule="q3", ratio=0.01, clip_quantile=1.0)
    assert unclipped.scores[98].item() == pytest.approx(1 - (h[98].item() - 0.1) / 0.9)
    assert unclipped.mask.nonzero().flatten().tolist() == [98]


@pytest.mark.parametrize("q", (0.0, 0.3, 0.5, 0.98, 1.0))
def test_masked_quantile_equals_torch_quantile(q):
    g = torch.Generator().manual_seed(5)
    for n_valid in (1, 2, 7, 100):
        x = torch.rand(4, 50, generator=g)
        mask = torch.zeros(200, dtype=torch.bool)
        mask[torch.randperm(200, generator=g)[:n_valid]] = True
        mask = mask.reshape(4, 50)
        assert _masked_quantile(x, mask, q).item() == torch.quantile(x[mask], q).item()
    assert _masked_quantile(x, torch.zeros_like(mask), q).item() == 0.0


# ------------------------------------------------------------------ stochastic rules


def test_random_is_topk_of_its_keys_and_uniform():
    stats, mask = make_batch(6)
    for budget in BUDGETS:
        gen = torch.Generator().manual_seed(2)
        sel = select_tokens(stats, mask, rule="random", ratio=0.4, budget=budget, generator=gen)
        keys = {p: sel.scores[p].item() for p in valid_positions(mask)}
        assert all(0.0 <= v < 1.0 for v in keys.values())
        assert torch.equal(sel.mask, ref_select(keys, mask, 0.4, budget))
    rows, L = 20000, 8
    sel = select_tokens(TokenStats(), torch.ones(rows, L, dtype=torch.bool), rule="random", ratio=0.25,
                        generator=torch.Generator().manual_seed(3))
    freq = sel.mask.double().mean(0)
    se = (0.25 * 0.75 / rows) ** 0.5
    assert torch.all((freq - 0.25).abs() < 5 * se), freq


def test_entropy_sample_frequencies_follow_entropy():
    h = torch.tensor([0.05, 0.1, 0.0, 0.2, 0.3, 0.35])
    rows = 20000
    stats = TokenStats(entropy_norm=h.expand(rows, -1).contiguous())
    sel = select_tokens(stats, torch.ones(rows, 6, dtype=torch.bool), rule="entropy_sample", ratio=1 / 6,
                        generator=torch.Generator().manual_seed(0))
    assert torch.all(sel.mask.sum(1) == 1)
    counts = sel.mask.sum(0).double()
    assert counts[2].item() == 0
    expected = rows * h.double() / h.sum()
    pos = h > 0
    chi2 = (((counts - expected) ** 2)[pos] / expected[pos]).sum().item()
    assert chi2 < 20.5, chi2  # 4 degrees of freedom: P(chi2 > 20.5) < 5e-4
    assert torch.equal(sel.scores, stats.entropy_norm)


def test_entropy_sample_never_picks_zero_entropy():
    h = torch.tensor([[0.0, 0.4, 0.0, 0.0, 0.2, 0.0, 0.0, 0.9, 0.0, 0.0]])
    mask = torch.ones(1, 10, dtype=torch.bool)
    for seed in range(5):
        sel = select_tokens(TokenStats(entropy_norm=h), mask, rule="entropy_sample", ratio=0.5,
                            generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sel.mask, h > 0)  # k = 5 but only 3 have h > 0


@pytest.mark.parametrize("rule", ("random", "entropy_sample"))
def test_generator_reproducibility(rule):
    stats, mask = make_batch(7)

    def run(seed):
        return select_tokens(stats, mask, rule=rule, ratio=0.3, generator=torch.Generator().manual_seed(seed),
                             importance_weights=True)

    a, b, c = run(11), run(11), run(12)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.weights, b.weights) and torch.equal(a.scores, b.scores)
    assert not torch.equal(a.mask, c.mask)


def test_entropy_sample_importance_weights_are_unbiased():
    h = torch.tensor([0.9, 0.8, 0.05, 0.1, 0.0, 0.3, 0.6, 0.02, 0.4, 0.15])
    loss = 1.0 - h + 0.1 * torch.arange(10.0)  # anti-correlated with h: the unweighted mean is biased
    rows, k = 20000, 3
    stats = TokenStats(entropy_norm=h.expand(rows, -1).contiguous())
    mask = torch.ones(rows, 10, dtype=torch.bool)
    sel = select_tokens(stats, mask, rule="entropy_sample", ratio=0.3, importance_weights=True,
                        generator=torch.Generator().manual_seed(0))
    assert torch.all(sel.mask.sum(1) == k)
    w = sel.weights.double()
    assert torch.all((w > 0) == sel.mask)
    target = loss[h > 0].double().mean().item()  # the h = 0 token can never be drawn
    est = (w * loss.double()).sum(1) / k
    se = est.std().item() / rows**0.5
    assert abs(est.mean().item() - target) < 4 * se, (est.mean().item(), target, se)
    assert (w.sum(1) / k).mean().item() == pytest.approx(1.0, abs=4 * (w.sum(1) / k).std().item() / rows**0.5)
    naive = (sel.mask.double() * loss.double()).sum(1) / k
    assert abs(naive.mean().item() - target) > 20 * se  # the weights matter


def test_random_importance_weights_are_exact():
    stats, mask = make_batch(8)
    sel = select_tokens(stats, mask, rule="random", ratio=0.5, importance_weights=True,
                        generator=torch.Generator().manual_seed(0))
    m = mask.sum(1).tolist()
    k = [budget_of(0.5, mi) for mi in m]
    K, M = sum(k), sum(mi for mi, ki in zip(m, k) if ki >= 1)
    for b in range(mask.shape[0]):
        expected = (K / M) * m[b] / k[b] if k[b] else 0.0
        torch.testing.assert_close(sel.weights[b][sel.mask[b]], torch.full((k[b],), expected, dtype=torch.float32))
    sel = select_tokens(stats, mask, rule="random", ratio=0.5, budget="per_batch", importance_weights=True)
    assert torch.equal(sel.weights, sel.mask.float())


# ------------------------------------------------------------------ shapes and dtypes


@pytest.mark.parametrize("rule", RULES)
def test_one_dimensional_input(rule):
    stats, mask = make_batch(9)
    s1, m1 = stats.map(lambda t: t[3]), mask[3]
    one = select_tokens(s1, m1, rule=rule, ratio=0.5, generator=torch.Generator().manual_seed(0))
    two = select_tokens(s1.reshape(1, -1), m1[None], rule=rule, ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert one.mask.shape == (37,)
    assert torch.equal(one.mask, two.mask[0]) and torch.equal(one.scores, two.scores[0])
    assert torch.equal(quadrants(s1, m1), quadrants(s1.reshape(1, -1), m1[None])[0])


def test_float32_stats():
    stats, mask = make_batch(10, dtype=torch.float32)
    for rule in RULES:
        sel = select_tokens(stats, mask, rule=rule, ratio=0.5)
        assert sel.scores.dtype == torch.float32 and torch.isfinite(sel.scores).all()


def test_empty_batch():
    stats = TokenStats(entropy_norm=torch.zeros(0, 5), reverse_kl=torch.zeros(0, 5), forward_kl=torch.zeros(0, 5))
    mask = torch.zeros(0, 5, dtype=torch.bool)
    for rule in RULES:
        assert select_tokens(stats, mask, rule=rule).mask.shape == (0, 5)
    assert quadrants(stats, mask).shape == (0, 5)


# ------------------------------------------------------------------ quadrants


def ref_quadrants(stats, mask, ht=None, dt=None):
    pos = valid_positions(mask)
    h = {p: stats.entropy_norm[p].item() for p in pos}
    d = {p: stats.reverse_kl[p].item() for p in pos}
    ht = statistics.median(h.values()) if ht is None else ht
    dt = statistics.median(d.values()) if dt is None else dt
    out = torch.zeros(mask.shape, dtype=torch.long)
    for p in pos:
        out[p] = {(True, True): 1, (True, False): 2, (False, True): 3, (False, False): 4}[(h[p] > ht, d[p] > dt)]
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_quadrants_match_reference(seed):
    stats, mask = make_batch(seed)
    stats.entropy_norm[1, 3] = 0.5  # exactly on the absolute threshold: "low"
    stats.reverse_kl[1, 4] = 0.25
    quad = quadrants(stats, mask)
    assert quad.dtype == torch.long
    assert torch.equal(quad, ref_quadrants(stats, mask))
    assert torch.all(quad[~mask] == 0) and torch.all(quad[mask] >= 1)
    # Medians balance the quadrants: on each axis, half the valid tokens (rounded down) are high.
    n = mask.sum().item()
    assert ((quad == 1) | (quad == 2)).sum().item() == n // 2
    assert ((quad == 1) | (quad == 3)).sum().item() == n // 2
    quad = quadrants(stats, mask, entropy_threshold=0.5, divergence_threshold=0.25)
    assert torch.equal(quad, ref_quadrants(stats, mask, 0.5, 0.25))
    assert quad[1, 3].item() in (3, 4) and quad[1, 4].item() in (2, 4)


def test_quadrants_hand_example_and_shares():
    h = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.5, 0.7]])
    d = torch.tensor([[1.0, 0.1, 2.0, 0.0, 9.0, 0.3]])
    mask = torch.tensor([[True, True, True, True, False, True]])
    quad = quadrants(TokenStats(entropy_norm=h, reverse_kl=d), mask)  # medians 0.7 and 0.3 (5 valid)
    assert quad.tolist() == [[1, 2, 3, 4, 0, 4]]
    assert quadrant_shares(quad) == {"Q1": 0.2, "Q2": 0.2, "Q3": 0.2, "Q4": 0.4}
    among = torch.tensor([[True, False, True, False, True, False]])  # the masked token (quadrant 0) is ignored
    assert quadrant_shares(quad, among) == {"Q1": 0.5, "Q2": 0.0, "Q3": 0.5, "Q4": 0.0}
    assert quadrant_shares(quad, torch.zeros_like(mask)) == {"Q1": 0.0, "Q2": 0.0, "Q3": 0.0, "Q4": 0.0}
    assert quadrants(TokenStats(entropy_norm=h, reverse_kl=d), torch.zeros_like(mask)).tolist() == [[0] * 6]


# ------------------------------------------------------------------ bad input


def test_bad_inputs_raise_naming_the_argument():
    stats, mask = make_batch(0)
    for ratio in (0, 0.0, -0.1, 1.5, float("nan"), "0.5", None, True):
        with pytest.raises(ValueError, match="ratio"):
            select_tokens(stats, mask, ratio=ratio)
    with pytest.raises(ValueError, match=r"unknown rule 'entropy'; expected one of .*'soft_or'.*'divergence'"):
        select_tokens(stats, mask, rule="entropy")
    with pytest.raises(ValueError, match=r"unknown budget .*expected one of .*'per_sequence'.*'per_batch'"):
        select_tokens(stats, mask, budget="per_token")
    with pytest.raises(TypeError, match="mask must be a bool tensor.*float32"):
        select_tokens(stats, mask.float())
    with pytest.raises(TypeError, match="mask"):
        select_tokens(stats, mask.tolist())
    with pytest.raises(ValueError, match=r"mask shape \(5, 36\).*\(5, 37\)"):
        select_tokens(stats, mask[:, :36])
    with pytest.raises(ValueError, match=r"reverse_kl"):
        select_tokens(TokenStats(entropy_norm=stats.entropy_norm), mask, rule="soft_or")
    with pytest.raises(ValueError, match=r"forward_kl"):
        select_tokens(TokenStats(entropy_norm=stats.entropy_norm), mask, rule="q3")
    with pytest.raises(ValueError, match=r"entropy_norm"):
        select_tokens(TokenStats(reverse_kl=stats.reverse_kl), mask, rule="entropy_topk")
    with pytest.raises(ValueError, match="importance_weights"):
        select_tokens(stats, mask, rule="soft_or", importance_weights=True)
    for q in (0.0, 1.2, "x"):
        with pytest.raises(ValueError, match="clip_quantile"):
            select_tokens(stats, mask, clip_quantile=q)
    with pytest.raises(ValueError, match=r"\[B, L\] or \[N\]"):
        select_tokens(stats.reshape(5, 37, 1), mask.reshape(5, 37, 1))
    with pytest.raises(ValueError, match="entropy_threshold"):
        quadrants(stats, mask, entropy_threshold="high")
    with pytest.raises(ValueError, match="divergence_threshold"):
        quadrants(stats, mask, divergence_threshold=float("nan"))
    with pytest.raises(ValueError, match=r"reverse_kl"):
        quadrants(TokenStats(entropy_norm=stats.entropy_norm), mask)
    with pytest.raises(ValueError, match=r"mask shape \(37,\).*\(5, 37\)"):
        quadrants(stats, mask[0])
    with pytest.raises(ValueError, match=r"quad's shape"):
        quadrant_shares(quadrants(stats, mask), mask[:, :3])
