"""Policy search (allocation.method: search): budget, SRM penalty, sensitivity, determinism, plumbing."""

from __future__ import annotations

import csv
import itertools
import json
import math
import random
from fractions import Fraction

import pytest
import torch
import torch.nn as nn

from tasks.io import data_spec
from tests.tiny import tiny_params
from vlmprune.adapters.base import Tower
from vlmprune.allocators import GroupInfo, ecoflap_kept
from vlmprune.pruners import PRUNERS
from vlmprune.search import (
    CandidatePruner,
    Policy,
    PolicySpace,
    SearchConfig,
    components,
    evolve,
    shell_size,
    srm_penalty,
)
from vlmprune.search.srm import bernstein_penalty
from vlmprune.sparsity import model_layout


def groups_of(sizes, towers=None, scores=None):
    towers = towers or ["vision"] * len(sizes)
    scores = scores or [1.0] * len(sizes)
    return [GroupInfo(f"{t}.{i}", t, n, s) for i, (n, t, s) in enumerate(zip(sizes, towers, scores))]


# ---- the SRM penalty ----

def test_shell_size_counts_integer_vectors_of_given_l1_norm():
    for dim, k in itertools.product(range(1, 4), range(0, 5)):
        brute = sum(1 for v in itertools.product(range(-k, k + 1), repeat=dim) if sum(map(abs, v)) == k)
        assert shell_size(dim, k) == brute
    assert shell_size(2, 2) == 8  # (+-2, 0), (0, +-2), (+-1, +-1)


def test_penalty_formula_and_monotonicity():
    # one base, k = 0, S = 1: sqrt((ln 2 + ln(2 / 0.05)) / (2 * 50))
    assert srm_penalty(50, dim=1, complexity=0, n_bases=1, delta=0.05) == pytest.approx(
        math.sqrt((math.log(2) + math.log(40)) / 100))
    # two bases, U = 2, k = 2: ln 2 + ln 12 + ln 8 + ln 40, range 0.5
    assert srm_penalty(10, 2, 2, n_bases=2, delta=0.05, value_range=0.5) == pytest.approx(
        0.5 * math.sqrt((math.log(2) + math.log(12) + math.log(8) + math.log(40)) / 20))
    assert srm_penalty(64, 6, 3) > srm_penalty(64, 6, 2) > srm_penalty(64, 6, 0)
    assert srm_penalty(16, 6, 2) > srm_penalty(64, 6, 2) > srm_penalty(256, 6, 2)
    assert srm_penalty(64, 6, 2) / srm_penalty(256, 6, 2) == pytest.approx(2.0)


def test_bernstein_penalty_formula():
    d = [0.1, -0.1, 0.3, 0.1]  # mean 0.1, squared deviations 0, 0.04, 0.04, 0: V_n = 0.08 / 3
    # one base, U = 2, k = 1: S = 4, k (k+1) = 2; L = ln(2 / 0.05) + ln 2 + ln 4
    log_terms = math.log(40) + math.log(2) + math.log(4)
    assert bernstein_penalty(d, dim=2, complexity=1) == pytest.approx(math.sqrt(2 * (0.08 / 3) * log_terms / 4))
    # two bases, U = 2, k = 2: S = 8, k (k+1) = 6
    assert bernstein_penalty(d, 2, 2, n_bases=2, delta=0.1) == pytest.approx(
        math.sqrt(2 * (0.08 / 3) * (math.log(20) + math.log(2) + math.log(6) + math.log(8)) / 4))
    assert bernstein_penalty(d, 2, 0) == 0.0  # a base needs no bound
    assert bernstein_penalty([0.2] * 8, 2, 3) == 0.0  # the same shift on every sample: no variance
    assert bernstein_penalty(d, 2, 3) > bernstein_penalty(d, 2, 2)  # grows with the complexity
    assert bernstein_penalty([2 * v for v in d], 2, 2) == pytest.approx(2 * bernstein_penalty(d, 2, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        bernstein_penalty([0.1], 2, 1)


# ---- policies and the budget ----

def test_components_by_tower_group_and_block():
    groups = groups_of([10] * 5, ["vision"] * 3 + ["text"] * 2)
    assert components(groups, "tower") == (["vision", "text"], [0, 0, 0, 1, 1])
    assert components(groups, "group")[1] == [0, 1, 2, 3, 4]
    names, member = components(groups, 2)
    assert names == ["vision[0:2]", "vision[2:4]", "text[0:2]"] and member == [0, 0, 1, 2, 2]
    with pytest.raises(ValueError, match="granularity"):
        components(groups, 0)


def test_every_policy_meets_the_budget_exactly_within_the_box():
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 9)
        groups = groups_of([rng.choice([rng.randint(1, 40), rng.randint(100, 10**6)]) for _ in range(n)],
                           [rng.choice(["vision", "text"]) for _ in range(n)], [rng.random() for _ in range(n)])
        target = rng.choice([0.0, 0.3, 0.5, 0.6, 0.7])
        s_max = min(target + rng.choice([0.05, 0.1, 0.3]), 0.95)
        space = PolicySpace(groups, target, rng.choice(["tower", "group", 2]), ("uniform", "ecoflap"),
                            step=rng.choice([0.025, 0.1]), s_max=s_max)
        for _ in range(5):
            policy = Policy(rng.choice(["uniform", "ecoflap"]), tuple(rng.randint(-8, 8) for _ in range(space.dim)))
            sparsity = space.sparsity(policy)
            assert space.kept_total(sparsity) == space.budget == round((1 - Fraction(str(target))) * sum(g.n_params for g in groups))
            assert all(0.0 <= p <= s_max + 1e-12 for p in sparsity.values())


def test_zero_offsets_give_the_base_allocations():
    groups = groups_of([1000, 3000, 500, 2500], ["vision", "vision", "text", "text"], [0.1, 2.0, 0.5, 1.0])
    space = PolicySpace(groups, 0.5, "group", ("uniform", "ecoflap"), s_max=0.6)
    kept = ecoflap_kept(groups, 0.5, 0.6)
    sparsity = space.sparsity(Policy("ecoflap", (0, 0, 0, 0)))
    assert {g.name: g.n_params - round(g.n_params * sparsity[g.name]) for g in groups} == kept
    assert all(p == 0.5 for p in space.sparsity(Policy("uniform", (0, 0, 0, 0))).values())


def test_offsets_move_sparsity_between_components_by_whole_steps():
    groups = groups_of([1000, 1000, 1000, 1000], ["vision", "vision", "text", "text"])
    space = PolicySpace(groups, 0.5, "tower", ("uniform",), step=0.05, s_max=0.9)
    p = space.sparsity(Policy("uniform", (2, -2)))
    assert p["vision.0"] == p["vision.1"] == pytest.approx(0.6)  # 0.5 + 2 * 0.05 + lam, lam = 0 by symmetry
    assert p["text.2"] == p["text.3"] == pytest.approx(0.4)
    assert space.sparsity(Policy("uniform", (3, -1))) == p  # a common shift is absorbed by the budget


# ---- the evolutionary loop on synthetic objectives (exact, hand-checkable) ----

def far_better_objective(space):
    """Objective rising linearly as vision gets sparser than text: the best policies are far from the bases."""
    def evaluate_many(policies):
        return [0.5 + 0.1 * (p["vision.0"] - p["text.2"]) for p in policies]
    return evaluate_many


def two_tower_space():
    groups = groups_of([1000, 1000, 1000, 1000], ["vision", "vision", "text", "text"])
    return PolicySpace(groups, 0.5, "tower", ("uniform",), step=0.05, s_max=0.9)


def test_penalty_changes_the_choice_when_samples_are_few():
    space = two_tower_space()
    config = SearchConfig(rounds=4, population=6, max_evaluations=24, seed=0)
    off = evolve(space, far_better_objective(space), 16, SearchConfig(**{**config.__dict__, "penalty": False}),
                 progress=False).best
    few = evolve(space, far_better_objective(space), 16, config, progress=False).best
    many = evolve(space, far_better_objective(space), 10**9, config, progress=False).best
    assert off.policy.complexity > 0 and off.objective > 0.5
    # 16 samples: a gain of at most 0.1 * 0.8 never pays for the bound's growth, so the base is kept
    assert few.policy == Policy("uniform", (0, 0)) and few.sparsity != off.sparsity
    assert few.penalty == pytest.approx(srm_penalty(16, 2, 0, 1, 0.05))
    # with a huge sample the penalty is negligible and the choice is the unpenalised one
    assert many.sparsity == off.sparsity


def test_penalty_weight_scales_the_bound_and_trades_it_against_the_objective():
    space = two_tower_space()
    config = SearchConfig(rounds=4, population=6, max_evaluations=24, seed=0)
    runs = {w: evolve(space, far_better_objective(space), 16, SearchConfig(**{**config.__dict__, "penalty": w}),
                      progress=False) for w in (1.0, 0.01, 0.0)}
    for w, run in runs.items():
        for c in run.candidates:  # lambda x the bound, for every candidate
            assert c.penalty == pytest.approx(w * srm_penalty(16, 2, c.policy.complexity, 1, 0.05))
            assert c.score == pytest.approx(c.objective - c.penalty)
        assert run.best.score == max(c.score for c in run.candidates)
    # 4 steps gain 0.1 * 0.2 = 0.02 of objective; the bound grows by 0.185 from k = 0 to k = 4 at n = 16
    # (0.370 -> 0.555): lambda = 1 keeps the base, lambda = 0.01 (0.002 of penalty) moves away from it
    assert runs[1.0].best.policy.complexity == 0
    assert runs[0.01].best.policy.complexity > 0 and runs[0.01].best.objective > runs[1.0].best.objective
    assert runs[0.0].best.penalty == 0.0
    assert srm_penalty(16, 2, 4, 1, 0.05) - srm_penalty(16, 2, 0, 1, 0.05) == pytest.approx(0.185, abs=1e-3)
    with pytest.raises(ValueError, match="penalty"):
        evolve(space, far_better_objective(space), 16, SearchConfig(penalty=-0.5), progress=False)


def swinging_objective(space, n=64):
    """Per-sample values: the base scores 0.5 +- 0.3 (easy and hard samples alternate, for every policy
    alike). A policy's mean gain grows with how much sparser vision is than text (x, in steps), but from
    x = 3 on it comes from large swings (+-0.4 on alternate samples); below that the gain is the same
    on every sample."""
    base = space.sparsity(Policy("uniform", (0, 0)))

    def evaluate_many(policies):
        out = []
        for p in policies:
            x = round((p["vision.0"] - base["vision.0"] - (p["text.2"] - base["text.2"])) / space.step)
            gain = 0.01 * x if x < 3 else 0.012 * x
            swing = 0.4 if x >= 3 else 0.0
            out.append([0.5 + (0.3 if i % 4 < 2 else -0.3) + gain + (swing if i % 2 else -swing) for i in range(n)])
        return out
    return evaluate_many


def test_bernstein_penalty_passes_over_gains_made_of_swings():
    space = two_tower_space()
    config = SearchConfig(rounds=6, population=6, max_evaluations=36, seed=0, bound="bernstein")
    off = evolve(space, swinging_objective(space), 64, SearchConfig(**{**config.__dict__, "penalty": 0.0}),
                 progress=False).best
    on = evolve(space, swinging_objective(space), 64, config, progress=False)
    assert off.objective > 0.5 + 0.012 * 3  # unpenalised: the largest mean, made of swings
    # the Bernstein penalty charges the swings (sqrt(2 * 0.16 * 64/63 * L / 64) > 0.1 for L > 5) and not
    # the steady gains (their differences from the base have V = 0, though their values vary as much as
    # the base's): it picks the best steady policy, x = 2, a gain of 0.02 on every sample
    assert on.best.objective == pytest.approx(0.52) and on.best.penalty == pytest.approx(0.0, abs=1e-9)
    evaluate = swinging_objective(space)
    base_values = evaluate([space.sparsity(Policy("uniform", (0, 0)))])[0]
    for c in on.candidates:  # each candidate's penalty, from its own values minus its base's
        values = evaluate([c.sparsity])[0]
        assert c.penalty == pytest.approx(bernstein_penalty([v - b for v, b in zip(values, base_values)], 2,
                                                            c.policy.complexity, 1, 0.05))
    # the same swings over 100 times the samples: the penalty shrinks 10x and the swinging gains win
    many = evolve(space, swinging_objective(space, n=6400), 6400, config, progress=False).best
    assert many.objective > 0.5 + 0.012 * 3 and many.sparsity != on.best.sparsity
    hoeffding = evolve(space, swinging_objective(space), 64, SearchConfig(**{**config.__dict__, "bound": "hoeffding",
                                                                            "penalty": 0.05}), progress=False)
    assert hoeffding.best.objective > 0.5 + 0.012 * 3  # the range-only bound cannot tell swings from steady gains


def test_bernstein_penalty_needs_per_sample_values_and_every_base():
    space = two_tower_space()
    with pytest.raises(ValueError, match="per-sample values"):
        evolve(space, far_better_objective(space), 64, SearchConfig(bound="bernstein"), progress=False)
    two_bases = PolicySpace(groups_of([1000] * 4, ["vision", "vision", "text", "text"]), 0.5, "tower",
                            ("uniform", "ecoflap"), step=0.05, s_max=0.9)
    with pytest.raises(ValueError, match="population and max_evaluations must be >= 2"):
        evolve(two_bases, swinging_objective(two_bases), 64, SearchConfig(population=1, bound="bernstein"),
               progress=False)
    with pytest.raises(ValueError, match="unknown bound 'chernoff'; known: hoeffding, bernstein"):
        evolve(space, far_better_objective(space), 64, SearchConfig(bound="chernoff"), progress=False)


def test_every_candidate_meets_the_budget_and_same_seed_same_search():
    groups = groups_of([1200, 800, 400, 2000, 1600], ["vision"] * 3 + ["text"] * 2, [0.3, 1.0, 2.0, 0.1, 0.5])
    space = PolicySpace(groups, 0.6, "group", ("uniform", "ecoflap"), s_max=0.8)

    def noisy(policies):  # deterministic in the policy, rugged
        return [math.sin(sum(i * v for i, v in enumerate(p.values(), 1)) * 37.0) for p in policies]

    runs = [evolve(space, noisy, 64, SearchConfig(rounds=4, population=5, max_evaluations=18, seed=s),
                   progress=False) for s in (3, 3, 4)]
    for run in runs:
        assert len(run.candidates) == 18 and run.stopped == "evaluations"
        assert all(space.kept_total(c.sparsity) == space.budget for c in run.candidates)
        assert len({tuple(c.sparsity.values()) for c in run.candidates}) == 18  # never evaluated twice
    same = [[(c.policy, c.objective) for c in run.candidates] for run in runs]
    assert same[0] == same[1] and runs[0].best.policy == runs[1].best.policy
    assert same[0] != same[2]


def test_wall_time_budget_stops_between_rounds():
    space = two_tower_space()
    result = evolve(space, far_better_objective(space), 64, SearchConfig(rounds=50, population=2,
                    max_evaluations=100, max_seconds=1e-9), progress=False)
    assert result.stopped == "wall time" and len(result.candidates) == 2  # round 0 always runs


# ---- a tiny model with known sensitive blocks ----

class ResidualMLP(nn.Module):
    """x -> x + scale_b * W_b x for each block b: pruning W_b moves the output in proportion to scale_b."""

    def __init__(self, scales, width=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in scales)
        self.scales = list(scales)

    def forward(self, x):
        for scale, block in zip(self.scales, self.blocks):
            x = x + scale * block(x)
        return x


def test_search_spares_the_sensitive_blocks():
    model = ResidualMLP([3.0, 0.05, 3.0, 0.05]).eval()
    towers = [Tower("main", [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)], lambda m, b: m(b["x"]))]
    groups = model_layout(model, towers)
    calibration = [{"x": torch.randn(64, 32, generator=torch.Generator().manual_seed(1))}]
    search_x = torch.randn(128, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense_out = model(search_x)
    worker = CandidatePruner(model, towers, groups, calibration, PRUNERS.get("wanda")(), None)
    dense_weights = {n: w.clone() for n, w in worker.dense.items()}

    def evaluate_many(policies):
        out = []
        for sparsity in policies:
            worker.prune({f"{g}": p for g, p in sparsity.items()})
            with torch.no_grad():
                out.append(-float(((model(search_x) - dense_out) ** 2).mean()))
            worker.restore()
        return out

    infos = [GroupInfo(g.name, g.tower, g.n_params) for g in groups]
    space = PolicySpace(infos, 0.5, "group", ("uniform",), step=0.05, s_max=0.9)
    result = evolve(space, evaluate_many, 128, SearchConfig(rounds=5, population=6, max_evaluations=30,
                                                            penalty=False, seed=0), progress=False)
    best = result.best.sparsity
    assert best["blocks.0"] < 0.5 and best["blocks.2"] < 0.5  # the sensitive blocks: less sparse than uniform
    assert best["blocks.1"] > 0.5 and best["blocks.3"] > 0.5
    uniform = next(c for c in result.candidates if c.policy == Policy("uniform", (0, 0, 0, 0)))
    assert result.best.objective > uniform.objective
    assert all(torch.equal(layer.weight, dense_weights[n]) for n, layer in worker.layers.items())  # restored


# ---- the stage on the tiny dual encoder ----

@pytest.fixture(scope="module")
def search_run(tiny_dual_encoder_dir, tmp_path_factory):
    from flows.pipeline import TASKS

    artifacts = tmp_path_factory.mktemp("search") / "artifacts"
    search = {"n_samples": 16, "rounds": 2, "population": 3, "max_evaluations": 4, "granularity": "tower",
              "bases": ["uniform"], "batch_size": 16}
    params = tiny_params(tiny_dual_encoder_dir, artifacts, allocation={"method": "search", "search": search},
                         pruning={"method": "wanda", "sparsity": 0.5})
    for stage in ("prepare", "calibrate", "score", "allocate"):
        TASKS[stage].fn(params)
    return params, artifacts


def test_search_stage_writes_allocation_and_candidates(search_run):
    from flows.pipeline import TASKS

    params, artifacts = search_run
    allocation = json.loads((artifacts / "allocate" / "allocation.json").read_text())
    scores = json.loads((artifacts / "score" / "scores.json").read_text())
    assert allocation["method"] == "search" and allocation["overall"] == pytest.approx(0.5, abs=1e-4)
    assert set(allocation["layers"]) == {layer for g in scores["groups"] for layer in g["layers"]}
    assert allocation["search"]["evaluations"] == 4
    assert (allocation["search"]["bound"], allocation["search"]["weight"]) == ("hoeffding", 1.0)
    with open(artifacts / "allocate" / "candidates.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and sum(int(r["chosen"]) for r in rows) == 1
    assert all(0.0 <= float(r["objective"]) <= 1.0 and float(r["penalty"]) > 0 for r in rows)
    chosen = next(r for r in rows if r["chosen"] == "1")
    assert float(chosen["score"]) == max(float(r["score"]) for r in rows)
    assert (artifacts / "allocate" / "candidates.png").read_bytes()[:4] == b"\x89PNG"
    TASKS["prune"].fn(params)  # the prune stage reads the search's allocation unchanged
    report = json.loads((artifacts / "prune" / "sparsity.json").read_text())
    assert report["overall"] == pytest.approx(0.5, abs=0.02)


def test_search_stage_same_seed_same_policy(search_run):
    from tasks.search import run_search

    params, artifacts = search_run
    scores = json.loads((artifacts / "score" / "scores.json").read_text())
    groups = [GroupInfo(g["name"], g["tower"], g["n_params"]) for g in scores["groups"]]
    layers = {g["name"]: list(g["layers"]) for g in scores["groups"]}
    again, _ = run_search(params, groups, layers, progress=False)  # a fresh model load, same seeds
    with open(artifacts / "allocate" / "candidates.csv") as f:
        first = [(r["base"], r["offsets"], float(r["objective"])) for r in csv.DictReader(f)]
    assert [(c.policy.base, " ".join(map(str, c.policy.q)), c.objective) for c in again.candidates] == first
    recorded = json.loads((artifacts / "allocate" / "allocation.json").read_text())
    assert again.best.sparsity == recorded["groups"]


def test_search_stage_bernstein_bound_reads_per_sample_values(search_run, tiny_dual_encoder_dir):
    from tasks.search import SearchEvaluator, run_search

    params, artifacts = search_run
    search = {**params.allocation.search.model_dump(), "bound": "bernstein", "penalty": 0.5}
    bernstein = tiny_params(tiny_dual_encoder_dir, artifacts, allocation={"method": "search", "search": search},
                            pruning={"method": "wanda", "sparsity": 0.5})
    scores = json.loads((artifacts / "score" / "scores.json").read_text())
    groups = [GroupInfo(g["name"], g["tower"], g["n_params"]) for g in scores["groups"]]
    layers = {g["name"]: list(g["layers"]) for g in scores["groups"]}
    result, space = run_search(bernstein, groups, layers, progress=False)
    evaluator = SearchEvaluator(bernstein, layers)
    base = evaluator.evaluate(space.sparsity(Policy("uniform", (0,) * space.dim)))
    assert base.shape == (16,)  # one value per search sample
    for c in result.candidates:
        expected = 0.5 * bernstein_penalty(evaluator.evaluate(c.sparsity) - base, space.dim, c.policy.complexity)
        assert c.penalty == pytest.approx(expected) and c.objective == pytest.approx(float(
            evaluator.evaluate(c.sparsity).mean()))
    assert any(c.penalty > 0 for c in result.candidates)


def test_bernstein_bound_refuses_a_loss_without_per_sample_terms(search_run, tiny_dual_encoder_dir):
    from tasks.search import SearchEvaluator
    from vlmprune.errors import ModelError

    params, artifacts = search_run
    search = {**params.allocation.search.model_dump(), "bound": "bernstein", "objective": "loss"}
    contrastive = tiny_params(tiny_dual_encoder_dir, artifacts, allocation={"method": "search", "search": search})
    with pytest.raises(ModelError, match="allocation.search.bound 'bernstein' .* dual_encoder family's loss"):
        SearchEvaluator(contrastive, {})


def test_search_stage_bernstein_bound_on_a_language_models_loss(tmp_path):
    """Image-to-text (the LLaVA-style model): the loss objective gives one value per search sample, each
    sample's own answer loss, so the bernstein bound runs on it."""
    from flows.pipeline import TASKS
    from tasks.search import SearchEvaluator, run_search
    from tests.tiny import build_tiny_vision_lm, family_params
    from vlmprune.adapters.base import LoadedModel
    from vlmprune.adapters.causal_lm import lm_loss
    from vlmprune.adapters.vision_lm import VisionLMAdapter

    model, tokenizer = build_tiny_vision_lm()
    VisionLMAdapter().save(LoadedModel(model, tokenizer), tmp_path / "vlm")
    search = {"n_samples": 8, "rounds": 2, "population": 3, "max_evaluations": 5, "granularity": "tower",
              "bases": ["uniform"], "batch_size": 3, "objective": "loss", "bound": "bernstein", "penalty": 0.5}
    params = family_params(tmp_path / "vlm", tmp_path / "art", {"name": "digits"},
                           allocation={"method": "search", "search": search})
    for stage in ("calibrate", "score"):
        TASKS[stage].fn(params)
    scores = json.loads((tmp_path / "art" / "score" / "scores.json").read_text())
    groups = [GroupInfo(g["name"], g["tower"], g["n_params"]) for g in scores["groups"]]
    layers = {g["name"]: list(g["layers"]) for g in scores["groups"]}
    result, space = run_search(params, groups, layers, progress=False)
    evaluator = SearchEvaluator(params, layers)
    dense = evaluator.values(model)
    samples = VisionLMAdapter().make_calibration(LoadedModel(model, tokenizer), data_spec(params), 8,
                                                  params.allocation.search.sample_seed)
    with torch.no_grad():  # minus each sample's own answer loss, in order
        expected = -lm_loss(VisionLMAdapter.run_full(model, samples).logits, samples["labels"], reduction="sample")
    assert dense.shape == (8,) and dense == pytest.approx(expected.double().numpy(), rel=1e-5)
    assert evaluator.value_range == pytest.approx(-dense.mean())
    base = evaluator.evaluate(space.sparsity(Policy("uniform", (0,) * space.dim)))
    for c in result.candidates:
        values = evaluator.evaluate(c.sparsity)
        assert c.penalty == pytest.approx(0.5 * bernstein_penalty(values - base, space.dim, c.policy.complexity))
        assert c.objective == pytest.approx(float(values.mean()))
    assert any(c.penalty > 0 for c in result.candidates)


def test_search_params_say_what_is_missing(tiny_dual_encoder_dir, tmp_path):
    from params.schema import ParamsError

    with pytest.raises(ParamsError, match="needs scores"):
        tiny_params(tiny_dual_encoder_dir, tmp_path, allocation={"method": "search"})
    with pytest.raises(ParamsError, match="sample_seed"):
        tiny_params(tiny_dual_encoder_dir, tmp_path,
                    allocation={"method": "search", "search": {"bases": ["uniform"], "sample_seed": 0}})
    with pytest.raises(ParamsError, match="allocation.search.penalty"):
        tiny_params(tiny_dual_encoder_dir, tmp_path,
                    allocation={"method": "search", "search": {"bases": ["uniform"], "penalty": -1}})
    on = tiny_params(tiny_dual_encoder_dir, tmp_path, allocation={"method": "search", "search": {"bases": ["uniform"],
                                                                                                "penalty": True}})
    assert on.allocation.search.penalty == 1.0  # the old boolean form still reads
    with pytest.raises(ParamsError, match="unstructured"):
        tiny_params(tiny_dual_encoder_dir, tmp_path, pruning={"pattern": "2:4"},
                    allocation={"method": "search", "search": {"bases": ["uniform"]}})
    with pytest.raises(ParamsError, match="population and max_evaluations must be >= 2"):
        tiny_params(tiny_dual_encoder_dir, tmp_path, scoring={"method": "zeroth_order"}, allocation={
            "method": "search", "search": {"bound": "bernstein", "population": 1}})
    with pytest.raises(ParamsError, match="allocation.search.bound"):
        tiny_params(tiny_dual_encoder_dir, tmp_path, allocation={"method": "search", "search": {
            "bases": ["uniform"], "bound": "chernoff"}})


def test_candidates_fan_out_as_prefect_tasks_inside_a_flow(prefect_harness):
    from prefect import flow
    from prefect.context import TaskRunContext

    from tasks.search import SearchEvaluator

    class Recorder:
        def __init__(self):
            self.in_task = []

        def evaluate(self, sparsity):
            self.in_task.append(TaskRunContext.get() is not None)
            return sparsity["g"] * 2

    policies = [{"g": v} for v in (0.1, 0.2, 0.3, 0.4)]

    @flow
    def fan_out(recorder):
        return SearchEvaluator.evaluate_many(recorder, policies)

    inside, outside = Recorder(), Recorder()
    assert fan_out(inside) == [0.2, 0.4, 0.6, 0.8]  # one task per candidate, results in order
    assert inside.in_task == [True] * 4
    assert SearchEvaluator.evaluate_many(outside, policies) == [0.2, 0.4, 0.6, 0.8] and outside.in_task == [False] * 4


def test_accuracy_hook_agrees_with_the_zero_shot_evaluator(search_run):
    import torch.nn.functional as F

    from tasks.io import data_spec, load_model
    from vlmprune.data.images import image_split
    from vlmprune.evaluators.zero_shot import class_embeddings, zero_shot_accuracy
    from vlmprune.search.objective import ACCURACY_HOOKS

    params, _ = search_run
    adapter, loaded = load_model(params)
    spec = data_spec(params)
    samples = adapter.make_calibration(loaded, spec, 24, seed=5)
    values = ACCURACY_HOOKS["dual_encoder"](loaded, spec, samples, 8, "cpu")(loaded.model)
    correct, probability = values["accuracy"], values["probability"]
    data, _, _ = image_split(spec)
    model = loaded.model
    classes = class_embeddings(model.encode_text, loaded.processor, data.class_names, data.train_templates)
    with torch.no_grad():
        images = F.normalize(model.encode_image(samples["pixel_values"]), dim=-1)
    assert correct.shape == (24,) and set(correct.tolist()) <= {0.0, 1.0}
    assert float(correct.mean()) == pytest.approx(zero_shot_accuracy(images, classes, samples["labels"].numpy()))
    assert torch.all((probability > 0) & (probability < 1))
    assert torch.all(correct[probability > 0.5] == 1)  # a class with more than half the mass is the argmax
    assert torch.all(probability[correct == 0] < 0.5 + 1e-6)
