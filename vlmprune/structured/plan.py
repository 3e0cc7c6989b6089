"""Width then depth (MoPE-CLIP's fine-tuning-stage order): per layer, keep the most important
heads and FFN neuron groups to a target width ratio; then, scored again on the narrowed model,
remove the least important residual layers to a target depth ratio.

Counts: a layer with H heads keeps ``max(1, round(width_ratio * H))`` heads and
``max(1, round(width_ratio * G))`` of its G neuron groups; a tower of L layers loses
``min(round((1 - depth_ratio) * L), D)`` of its D residual layers. Importance comes from a scorer
(:class:`~vlmprune.structured.mope.MoPEScorer`, for causal LMs
:class:`~vlmprune.structured.mope_lm.LMMoPEScorer`, or
:class:`~vlmprune.structured.magnitude.MagnitudeScorer`); ``layer_drop`` removes evenly spaced
layers and keeps the width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vlmprune.structured.magnitude import MagnitudeScorer, uniform_drop
from vlmprune.structured.mope import MoPEScorer, contiguous_groups
from vlmprune.structured.mope_lm import LMMoPEScorer
from vlmprune.structured.surgery import (
    count_parameters, current_structure, keep_heads, keep_layers, keep_width, parent_indices, tag_parent_indices,
)
from vlmprune.structured.towers import is_causal_lm, structured_towers

LM_METRICS = ("lm_loss", "loss")  # what MoPE scores on a causal LM: the rise of the next-token loss


@dataclass
class StructuredSettings:
    method: str = "mope"            # mope | magnitude_structured | layer_drop
    width_ratio: float = 1.0
    depth_ratio: float = 1.0
    ffn_group: float = 1 / 16       # fraction of a layer's FFN width scored (and removed) together
    metric: str = "auto"            # MoPE metric: accuracy | retrieval | loss (cross-modal); lm_loss (causal LMs);
                                    # auto: lm_loss for a causal LM, accuracy otherwise
    towers: list[str] | None = None
    max_rows: int = 512             # MoPE: rows (candidates x samples) per batched forward
    extra: dict = field(default_factory=dict)


def keep_top(scores: tuple[torch.Tensor, torch.Tensor], n_keep: int) -> list[int]:
    """Indices of the ``n_keep`` most important units (by score, then tie-break), in index order."""
    primary, secondary = (s.detach().cpu().tolist() for s in scores)  # one copy, not a GPU sync per unit
    order = sorted(range(len(primary)), key=lambda i: (primary[i], secondary[i], -i))
    return sorted(order[len(order) - n_keep:])


def _plain(scores) -> list | None:
    return None if scores is None else [round(float(v), 6) for v in scores[0]]


def prune_width(model: nn.Module, scorer, settings: StructuredSettings) -> dict:
    """Narrow every layer of the selected towers; returns kept heads/neurons (pre-pruning indices)."""
    towers = structured_towers(model, settings.towers)
    plans = []
    for tower in towers:  # score everything on the unpruned model first
        groups = [contiguous_groups(w.size, settings.ffn_group) if (w := tower.width(layer)) else None
                  for layer in tower.layers]
        plans.append((tower, groups, scorer.heads(tower), scorer.width(tower, groups)))
    record = {}
    for tower, groups, head_scores, width_scores in plans:
        heads, neurons = [], []
        for layer, layer_groups, hs, ws in zip(tower.layers, groups, head_scores, width_scores):
            attention, width = tower.attention(layer), tower.width(layer)
            kept_heads = None
            if attention is not None:
                kept_heads = keep_top(hs, max(1, round(settings.width_ratio * attention.n_heads)))
                keep_heads(attention, kept_heads)
            kept = None
            if width is not None:
                chosen = keep_top(ws, max(1, round(settings.width_ratio * len(layer_groups))))
                kept = sorted(i for g in chosen for i in layer_groups[g])
                keep_width(width, kept)
            heads.append(kept_heads)
            neurons.append(kept)
        record[tower.name] = {"heads": heads, "neurons": neurons,
                              "head_scores": [_plain(s) for s in head_scores],
                              "group_scores": [_plain(s) for s in width_scores]}
    return record


def prune_depth(model: nn.Module, scorer, settings: StructuredSettings) -> dict:
    """Remove the least important (or evenly spaced) residual layers of the selected towers."""
    towers = structured_towers(model, settings.towers)
    scorer.refresh()
    record = {}
    for tower in towers:
        layers = list(tower.layers)
        droppable = [i for i, layer in enumerate(layers) if tower.droppable(layer)]
        n_remove = min(round((1 - settings.depth_ratio) * len(layers)), len(droppable))
        if settings.method == "layer_drop":
            removed, scores = uniform_drop(droppable, n_remove), None
        else:
            scores = scorer.layers(tower)
            kept_droppable = keep_top((scores[0][droppable], scores[1][droppable]), len(droppable) - n_remove)
            removed = sorted(set(droppable) - {droppable[i] for i in kept_droppable})
        parents = parent_indices(tower)
        record[tower.name] = {"removed_layers": [parents[i] for i in removed], "layer_scores": _plain(scores)}
        if removed:
            keep_layers(tower, [i for i in range(len(layers)) if i not in removed])
    return record


def structured_prune(model: nn.Module, settings: StructuredSettings, batch: dict | None = None) -> dict:
    """Prune ``model`` in place (width, then depth); returns what was kept and what it cost."""
    if settings.method not in ("mope", "magnitude_structured", "layer_drop"):
        raise ValueError(f"structured method {settings.method!r} is not one of: mope, magnitude_structured, layer_drop")
    if settings.method == "layer_drop" and settings.width_ratio < 1:
        raise ValueError("layer_drop removes whole layers only: set width_ratio to 1.0 (or use mope / magnitude_structured)")
    towers = structured_towers(model, settings.towers)
    for tower in towers:
        tag_parent_indices(tower)
    before = {t.name: count_parameters(t.layers) for t in towers}
    metric = settings.metric if settings.metric != "auto" else "lm_loss" if is_causal_lm(model) else "accuracy"
    if settings.method == "mope" and is_causal_lm(model):
        if metric not in LM_METRICS:
            raise ValueError(f"structured.metric {settings.metric!r} is a cross-modal metric; MoPE on a causal LM "
                             f"scores the rise of the next-token loss: set structured.metric to lm_loss")
        if batch is None:
            raise ValueError("MoPE on a causal LM needs a batch of calibration windows (input_ids, attention_mask)")
        scorer = LMMoPEScorer(model, batch, settings.max_rows)
    elif settings.method == "mope":
        if batch is None:
            raise ValueError("MoPE needs a batch of image-caption pairs (pixel_values, input_ids, attention_mask, labels)")
        scorer = MoPEScorer(model, batch, metric, settings.max_rows, settings.towers)
    else:
        scorer = MagnitudeScorer()
    width = prune_width(model, scorer, settings) if settings.width_ratio < 1 else {}
    depth = prune_depth(model, scorer, settings) if settings.depth_ratio < 1 else {}
    towers = structured_towers(model, settings.towers)
    report = {"method": settings.method, "width_ratio": settings.width_ratio, "depth_ratio": settings.depth_ratio,
              "scoring_cost": dict(scorer.cost), "towers": {}}
    for tower in towers:
        after = count_parameters(tower.layers)
        report["towers"][tower.name] = {
            "kept_layers": parent_indices(tower),
            "layer_params_before": before[tower.name], "layer_params_after": after,
            **width.get(tower.name, {}), **depth.get(tower.name, {}),
        }
    report["structure"] = current_structure(model)
    return report
