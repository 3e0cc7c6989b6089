"""Measured contributions of each visual token of one input: a reference for token-pruning policies.

For an input ``x`` (cached as :class:`vlmprune.par.train.Examples`), the distance of a pruned model from
the dense one is the router's training distance

    D(x; S) = (1 / |P_x|) sum_{i in P_x} KL( p_dense(. | x_<=i) || p_S(. | x_<=i) )

with ``p_S`` the model that keeps only the visual tokens in ``S`` after layer ``k``. Draw ``R``
keep-sets ``S_r`` (sizes ``floor(n r)``, cycling over the given keep ratios), measure ``D_r = D(x; S_r)``,
and fit the linear model ``D_r ~ a + sum_j b_j 1[j in S_r]`` by ridge regression (penalty ``ridge`` on
``b``, none on the intercept). The contribution of token ``j`` is ``c_j = -b_j``: how much keeping it
lowers the distance, on average over the other tokens kept (a datamodel of one input's tokens; Ilyas et
al. 2022, arXiv:2202.00622).

Which keep-sets (``sets``):

- ``"random"``: ``S_r`` uniform among the sets of its size: the contributions average over every context.
- ``"spread"``: ``S_r`` is the spatial-spread prior's keep-set of its size (:mod:`vlmprune.par.spread`: the
  ``s`` tokens of lowest dither rank) with ``m`` of its tokens swapped for ``m`` tokens outside it, both
  drawn uniformly, ``m`` uniform on ``{lo .. hi}`` with ``hi = min(max(2, floor(s/4)), s, n - s)`` and
  ``lo = min(max(1, floor(s/24)), hi)``. The fit is then local to the prior's keep-set: ``c_j`` tells how
  much dropping a token of the prior's set costs, or adding a token outside it gains, which is what a
  router whose scores are added to the prior (``par.spread``) has to decide; random sets, by contrast,
  never see that a token's neighbours are already kept.

Keeping the top-``c`` tokens is an *oracle* policy: it needs ``R`` pruned forwards of the very input
it prunes, so it cannot run at inference. ``benchmarks/router_training.py`` uses it to tell how much of
the accuracy lost at a token ratio any ranking of the tokens could win back.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from vlmprune.par.decoder import Decoder
from vlmprune.par.engine import check_batch, keep_count
from vlmprune.par.spread import spread_prior
from vlmprune.par.train import Examples, answer_kl, key_weights


@torch.no_grad()
def token_contributions(dec: Decoder, examples: Examples, k: int, ratios: list[float], n_subsets: int = 32,
                        ridge: float = 1e-2, seed: int = 0, progress: bool = False,
                        sets: str = "random") -> torch.Tensor:
    """``c`` (N, n): each visual token's contribution (module docstring), ``n_subsets`` keep-sets per input,
    drawn as ``sets`` says (``"random"`` or ``"spread"``), their sizes cycling over ``ratios``."""
    if sets not in KEEP_SETS:
        raise ValueError(f"unknown keep-sets {sets!r}; known: {', '.join(KEEP_SETS)}")
    ratios = [r for r in ratios if r < 1]
    if not ratios:
        raise ValueError("token contributions need a token keep ratio below 1")
    n = check_batch(examples.visual_mask[:, :examples.prompt_len])
    sizes = [keep_count(n, r) for r in ratios]
    generator = torch.Generator().manual_seed(seed)
    draw = KEEP_SETS[sets]
    out = []
    for i in tqdm(range(len(examples)), desc="token contributions", disable=not progress):
        keep = torch.stack([draw(n, sizes[r % len(sizes)], generator) for r in range(n_subsets)])
        one = examples.batch([i] * n_subsets)
        kl = answer_kl(dec, one, k, key_weights(one, keep.to(one.hidden.device)))
        out.append(fit_contributions(keep, (kl.sum(-1) / one.valid.sum(-1).clamp_min(1)).cpu(), ridge))
    return torch.stack(out)


def random_set(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Bool (n,): ``size`` tokens drawn uniformly."""
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=generator)[:size]] = True
    return keep


def swapped_spread_set(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Bool (n,): the spread prior's keep-set of ``size`` tokens with ``m`` of them swapped for ``m``
    tokens outside it (module docstring, ``sets="spread"``)."""
    keep = spread_prior(n, size).bool()
    high = min(max(2, size // 4), size, n - size)
    low = min(max(1, size // 24), high)
    m = int(torch.randint(low, high + 1, (1,), generator=generator))
    inside, outside = keep.nonzero()[:, 0], (~keep).nonzero()[:, 0]
    dropped = inside[torch.randperm(len(inside), generator=generator)[:m]]
    added = outside[torch.randperm(len(outside), generator=generator)[:m]]
    keep[dropped], keep[added] = False, True
    return keep


KEEP_SETS = {"random": random_set, "spread": swapped_spread_set}  # par.token_sets -> how one keep-set is drawn


def fit_contributions(keep: torch.Tensor, distance: torch.Tensor, ridge: float) -> torch.Tensor:
    """``-b`` of the ridge fit ``distance_r ~ a + sum_j b_j keep_rj``, the intercept not penalised:
    ``(X^T X + ridge I') [a; b] = X^T distance`` with ``X = [1, keep]`` and ``I'`` the identity with
    a zero in the intercept's place."""
    X = torch.cat([torch.ones(keep.shape[0], 1, dtype=torch.float64), keep.double()], dim=1)
    penalty = ridge * torch.eye(X.shape[1], dtype=torch.float64)
    penalty[0, 0] = 0.0
    return -torch.linalg.solve(X.T @ X + penalty, X.T @ distance.double())[1:].float()
