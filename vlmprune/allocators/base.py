"""The allocator interface: how much sparsity each group gets, and its registry.

An allocator is a pure function over plain data, with no model knowledge:

    allocate(groups: list[GroupInfo], target: float, **options) -> dict[str, float]

It receives one ``GroupInfo`` per group (a transformer block of a tower) and the
overall target sparsity, and returns the sparsity of each group by name. The
pruners then prune every layer of a group at that sparsity; pruners never
allocate (STYLE.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from vlmprune.registry import Registry


@dataclass(frozen=True)
class GroupInfo:
    """One group of prunable weights (a transformer block of one tower).

    name: unique key of the group, used in the returned dict.
    tower: which tower it belongs to ("vision", "language", ...); informative
        only, every allocator here shares one budget across towers.
    n_params: number of prunable weights in the group (> 0).
    score: global importance of the group (ECoFLaP stage 1), >= 0.
    outlier_ratio: OWL's outlier ratio D_l, a percentage in 0..100.
    """

    name: str
    tower: str
    n_params: int
    score: float | None = None
    outlier_ratio: float | None = None


class Allocator(Protocol):
    def __call__(self, groups: list[GroupInfo], target: float, **options) -> dict[str, float]: ...


ALLOCATORS: Registry[Allocator] = Registry("allocator")


def check_target(target: float) -> None:
    """A target sparsity must lie in [0, 1)."""
    if not (isinstance(target, (int, float)) and 0.0 <= target < 1.0):
        raise ValueError(f"target sparsity must be in [0, 1), got {target!r}")


def check_groups(groups: list[GroupInfo]) -> None:
    """Groups must be non-empty, uniquely named, and each hold at least one weight."""
    if not groups:
        raise ValueError("no groups to allocate sparsity to")
    names = [g.name for g in groups]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate group names: {duplicates}")
    for g in groups:
        if not isinstance(g.n_params, int) or g.n_params <= 0:
            raise ValueError(f"group {g.name!r}: n_params must be a positive int, got {g.n_params!r}")


def overall_sparsity(groups: list[GroupInfo], sparsities: dict[str, float]) -> float:
    """Parameter-weighted mean sparsity: sum_g N_g p_g / sum_g N_g."""
    total = sum(g.n_params for g in groups)
    return math.fsum(g.n_params * sparsities[g.name] for g in groups) / total


def kept_counts(groups: list[GroupInfo], sparsities: dict[str, float]) -> dict[str, int]:
    """Nominal kept weights per group: N_g - round(N_g p_g).

    Exact for ECoFLaP's sparsities (p_g = 1 - k_g / N_g); a pruner that drops
    floor(in * p) per row (Wanda) may keep a few more.
    """
    return {g.name: g.n_params - round(g.n_params * sparsities[g.name]) for g in groups}
