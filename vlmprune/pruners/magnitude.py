"""Magnitude pruning: score |W_ij|, no calibration data.

Per output row, for parity with Wanda (METHODS.md section 1): drop the
``int(in * p)`` lowest |W| of each row (stable ascending sort), or the N lowest
of every M consecutive columns for N:M.

Note: locuslab/wanda ``lib/prune.py: prune_magnitude`` instead uses one
threshold for the whole layer (``|W| <= sorted(|W|.flatten())[int(numel * p)]``),
which prunes one extra weight or more on ties; this module follows METHODS.md.
"""

from __future__ import annotations

from torch import Tensor

from .base import PRUNERS, Pruner, check_prune_args
from .stats import InputStats
from .wanda import mask_from_scores


@PRUNERS.register("magnitude")
class MagnitudePruner(Pruner):
    """Drop the lowest |W_ij| per output row (or per N:M group)."""

    name = "magnitude"
    needs_inputs = False
    needs_hessian = False

    def prune(
        self,
        weight: Tensor,
        stats: InputStats | None,
        sparsity: float,
        nm: tuple[int, int] | None,
    ) -> tuple[Tensor, Tensor]:
        check_prune_args(weight, sparsity, nm)
        mask = mask_from_scores(weight.abs(), sparsity, nm)
        return weight.masked_fill(mask, 0), mask
