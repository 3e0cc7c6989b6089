"""Steps several stage tasks share: the model's prunable layout and its calibration batches."""

from __future__ import annotations

from safetensors.torch import load_file

from params import RunParams
from tasks.io import batches_of, resolve_device, stage_dir
from vlmprune.adapters import LoadedModel, ModelAdapter
from vlmprune.sparsity import Group, model_layout


def layout(params: RunParams, adapter: ModelAdapter, loaded: LoadedModel) -> list[Group]:
    p = params.pruning
    return model_layout(loaded.model, adapter.towers(loaded.model), p.include, p.exclude, p.towers)


def calibration_batches(params: RunParams, batch_size: int, limit: int | None = None) -> list[dict]:
    data = load_file(str(stage_dir(params, "calibrate") / "calibration.safetensors"))
    return batches_of(data, batch_size, resolve_device(params.model.device), limit)


def tower_groups(groups: list[Group], tower: str) -> list[tuple[str, object, dict]]:
    return [(g.name, g.module, g.layers) for g in groups if g.tower == tower]
