"""Allocators checked against their formulas (METHODS.md sections 2 and 3)."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from vlmprune.allocators import (
    ALLOCATORS,
    GroupInfo,
    ecoflap_kept,
    kept_counts,
    outlier_ratio,
    overall_sparsity,
)

ecoflap = ALLOCATORS.get("ecoflap")
owl = ALLOCATORS.get("owl")
uniform = ALLOCATORS.get("uniform")


def groups_of(sizes, scores=None, ratios=None):
    scores = scores or [None] * len(sizes)
    ratios = ratios or [None] * len(sizes)
    return [
        GroupInfo(f"g{i}", "vision" if i % 2 else "language", n, s, d)
        for i, (n, s, d) in enumerate(zip(sizes, scores, ratios))
    ]


def random_case(rng: random.Random):
    n = rng.randint(1, 12)
    sizes = [rng.choice([rng.randint(1, 50), rng.randint(100, 5000), rng.randint(10**5, 10**7)]) for _ in range(n)]
    scores = [rng.choice([0.0, rng.random(), rng.random() * 1e3, rng.expovariate(1.0)]) for _ in range(n)]
    target = rng.choice([0.0, 0.3, 0.5, 0.6, 0.7, rng.random() * 0.85])
    s_max = min(target + rng.choice([0.0, 0.05, 0.1, 0.3]), 1.0)
    return groups_of(sizes, scores), target, s_max


# ---------------------------------------------------------------- ecoflap


def test_ecoflap_random_invariants():
    rng = random.Random(0)
    checked = 0
    for _ in range(400):
        groups, target, s_max = random_case(rng)
        # K = round((1 - p) sum N), with p read as the decimal it prints as (exact, half to even)
        budget = round((1 - Fraction(str(target))) * sum(g.n_params for g in groups))
        try:
            kept = ecoflap_kept(groups, target, s_max)
        except ValueError as err:  # the floors (ceil) can exceed the budget when s_max == target
            assert "s_max" in str(err)
            continue
        checked += 1
        sparsity = ecoflap(groups, target, s_max=s_max)
        assert sum(kept.values()) == budget
        for g in groups:
            floor = math.ceil(g.n_params * (1 - Fraction(str(s_max))))
            assert floor <= kept[g.name] <= g.n_params
            assert 0.0 <= sparsity[g.name] <= s_max
        assert kept_counts(groups, sparsity) == kept
        assert abs(overall_sparsity(groups, sparsity) - target) <= 0.5 / sum(g.n_params for g in groups) + 1e-12
    assert checked > 300


def test_ecoflap_zero_score_group_gets_s_max():
    rng = random.Random(1)
    for _ in range(100):
        sizes = [rng.randint(100, 10_000) for _ in range(5)]
        scores = [0.0] + [rng.uniform(0.5, 2.0) for _ in range(4)]
        groups = groups_of(sizes, scores)
        p = ecoflap(groups, 0.5, s_max=0.6)
        assert 0.6 - 1 / sizes[0] < p["g0"] <= 0.6


def test_ecoflap_equal_scores_give_uniform_sparsity():
    rng = random.Random(2)
    for _ in range(100):
        n, size = rng.randint(1, 10), rng.randint(10, 10_000)
        target = rng.uniform(0.1, 0.8)
        score = rng.choice([0.0, 1.0, 123.4])
        groups = groups_of([size] * n, [score] * n)
        kept = ecoflap_kept(groups, target)
        assert max(kept.values()) - min(kept.values()) <= 1  # within one weight of each other
        for p in ecoflap(groups, target).values():
            assert abs(p - target) <= 1.5 / size  # and of the target (K is rounded too)


def test_ecoflap_all_zero_scores_give_target_for_any_sizes():
    groups = groups_of([100, 1000, 10_000], [0.0, 0.0, 0.0])
    for g, p in ecoflap(groups, 0.5).items():
        assert abs(p - 0.5) <= 1 / 100


def test_ecoflap_higher_score_never_sparser_at_equal_size():
    rng = random.Random(3)
    for _ in range(200):
        n = rng.randint(2, 10)
        sizes = [rng.choice([100, 1000]) for _ in range(n)]
        scores = [rng.choice([0.0, rng.random(), rng.random()]) for _ in range(n)]
        groups = groups_of(sizes, scores)
        target = rng.uniform(0.2, 0.7)
        p = ecoflap(groups, target, s_max=target + rng.choice([0.05, 0.1, 0.3]))
        for a in groups:
            for b in groups:
                if a.n_params == b.n_params and a.score > b.score:
                    assert p[a.name] <= p[b.name], (a, b, p)


def test_ecoflap_infeasible_raises_naming_s_max():
    groups = groups_of([100, 100], [1.0, 2.0])
    with pytest.raises(ValueError, match="s_max"):
        ecoflap(groups, 0.6, s_max=0.5)
    with pytest.raises(ValueError, match="s_max"):
        ecoflap_kept(groups_of([3, 3], [1.0, 1.0]), 0.5, s_max=0.5)  # floors 2+2 > budget 3


def test_ecoflap_hand_case_with_saturation():
    # N = [100, 100, 200], S = [1, 30, 1], target 0.5, s_max 0.7.
    # K = 0.5 * 400 = 200; floors ceil(N * 0.3) = [30, 30, 60] (sum 120), R = 80.
    # round 1: shares ceil(S / 32 * 80) = [ceil 2.5, 75, ceil 2.5] = [3, 75, 3]
    #          -> [33, 105, 63], group 1 clamped to 100 (saturated); sum 196, R = 4.
    # round 2: groups 0 and 2 share 4 by S = [1, 1]: +2 each -> [35, 100, 65], sum 200.
    # p = 1 - k / N = [0.65, 0.0, 0.675].
    groups = groups_of([100, 100, 200], [1.0, 30.0, 1.0])
    assert ecoflap_kept(groups, 0.5, 0.7) == {"g0": 35, "g1": 100, "g2": 65}
    p = ecoflap(groups, 0.5, s_max=0.7)
    assert p == pytest.approx({"g0": 0.65, "g1": 0.0, "g2": 0.675})
    assert overall_sparsity(groups, p) == pytest.approx(0.5)


def test_ecoflap_hand_case_with_overshoot_removed():
    # N = [100, 100, 200], S = [1, 9, 2], target 0.5, s_max 0.7: floors [30, 30, 60], R = 80.
    # shares ceil(S / 12 * 80) = [ceil 6.67, 60, ceil 13.33] = [7, 60, 14] -> [37, 90, 74] = 201.
    # One weight too many (the reference would add one more); it comes off the largest
    # top-up (group 1: 60) -> [37, 89, 74] = 200.
    groups = groups_of([100, 100, 200], [1.0, 9.0, 2.0])
    assert ecoflap_kept(groups, 0.5, 0.7) == {"g0": 37, "g1": 89, "g2": 74}


def test_ecoflap_default_s_max_and_errors():
    groups = groups_of([1000] * 4, [1.0, 2.0, 3.0, 100.0])
    p = ecoflap(groups, 0.5)  # s_max = 0.6
    assert max(p.values()) <= 0.6 and min(p.values()) >= 0.0
    assert ecoflap(groups_of([1000] * 2, [1.0, 5.0]), 0.95)  # s_max stays below 1
    with pytest.raises(ValueError, match="score"):
        ecoflap(groups_of([10, 10]), 0.5)
    with pytest.raises(ValueError, match="target"):
        ecoflap(groups, 1.2)
    with pytest.raises(TypeError):
        ecoflap(groups, 0.5, lam=0.1)


# ---------------------------------------------------------------- owl


def test_owl_plain_mean_order_and_spread():
    rng = random.Random(4)
    for _ in range(100):
        n = rng.randint(2, 30)
        ratios = [rng.uniform(0, 10) for _ in range(n)]
        sizes = [rng.randint(1, 10**6) for _ in range(n)]
        target, lam = rng.uniform(0.3, 0.7), rng.uniform(0.01, 0.2)
        groups = groups_of(sizes, ratios=ratios)
        p = owl(groups, target, lam=lam)
        values = list(p.values())
        assert sum(values) / n == pytest.approx(target, abs=1e-12)
        assert max(values) - min(values) == pytest.approx(2 * lam, abs=1e-12)
        for a in groups:
            for b in groups:
                if a.outlier_ratio > b.outlier_ratio:
                    assert p[a.name] < p[b.name]


def test_owl_hand_case():
    # D = [0, 5, 10], lam = 0.08 -> mapped [0, 0.08, 0.16], mean 0.08 -> p = 0.5 - [-0.08, 0, 0.08]
    p = owl(groups_of([10, 10, 10], ratios=[0.0, 5.0, 10.0]), 0.5)
    assert p == pytest.approx({"g0": 0.58, "g1": 0.5, "g2": 0.42})


def test_owl_equal_ratios_give_target_and_clip():
    assert set(owl(groups_of([5, 7], ratios=[3.0, 3.0]), 0.4).values()) == {0.4}
    p = owl(groups_of([5, 7], ratios=[0.0, 9.0]), 0.98, lam=0.1)
    assert 0.0 <= min(p.values()) and max(p.values()) < 1.0


def test_owl_weighted_mean_equals_target():
    rng = random.Random(5)
    for _ in range(50):
        n = rng.randint(2, 20)
        groups = groups_of([rng.randint(1, 10**6) for _ in range(n)], ratios=[rng.uniform(0, 5) for _ in range(n)])
        p = owl(groups, 0.5, weighted=True)
        assert overall_sparsity(groups, p) == pytest.approx(0.5, abs=1e-12)
        assert max(p.values()) - min(p.values()) == pytest.approx(0.16, abs=1e-12)


def test_owl_needs_ratios():
    with pytest.raises(ValueError, match="outlier_ratio"):
        owl(groups_of([10, 10], ratios=[1.0, None]), 0.5)


def test_outlier_ratio_by_hand():
    # 20 entries: eighteen 1s, one 20 and one 30; mean = (18 + 20 + 30) / 20 = 3.4,
    # threshold M * mean = 17 -> 2 outliers of 20 -> 10 %. Split over two tensors.
    a = torch.ones(3, 4)
    b = torch.ones(8)
    a[1, 2], b[5] = 20.0, 30.0
    assert outlier_ratio([a, b], M=5.0) == pytest.approx(10.0)
    # threshold 3.4 * 6 = 20.4: only 30 is above -> 5 %; a value equal to the threshold is not
    assert outlier_ratio([a, b], M=6.0) == pytest.approx(5.0)
    assert outlier_ratio([torch.full((4,), 2.0)], M=1.0) == 0.0
    with pytest.raises(ValueError):
        outlier_ratio([])


# ---------------------------------------------------------------- uniform and registry


def test_uniform_is_target_everywhere():
    groups = groups_of([1, 10, 1000])
    assert uniform(groups, 0.37) == {"g0": 0.37, "g1": 0.37, "g2": 0.37}


def test_registry_lists_exactly_three():
    assert ALLOCATORS.names() == ["ecoflap", "owl", "uniform"]
    with pytest.raises(KeyError) as err:
        ALLOCATORS.get("nope")
    assert all(name in str(err.value) for name in ("ecoflap", "owl", "uniform"))


@pytest.mark.parametrize("name", ALLOCATORS.names())
def test_every_allocator_meets_the_target_on_equal_groups(name):
    groups = groups_of([4096] * 8, [float(i + 1) for i in range(8)], [float(i) for i in range(8)])
    p = ALLOCATORS.get(name)(groups, 0.6)
    assert set(p) == {g.name for g in groups}
    assert all(0.0 <= v < 1.0 for v in p.values())
    # ecoflap rounds the budget to whole weights: within half a weight of the target
    assert overall_sparsity(groups, p) == pytest.approx(0.6, abs=0.5 / (8 * 4096))
    with pytest.raises(ValueError):
        ALLOCATORS.get(name)(groups + groups[:1], 0.6)  # duplicate names
