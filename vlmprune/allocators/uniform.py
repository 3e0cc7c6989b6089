"""Uniform allocation: every group gets the target sparsity (the baseline)."""

from __future__ import annotations

from .base import ALLOCATORS, GroupInfo, check_groups, check_target


@ALLOCATORS.register("uniform")
def allocate(groups: list[GroupInfo], target: float) -> dict[str, float]:
    """p_g = target for every group g."""
    check_groups(groups)
    check_target(target)
    return {g.name: float(target) for g in groups}
