"""Wanda: pruning by weights and activations (Sun et al. 2023, "A Simple and
Effective Pruning Approach for Large Language Models").

Reference code: github locuslab/wanda, ``lib/prune.py: prune_wanda`` and
``lib/layerwrapper.py``.

Score ``S_ij = |W_ij| * ||X_j||_2`` with ||X_j|| the L2 norm of input feature j
over all calibration tokens. No weight update.

- Unstructured: in each output row drop the ``int(in * p)`` lowest scores,
  found by a stable ascending sort (ties go to the lower column index), so
  every row has exactly floor(in * p) zeros. ``int`` of the float product is
  the reference's rounding, e.g. in=100, p=0.29 gives 28.
- N:M: in every group of M consecutive columns drop the N lowest scores
  (``topk(largest=False)`` per group), i.e. keep the M - N highest.

The mask functions here are shared with the magnitude pruner.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import PRUNERS, Pruner, check_prune_args
from .stats import InputStats


def wanda_scores(weight: Tensor, col_norm: Tensor) -> Tensor:
    """S_ij = |W_ij| * ||X_j||_2, shape (out, in)."""
    if col_norm.shape != (weight.shape[1],):
        raise ValueError(
            f"col_norm of shape {tuple(col_norm.shape)} does not match in={weight.shape[1]}"
        )
    return weight.abs() * col_norm.to(device=weight.device, dtype=weight.dtype).reshape(1, -1)


def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """True at the int(in * sparsity) lowest scores of each row (stable ascending sort)."""
    n_prune = int(scores.shape[1] * sparsity)
    order = torch.sort(scores, dim=1, stable=True).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, order[:, :n_prune], True)
    return mask


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """True at the n lowest scores in every group of m consecutive columns of each row."""
    rows, cols = scores.shape
    if cols % m != 0:
        raise ValueError(f"N:M pattern {n}:{m} needs in ({cols}) divisible by M={m}")
    groups = scores.reshape(rows, cols // m, m)
    lowest = torch.topk(groups, n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, lowest, True)
    return mask.reshape(rows, cols)


def mask_from_scores(scores: Tensor, sparsity: float, nm: tuple[int, int] | None) -> Tensor:
    """Row-wise unstructured mask, or N:M mask when ``nm`` is given."""
    if nm is not None:
        return nm_mask(scores, *nm)
    return row_mask(scores, sparsity)


@PRUNERS.register("wanda")
class WandaPruner(Pruner):
    """Wanda: drop the lowest |W_ij| * ||X_j||_2 per output row (or per N:M group)."""

    name = "wanda"
    needs_inputs = True
    needs_hessian = False

    def prune(
        self,
        weight: Tensor,
        stats: InputStats | None,
        sparsity: float,
        nm: tuple[int, int] | None,
    ) -> tuple[Tensor, Tensor]:
        check_prune_args(weight, sparsity, nm)
        if stats is None:
            raise ValueError("wanda needs the layer's InputStats (col_norm)")
        mask = mask_from_scores(wanda_scores(weight, stats.col_norm), sparsity, nm)
        return weight.masked_fill(mask, 0), mask
