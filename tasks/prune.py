"""``prune``: layer-wise pruning with the allocated sparsities; saves the pruned model and masks."""

from __future__ import annotations

from prefect import task
from safetensors.torch import save_file

from params import RunParams
from tasks.common import calibration_batches, layout, tower_groups
from tasks.io import atomic_dir, load_model, read_json, stage_dir, write_json, write_meta
from vlmprune.pruners import PRUNERS
from vlmprune.profiling import measure
from vlmprune.sequential import prune_tower_sequential
from vlmprune.sparsity import mask_digest, sparsity_report


def make_pruner(params: RunParams):
    p = params.pruning
    if p.method == "sparsegpt":
        return PRUNERS.get("sparsegpt")(blocksize=p.sparsegpt.blocksize, percdamp=p.sparsegpt.percdamp)
    return PRUNERS.get(p.method)()


@task(name="prune")
def prune(params: RunParams) -> str:
    out = stage_dir(params, "prune")
    allocation = read_json(stage_dir(params, "allocate") / "allocation.json")["layers"]
    pruner = make_pruner(params)
    with measure() as usage:
        adapter, loaded = load_model(params)
        groups = layout(params, adapter, loaded)
        batches = calibration_batches(params, params.calibration.batch_size) if pruner.needs_inputs else []
        masks = {}
        for tower in adapter.towers(loaded.model):
            members = tower_groups(groups, tower.name)
            if members:
                masks.update(prune_tower_sequential(
                    loaded.model, tower.run, batches, members, allocation, pruner, params.pruning.nm,
                    desc=f"{params.pruning.method} {tower.name}",
                ))
        report = sparsity_report(groups)
    with atomic_dir(out) as tmp:
        adapter.save(loaded, tmp / "model")
        save_file({k: v.contiguous() for k, v in masks.items()}, str(tmp / "masks.safetensors"))
        write_json(tmp / "sparsity.json", {"mask_sha256": mask_digest(masks), **report})
        write_meta(tmp, "prune", usage.as_dict(), method=params.pruning.method, pattern=params.pruning.pattern)
    return str(out)
