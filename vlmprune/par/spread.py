"""A spatial-spread prior for visual-token keep-sets: ordered dithering over the token grid.

Neighbouring visual tokens of an image often carry nearly the same content (a patch grid finer than the
detail of the image), so a keep-set that a per-token score picks tends to lose whole regions while it
keeps near-duplicates. Ordered dithering (Bayer 1973) orders the cells of a grid so that, for every
``k``, the first ``k`` cells are spread evenly over it: on a ``2^m x 2^m`` grid the Bayer index is

    B(i, j) = sum_{b=0}^{m-1} D(i_b, j_b) 4^(m-1-b),   D(0, 0) = 0, D(0, 1) = 2, D(1, 0) = 3, D(1, 1) = 1,

with ``i_b`` bit ``b`` of the row (``b = 0`` the lowest). The cells with ``B < 4^m / 2`` form a
checkerboard, those with ``B < 4^m / 4`` one cell of every 2 x 2 block, and so on. ``n`` visual tokens
are read as a ``g x g`` raster grid when ``n = g^2`` (the Bayer matrix of the next power of two,
cropped); otherwise as a line, ordered by the bit-reversed index (the one-dimensional case).

The prior for a keep-set of ``n_keep`` tokens is ``1`` on the ``n_keep`` tokens of lowest dither rank,
``0`` elsewhere; :class:`SpreadPolicy` adds ``weight`` times it to the standardised scores of another
policy, so a token off the dither pattern must out-score one on it by ``weight`` standard deviations
to replace it. It assumes the visual tokens of one image in raster order (LLaVA's patch grid, the
offline VisionLM's feature grid); for any other layout it is only a heuristic.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from vlmprune.par.policies import RandomPolicy

_BASE = ((0, 2), (3, 1))


def bayer(m: int) -> torch.Tensor:
    """The ``2^m x 2^m`` Bayer index matrix (module docstring), values ``0 .. 4^m - 1``."""
    side = 1 << m
    i = torch.arange(side).unsqueeze(1).expand(side, side)
    j = torch.arange(side).unsqueeze(0).expand(side, side)
    out = torch.zeros(side, side, dtype=torch.long)
    base = torch.tensor(_BASE)
    for b in range(m):
        out += base[(i >> b) & 1, (j >> b) & 1] * 4 ** (m - 1 - b)
    return out


def _bit_reversed(n: int) -> torch.Tensor:
    bits = max(1, math.ceil(math.log2(n)))
    index = torch.arange(n)
    out = torch.zeros(n, dtype=torch.long)
    for b in range(bits):
        out |= ((index >> b) & 1) << (bits - 1 - b)
    return out


def dither_ranks(n: int) -> torch.Tensor:
    """Rank (0 = first kept) of each of ``n`` visual tokens in raster order, by ordered dithering."""
    return _ranks(n).clone()


@lru_cache(maxsize=None)
def _ranks(n: int) -> torch.Tensor:
    """:func:`dither_ranks`, computed once per token count (every pruned prefill asks for it); never
    handed out uncopied."""
    if n < 1:
        raise ValueError(f"need at least one visual token, got {n}")
    side = math.isqrt(n)
    if side * side == n:
        value = bayer(math.ceil(math.log2(side)))[:side, :side].reshape(-1)
    else:
        value = _bit_reversed(n)
    ranks = torch.empty(n, dtype=torch.long)
    ranks[torch.argsort(value, stable=True)] = torch.arange(n)
    return ranks


def spread_prior(n: int, n_keep: int) -> torch.Tensor:
    """(n,) float: 1 on the ``n_keep`` tokens of lowest dither rank, 0 elsewhere."""
    return (_ranks(n) < n_keep).float()


class SpreadPolicy:
    """``base``'s token scores, standardised per input, plus ``weight`` times :func:`spread_prior`;
    layers as ``base`` chooses them."""

    def __init__(self, base, weight: float = 1.0):
        if weight < 0:
            raise ValueError(f"spread weight must be >= 0, got {weight}")
        self.base, self.weight = base, weight
        self.needs_attention = getattr(base, "needs_attention", False)

    def token_scores(self, prefix, n_keep: int | None = None) -> torch.Tensor:
        if n_keep is None:
            raise ValueError("SpreadPolicy needs the number of tokens kept (n_keep) to place its prior")
        scores = self.base.token_scores(prefix, n_keep).float()
        z = (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True, correction=0).clamp_min(1e-8)
        return z + self.weight * spread_prior(scores.shape[1], n_keep).to(z.device)

    def layer_keep(self, prefix, n_keep: int, n_layers: int) -> torch.Tensor:
        return self.base.layer_keep(prefix, n_keep, n_layers)


class DitherPolicy:
    """The spread prior alone (a fixed keep-set per keep ratio, the same for every input): the baseline
    that tells how much of :class:`SpreadPolicy`'s accuracy the prior gives by itself. Layers: random,
    as :class:`~vlmprune.par.policies.RandomPolicy` with ``seed``."""

    needs_attention = False

    def __init__(self, seed: int = 0):
        self.layers = RandomPolicy(seed)

    def token_scores(self, prefix, n_keep: int | None = None) -> torch.Tensor:
        if n_keep is None:
            raise ValueError("DitherPolicy needs the number of tokens kept (n_keep)")
        B, n = prefix.hidden.shape[0], int(prefix.visual_mask[0].sum())
        return spread_prior(n, n_keep).to(prefix.hidden.device).expand(B, -1)

    def layer_keep(self, prefix, n_keep: int, n_layers: int) -> torch.Tensor:
        return self.layers.layer_keep(prefix, n_keep, n_layers)
