"""Steps several stage tasks share: the model's prunable layout and its calibration batches."""

from __future__ import annotations

import torch

from params import RunParams
from tasks.io import batches_of, load_tensors, resolve_device, stage_dir
from vlmprune.adapters import LoadedModel, ModelAdapter
from vlmprune.errors import ArtifactError
from vlmprune.sparsity import Group, model_layout


def layout(params: RunParams, adapter: ModelAdapter, loaded: LoadedModel) -> list[Group]:
    p = params.pruning
    return model_layout(loaded.model, adapter.towers(loaded.model), p.include, p.exclude, p.towers)


def calibration_sample(params: RunParams) -> dict[str, torch.Tensor]:
    """The calibrate stage's sample; :class:`ArtifactError` when it is missing, unreadable or does not
    hold ``calibration.n_samples`` examples (the params changed since it was drawn)."""
    data = load_tensors(stage_dir(params, "calibrate") / "calibration.safetensors")
    n = len(next(iter(data.values())))
    if n != params.calibration.n_samples:
        raise ArtifactError(
            f"{stage_dir(params, 'calibrate')}/calibration.safetensors holds {n} samples but calibration.n_samples "
            f"is {params.calibration.n_samples}: rerun the calibrate stage (vlmprune stage calibrate)"
        )
    return data


def calibration_batches(params: RunParams, batch_size: int, limit: int | None = None,
                        sample: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """The calibration sample (read from disk unless ``sample`` is given) in batches on the model's device."""
    sample = calibration_sample(params) if sample is None else sample
    return batches_of(sample, batch_size, resolve_device(params.model.device), limit)


def tower_groups(groups: list[Group], tower: str) -> list[tuple[str, object, dict]]:
    return [(g.name, g.module, g.layers) for g in groups if g.tower == tower]
