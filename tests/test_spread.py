"""The spatial-spread prior for visual-token keep-sets (vlmprune/par/spread.py)."""

from __future__ import annotations

import pytest
import torch

from tests.test_tokens import N_VISUAL, llava, prompt  # noqa: F401  (llava: the module's tiny-LLaVA fixture)
from vlmprune.par.contributions import swapped_spread_set, token_contributions
from vlmprune.par.engine import Plan, Prefix, generate, kept_positions, prefill, run_prefix
from vlmprune.par.spread import DitherPolicy, SpreadPolicy, bayer, dither_ranks, spread_prior
from vlmprune.par.train import make_examples

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_bayer_matrices_are_the_standard_ones():
    assert bayer(0).tolist() == [[0]]
    assert bayer(1).tolist() == [[0, 2], [3, 1]]
    assert bayer(2).tolist() == [[0, 8, 2, 10], [12, 4, 14, 6], [3, 11, 1, 9], [15, 7, 13, 5]]


def test_square_grid_keeps_a_checkerboard_at_half_and_one_per_2x2_block_at_a_quarter():
    ranks = dither_ranks(196)  # 14 x 14, cropped from the 16 x 16 matrix
    assert sorted(ranks.tolist()) == list(range(196))
    i, j = torch.meshgrid(torch.arange(14), torch.arange(14), indexing="ij")
    assert torch.equal((ranks < 98).view(14, 14), (i + j) % 2 == 0)
    assert torch.equal((ranks < 49).view(14, 14), (i % 2 == 0) & (j % 2 == 0))


@pytest.mark.parametrize("n", [6, 10, 17])
def test_a_line_of_tokens_keeps_every_other_token_first(n):
    ranks = dither_ranks(n)  # not a square: bit-reversed order
    assert sorted(ranks.tolist()) == list(range(n))
    first = set(torch.nonzero(ranks < (n + 1) // 2)[:, 0].tolist())
    assert first == set(range(0, n, 2))


def test_prior_marks_exactly_n_keep_tokens():
    for n, n_keep in [(196, 98), (196, 49), (16, 5), (7, 0), (7, 7), (1, 1)]:
        prior = spread_prior(n, n_keep)
        assert prior.shape == (n,) and prior.sum() == n_keep and set(prior.tolist()) <= {0.0, 1.0}


class Fixed:
    """A policy with given token scores."""

    needs_attention = False

    def __init__(self, scores):
        self.scores = torch.tensor([scores])

    def token_scores(self, prefix, n_keep=None):
        return self.scores


def _prefix(n: int) -> Prefix:
    return Prefix(torch.zeros(1, n + 1, 4), 1, torch.tensor([[True] * n + [False]]), None)


def test_spread_adds_weight_times_prior_to_standardised_scores():
    # 2 x 2 grid, dither ranks (0, 2, 3, 1): keeping 2, the prior marks tokens 0 and 3
    scores = [3.0, 2.0, 1.0, 0.0]
    z = (torch.tensor(scores) - 1.5) / 1.25 ** 0.5  # population standard deviation
    for weight, kept in [(0.0, {0, 1}), (0.5, {0, 1}), (2.0, {0, 3})]:
        out = SpreadPolicy(Fixed(scores), weight).token_scores(_prefix(4), 2)[0]
        torch.testing.assert_close(out, z + weight * torch.tensor([1.0, 0, 0, 1.0]))
        assert set(torch.topk(out, 2).indices.tolist()) == kept
    with pytest.raises(ValueError, match="n_keep"):
        SpreadPolicy(Fixed(scores)).token_scores(_prefix(4))
    with pytest.raises(ValueError, match=">= 0"):
        SpreadPolicy(Fixed(scores), -1.0)


def test_dither_policy_keeps_the_same_spread_tokens_for_every_input(llava):  # noqa: F811
    model, _, dec = llava
    ids, pixels = prompt(model, batch=3)
    embeds, mask = dec.embed_inputs(ids, pixels), dec.visual_mask(ids)
    n_keep = N_VISUAL // 4  # 4 x 4 grid: one token of each 2 x 2 block
    with torch.no_grad():
        prefix = run_prefix(dec, embeds, mask, 1)
        index = kept_positions(mask, DitherPolicy().token_scores(prefix, n_keep), n_keep)
        _, cache = prefill(dec, embeds, mask, Plan(0.25, 1.0, 1), DitherPolicy())
    visual = mask[0].nonzero()[:, 0]
    grid = torch.zeros(N_VISUAL, dtype=torch.bool)
    grid[[v in index[0].tolist() for v in visual.tolist()]] = True
    i, j = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    assert torch.equal(grid.view(4, 4), (i % 2 == 0) & (j % 2 == 0))
    assert (index == index[0]).all()
    assert cache.kept_tokens == ids.shape[1] - N_VISUAL + n_keep


def test_spread_policy_skips_the_layers_its_base_skips(llava):  # noqa: F811
    from vlmprune.par.policies import RandomPolicy

    model, _, dec = llava
    ids, pixels = prompt(model)
    embeds, mask = dec.embed_inputs(ids, pixels), dec.visual_mask(ids)
    plan = Plan(0.5, 0.5, 1)
    with torch.no_grad():
        _, spread = prefill(dec, embeds, mask, plan, SpreadPolicy(RandomPolicy(3), 1.0))
        _, base = prefill(dec, embeds, mask, plan, RandomPolicy(3))
        answer = generate(dec, ids, pixels, plan, SpreadPolicy(RandomPolicy(3), 1.0), max_new_tokens=3)
    assert torch.equal(spread.layer_keep, base.layer_keep) and spread.kept_tokens == base.kept_tokens
    assert answer.shape == (ids.shape[0], 3)


def test_par_spread_must_not_be_negative():
    from params.schema import ParamsError, validate

    with pytest.raises(ParamsError, match=r"par\.spread"):
        validate({"par": {"spread": -0.5}})


# ---- contributions measured around the prior's keep-set (par.token_sets: spread) ----

@pytest.mark.parametrize("n, size, low, high", [(196, 98, 4, 24), (196, 49, 2, 12), (16, 8, 1, 2), (10, 9, 1, 1)])
def test_swapped_spread_sets_swap_between_low_and_high_tokens_of_the_prior_set(n, size, low, high):
    """m tokens of the prior's keep-set swapped for m outside it, m uniform on {low .. high} with
    high = min(max(2, s // 4), s, n - s) and low = min(max(1, s // 24), high), computed here by hand."""
    prior = spread_prior(n, size).bool()
    generator = torch.Generator().manual_seed(0)
    swaps = []
    for _ in range(300):
        keep = swapped_spread_set(n, size, generator)
        assert int(keep.sum()) == size
        swaps.append(int((prior & ~keep).sum()))
        assert int((keep & ~prior).sum()) == swaps[-1]
    assert min(swaps) == low and max(swaps) == high
    first, second = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(swapped_spread_set(n, size, first), swapped_spread_set(n, size, second))


def test_token_contributions_draw_the_keep_sets_they_are_told(llava):  # noqa: F811
    model, _, dec = llava
    ids, pixels = prompt(model, batch=2)
    examples = make_examples(dec, ids[:1], pixels, k=1, max_new_tokens=2, batch_size=2)
    spread = token_contributions(dec, examples, 1, [0.5], n_subsets=8, sets="spread")
    assert spread.shape == (2, N_VISUAL) and torch.isfinite(spread).all()
    assert torch.equal(spread, token_contributions(dec, examples, 1, [0.5], n_subsets=8, sets="spread"))
    assert not torch.equal(spread, token_contributions(dec, examples, 1, [0.5], n_subsets=8, sets="random"))
    with pytest.raises(ValueError, match="random, spread"):
        token_contributions(dec, examples, 1, [0.5], n_subsets=8, sets="nearby")


def test_par_token_sets_is_random_or_spread():
    import typing

    from params.schema import ParamsError, ParParams, validate
    from vlmprune.par.contributions import KEEP_SETS

    assert validate({"par": {"token_sets": "spread"}}).par.token_sets == "spread"
    with pytest.raises(ParamsError, match=r"par\.token_sets = 'nearby': Input should be 'random' or 'spread'"):
        validate({"par": {"token_sets": "nearby"}})
    # the schema lists them without importing the PAR modules (they load transformers' LLaMA)
    assert set(typing.get_args(ParParams.model_fields["token_sets"].annotation)) == set(KEEP_SETS)
