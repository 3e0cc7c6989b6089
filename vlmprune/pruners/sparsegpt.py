"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can
Be Accurately Pruned in One-Shot").

Reference code: github IST-DASLab/sparsegpt, ``sparsegpt.py: SparseGPT.fasterprune``.
This module reproduces its numbers on the same W and H (float32 throughout).

With H = 2 X^T X / n (``InputStats.hessian``):

1. Dead inputs (H_jj == 0): set H_jj = 1 and W[:, j] = 0.
2. Damping: H += percdamp * mean(diag H) * I.
3. Hinv = upper Cholesky factor U of H^-1 (H^-1 = U^T U), computed as
   cholesky(H) -> cholesky_inverse -> cholesky(upper=True).
4. Walk the columns in blocks of ``blocksize``. For column c with d = Hinv[c, c],
   the pruning cost of w_rc is w_rc^2 / d^2.
   - Unstructured: the mask is chosen once per block on the block's current
     (already updated) weights: thresh = sorted(costs.flatten())[int(numel * p)],
     mask = costs <= thresh. So the sparsity is per block (rows may differ),
     and a block usually prunes int(numel * p) + 1 weights (the weight at the
     threshold index is included; more on exact ties). This is the reference
     behaviour, kept on purpose.
   - N:M: at each column i with i % M == 0, the N lowest costs among columns
     i .. i+M-1 of each row, on the currently updated weights.
   Optimal brain surgeon update, column by column: q = w with the masked
   entries zeroed, err = (w - q) / d, W[:, c:] -= err (outer) Hinv[c, c:]
   inside the block; after the block, W[:, i2:] -= Err @ Hinv[i1:i2, i2:].

With sparsity 0 (unstructured) the weight is returned unchanged with an
all-False mask: the reference would still prune the lowest-cost weight of each
block, since its threshold is the smallest cost and the test is ``<=``.

Dead input columns (always zero in calibration) are zeroed as in the reference
and marked in the returned mask, so the mask is exactly the set of zeroed
weights; with N:M a group holding a dead column may then have more than N zeros.

On a GPU the column loop costs the launching of its small kernels, not their arithmetic (on an H100,
about 130 us per column from Python against about 15 us of GPU work; replayed, 16-28 us:
benchmarks/sparsegpt_graphs.py). :class:`ColumnLoopGraphs` captures
the loop once per block shape as a CUDA graph and replays it for every block of that shape: the
same kernels on the same inputs, so the result is bit-identical to the eager loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import PRUNERS, Pruner, check_prune_args
from .stats import InputStats


def upper_cholesky_inverse(hessian: Tensor, percdamp: float) -> tuple[Tensor, Tensor]:
    """Prepare H as the reference does; return (Hinv upper factor, dead-column mask).

    ``hessian`` is modified in place (dead diagonal set to 1, damping added).
    """
    diag = torch.diagonal(hessian)
    dead = diag == 0
    diag[dead] = 1.0
    diag += percdamp * diag.mean()
    lower = torch.linalg.cholesky(hessian)
    h_inv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(h_inv, upper=True), dead


def obs_columns(w1: Tensor, mask1: Tensor, h_inv1: Tensor, nm: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
    """The column-by-column update of one block of columns; returns (q1, err1).

    ``w1`` (the block's current weights) is updated in place, and with N:M ``mask1`` is filled in
    place; ``h_inv1`` is the block's square of the upper factor. Few tensor calls per column, none
    that waits for the GPU (boolean indexing would), so that the loop can be captured as a graph.
    """
    q1 = torch.zeros_like(w1)
    err1 = torch.zeros_like(w1)
    d1 = torch.diagonal(h_inv1)
    for i in range(w1.shape[1]):
        if nm is not None and i % nm[1] == 0:
            n, m = nm
            cost = w1[:, i : i + m] ** 2 / d1[i : i + m].reshape(1, -1) ** 2
            lowest = torch.topk(cost, n, dim=1, largest=False).indices
            mask1.scatter_(1, i + lowest, True)
        col = w1[:, i]
        q = col.masked_fill(mask1[:, i], 0.0)
        q1[:, i] = q
        err = (col - q) / d1[i]
        w1[:, i:].addr_(err, h_inv1[i, i:], alpha=-1.0)  # W1[:, i:] -= err (outer) Hinv1[i, i:]
        err1[:, i] = err
    return q1, err1


class ColumnLoopGraphs:
    """:func:`obs_columns` on a CUDA device, captured once per (block shape, N:M) as a CUDA graph and
    replayed for every later block of that shape (see the module docstring). Holds the graphs and
    their static buffers (a few MB) for as long as it lives."""

    def __init__(self) -> None:
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, Tensor]]] = {}

    def __call__(self, w1: Tensor, mask1: Tensor, h_inv1: Tensor, nm: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
        key = (tuple(w1.shape), nm, w1.device)
        if key not in self.graphs:
            self.graphs[key] = self._capture(w1, mask1, h_inv1, nm)
        graph, static = self.graphs[key]
        static["w1"].copy_(w1)
        static["mask1"].copy_(mask1)
        static["h_inv1"].copy_(h_inv1)
        graph.replay()
        mask1.copy_(static["mask1"])
        return static["q1"].clone(), static["err1"].clone()

    @staticmethod
    def _capture(w1: Tensor, mask1: Tensor, h_inv1: Tensor, nm: tuple[int, int] | None):
        # one eager run on a side stream first, so that lazy initialisation stays out of the graph
        side = torch.cuda.Stream(w1.device)
        side.wait_stream(torch.cuda.current_stream(w1.device))
        with torch.cuda.stream(side):
            obs_columns(w1.clone(), mask1.clone(), h_inv1, nm)
        torch.cuda.current_stream(w1.device).wait_stream(side)
        static = {"w1": w1.clone(), "mask1": mask1.clone(), "h_inv1": h_inv1.clone()}
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static["q1"], static["err1"] = obs_columns(static["w1"], static["mask1"], static["h_inv1"], nm)
        return graph, static


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    graphs: ColumnLoopGraphs | None = None,
) -> tuple[Tensor, Tensor]:
    """SparseGPT on a float (out, in) matrix and its (in, in) Hessian; returns (W', mask).

    ``graphs``: run the column loop of each block through these CUDA graphs (a CUDA ``weight`` only).
    """
    w = weight.detach().to(torch.float32, copy=True)
    h = hessian.detach().to(device=w.device, dtype=torch.float32, copy=True)
    rows, cols = w.shape
    if h.shape != (cols, cols):
        raise ValueError(f"hessian of shape {tuple(h.shape)} does not match in={cols}")
    if nm is not None and blocksize % nm[1] != 0:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={nm[1]}")
    column_loop = graphs if graphs is not None and w.is_cuda else obs_columns

    h_inv, dead = upper_cholesky_inverse(h, percdamp)
    w[:, dead] = 0
    mask = torch.zeros_like(w, dtype=torch.bool)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        h_inv1 = h_inv[i1:i2, i1:i2]
        d1 = torch.diagonal(h_inv1)

        if nm is None:
            cost = w1**2 / d1.reshape(1, -1) ** 2
            k = int(cost.numel() * sparsity)
            if k >= cost.numel():
                mask1 = torch.ones_like(cost, dtype=torch.bool)
            else:
                thresh = torch.sort(cost.flatten()).values[k]
                mask1 = cost <= thresh
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)

        q1, err1 = column_loop(w1, mask1, h_inv1, nm)
        w[:, i1:i2] = q1
        mask[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ h_inv[i1:i2, i2:]

    # Dead inputs (never non-zero in calibration) had their weights zeroed up front, as in the
    # reference: record them in the mask too, so the mask says exactly which weights are zero.
    mask[:, dead] = True
    return w, mask


@PRUNERS.register("sparsegpt")
class SparseGPTPruner(Pruner):
    """SparseGPT: OBS-style pruning with a column-by-column weight update."""

    name = "sparsegpt"
    needs_inputs = True
    needs_hessian = True

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01, cuda_graphs: bool = True) -> None:
        """``cuda_graphs``: on a CUDA weight, replay each block shape's column loop as a CUDA graph
        (bit-identical, faster; see the module docstring); False runs it eagerly."""
        self.blocksize = blocksize
        self.percdamp = percdamp
        self.graphs = ColumnLoopGraphs() if cuda_graphs else None

    def prune(
        self,
        weight: Tensor,
        stats: InputStats | None,
        sparsity: float,
        nm: tuple[int, int] | None,
    ) -> tuple[Tensor, Tensor]:
        check_prune_args(weight, sparsity, nm)
        if nm is None and sparsity == 0:
            return weight.clone(), torch.zeros_like(weight, dtype=torch.bool)
        if stats is None or stats.hessian is None:
            raise ValueError("sparsegpt needs InputStats built with need_hessian=True")
        new_weight, mask = sparsegpt_prune(
            weight, stats.hessian, sparsity, nm, self.blocksize, self.percdamp, self.graphs
        )
        return new_weight.to(weight.dtype), mask
