"""``allocate``: per-group and per-layer sparsity from the scores, plus its plot."""

from __future__ import annotations

import csv

from prefect import task

from params import RunParams
from tasks.io import atomic_dir, read_json, stage_dir, write_json, write_meta
from vlmprune.allocators import ALLOCATORS, GroupInfo, overall_sparsity
from vlmprune.plots import sparsity_per_group
from vlmprune.profiling import measure


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
    with measure() as usage:
        groups = [GroupInfo(g["name"], g["tower"], g["n_params"], g.get("score"), g.get("outlier_ratio"))
                  for g in scores["groups"]]
        group_sparsity = ALLOCATORS.get(params.allocation.method)(groups, target, **_options(params))
        layers = {layer: group_sparsity[g["name"]] for g in scores["groups"] for layer in g["layers"]}
    rows = [{"group": g.name, "tower": g.tower, "index": i, "sparsity": group_sparsity[g.name]}
            for i, g in enumerate(groups)]
    with atomic_dir(out) as tmp:
        write_json(tmp / "allocation.json", {
            "method": params.allocation.method, "target": target,
            "overall": overall_sparsity(groups, group_sparsity),
            "groups": group_sparsity, "layers": layers,
        })
        with open(tmp / "groups.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        sparsity_per_group(rows, tmp / "allocation.png",
                           f"{params.allocation.method} allocation, target {target:.0%}")
        write_meta(tmp, "allocate", usage.as_dict(), method=params.allocation.method)
    return str(out)
