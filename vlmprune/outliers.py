"""Per-group outlier ratios for OWL (Yin et al. 2024, github luuyin/OWL).

For each group, D = 100 * fraction of the Wanda scores |W_ij| * ||X_j|| of all its prunable layers
above M times their mean. The input norms come from the dense model, block by block on the
calibration batches (the groups are not pruned while their statistics are gathered).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch
import torch.nn as nn

from vlmprune.allocators import outlier_ratio
from vlmprune.pruners import weight_matrix
from vlmprune.pruners.wanda import wanda_scores
from vlmprune.sequential import capture_group_inputs, collect_stats, run_group


@torch.no_grad()
def group_outlier_ratios(model: nn.Module, run: Callable[[nn.Module, dict], Any], batches: list[dict],
                         groups: list[tuple[str, nn.Module, dict[str, nn.Module]]], M: float,
                         hold: Callable[[str], AbstractContextManager] | None = None) -> dict[str, float]:
    """OWL's outlier ratio D (a percentage) of each group of one tower, by group name.

    ``hold(group name)`` keeps an offloaded group's weights in place while it is measured.
    """
    hidden, calls = capture_group_inputs(model, run, batches, [g for _, g, _ in groups])
    ratios = {}
    for index, (name, group, layers) in enumerate(groups):
        group_calls = [c[index] for c in calls]
        with hold(name) if hold else nullcontext():
            stats = collect_stats(group, layers, hidden, group_calls, need_hessian=False)
            scores = [wanda_scores(weight_matrix(layer), stats[n].col_norm) for n, layer in layers.items()]
            ratios[name] = outlier_ratio(scores, M)
            hidden = [run_group(group, h, call) for h, call in zip(hidden, group_calls)]
    return ratios
