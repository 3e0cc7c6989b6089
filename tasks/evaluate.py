"""``baseline`` evaluates the dense model once (DVC reruns it only when the model, data or evaluation
params change); ``evaluate`` evaluates the pruned model and writes both side by side, with
label-free fidelity, measured sparsity, stage costs and plots."""

from __future__ import annotations

import csv

from prefect import task
from safetensors.torch import load_file, save_file

from params import RunParams
from tasks.io import atomic_dir, data_spec, load_model, read_json, resolve_device, stage_dir, write_json, write_meta
from vlmprune.evaluators.fidelity import fidelity
from vlmprune.plots import dense_vs_pruned, sparsity_per_group
from vlmprune.profiling import measure

STAGES = ("prepare", "calibrate", "baseline", "score", "allocate", "prune")


def _evaluate(params: RunParams, model_id: str):
    adapter, loaded = load_model(params, model_id)
    e = params.evaluation
    return adapter.evaluate(loaded, data_spec(params), e.batch_size, e.max_samples,
                            resolve_device(params.model.device), progress=True)


@task(name="baseline")
def baseline(params: RunParams) -> str:
    out = stage_dir(params, "baseline")
    with measure() as usage:
        metrics, outputs = _evaluate(params, params.model.id)
    with atomic_dir(out) as tmp:
        write_json(tmp / "metrics.json", metrics)
        save_file({k: v.contiguous() for k, v in outputs.items()}, str(tmp / "outputs.safetensors"))
        write_meta(tmp, "baseline", usage.as_dict())
    return str(out)


@task(name="evaluate")
def evaluate(params: RunParams) -> str:
    out = stage_dir(params, "evaluate")
    pruned_dir = stage_dir(params, "prune")
    dense_dir = stage_dir(params, "baseline")
    dense_metrics = read_json(dense_dir / "metrics.json")
    dense_outputs = load_file(str(dense_dir / "outputs.safetensors"))
    with measure() as usage:
        pruned_metrics, pruned_outputs = _evaluate(params, str(pruned_dir / "model"))
    dense_metrics.update(fidelity(dense_outputs, dense_outputs))
    pruned_metrics.update(fidelity(dense_outputs, pruned_outputs))
    report = read_json(pruned_dir / "sparsity.json")
    allocation = read_json(stage_dir(params, "allocate") / "allocation.json")
    stages = {s: read_json(stage_dir(params, s) / "meta.json").get("usage", {}) for s in STAGES}
    stages["evaluate"] = usage.as_dict()
    metrics = {
        "dense": dense_metrics,
        "pruned": pruned_metrics,
        "sparsity": {"target": params.pruning.sparsity, "overall": report["overall"], **report["towers"]},
        "mask_sha256": report["mask_sha256"],
        "stages": stages,
    }
    rows = []
    groups = read_json(stage_dir(params, "score") / "scores.json")["groups"]
    for i, g in enumerate(groups):
        rows.append({"group": g["name"], "tower": g["tower"], "index": i,
                     "sparsity": allocation["groups"][g["name"]], "measured": report["groups"][g["name"]]})
    with atomic_dir(out) as tmp:
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "sparsity_layers.json", report["layers"])
        with open(tmp / "sparsity_groups.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        title = f"{params.allocation.method} + {params.pruning.method} {params.pruning.pattern}"
        sparsity_per_group(rows, tmp / "sparsity.png", f"{title}: target (bars) and measured", measured_key="measured")
        dense_vs_pruned(metrics, tmp / "metrics.png", f"{title} at {report['overall']:.1%} sparsity")
        write_meta(tmp, "evaluate", usage.as_dict())
    return str(out)
