"""Evolutionary search over pruning policies (EfficientLLaVA-style, METHODS.md section 5).

Round 0 evaluates every base allocation as it is (uniform, ECoFLaP: offsets 0) and random
policies around them (offsets drawn uniformly in [-radius, radius] grid steps). Each later round
keeps the ``elite`` best policies by score and breeds ``population`` new ones from them: uniform
crossover of two elites (with probability ``crossover``) and a Gaussian mutation of the offsets
whose standard deviation shrinks by ``shrink`` each round, so the search space narrows and moves
around the best policies found so far. A policy is never evaluated twice (nor two policies giving
the same group budgets).

    score(h) = objective(h) - lambda * bound(h)     bound: an SRM penalty of vlmprune.search.srm

``SearchConfig.bound`` picks the penalty: ``hoeffding`` (the SRM bound for a range R, the same for
every policy of a complexity) or ``bernstein`` (the variance term of the empirical Bernstein bound
on each policy's per-sample differences from its base: it needs per-sample objective values).

``lambda`` is ``SearchConfig.penalty``: 1 subtracts the bound itself, so the search maximises a lower
bound on the true objective that holds with probability 1 - delta (a guarantee); 0 turns the penalty
off. A value in between keeps the bound's shape (it grows with the policy's complexity and shrinks
as 1 / sqrt(n)) but is no longer a bound: it is the usual regularised form of structural risk
minimization, a trade-off weight the guarantee does not choose. At the sample counts the search is
meant for (tens) the bound itself is wider than the accuracy differences between nearby policies,
so with lambda = 1 the search keeps its base (``benchmarks/results/search_penalty_weight.md``).

Candidates are evaluated batch by batch through ``evaluate_many(list of {group: sparsity}) ->
list of values`` (higher is better), so the caller decides how to fan them out. A policy's values are
its per-sample objective values (a 1-D array; its objective is their mean) or its objective alone (a
number: the Hoeffding bound needs no more). The search
stops after ``rounds`` rounds, at ``max_evaluations`` evaluations, or once ``max_seconds`` have
passed (checked between rounds; round 0 always runs). Randomness comes from one ``numpy.random.Generator`` seeded with
``seed``: the same seed and the same objectives give the same policy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from vlmprune.search.policy import Policy, PolicySpace
from vlmprune.search.srm import bernstein_penalty, srm_penalty

BOUNDS = ("hoeffding", "bernstein")


@dataclass(frozen=True)
class SearchConfig:
    rounds: int = 6
    population: int = 8
    max_evaluations: int = 40
    max_seconds: float | None = None
    elite: int = 3
    radius: int = 4
    mutation: float = 2.0
    shrink: float = 0.7
    crossover: float = 0.5
    penalty: float = 1.0  # lambda: the weight of the SRM bound (1: the bound itself, 0: off)
    delta: float = 0.05
    bound: str = "hoeffding"  # the SRM penalty: hoeffding (range only) or bernstein (per-sample variance)
    seed: int = 0


@dataclass
class Candidate:
    index: int
    round: int
    policy: Policy
    sparsity: dict[str, float]
    objective: float
    penalty: float
    score: float


@dataclass
class SearchResult:
    best: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    stopped: str = "rounds"
    seconds: float = 0.0


def _canonical(space: PolicySpace, policy: Policy) -> Policy:
    """Offsets shifted by an integer median when that gives the same budgets (the shift is absorbed
    by the projection): the same model, at the lowest complexity of the two representations."""
    q = np.asarray(policy.q)
    shifted = Policy(policy.base, tuple(int(v) for v in q - int(np.round(np.median(q)))))
    if shifted.complexity < policy.complexity and space.sparsity(shifted) == space.sparsity(policy):
        return shifted
    return policy


def _key(space: PolicySpace, sparsity: dict[str, float]) -> tuple:
    return tuple(round(g.n_params * sparsity[g.name]) for g in space.groups)


def evolve(space: PolicySpace, evaluate_many: Callable[[list[dict[str, float]]], list], n_samples: int,
           config: SearchConfig = SearchConfig(), value_range: float = 1.0, progress: bool = True,
           on_candidate: Callable[[Candidate], None] | None = None) -> SearchResult:
    """Search policies of ``space`` maximising objective - lambda * SRM penalty; returns every candidate and the best.

    ``n_samples``: how many samples each policy's objective averages over (the penalty's n);
    ``value_range``: the width R of the interval the per-sample objective lies in (1 for accuracy).
    """
    if config.population < 1 or config.rounds < 1 or config.max_evaluations < 1 or config.elite < 1:
        raise ValueError(f"population, rounds, max_evaluations and elite must be >= 1, got {config}")
    if config.penalty < 0:
        raise ValueError(f"penalty (the weight of the SRM bound) must be >= 0, got {config.penalty}")
    if config.bound not in BOUNDS:
        raise ValueError(f"unknown bound {config.bound!r}; known: {', '.join(BOUNDS)}")
    if config.bound == "bernstein" and min(config.population, config.max_evaluations) < len(space.bases):
        raise ValueError(f"the bernstein bound compares every policy with its base, so round 0 must evaluate all "
                         f"{len(space.bases)} bases: population and max_evaluations must be >= {len(space.bases)}")
    rng = np.random.default_rng(config.seed)
    start = time.perf_counter()
    bases = list(space.bases)
    seen: set[tuple] = set()
    candidates: list[Candidate] = []
    stopped = "rounds"

    base_keys = {base: _key(space, space.sparsity(Policy(base, (0,) * space.dim))) for base in bases}
    values_of: dict[tuple, np.ndarray] = {}  # a base's budgets key -> its per-sample values (bernstein bound)

    def penalty(policy: Policy, values: np.ndarray) -> float:
        if config.penalty == 0:
            return 0.0
        if config.bound == "hoeffding":
            return config.penalty * srm_penalty(n_samples, space.dim, policy.complexity, len(bases), config.delta,
                                                value_range)
        if len(values) != n_samples:
            raise ValueError(f"the bernstein bound needs the {n_samples} per-sample values of each policy; "
                             f"evaluate_many returned {len(values)}")
        base = values_of[base_keys[policy.base]]
        return config.penalty * bernstein_penalty(values - base, space.dim, policy.complexity, len(bases),
                                                  config.delta)

    def admit(policy: Policy, batch: list) -> bool:
        policy = _canonical(space, policy)
        sparsity = space.sparsity(policy)
        key = _key(space, sparsity)
        if key in seen:
            return False
        seen.add(key)
        batch.append((policy, sparsity))
        return True

    def breed(parents: list[Candidate], scale: float) -> Policy:
        a = parents[rng.integers(len(parents))]
        q = np.asarray(a.policy.q)
        if len(parents) > 1 and rng.random() < config.crossover:
            b = parents[rng.integers(len(parents))]
            q = np.where(rng.random(space.dim) < 0.5, q, np.asarray(b.policy.q))
        step = np.round(rng.normal(0.0, scale, space.dim)).astype(int)
        if not step.any():
            step[rng.integers(space.dim)] = rng.choice([-1, 1])
        return Policy(a.policy.base, tuple(int(v) for v in q + step))

    bar = tqdm(total=config.max_evaluations, desc="policy search", disable=not progress, leave=False)
    try:
        for round_ in range(config.rounds):
            if round_ > 0 and config.max_seconds is not None and time.perf_counter() - start > config.max_seconds:
                stopped = "wall time"
                break
            room = config.max_evaluations - len(candidates)
            if room <= 0:
                stopped = "evaluations"
                break
            want = min(config.population, room)
            batch: list[tuple[Policy, dict]] = []
            if round_ == 0:
                for base in bases:
                    if len(batch) < want:
                        admit(Policy(base, (0,) * space.dim), batch)
            parents = sorted(candidates, key=lambda c: (-c.score, c.policy.complexity, c.index))[:config.elite]
            scale = config.mutation * config.shrink ** max(round_ - 1, 0)
            tries = 0
            while len(batch) < want and tries < 50 * want:
                tries += 1
                if round_ == 0:
                    q = rng.integers(-config.radius, config.radius + 1, size=space.dim)
                    policy = Policy(bases[rng.integers(len(bases))], tuple(int(v) for v in q))
                else:
                    policy = breed(parents, scale)
                admit(policy, batch)
            if not batch:
                stopped = "search space exhausted"
                break
            objectives = evaluate_many([s for _, s in batch])
            if len(objectives) != len(batch):
                raise RuntimeError(f"evaluate_many returned {len(objectives)} objectives for {len(batch)} policies")
            for (policy, sparsity), value in zip(batch, objectives):
                values = np.atleast_1d(np.asarray(value, dtype=float))
                if policy.complexity == 0:
                    values_of[_key(space, sparsity)] = values
                objective, pen = float(values.mean()), penalty(policy, values)
                c = Candidate(len(candidates), round_, policy, sparsity, objective, pen, objective - pen)
                candidates.append(c)
                if on_candidate is not None:
                    on_candidate(c)
            bar.update(len(batch))
        else:
            stopped = "rounds"
        if stopped == "rounds" and len(candidates) >= config.max_evaluations:
            stopped = "evaluations"
    finally:
        bar.close()
    best = min(candidates, key=lambda c: (-c.score, c.policy.complexity, c.index))
    return SearchResult(best, candidates, stopped, time.perf_counter() - start)
