"""Pruning policies for the search: per-component offsets on a base allocation, projected onto the budget.

A *component* is a set of groups that share one search variable: a whole tower (``"tower"``),
a single group (``"group"``), or ``n`` consecutive groups of one tower (an int ``n``).

A policy is a base allocation ``b`` (``uniform``: every group at the target; ``ecoflap``: ECoFLaP's
allocation, METHODS.md section 2) and an integer offset ``q_u`` per component u on a grid of step
``step``. Its group sparsities are

    raw_g = b_g + step * q_{u(g)}                                 (u(g): the component of group g)
    p_g   = clip(raw_g + lam, 0, s_max)   with lam such that   sum_g N_g p_g = target * sum_g N_g
    k_g   = N_g (1 - p_g) rounded to integers (largest remainder, within [ceil(N_g (1 - s_max)), N_g])
            so that sum_g k_g = K = round((1 - target) * sum_g N_g) exactly   (ECoFLaP's budget)
    p_g  <- 1 - k_g / N_g

so every policy meets the budget exactly and lies in the box [0, s_max]. ``lam`` exists because
the left side is continuous and non-decreasing in ``lam`` from 0 to s_max * N >= target * N; it is
found by bisection. The shift keeps the offsets' differences between components (the search's
signal) and only moves the level. Policy = (base, q) makes the search space countable, which the
structural-risk penalty (:mod:`vlmprune.search.srm`) needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from vlmprune.allocators import ALLOCATORS, GroupInfo, default_s_max


def components(groups: list[GroupInfo], granularity: str | int) -> tuple[list[str], list[int]]:
    """Component names and, for each group, the index of its component.

    ``"tower"``: one component per tower; ``"group"``: one per group; an int n >= 1: blocks of n
    consecutive groups within each tower (the last block of a tower may be shorter).
    """
    names: list[str] = []
    member: list[int] = []
    position: dict[str, int] = {}
    for g in groups:
        i = position.get(g.tower, 0)
        position[g.tower] = i + 1
        if granularity == "tower":
            name = g.tower
        elif granularity == "group":
            name = g.name
        elif isinstance(granularity, int) and not isinstance(granularity, bool) and granularity >= 1:
            start = i // granularity * granularity
            name = f"{g.tower}[{start}:{start + granularity}]"
        else:
            raise ValueError(f"granularity must be 'tower', 'group' or a positive int, got {granularity!r}")
        if name not in names:
            names.append(name)
        member.append(names.index(name))
    return names, member


@dataclass(frozen=True)
class Policy:
    """A base allocation's name and an integer offset (in grid steps) per component."""

    base: str
    q: tuple[int, ...]

    @property
    def complexity(self) -> int:
        """L1 norm of the offsets, in grid steps: the SRM structure index."""
        return sum(abs(v) for v in self.q)

    def label(self) -> str:
        return f"{self.base}{list(self.q)}"


class PolicySpace:
    """Groups, components, base allocations and the budget; turns a :class:`Policy` into group sparsities."""

    def __init__(self, groups: list[GroupInfo], target: float, granularity: str | int = "tower",
                 bases: tuple[str, ...] = ("uniform", "ecoflap"), step: float = 0.025, s_max: float | None = None):
        if not 0.0 <= target < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {target!r}")
        if not step > 0:
            raise ValueError(f"step must be > 0, got {step!r}")
        self.groups = list(groups)
        self.target = float(target)
        self.s_max = default_s_max(target) if s_max is None else float(s_max)
        if not target <= self.s_max < 1.0:
            raise ValueError(f"s_max must be in [target, 1), got {self.s_max!r} with target {target!r}")
        self.step = float(step)
        self.names, self.member = components(self.groups, granularity)
        self.sizes = np.array([g.n_params for g in self.groups], dtype=np.int64)
        self.budget = round((1 - Fraction(str(target))) * int(self.sizes.sum()))
        self.floor = [math.ceil(int(n) * (1 - Fraction(str(self.s_max)))) for n in self.sizes]
        if sum(self.floor) > self.budget:
            raise ValueError(f"no policy reaches target {target} with s_max={self.s_max}: keeping every group at "
                             f"most s_max sparse keeps {sum(self.floor)} weights, the budget is {self.budget}; "
                             "raise s_max")
        if not bases:
            raise ValueError("at least one base allocation is needed")
        self.bases: dict[str, np.ndarray] = {}
        for name in bases:
            options = {"s_max": self.s_max} if name == "ecoflap" else {}
            sparsity = ALLOCATORS.get(name)(self.groups, self.target, **options)
            self.bases[name] = np.array([sparsity[g.name] for g in self.groups], dtype=np.float64)

    @property
    def dim(self) -> int:
        return len(self.names)

    def raw(self, policy: Policy) -> np.ndarray:
        if policy.base not in self.bases:
            raise KeyError(f"unknown base {policy.base!r}; known: {', '.join(self.bases)}")
        if len(policy.q) != self.dim:
            raise ValueError(f"policy has {len(policy.q)} offsets, the space has {self.dim} components")
        return self.bases[policy.base] + self.step * np.asarray(policy.q, dtype=np.float64)[self.member]

    def project(self, raw: np.ndarray) -> np.ndarray:
        """p = clip(raw + lam, 0, s_max) with sum N p = target * sum N (bisection on lam)."""
        sizes = self.sizes.astype(np.float64)
        goal = self.target * sizes.sum()

        def mass(lam: float) -> float:
            return float(np.dot(sizes, np.clip(raw + lam, 0.0, self.s_max)))

        lo, hi = -float(raw.max()), self.s_max - float(raw.min())  # mass(lo) = 0, mass(hi) = s_max * N
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if mass(mid) < goal else (lo, mid)
        return np.clip(raw + 0.5 * (lo + hi), 0.0, self.s_max)

    def kept(self, sparsity: np.ndarray) -> list[int]:
        """Integer kept counts k_g near N_g (1 - p_g), within [floor_g, N_g], summing to the budget exactly."""
        real = self.sizes * (1.0 - sparsity)
        kept = [min(int(n), max(f, math.floor(r + 1e-9))) for r, n, f in zip(real, self.sizes, self.floor)]
        residual = [r - k for r, k in zip(real, kept)]
        while (gap := self.budget - sum(kept)) != 0:
            order = sorted(range(len(kept)), key=lambda i: -residual[i] if gap > 0 else residual[i])
            moved = False
            for i in order:
                if gap > 0 and kept[i] < self.sizes[i]:
                    kept[i], residual[i], gap, moved = kept[i] + 1, residual[i] - 1, gap - 1, True
                elif gap < 0 and kept[i] > self.floor[i]:
                    kept[i], residual[i], gap, moved = kept[i] - 1, residual[i] + 1, gap + 1, True
                if gap == 0:
                    break
            if not moved:  # impossible when floor <= budget <= N, which __init__'s checks guarantee
                raise RuntimeError("cannot meet the budget within [0, s_max]")
        return kept

    def sparsity(self, policy: Policy) -> dict[str, float]:
        """Group sparsity p_g = 1 - k_g / N_g of a policy; sum_g k_g == budget exactly."""
        kept = self.kept(self.project(self.raw(policy)))
        return {g.name: (g.n_params - k) / g.n_params for g, k in zip(self.groups, kept)}

    def kept_total(self, sparsity: dict[str, float]) -> int:
        """sum_g N_g - round(N_g p_g): the kept weights of a group-sparsity dict (to check the budget)."""
        return sum(g.n_params - round(g.n_params * sparsity[g.name]) for g in self.groups)
