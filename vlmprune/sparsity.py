"""Which layers get pruned, how much, and how sparse the result really is.

A *layout* lists every tower, its groups and their prunable layers. Allocators give one sparsity
per group; :func:`layer_sparsities` spreads it to the group's layers. :func:`sparsity_report`
measures zeros in the weights themselves, and :func:`mask_digest` fingerprints a set of masks.
"""

from __future__ import annotations

import hashlib
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from vlmprune.adapters.base import Tower, prunable_layers


@dataclass
class Group:
    name: str
    tower: str
    module: nn.Module
    layers: dict[str, nn.Module]

    @property
    def n_params(self) -> int:
        return sum(layer.weight.numel() for layer in self.layers.values())


def model_layout(model: nn.Module, towers: list[Tower], include: list[str] | None = None,
                 exclude: list[str] | None = None, tower_names: list[str] | None = None) -> list[Group]:
    """The prunable groups of the selected towers (all towers when ``tower_names`` is None)."""
    known = [t.name for t in towers]
    for name in tower_names or []:
        if name not in known:
            raise ValueError(f"unknown tower {name!r}; this model has: {', '.join(known)}")
    groups = []
    for tower in towers:
        if tower_names is not None and tower.name not in tower_names:
            continue
        for name, module in tower.groups:
            layers = prunable_layers(model, module, include, exclude)
            if layers:
                groups.append(Group(name, tower.name, module, layers))
    if not groups:
        raise ValueError("no prunable layer selected: check pruning.towers, pruning.include and pruning.exclude")
    return groups


def layer_sparsities(groups: list[Group], group_sparsity: dict[str, float]) -> dict[str, float]:
    """Every layer takes its group's sparsity."""
    return {layer: group_sparsity[g.name] for g in groups for layer in g.layers}


def _zeros(weight: torch.Tensor) -> int:
    return int((weight == 0).sum())


def sparsity_report(groups: list[Group], hold: Callable[[str], AbstractContextManager] | None = None) -> dict:
    """Measured fraction of zero weights: per layer, per group, per tower and overall.

    ``hold(group name)`` brings an offloaded group's weights in while they are counted.
    """
    layers, per_group, towers = {}, {}, {}
    total_zero = total = 0
    for g in groups:
        g_zero = g_total = 0
        with hold(g.name) if hold else nullcontext():
            for name, layer in g.layers.items():
                zero, n = _zeros(layer.weight), layer.weight.numel()
                layers[name] = zero / n
                g_zero, g_total = g_zero + zero, g_total + n
        per_group[g.name] = g_zero / g_total
        t_zero, t_total = towers.get(g.tower, (0, 0))
        towers[g.tower] = (t_zero + g_zero, t_total + g_total)
        total_zero, total = total_zero + g_zero, total + g_total
    return {
        "overall": total_zero / total,
        "towers": {t: z / n for t, (z, n) in towers.items()},
        "groups": per_group,
        "layers": layers,
        "n_params": total,
    }


def mask_digest(masks: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the layer names and bit-packed masks, in name order."""
    digest = hashlib.sha256()
    for name in sorted(masks):
        mask = masks[name].detach().cpu().numpy().astype(bool)
        digest.update(name.encode())
        digest.update(str(mask.shape).encode())
        digest.update(np.packbits(mask.ravel()).tobytes())
    return digest.hexdigest()
