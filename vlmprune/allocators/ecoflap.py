"""ECoFLaP's coarse stage: share one budget of kept weights by group importance.

Sung et al., "ECoFLaP: Efficient Coarse-to-Fine Layer-Wise Pruning for
Vision-Language Models", ICLR 2024; reference code ylsung/ECoFLaP,
``LAVIS/lavis/compression/pruners/layer_single_base_pruner.py``
(``compute_the_sparsity_per_group``). METHODS.md section 2.

With N_g the group's prunable weight count, S_g its score and p the target:

    K   = round((1 - p) * sum_g N_g)          kept weights, one budget for all towers
    k_g = ceil(N_g * (1 - s_max))             floor: no group is sparser than s_max
    repeat while R = K - sum_g k_g > 0 and some group is unsaturated (k_g < N_g):
        k_g += ceil(S_g / sum_{unsat} S * R)  for every unsaturated g,
        k_g  = min(k_g, N_g)                  saturated groups leave the share
    p_g = 1 - k_g / N_g                       in [0, s_max]

Where this differs from the reference code:

- The ceilings overshoot K by less than one weight per group. The reference's
  fix-up, meant to remove that excess, adds it (a sign slip). Here the excess is
  removed, one weight at a time, from the groups with the largest top-up
  (k_g - floor_g; ties: lower score first), never below the floor, so
  sum_g k_g == K exactly.
- When every unsaturated group has score 0 but R > 0 (all scores zero, or the
  positive-score groups saturated), the reference stalls; here the remainder is
  shared in proportion to N_g instead, which gives every group the target
  sparsity when all scores are zero. A zero-score group otherwise keeps only its
  floor (sparsity s_max).
- K and the floors are computed exactly, reading target and s_max as the
  decimals they print as (K rounded half to even, like Python's round), so
  p_g <= s_max holds without float slack (the reference's float
  ceil(N * (1 - 0.7)) keeps one weight too many when N * 0.3 is whole).

Note the share is proportional to S_g itself, as in the reference, not to
S_g * N_g: equal scores give equal *counts* of extra weights, hence equal
sparsity only between groups of equal size.
"""

from __future__ import annotations

import math
from fractions import Fraction

from vlmprune.errors import AllocationError

from .base import ALLOCATORS, GroupInfo, check_groups, check_target


def default_s_max(target: float) -> float:
    """The reference setting s_max = target + 0.1, kept below 1 (at most halfway to 1)."""
    return target + min(0.1, (1.0 - target) / 2)


def _checked_scores(groups: list[GroupInfo]) -> list[float]:
    scores = []
    for g in groups:
        if g.score is None or not math.isfinite(g.score) or g.score < 0:
            raise ValueError(f"ecoflap needs a finite score >= 0 for group {g.name!r}, got {g.score!r}")
        scores.append(float(g.score))
    return scores


def ecoflap_kept(groups: list[GroupInfo], target: float, s_max: float | None = None) -> dict[str, int]:
    """Integer kept-weight count k_g per group name; sum_g k_g == round((1 - target) * sum_g N_g)."""
    check_groups(groups)
    check_target(target)
    s_max = default_s_max(target) if s_max is None else s_max
    if not 0.0 <= s_max <= 1.0:
        raise ValueError(f"s_max must be in [0, 1], got {s_max!r}")
    scores = _checked_scores(groups)
    sizes = [g.n_params for g in groups]

    budget = round((1 - Fraction(str(target))) * sum(sizes))
    floor = [math.ceil(n * (1 - Fraction(str(s_max)))) for n in sizes]
    if s_max < target or sum(floor) > budget:
        raise AllocationError(
            f"ecoflap cannot reach target sparsity {target} with s_max={s_max}: no group may be "
            f"sparser than s_max, so s_max must be at least the target (the floors keep {sum(floor)} "
            f"weights, the budget is {budget}); raise s_max or lower the target"
        )

    kept = list(floor)
    unsat = [i for i, n in enumerate(sizes) if kept[i] < n]
    while (rest := budget - sum(kept)) > 0 and unsat:
        weights = [scores[i] for i in unsat]
        if sum(weights) == 0:  # only zero-score groups left: share by size
            weights = [float(sizes[i]) for i in unsat]
        total = sum(weights)
        for i, w in zip(unsat, weights):
            kept[i] = min(sizes[i], kept[i] + math.ceil(w / total * rest))
        unsat = [i for i in unsat if kept[i] < sizes[i]]

    excess = sum(kept) - budget
    order = sorted(range(len(groups)), key=lambda i: (floor[i] - kept[i], scores[i]))
    while excess > 0:  # terminates: sum(kept) > budget >= sum(floor)
        for i in order:
            if excess > 0 and kept[i] > floor[i]:
                kept[i] -= 1
                excess -= 1
    return {g.name: k for g, k in zip(groups, kept)}


@ALLOCATORS.register("ecoflap")
def allocate(groups: list[GroupInfo], target: float, *, s_max: float | None = None) -> dict[str, float]:
    """Group sparsity p_g = 1 - k_g / N_g from ``ecoflap_kept``; each in [0, s_max].

    s_max defaults to target + 0.1 (the reference setting), kept below 1.
    """
    kept = ecoflap_kept(groups, target, s_max)
    return {g.name: (g.n_params - kept[g.name]) / g.n_params for g in groups}
