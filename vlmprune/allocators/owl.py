"""OWL: outlier-weighted layer-wise sparsity.

Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce
for Pruning LLMs to High Sparsity", ICML 2024; reference code luuyin/OWL
(``lib/prune_all.py``: ``check_outlier_mean`` and the ``all_layer_ratio``
lines of ``prune_wanda_outlier``). METHODS.md section 3.

For each block l, A_l = the Wanda scores |W| * ||X||_2 of all its linear layers,

    D_l      = 100 * #{a in A_l : a > M * mean(A_l)} / |A_l|        (M = 5)
    mapped_l = (D_l - min D) / (max D - min D) * 2 * lam             (lam = 0.08)
    p_l      = target - (mapped_l - mean_l mapped_l)

so blocks with more outliers keep more weights, the spread max - min of p is
2 * lam, and the plain (unweighted) mean of p_l is the target.

Notes:

- Like the reference, the mean is over groups, unweighted: with groups of
  unequal size (a ViT block beside an LM block) the parameter-weighted overall
  sparsity differs from the target. ``weighted=True`` shifts every p_l by one
  constant so that the parameter-weighted mean is the target instead.
- The reference divides by max D - min D; when all D_l are equal (or there is
  one group) it yields NaN. Here every group then gets the target.
- Results are clipped to [0, 1) (the upper end is the largest float below 1,
  so a pruner dropping floor(in * p) per row keeps at least one weight); this
  only happens when target +- lam leaves [0, 1), and then the means above hold
  only approximately.
"""

from __future__ import annotations

import math

from torch import Tensor

from .base import ALLOCATORS, GroupInfo, check_groups, check_target

_BELOW_ONE = math.nextafter(1.0, 0.0)


def outlier_ratio(scores: list[Tensor], M: float = 5.0) -> float:
    """D = 100 * fraction of all entries of ``scores`` (taken together) above M * their mean.

    ``scores`` are e.g. the Wanda scores |W| * ||X|| of one block's linear layers.
    Same as the reference's ``check_outlier_mean`` on the concatenation (strict >),
    computed without building it; the mean is accumulated in float64.
    """
    if not scores:
        raise ValueError("outlier_ratio needs at least one score tensor")
    numel = sum(s.numel() for s in scores)
    if numel == 0:
        raise ValueError("outlier_ratio got only empty score tensors")
    mean = sum(s.double().sum() for s in scores) / numel
    count = sum(int((s.double() > M * mean).sum()) for s in scores)
    return 100.0 * count / numel


@ALLOCATORS.register("owl")
def allocate(
    groups: list[GroupInfo],
    target: float,
    *,
    lam: float = 0.08,
    M: float = 5.0,
    weighted: bool = False,
) -> dict[str, float]:
    """p_l = target - (mapped D_l - mean mapped D), clipped to [0, 1); see the module docstring.

    ``M`` is not used here (the outlier ratios are given in ``GroupInfo``); it is
    accepted so that one config carries both OWL hyper-parameters, and is the
    threshold to pass to ``outlier_ratio``.
    """
    check_groups(groups)
    check_target(target)
    if not lam >= 0:
        raise ValueError(f"owl lam must be >= 0, got {lam!r}")
    ratios = []
    for g in groups:
        if g.outlier_ratio is None or not math.isfinite(g.outlier_ratio):
            raise ValueError(f"owl needs an outlier_ratio for group {g.name!r}, got {g.outlier_ratio!r}")
        ratios.append(float(g.outlier_ratio))

    lo, hi = min(ratios), max(ratios)
    mapped = [0.0 if hi == lo else (d - lo) / (hi - lo) * 2 * lam for d in ratios]
    mean = math.fsum(mapped) / len(mapped)
    sparsity = [target - (m - mean) for m in mapped]
    if weighted:
        sizes = [g.n_params for g in groups]
        shift = target - math.fsum(n * p for n, p in zip(sizes, sparsity)) / sum(sizes)
        sparsity = [p + shift for p in sparsity]
    return {g.name: min(max(p, 0.0), _BELOW_ONE) for g, p in zip(groups, sparsity)}
