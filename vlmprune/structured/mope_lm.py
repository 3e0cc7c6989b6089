"""MoPE with the LM loss, for generative models (issue #6 item 1; METHODS.md section 4).

For a causal LM the metric is the next-token cross-entropy on N calibration windows (training
split, never the held-out text), and the importance of a module m (a head unit — one KV head with
its query heads under GQA —, a group of FFN neurons, a whole decoder layer) is its rise when m
alone is removed:

    MoPE(m) = L(model without m) - L(model),
    L = (1 / #tokens) * sum_{windows, t} -log p(x_{t+1} | x_{<=t})     (labels = input_ids, shifted)

Positive: removing m hurts; the least important modules are removed first. The loss is
continuous, so it is also its own tie-break.

Cost, as in :class:`~vlmprune.structured.mope.MoPEScorer`: removing a module of layer l leaves
the input of layer l unchanged, so every layer's inputs (hidden states, rotary tables, mask) are
cached from one dense forward, and a candidate runs only layers l..L-1, the final norm and the LM
head. Removal is a 0/1 mask on the input of ``o_proj`` (head units) or ``down_proj`` (neurons), or
a skipped layer — what physical removal computes (:mod:`vlmprune.structured.surgery`). The C
candidates of a layer run as one batch of C * N windows (chunked to ``max_rows`` windows); the LM
head runs on ``head_rows`` windows at a time, so that the (rows, T, vocabulary) logits stay small.
``cost`` counts the batched calls, the candidates and the full-forward equivalents.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vlmprune.adapters.causal_lm import lm_loss
from vlmprune.structured.mope import MoPEScorer, _input_mask, _repeat
from vlmprune.structured.towers import StructuredTower, layer_output, structured_towers


class LMMoPEScorer(MoPEScorer):
    """MoPE scores (rise of the LM loss) of the head units, FFN groups and layers of a causal LM."""

    def __init__(self, model: nn.Module, batch: dict, max_rows: int = 512, head_rows: int = 8):
        self.model, self.max_rows, self.head_rows = model, max_rows, max(1, head_rows)
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        self.batch = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "labels": labels}
        self.n = len(labels)
        self.towers = None
        self.cost = {"forward_calls": 0, "candidates": 0, "full_forward_equivalents": 0.0}
        self._inputs: dict[str, list] = {}
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """One dense forward: cache every decoder layer's inputs and the dense loss."""
        (tower,) = structured_towers(self.model)
        captured, last = [], {}
        hooks = [layer.register_forward_pre_hook(lambda _, a, k: captured.append((a, k)), with_kwargs=True)
                 for layer in tower.layers]
        hooks.append(tower.layers[-1].register_forward_hook(lambda _, a, out: last.update(x=layer_output(out))))
        try:
            tower.parent(input_ids=self.batch["input_ids"], attention_mask=self.batch["attention_mask"], use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        self._inputs = {tower.name: captured}
        self.dense_loss = float(self._finish(tower, last["x"], 1)[0])
        self.cost["forward_calls"] += 1
        self.cost["full_forward_equivalents"] += 1.0

    def _finish(self, tower: StructuredTower, x: torch.Tensor, copies: int) -> torch.Tensor:
        """Mean next-token loss of each candidate (the replay loop is :meth:`MoPEScorer._run`); ``x``: the last
        layer's output (copies * N, T, hidden), candidate-major."""
        labels = _repeat(self.batch["labels"], self.n, copies).to(x.device)
        total = torch.zeros(len(x), dtype=torch.float64)
        for s in range(0, len(x), self.head_rows):
            token_loss = lm_loss(tower.tail(x[s:s + self.head_rows], self.batch), labels[s:s + self.head_rows],
                                 reduction="none")
            total[s:s + self.head_rows] = token_loss.sum(1).double().cpu()
        tokens = (labels[:, 1:] != -100).sum(1).double().cpu().view(copies, self.n).sum(1)
        return (total.view(copies, self.n).sum(1) / tokens.clamp(min=1)).float()

    def _masked(self, tower: StructuredTower, layer: int, module: nn.Module, masks: torch.Tensor):
        """(MoPE, MoPE) of each row of ``masks`` (C, channels) applied to the input of ``module``."""
        per_call = max(1, self.max_rows // self.n)
        scores = []
        for s in range(0, len(masks), per_call):
            chunk = masks[s:s + per_call]
            with _input_mask(module, chunk, self.n):
                scores.append(self._run(tower, layer, len(chunk)) - self.dense_loss)
        scores = torch.cat(scores)
        return scores, scores

    def layers(self, tower: StructuredTower) -> tuple[torch.Tensor, torch.Tensor]:
        """(MoPE, MoPE) of removing each decoder layer alone."""
        scores = torch.stack([self._run(tower, i, 1, skip=i)[0] - self.dense_loss for i in range(len(tower.layers))])
        return scores, scores
