"""Who decides which visual tokens and layers an operating point keeps.

A policy has ``token_scores(prefix, n_keep) -> (B, n)`` (higher = keep; the ``n_keep`` highest of the
``n`` are kept) and ``layer_keep(prefix, n_keep, n_layers) -> (B, L - k)`` bool with ``n_keep`` True
per row.

- :class:`RouterPolicy`: PAR's meta-router (:mod:`vlmprune.par.router`), per input for both.
- :class:`AttentionPolicy`: tokens by the attention they receive, FastV-style (Chen et al. 2024,
  arXiv:2403.06764): ``s_j = mean_heads A^{(k-1)}_{T, j}``, the attention the last prompt token pays
  to visual token ``j`` in layer ``k-1``; layers by a static ranking, Block Influence (ShortGPT,
  Men et al. 2024, arXiv:2403.03853): ``BI_l = 1 - E_t cos(h_t^{(l)}, h_t^{(l+1)})`` on unlabelled
  calibration inputs, the layers with the lowest BI skipped first.
- :class:`RandomPolicy`: uniform random tokens and layers per input, from a seeded generator.
- :class:`vlmprune.par.spread.SpreadPolicy`: another policy's token scores plus a spatial-spread prior.
"""

from __future__ import annotations

import torch

from vlmprune.par.decoder import Decoder
from vlmprune.par.engine import Prefix, run_layer, rotary


def top_mask(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Bool mask (B, m) with True at the ``n_keep`` largest scores of each row."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, torch.topk(scores, n_keep, dim=1).indices, True) if n_keep else mask


class RouterPolicy:
    needs_attention = False

    def __init__(self, router):
        self.router = router

    @torch.no_grad()
    def token_scores(self, prefix: Prefix, n_keep: int | None = None) -> torch.Tensor:
        return self.router.token_scores(prefix.hidden, prefix.visual_mask)

    @torch.no_grad()
    def layer_keep(self, prefix: Prefix, n_keep: int, n_layers: int) -> torch.Tensor:
        return top_mask(self.router.layer_logits(prefix.hidden), n_keep)


class AttentionPolicy:
    needs_attention = True

    def __init__(self, influence: list[float] | None = None):
        """``influence``: Block Influence of every layer 0..L-1 (:func:`block_influence`)."""
        self.influence = influence

    def token_scores(self, prefix: Prefix, n_keep: int | None = None) -> torch.Tensor:
        B = prefix.hidden.shape[0]
        return prefix.last_attention[prefix.visual_mask].view(B, -1)

    def layer_keep(self, prefix: Prefix, n_keep: int, n_layers: int) -> torch.Tensor:
        if self.influence is None:
            raise ValueError("the attention policy skips layers by Block Influence: pass influence= "
                             "(block_influence on a few unlabelled inputs)")
        if len(self.influence) != n_layers:
            raise ValueError(f"influence has {len(self.influence)} entries for {n_layers} layers")
        later = torch.tensor(self.influence[prefix.k:], dtype=torch.float32).unsqueeze(0)
        return top_mask(later, n_keep).to(prefix.hidden.device).expand(prefix.hidden.shape[0], -1)


class RandomPolicy:
    needs_attention = False

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def token_scores(self, prefix: Prefix, n_keep: int | None = None) -> torch.Tensor:
        B, n = prefix.hidden.shape[0], int(prefix.visual_mask[0].sum())
        return torch.rand(B, n, generator=self.generator).to(prefix.hidden.device)

    def layer_keep(self, prefix: Prefix, n_keep: int, n_layers: int) -> torch.Tensor:
        B = prefix.hidden.shape[0]
        return top_mask(torch.rand(B, n_layers - prefix.k, generator=self.generator), n_keep).to(prefix.hidden.device)


@torch.no_grad()
def block_influence(dec: Decoder, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                    batch_size: int = 16) -> list[float]:
    """``BI_l = 1 - mean over tokens and inputs of cos(h^{(l)}_t, h^{(l+1)}_t)`` for every layer
    (ShortGPT, Men et al. 2024), from the dense model on unlabelled images ``pixel_values`` (N, ...)
    under the prompt ``input_ids`` ((1, T), or one row per image), ``batch_size`` images per forward.
    The inputs are embedded here, without gradients: an autograd graph of the vision tower kept for
    every batch grows with the image size (about 20 GB for 64 images at 448 px)."""
    total, count = torch.zeros(dec.n_layers, dtype=torch.float64, device=pixel_values.device), 0
    for start in range(0, pixel_values.shape[0], batch_size):
        pixels = pixel_values[start:start + batch_size]
        ids = input_ids.expand(len(pixels), -1) if input_ids.shape[0] == 1 else input_ids[start:start + batch_size]
        h = dec.embed_inputs(ids, pixels)
        B, T, _ = h.shape
        positions = torch.arange(T, device=h.device).unsqueeze(0).expand(B, -1)
        cos, sin = rotary(dec, h, positions)
        for index, layer in enumerate(dec.layers):
            out, _, _ = run_layer(dec, layer, h, cos, sin)
            total[index] += torch.nn.functional.cosine_similarity(out.float(), h.float(), dim=-1).sum().double()
            h = out
        count += B * T
    return (1 - total / count).tolist()
