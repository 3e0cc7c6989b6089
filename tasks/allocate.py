"""``allocate``: per-group and per-layer sparsity from the scores, plus its plot.

``allocation.method: search`` runs the policy search of ``tasks/search.py`` (it loads the model
and the calibration batches, and prunes candidates); it also writes ``candidates.csv`` and
``candidates.png``. Every method writes ``allocation.json`` in the same format. With
``allocation.granularity: layer`` the budget is shared between single layers (each with its score from
``scores.json``); the group sparsities written beside are the size-weighted means of their layers', and
``allocation_layers.png`` draws the layers.
"""

from __future__ import annotations

import csv

from prefect import task

from params import RunParams
from tasks.io import atomic_dir, read_json, stage_dir, write_json, write_meta
from vlmprune.allocators import ALLOCATORS, GroupInfo, overall_sparsity
from vlmprune.plots import sparsity_per_group, sparsity_per_layer_kind
from vlmprune.profiling import measure


def _groups(scores: dict) -> list[GroupInfo]:
    return [GroupInfo(g["name"], g["tower"], g["n_params"], g.get("score"), g.get("outlier_ratio"))
            for g in scores["groups"]]


def _layers(g: dict) -> list[GroupInfo]:
    """Group ``g`` of ``scores.json`` as single layers, each with its own size and score."""
    return [GroupInfo(layer, g["tower"], n, g.get("layer_scores", {}).get(layer)) for layer, n in g["layers"].items()]


def _layer_rows(scores: dict, layers: dict[str, float]) -> list[dict]:
    """Rows of ``sparsity_per_layer_kind``: each layer with its group's index within its tower."""
    seen: dict[str, int] = {}
    rows = []
    for g in scores["groups"]:
        index = seen[g["tower"]] = seen.get(g["tower"], -1) + 1
        rows += [{"tower": g["tower"], "index": index, "kind": layer.removeprefix(g["name"] + "."),
                  "sparsity": layers[layer]} for layer in g["layers"]]
    return rows


def _options(params: RunParams) -> dict:
    a = params.allocation
    if a.method == "ecoflap":
        return {"s_max": a.s_max}
    if a.method == "owl":
        return {"lam": a.owl.lam, "M": a.owl.M, "weighted": a.owl.weighted}
    return {}


@task(name="allocate")
def allocate(params: RunParams) -> str:
    out = stage_dir(params, "allocate")
    scores = read_json(stage_dir(params, "score") / "scores.json")
    target = params.pruning.sparsity
    method = params.allocation.method
    granularity = params.allocation.granularity
    result = space = None
    with measure() as usage:
        groups = _groups(scores)
        if granularity == "layer":
            units = {g["name"]: _layers(g) for g in scores["groups"]}
            layers = ALLOCATORS.get(method)([u for us in units.values() for u in us], target, **_options(params))
            group_sparsity = {name: overall_sparsity(us, layers) for name, us in units.items()}  # size-weighted means
        else:
            if method == "search":
                from tasks.search import run_search

                result, space = run_search(params, groups, {g["name"]: list(g["layers"]) for g in scores["groups"]})
                group_sparsity = result.best.sparsity
            else:
                group_sparsity = ALLOCATORS.get(method)(groups, target, **_options(params))
            layers = {layer: group_sparsity[g["name"]] for g in scores["groups"] for layer in g["layers"]}
    rows = [{"group": g.name, "tower": g.tower, "index": i, "sparsity": group_sparsity[g.name]}
            for i, g in enumerate(groups)]
    record = {"method": method, "granularity": granularity, "target": target,
              "overall": overall_sparsity(groups, group_sparsity), "groups": group_sparsity, "layers": layers}
    if result is not None:
        best = result.best
        record["search"] = {"base": best.policy.base, "offsets": list(best.policy.q), "components": space.names,
                            "objective": best.objective, "penalty": best.penalty, "score": best.score,
                            "evaluations": len(result.candidates), "stopped": result.stopped,
                            "seconds": result.seconds, "n_samples": params.allocation.search.n_samples,
                            "bound": params.allocation.search.bound, "weight": params.allocation.search.penalty}
    with atomic_dir(out) as tmp:
        write_json(tmp / "allocation.json", record)
        with open(tmp / "groups.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        sparsity_per_group(rows, tmp / "allocation.png", f"{method} allocation, target {target:.0%}"
                           + (" (per layer; bars: group means)" if granularity == "layer" else ""))
        if granularity == "layer":
            sparsity_per_layer_kind(_layer_rows(scores, layers), tmp / "allocation_layers.png",
                                    f"{method} allocation per layer, target {target:.0%}")
        if result is not None:
            from tasks.search import write_candidates

            write_candidates(result, space, tmp)
        write_meta(tmp, "allocate", usage.as_dict(), method=method)
    return str(out)
