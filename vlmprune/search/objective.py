"""What a candidate policy is scored by, and how a candidate is pruned from the dense weights.

Objectives (higher is better), measured on the search samples only (drawn from the training
split with their own seed; the held-out split is never read):

- ``loss`` (every family): minus the model's own loss on the search samples. Where the family gives
  per-sample losses (``adapter.sample_losses``: the language-model families, image-to-text included)
  the values are minus each sample's mean token loss, one per sample, and the objective is their
  mean; otherwise (the contrastive dual encoder and CLIP, whose per-sample terms depend on the batch)
  it is one value, minus the sample-weighted mean of ``adapter.loss`` over the batches. Its penalty
  scale R is the dense model's loss on the same samples: a heuristic scale (a per-sample loss is
  unbounded, so the SRM bound holds only for a loss clipped to [0, R]).
- ``accuracy`` (families with a hook below; the dual encoder): zero-shot accuracy of the search
  images against class embeddings built from the *training* caption templates (the evaluation
  templates stay unseen), as in :mod:`vlmprune.evaluators.zero_shot`. Per-sample values in {0, 1}: R = 1.
- ``probability`` (same families): the zero-shot probability of the correct class,
  softmax_c(exp(logit_scale) * cos(image, class c))[label], averaged over the search images: in
  [0, 1] (R = 1) like accuracy, but it does not saturate at 1 when every search image is right.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmprune.adapters import has_sample_losses
from vlmprune.pruners import Pruner
from vlmprune.sequential import prune_tower_sequential
from vlmprune.sparsity import Group


def _dual_encoder_values(loaded, spec, samples: dict, batch_size: int,
                          device: str) -> Callable[[nn.Module], dict[str, torch.Tensor]]:
    """``values(model) -> {"accuracy": (n,), "probability": (n,)}`` (on the CPU), from one pass: the
    per-sample zero-shot correctness (float 0/1) and the softmax probability of the correct class;
    class c's embedding is the normalised mean of its normalised prompt embeddings (prompt
    ensembling, as vlmprune.evaluators.zero_shot)."""
    from vlmprune.data.images import image_split

    data, _, _ = image_split(spec)
    templates = data.train_templates
    prompts = loaded.processor([t.format(c) for c in data.class_names for t in templates], padding=True,
                               return_tensors="pt")  # tokenised once: a fast tokenizer is not thread-safe
    ids, mask = prompts["input_ids"].to(device), prompts["attention_mask"].to(device)
    labels = samples["labels"].cpu()
    pixels = samples["pixel_values"]

    @torch.no_grad()
    def values(model: nn.Module) -> dict[str, torch.Tensor]:
        text = F.normalize(model.encode_text(ids, mask).float(), dim=-1).view(len(data.class_names), len(templates), -1)
        classes = F.normalize(text.mean(1), dim=-1).cpu()
        images = torch.cat([F.normalize(model.encode_image(pixels[s:s + batch_size].to(device)).float(), dim=-1).cpu()
                            for s in range(0, len(pixels), batch_size)])
        cosine = images @ classes.T
        scale = float(model.logit_scale.exp())
        return {"accuracy": (cosine.argmax(dim=1) == labels).float(),
                "probability": torch.softmax(scale * cosine, dim=1).gather(1, labels.view(-1, 1)).squeeze(1)}

    return values


# family -> builder of the per-sample values (accuracy in {0, 1}, probability of the correct class)
ACCURACY_HOOKS = {"dual_encoder": _dual_encoder_values}


def make_objective(adapter, loaded, spec, samples: dict[str, torch.Tensor], metric: str, batch_size: int,
                   device: str) -> tuple[Callable[[nn.Module], np.ndarray], float]:
    """``(values(model) -> 1-D array, value range R)`` on the search ``samples`` (a dict of per-sample
    tensors); the objective is the mean of the values. ``accuracy`` and ``probability`` give one value
    per sample; so does ``loss`` where the family has per-sample losses (:func:`has_sample_losses`),
    else one value, minus the mean loss over all batches (which the ``bernstein`` bound, needing
    per-sample values, does not take)."""
    if metric in ("accuracy", "probability"):
        hook = ACCURACY_HOOKS.get(adapter.family)
        if hook is None:
            raise ValueError(f"search objective {metric!r} is built only for: {', '.join(ACCURACY_HOOKS)} "
                             f"(model family {adapter.family!r}); use allocation.search.objective: loss")
        values = hook(loaded, spec, samples, batch_size, device)
        return (lambda model: values(model)[metric].double().numpy()), 1.0
    if metric != "loss":
        raise ValueError(f"unknown search objective {metric!r}; known: accuracy, probability, loss")
    n = len(next(iter(samples.values())))
    batches = [{k: v[s:s + batch_size].to(device) for k, v in samples.items()} for s in range(0, n, batch_size)]

    per_sample = has_sample_losses(adapter)

    @torch.no_grad()
    def minus_loss(model: nn.Module) -> np.ndarray:
        if per_sample:
            return -torch.cat([adapter.sample_losses(model, b).double().cpu() for b in batches]).numpy()
        return np.array([-sum(float(adapter.loss(model, b)) * len(next(iter(b.values()))) for b in batches) / n])

    dense = -float(minus_loss(loaded.model).mean())
    return minus_loss, max(dense, 1e-6)


class CandidatePruner:
    """Prunes one model to a given per-layer sparsity, always starting from its dense weights.

    Keeps a CPU copy of every prunable weight; :meth:`prune` restores them, then prunes tower by
    tower with the configured pruner on the cached calibration ``batches`` (prune stage semantics,
    :func:`vlmprune.sequential.prune_tower_sequential`). Only prunable weights change, so restoring
    them restores the dense model.
    """

    def __init__(self, model: nn.Module, towers, groups: list[Group], batches: list[dict], pruner: Pruner,
                 nm: tuple[int, int] | None):
        self.model, self.towers, self.groups, self.batches = model, towers, groups, batches
        self.pruner, self.nm = pruner, nm
        self.layers = {name: layer for g in groups for name, layer in g.layers.items()}
        self.dense = {name: layer.weight.detach().cpu().clone() for name, layer in self.layers.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for name, layer in self.layers.items():
            layer.weight.copy_(self.dense[name])

    def prune(self, layer_sparsity: dict[str, float]) -> None:
        self.restore()
        for tower in self.towers:
            members = [(g.name, g.module, g.layers) for g in self.groups if g.tower == tower.name]
            if members:
                prune_tower_sequential(self.model, tower.run, self.batches, members, layer_sparsity, self.pruner,
                                       self.nm, progress=False)
