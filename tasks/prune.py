"""``prune``: layer-wise pruning with the allocated sparsities; saves the pruned model and masks.

Resumable: every finished group is checkpointed (tasks/resume.py); a rerun with the same params and
inputs restores the finished groups and goes on from the next one, with a bit-identical result. The
masks never pile up in memory: the masks file is streamed from those checkpoints. With
``runtime.offload`` each group is held on the device (or in memory) only while it is pruned
(vlmprune/offload.py), and in disk mode the model is saved one group per shard.
"""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import task

from params import RunParams
from tasks.common import calibration_batches, layout, tower_groups
from tasks.io import (
    atomic_dir, load_model, read_json, stage_dir, write_json, write_meta,
)
from tasks.resume import ResumeStore, log, run_digest
from tasks.structured import prune_structured
from vlmprune.errors import ArtifactError
from vlmprune.pruners import PRUNERS
from vlmprune.profiling import measure
from vlmprune.safetensors_io import LazyTensors, write_streaming
from vlmprune.sequential import prune_tower_sequential
from vlmprune.sparsity import Group, mask_digest, sparsity_report
from vlmprune.structured import STRUCTURED


def make_pruner(params: RunParams):
    p = params.pruning
    if p.method == "sparsegpt":
        return PRUNERS.get("sparsegpt")(blocksize=p.sparsegpt.blocksize, percdamp=p.sparsegpt.percdamp)
    return PRUNERS.get(p.method)()


def resume_store(params: RunParams) -> ResumeStore:
    """The checkpoint store of this run: ``<artifacts>/.resume/prune``, keyed by the run digest."""
    sections = params.model_dump(mode="json", include={"model", "data", "calibration", "pruning"})
    model_dir = Path(params.model.id)
    files = [stage_dir(params, "allocate") / "allocation.json", stage_dir(params, "calibrate") / "calibration.safetensors"]
    digest = run_digest(sections, files, model_dir if model_dir.is_dir() else None)
    return ResumeStore(Path(params.artifacts) / ".resume" / "prune", digest)


def _check_allocation(allocation: dict[str, float], groups, path: Path) -> None:
    missing = [name for g in groups for name in g.layers if name not in allocation]
    if missing:
        raise ArtifactError(
            f"{path} has no sparsity for {len(missing)} prunable layer(s), e.g. {missing[0]} (the model or "
            "pruning.include/exclude changed since it was written): rerun the score and allocate stages"
        )


def write_masks(path: Path, groups: list[Group], store: ResumeStore) -> None:
    """The masks of every layer, read group by group from the checkpoint store into one file."""
    specs = {name: (torch.bool, tuple(layer.weight.shape)) for g in groups for name, layer in g.layers.items()}

    def tensors():
        for g in groups:
            masks = store.masks(g.name)
            for name in g.layers:
                yield name, masks[name]

    write_streaming(path, specs, tensors())


@task(name="prune")
def prune(params: RunParams) -> str:
    if params.pruning.method in STRUCTURED:  # heads, neurons, layers removed: tasks/structured.py
        return prune_structured(params)
    out = stage_dir(params, "prune")
    allocation_path = stage_dir(params, "allocate") / "allocation.json"
    allocation = read_json(allocation_path)["layers"]
    pruner = make_pruner(params)
    store = resume_store(params)
    with measure() as usage:
        adapter, loaded = load_model(params)
        groups = layout(params, adapter, loaded)
        _check_allocation(allocation, groups, allocation_path)
        batches = calibration_batches(params, params.calibration.batch_size) if pruner.needs_inputs else []
        offload = loaded.offload
        done = store.open()
        if done:
            log(f"resuming from group {done + 1} of {len(groups)} ({done} finished groups in {store.directory})")
        for tower in adapter.towers(loaded.model):
            members = tower_groups(groups, tower.name)
            if members:  # each finished group's masks go to the checkpoint store only
                prune_tower_sequential(
                    loaded.model, tower.run, batches, members, allocation, pruner, params.pruning.nm,
                    desc=f"{params.pruning.method} {tower.name}", restore=store.load, on_group_done=store.save,
                    hold=offload.hold if offload else None, keep_masks=False,
                )
        report = sparsity_report(groups, hold=offload.read_only if offload else None)
    with atomic_dir(out) as tmp:
        if offload and offload.mode == "disk":  # one block in memory at a time
            offload.save_pretrained(tmp / "model")
            loaded.processor.save_pretrained(str(tmp / "model"))
        else:
            adapter.save(loaded, tmp / "model")
        write_masks(tmp / "masks.safetensors", groups, store)
        write_json(tmp / "sparsity.json", {"mask_sha256": mask_digest(LazyTensors(tmp / "masks.safetensors")), **report})
        write_meta(tmp, "prune", usage.as_dict(), method=params.pruning.method, pattern=params.pruning.pattern,
                   resumed_groups=done, offload=params.runtime.offload,
                   offloaded_groups=len(offload.groups) if offload else 0)
    if offload:
        offload.close()
    store.clear()
    return str(out)
