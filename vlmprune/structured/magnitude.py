"""Data-free baselines for structured pruning: weight-magnitude norms and uniform layer dropping.

Magnitude-norm importance (the usual structured-magnitude baseline, e.g. Li et al. 2017, "Pruning
filters for efficient ConvNets", applied here to the same modules as MoPE):

- head h: ``sqrt(||W_q[h]||^2 + ||W_k[h]||^2 + ||W_v[h]||^2 + ||W_o[:, h]||^2)`` (Frobenius norms of
  the head's rows of q/k/v and its columns of o); under GQA, h is a head unit (one KV head with its
  g query heads) and ``W_q[h]``, ``W_o[:, h]`` span those g query heads;
- a group G of FFN neurons / MBConv channels: ``sqrt(||W_up[G]||^2 + ||W_down[:, G]||^2)`` (plus the
  rows of ``W_gate`` in a gated FFN, and the depthwise filters of the channels in an MBConv block);
- a layer: the root-mean-square of all its weight matrices' entries (a weak, data-free heuristic;
  layers without a residual path get +inf).

Uniform layer dropping removes evenly spaced residual layers: with D droppable layers and n to
remove, the k-th removed one is droppable[floor((k + 1/2) * D / n)], k = 0..n-1.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vlmprune.structured.towers import StructuredTower


def _rows(weight: torch.Tensor) -> torch.Tensor:
    """Squared norm of each output row / channel."""
    return weight.detach().float().pow(2).flatten(1).sum(1)


def _cols(weight: torch.Tensor) -> torch.Tensor:
    """Squared norm of each input column / channel."""
    return weight.detach().float().pow(2).transpose(0, 1).flatten(1).sum(1)


class MagnitudeScorer:
    """Same interface as :class:`vlmprune.structured.mope.MoPEScorer`; needs no data."""

    def __init__(self) -> None:
        self.cost = {"forward_calls": 0, "candidates": 0, "full_forward_equivalents": 0.0}

    def refresh(self) -> None:
        pass

    def heads(self, tower: StructuredTower):
        out = []
        for layer in tower.layers:
            a = tower.attention(layer)
            if a is None:
                out.append(None)
                continue
            query = (_rows(a.q.weight) + _cols(a.o.weight)).view(a.n_heads, -1).sum(1)
            kv = (_rows(a.k.weight) + _rows(a.v.weight)).view(a.n_heads, -1).sum(1)
            norms = (query + kv).sqrt()
            out.append((norms, norms))
        return out

    def width(self, tower: StructuredTower, groups):
        out = []
        for layer, layer_groups in zip(tower.layers, groups):
            w = tower.width(layer)
            if w is None or not layer_groups:
                out.append(None)
                continue
            per_unit = _rows(w.up.weight) + _cols(w.down.weight)
            if w.kind == "mbconv":
                per_unit = per_unit + _rows(w.extra[1].weight)
            elif w.kind == "gated":
                per_unit = per_unit + _rows(w.extra[0].weight)
            norms = torch.stack([per_unit[g].sum() for g in layer_groups]).sqrt()
            out.append((norms, norms))
        return out

    def layers(self, tower: StructuredTower):
        scores = []
        for layer in tower.layers:
            if not tower.droppable(layer):
                scores.append(float("inf"))
                continue
            weights = [m.weight for m in layer.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
            total = sum(float(w.detach().float().pow(2).sum()) for w in weights)
            scores.append((total / sum(w.numel() for w in weights)) ** 0.5)
        scores = torch.tensor(scores)
        return scores, scores


def uniform_drop(droppable: list[int], n_remove: int) -> list[int]:
    """Evenly spaced layers to remove among ``droppable`` (see the module docstring)."""
    d = len(droppable)
    n_remove = min(n_remove, d)
    return sorted({droppable[int((k + 0.5) * d / n_remove)] for k in range(n_remove)}) if n_remove else []
