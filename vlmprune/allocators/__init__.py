"""Allocators: the sparsity of each group (block) from an overall target.

Importing this package registers every allocator in ``ALLOCATORS``:
``uniform``, ``ecoflap`` (Sung et al. 2024) and ``owl`` (Yin et al. 2024).
Use ``ALLOCATORS.get(name)(groups, target, **options)``.
"""

from . import ecoflap, owl, uniform  # noqa: F401  (registration)
from .base import ALLOCATORS, GroupInfo, kept_counts, overall_sparsity
from .ecoflap import default_s_max, ecoflap_kept
from .owl import outlier_ratio

__all__ = [
    "ALLOCATORS",
    "GroupInfo",
    "default_s_max",
    "ecoflap_kept",
    "kept_counts",
    "outlier_ratio",
    "overall_sparsity",
]
