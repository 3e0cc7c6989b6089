"""The policy search behind ``allocation.method: search`` (library: :mod:`vlmprune.search`).

One model is loaded with its cached calibration batches and the search samples (drawn from the
training split with ``allocation.search.sample_seed``; the held-out split is never read). Every
candidate policy is pruned from the dense weights with the configured pruner and scored on the
search samples, then the dense weights are restored.

Fan-out: inside a Prefect flow run (``vlmprune run``, or a stage with ``--prefect on``) every
candidate of a round is submitted as its own ``search-candidate`` task on the flow's task runner
(Prefect's default thread pool); ``allocation.search.workers`` model copies serve them, so at most
that many prune at once (default 1: on a small CPU machine parallel candidates only compete for
the same cores). Outside a flow (``vlmprune stage allocate`` without a Prefect server, or a
task's ``.fn``) the candidates are evaluated in turn by plain calls.
"""

from __future__ import annotations

import copy
import csv
import queue
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from params import RunParams
from tasks.common import calibration_batches
from tasks.io import data_spec, load_model, require_in_memory, resolve_device
from tasks.prune import make_pruner
from vlmprune.adapters import has_sample_losses
from vlmprune.allocators import GroupInfo
from vlmprune.errors import ModelError
from vlmprune.search import (
    CandidatePruner,
    PolicySpace,
    SearchConfig,
    SearchResult,
    evolve,
    make_objective,
)
from vlmprune.sparsity import model_layout


class SearchEvaluator:
    """Prunes and scores candidate group sparsities on a pool of model copies."""

    def __init__(self, params: RunParams, layers: dict[str, list[str]]):
        s, p = params.allocation.search, params.pruning
        device = resolve_device(params.model.device)
        require_in_memory(params, "allocation.method: search")
        adapter, loaded = load_model(params)
        if s.bound == "bernstein" and s.objective == "loss" and not has_sample_losses(adapter):
            raise ModelError(f"allocation.search.bound 'bernstein' needs per-sample objective values, and the "
                             f"{adapter.family} family's loss has none (each sample's term depends on its batch): set "
                             f"allocation.search.objective to accuracy or probability, or bound to hoeffding")
        batches = calibration_batches(params, params.calibration.batch_size, limit=s.calibration_samples)
        samples = adapter.make_calibration(loaded, data_spec(params), s.n_samples, s.sample_seed)
        self.values, self.value_range = make_objective(adapter, loaded, data_spec(params), samples, s.objective,
                                                          s.batch_size, device)
        self.layers = layers
        self.pool: queue.Queue[CandidatePruner] = queue.Queue()
        for i in range(s.workers):
            model = loaded.model if i == 0 else copy.deepcopy(loaded.model)
            towers = adapter.towers(model)
            groups = model_layout(model, towers, p.include, p.exclude, p.towers)
            self.pool.put(CandidatePruner(model, towers, groups, batches, make_pruner(params), p.nm))

    def evaluate(self, group_sparsity: dict[str, float]) -> np.ndarray:
        """The candidate's per-sample objective values on the search samples (see ``make_objective``)."""
        layer_sparsity = {layer: group_sparsity[g] for g, names in self.layers.items() for layer in names}
        worker = self.pool.get()
        try:
            worker.prune(layer_sparsity)
            return self.values(worker.model)
        finally:
            worker.restore()
            self.pool.put(worker)

    def evaluate_many(self, policies: list[dict[str, float]]) -> list[np.ndarray]:
        if FlowRunContext.get() is None:
            return [self.evaluate(p) for p in policies]
        futures = [evaluate_candidate.submit(self, p) for p in policies]
        return [f.result() for f in futures]


@task(name="search-candidate", cache_policy=NO_CACHE)
def evaluate_candidate(evaluator: SearchEvaluator, group_sparsity: dict[str, float]) -> np.ndarray:
    """Prune one candidate from the dense weights and return its per-sample objective values."""
    return evaluator.evaluate(group_sparsity)


def search_space(params: RunParams, groups: list[GroupInfo]) -> PolicySpace:
    s = params.allocation.search
    return PolicySpace(groups, params.pruning.sparsity, s.granularity, tuple(s.bases), s.step, params.allocation.s_max)


def search_config(params: RunParams) -> SearchConfig:
    s = params.allocation.search
    return SearchConfig(rounds=s.rounds, population=s.population, max_evaluations=s.max_evaluations,
                        max_seconds=s.max_seconds, penalty=s.penalty, delta=s.delta, bound=s.bound, seed=s.seed)


def run_search(params: RunParams, groups: list[GroupInfo], layers: dict[str, list[str]],
               progress: bool = True) -> tuple[SearchResult, PolicySpace]:
    """Search a policy over ``groups`` (``layers``: each group's layer names); returns every candidate."""
    space = search_space(params, groups)
    evaluator = SearchEvaluator(params, layers)
    result = evolve(space, evaluator.evaluate_many, params.allocation.search.n_samples, search_config(params),
                    evaluator.value_range, progress=progress)
    return result, space


def component_sparsity(space: PolicySpace, sparsity: dict[str, float]) -> dict[str, float]:
    """Parameter-weighted sparsity of each search component."""
    pruned = [0] * space.dim
    total = [0] * space.dim
    for g, u in zip(space.groups, space.member):
        pruned[u] += g.n_params * sparsity[g.name]
        total[u] += g.n_params
    return {name: pruned[u] / total[u] for u, name in enumerate(space.names)}


def write_candidates(result: SearchResult, space: PolicySpace, directory: Path) -> list[dict]:
    """``candidates.csv`` (one row per evaluated policy) and ``candidates.png`` (objective per round)."""
    rows = []
    for c in result.candidates:
        rows.append({"index": c.index, "round": c.round, "base": c.policy.base,
                     "offsets": " ".join(str(v) for v in c.policy.q), "complexity": c.policy.complexity,
                     "objective": c.objective, "penalty": c.penalty, "score": c.score,
                     "chosen": int(c.index == result.best.index),
                     **{f"sparsity[{k}]": v for k, v in component_sparsity(space, c.sparsity).items()}})
    with open(Path(directory) / "candidates.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_candidates(rows, Path(directory) / "candidates.png")
    return rows


def plot_candidates(rows: list[dict], path: Path) -> None:
    from vlmprune.plots import plt, save_png  # pyplot with the Agg backend selected

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.scatter([r["round"] for r in rows], [r["objective"] for r in rows], s=14, label="objective")
    ax.scatter([r["round"] + 0.15 for r in rows], [r["score"] for r in rows], s=14, marker="x",
               label="objective - penalty")
    best, line = float("-inf"), []
    for r in sorted(rows, key=lambda r: r["index"]):
        best = max(best, r["score"])
        line.append((r["round"], best))
    ax.step([x for x, _ in line], [y for _, y in line], where="post", color="k", lw=1, label="best score so far")
    chosen = [r for r in rows if r["chosen"]]
    ax.scatter([r["round"] for r in chosen], [r["objective"] for r in chosen], s=60, facecolors="none",
               edgecolors="r", label="chosen")
    ax.set_xlabel("round")
    ax.set_ylabel("search objective")
    ax.set_title("policy search: every candidate")
    ax.legend(fontsize=7)
    save_png(fig, path)


def log_candidates(mlflow, allocate_dir: Path) -> None:
    """Log a search's candidates to the active MLflow run, if the allocation came from a search:
    ``candidates.csv``/``.png`` as artifacts under ``search/`` and, per candidate (step = its index),
    the metrics ``search.objective``, ``search.penalty`` and ``search.score``."""
    path = Path(allocate_dir) / "candidates.csv"
    if not path.exists():
        return
    for name in ("candidates.csv", "candidates.png"):
        mlflow.log_artifact(str(Path(allocate_dir) / name), artifact_path="search")
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            mlflow.log_metrics({f"search.{k}": float(row[k]) for k in ("objective", "penalty", "score")},
                               step=int(row["index"]))
