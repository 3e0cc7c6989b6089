"""``score``: the prunable layout (groups, sizes) and the global importance score of each group and layer."""

from __future__ import annotations

from prefect import task

from params import RunParams
from tasks.common import calibration_batches, calibration_sample, layout, tower_groups
from tasks.io import atomic_dir, load_model, require_in_memory, stage_dir, write_json, write_meta
from vlmprune.errors import ModelError
from vlmprune.outliers import group_outlier_ratios
from vlmprune.profiling import measure
from vlmprune.scorers import SCORERS


def _scorer_options(params: RunParams, adapter, loaded) -> dict:
    """First-order: activation checkpointing and the gradient norm. Zeroth-order: the unit perturbed
    together (a group or one tensor), the directions per batch and whether scores estimate an L1 norm;
    the blocks of every tower, so perturbed forwards start at their block, and with ``scoring.head:
    linear`` stop at the family's output head; on an offloaded model, the perturbed group is held in
    place."""
    s = params.scoring
    if s.method == "first_order":
        return {"checkpointing": s.checkpointing, "norm": s.norm}
    if s.method != "zeroth_order":
        return {}
    options = {"granularity": s.granularity, "n_directions": s.n_directions, "l1_estimate": s.l1_estimate}
    if loaded.offload:
        options["hold"] = loaded.offload.read_only
    if not s.cache_inputs:
        return options
    towers = adapter.towers(loaded.model)
    options = {
        **options,
        "blocks": {name: module for tower in towers for name, module in tower.groups},
        "towers": {tower.name: [name for name, _ in tower.groups] for tower in towers},
        "difference": s.difference,
    }
    if s.head == "linear":
        options["head"] = adapter.loss_head(loaded.model)
        if options["head"] is None:
            raise ModelError(f"scoring.head 'linear' needs a loss read through one output head; the {adapter.family} "
                             "family's loss has none (it is built for causal_lm, llava, blip2, vision_lm): use "
                             "scoring.head: exact")
    return options


@task(name="score")
def score(params: RunParams) -> str:
    out = stage_dir(params, "score")
    s = params.scoring
    if s.method == "first_order":  # its backward pass needs every block's weights at once
        require_in_memory(params, "scoring.method: first_order (global scores by backprop)")
    with measure() as usage:
        adapter, loaded = load_model(params)
        groups = layout(params, adapter, loaded)
        rows = {g.name: {"name": g.name, "tower": g.tower, "n_params": g.n_params,
                         "layers": {n: l.weight.numel() for n, l in g.layers.items()}} for g in groups}
        cost = {}
        sample = calibration_sample(params) if s.method != "none" or params.allocation.method == "owl" else None
        if s.method != "none":
            batches = calibration_batches(params, s.batch_size, limit=s.n_samples, sample=sample)
            result = SCORERS.get(s.method)(
                loaded.model, {g.name: g.layers for g in groups}, adapter.loss, batches,
                variant=s.variant, seed=s.seed, progress=True, **_scorer_options(params, adapter, loaded),
            )
            for name, value in result.group_scores.items():
                rows[name]["score"] = value
                rows[name]["layer_scores"] = {layer: result.layer_scores[layer] for layer in rows[name]["layers"]}
            cost = {"forward_passes": result.forward_passes, "backward_passes": result.backward_passes}
        if params.allocation.method == "owl":
            batches = calibration_batches(params, params.calibration.batch_size, sample=sample)
            for tower in adapter.towers(loaded.model):
                members = tower_groups(groups, tower.name)
                if members:
                    ratios = group_outlier_ratios(loaded.model, tower.run, batches, members, params.allocation.owl.M,
                                                  hold=loaded.offload.read_only if loaded.offload else None)
                    for name, ratio in ratios.items():
                        rows[name]["outlier_ratio"] = ratio
    with atomic_dir(out) as tmp:
        write_json(tmp / "scores.json", {"method": s.method, "variant": s.variant, "groups": list(rows.values()), **cost})
        write_meta(tmp, "score", usage.as_dict(), method=s.method)
    return str(out)
