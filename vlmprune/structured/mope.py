"""MoPE: module-wise pruning error (MoPE-CLIP, Lin et al., CVPR 2024; METHODS.md section 4).

The importance of a module m (an attention head, a group of FFN neurons / MBConv channels, a
whole residual layer) is the drop of a cross-modal metric when m alone is removed:

    MoPE(m) = M(model) - M(model without m)

with M the zero-shot accuracy, the retrieval R@1 or (its rise) the contrastive loss on a few
image-caption pairs of the *training* split (:mod:`vlmprune.structured.metrics`). The other tower's
embeddings do not change and are computed once. Ties of a discrete metric are broken by the rise
of the loss.

Cost. Removing a module of layer l does not change what enters layer l, so the inputs of every
layer are cached from one dense forward, and a candidate runs only layers l..L and the tower's
tail. Removal is a 0/1 mask on the input of the output projection (heads), of the down projection
(FFN neurons, MBConv project conv), or a skip (layers) — exactly what physical removal computes
(see :mod:`vlmprune.structured.surgery`). The C candidates of one layer run as one batch of C * N
rows (chunked to ``max_rows``). :attr:`MoPEScorer.cost` counts the batched calls, the candidates, and
the work in *full-forward equivalents* (sum over calls of candidates * layers run / all layers).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from vlmprune.structured.metrics import METRICS, metric_drop, pair_metrics
from vlmprune.structured.towers import StructuredTower, layer_output, logit_scale, structured_towers, tower_embed


def contiguous_groups(size: int, fraction: float) -> list[list[int]]:
    """Split ``range(size)`` into contiguous groups of ``max(1, round(fraction * size))`` units."""
    step = max(1, round(fraction * size))
    return [list(range(s, min(s + step, size))) for s in range(0, size, step)]


def _repeat(value, n: int, copies: int):
    """Repeat tensors whose first dimension is the sample count ``n``, candidate-major."""
    if isinstance(value, tuple):  # e.g. the (cos, sin) rotary tables of a decoder layer
        return tuple(_repeat(v, n, copies) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n and copies > 1:
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    return value


@contextmanager
def _input_mask(module: nn.Module, mask: torch.Tensor, n: int):
    """Multiply the input of ``module`` by ``mask`` (C, channels), one row per candidate of n samples.

    Linear inputs carry channels last, conv inputs in dimension 1."""
    rows = mask.repeat_interleave(n, 0)

    def hook(_, args):
        x = args[0]
        m = rows.to(x.device, x.dtype)
        m = m.view(len(m), *([1] * (x.dim() - 2)), -1) if isinstance(module, nn.Linear) else m.view(*m.shape, 1, 1)
        return (x * m, *args[1:])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class MoPEScorer:
    """MoPE scores of the heads, FFN groups and layers of a model's towers on one batch of pairs."""

    def __init__(self, model: nn.Module, batch: dict, metric: str = "accuracy", max_rows: int = 512,
                 towers: list[str] | None = None):
        if metric not in METRICS:
            raise ValueError(f"MoPE metric {metric!r} is not one of: {', '.join(METRICS)}")
        self.model, self.batch, self.metric, self.max_rows = model, batch, metric, max_rows
        self.towers = towers  # towers whose layer inputs are cached (all when None)
        self.n = len(batch["labels"])
        self.cost = {"forward_calls": 0, "candidates": 0, "full_forward_equivalents": 0.0}
        self._inputs: dict[str, list] = {}
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the dense embeddings and the cached layer inputs (after the model changed)."""
        self._inputs.clear()
        self.embeddings = {}
        for tower in structured_towers(self.model):
            captured = []
            cached = self.towers is None or tower.name in self.towers
            hooks = [layer.register_forward_pre_hook(lambda _, a, k, store=captured: store.append((a, k)), with_kwargs=True)
                     for layer in tower.layers] if cached else []
            try:
                self.embeddings[tower.name] = tower_embed(self.model, tower, self.batch)
            finally:
                for h in hooks:
                    h.remove()
            self._inputs[tower.name] = captured
            self.cost["forward_calls"] += 1
            self.cost["full_forward_equivalents"] += 1.0
        self.scale = float(logit_scale(self.model))
        self.dense = self._metrics(next(iter(self.embeddings)), self.embeddings[next(iter(self.embeddings))])

    def _metrics(self, tower_name: str, emb: torch.Tensor) -> dict[str, torch.Tensor]:
        image = emb if tower_name == "vision" else self.embeddings["vision"]
        text = emb if tower_name == "text" else self.embeddings["text"]
        return pair_metrics(image, text, self.batch["labels"], self.scale)

    @torch.no_grad()
    def _run(self, tower: StructuredTower, start: int, copies: int, skip: int | None = None) -> torch.Tensor:
        """What ``copies`` candidates give (:meth:`_finish`), running layers ``start``.. (all but ``skip``)
        from the cached inputs of layer ``start``, the batch repeated candidate-major."""
        layers = list(tower.layers)
        x = None
        for i in range(start, len(layers)):
            args, kwargs = self._inputs[tower.name][i]
            if x is None:
                x = _repeat(args[0], self.n, copies)
            if i == skip:
                continue
            kwargs = {k: _repeat(v, self.n, copies) for k, v in kwargs.items()}
            x = layer_output(layers[i](x, *[_repeat(a, self.n, copies) for a in args[1:]], **kwargs))
        self.cost["forward_calls"] += 1
        self.cost["candidates"] += copies
        self.cost["full_forward_equivalents"] += copies * (len(layers) - start - (skip is not None)) / len(layers)
        return self._finish(tower, x, copies)

    def _finish(self, tower: StructuredTower, x: torch.Tensor, copies: int) -> torch.Tensor:
        """Embeddings (copies, N, d) from the last layer's output ``x`` (copies * N, ...)."""
        batch = {k: _repeat(v, self.n, copies) for k, v in self.batch.items()}
        return tower.tail(x, batch).view(copies, self.n, -1)

    def _masked(self, tower: StructuredTower, layer: int, module: nn.Module, masks: torch.Tensor):
        """(MoPE, loss rise) of each row of ``masks`` (C, channels) applied to the input of ``module``."""
        per_call = max(1, self.max_rows // self.n)
        scores, ties = [], []
        for s in range(0, len(masks), per_call):
            chunk = masks[s:s + per_call]
            with _input_mask(module, chunk, self.n):
                emb = self._run(tower, layer, len(chunk))
            drop, tie = metric_drop(self.dense, self._metrics(tower.name, emb), self.metric)
            scores.append(drop)
            ties.append(tie)
        return torch.cat(scores), torch.cat(ties)

    def heads(self, tower: StructuredTower) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per layer: (MoPE, loss rise) of removing each head alone."""
        out = []
        for i, layer in enumerate(tower.layers):
            attention = tower.attention(layer)
            if attention is None:
                out.append(None)
                continue
            h = attention.n_heads
            masks = torch.ones(h, attention.o.in_features)
            for j in range(h):
                masks[j, attention.query_index([j])] = 0  # under GQA: the unit's g query heads
            out.append(self._masked(tower, i, attention.o, masks))
        return out

    def width(self, tower: StructuredTower, groups: list[list[list[int]] | None]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per layer: (MoPE, loss rise) of removing each group of FFN neurons / channels alone."""
        out = []
        for i, (layer, layer_groups) in enumerate(zip(tower.layers, groups)):
            width = tower.width(layer)
            if width is None or not layer_groups:
                out.append(None)
                continue
            masks = torch.ones(len(layer_groups), width.size)
            for j, g in enumerate(layer_groups):
                masks[j, g] = 0
            out.append(self._masked(tower, i, width.down, masks))
        return out

    def layers(self, tower: StructuredTower) -> tuple[torch.Tensor, torch.Tensor]:
        """(MoPE, loss rise) of removing each layer alone; +inf for layers without a residual path."""
        n = len(tower.layers)
        scores, ties = torch.full((n,), float("inf")), torch.full((n,), float("inf"))
        for i, layer in enumerate(tower.layers):
            if tower.droppable(layer):
                emb = self._run(tower, i, 1, skip=i)
                drop, tie = metric_drop(self.dense, self._metrics(tower.name, emb), self.metric)
                scores[i], ties[i] = drop[0], tie[0]
        return scores, ties
