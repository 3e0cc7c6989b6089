"""``prune`` for the structured methods (``pruning.method`` mope, magnitude_structured, layer_drop).

Writes the prune stage's artifact where :func:`tasks.prune.prune` would, so evaluate and register
run unchanged:

- ``model/``: the physically smaller model; its config carries ``structure`` (see
  :mod:`vlmprune.structured.persist`; causal LMs load back through the ``causal_lm`` adapter);
- ``structure.json``: kept layers, heads and FFN neurons per tower, their scores, parameters and
  file size before and after, the forward passes MoPE took, the distillation history
  (``structured.distill.enabled``: image-text pairs, or for a causal LM ``n_samples`` windows of
  ``data.seq_len`` training tokens drawn with ``structured.distill.seed``);
- ``sparsity.json``: what evaluate reads: per layer, group (parent layer/block) and tower, the
  fraction of prunable weights *removed* (1.0 for a dropped layer); ``mask_sha256`` is the SHA-256
  of the structure, as there are no masks;
- ``meta.json``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

from params import RunParams
from tasks.common import calibration_batches, layout
from tasks.io import atomic_dir, data_spec, load_model, require_in_memory, stage_dir, write_json, write_meta
from vlmprune.adapters.base import prunable_layers
from vlmprune.profiling import measure
from vlmprune.structured import StructuredSettings, count_parameters, structured_prune
from vlmprune.structured.distill import DistillSettings, distill
from vlmprune.structured.persist import record_structure


def settings_of(params: RunParams) -> StructuredSettings:
    s = params.structured
    return StructuredSettings(method=params.pruning.method, width_ratio=s.width_ratio, depth_ratio=s.depth_ratio,
                              ffn_group=s.ffn_group, metric=s.metric, towers=params.pruning.towers,
                              max_rows=s.max_rows)


def _weights_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _parent_layers(params, adapter, loaded) -> tuple[dict, dict]:
    """Group names per tower (index = layer in the dense parent) and prunable-layer sizes per group."""
    names = {t.name: [n for n, _ in t.groups] for t in adapter.towers(loaded.model)}
    sizes = {g.name: (g.tower, {n: m.weight.numel() for n, m in g.layers.items()})
             for g in layout(params, adapter, loaded)}
    return names, sizes


def removed_report(params, adapter, loaded, parent_names: dict, parent_sizes: dict, kept: dict) -> dict:
    """Fraction of each parent group's prunable weights that the pruned model no longer has."""
    p = params.pruning
    after: dict[str, int] = {}
    for tower in adapter.towers(loaded.model):
        parents = kept.get(tower.name, list(range(len(tower.groups))))
        for (name, module), parent in zip(tower.groups, parents, strict=True):
            parent_name = parent_names[tower.name][parent]
            for layer_name, layer in prunable_layers(loaded.model, module, p.include, p.exclude).items():
                after[parent_name + layer_name[len(name):]] = layer.weight.numel()
    layers, groups, towers = {}, {}, {}
    for group, (tower, sizes) in parent_sizes.items():
        g_before = sum(sizes.values())
        g_after = sum(after.get(n, 0) for n in sizes)
        layers.update({n: 1 - after.get(n, 0) / size for n, size in sizes.items()})
        groups[group] = 1 - g_after / g_before
        t_before, t_after = towers.get(tower, (0, 0))
        towers[tower] = (t_before + g_before, t_after + g_after)
    total_before = sum(b for b, _ in towers.values())
    total_after = sum(a for _, a in towers.values())
    return {"overall": 1 - total_after / total_before, "towers": {t: 1 - a / b for t, (b, a) in towers.items()},
            "groups": groups, "layers": layers, "n_params": total_before}


def prune_structured(params: RunParams) -> str:
    """Prune structurally and write the prune artifact; a plain function, called from the ``prune`` task."""
    out = stage_dir(params, "prune")
    settings = settings_of(params)
    require_in_memory(params, f"pruning.method: {params.pruning.method} (structured pruning)")
    with measure() as usage:
        adapter, loaded = load_model(params)
        model = loaded.model
        parent_names, parent_sizes = _parent_layers(params, adapter, loaded)
        params_before, bytes_before = count_parameters(model), _weights_bytes(model)
        teacher = copy.deepcopy(model) if params.structured.distill.enabled else None
        batch = None
        if settings.method == "mope":
            batch = calibration_batches(params, params.structured.n_samples, limit=params.structured.n_samples)[0]
        report = structured_prune(model, settings, batch)
        recovery = None
        d = params.structured.distill
        if d.enabled:
            data = adapter.make_calibration(loaded, data_spec(params), d.n_samples, d.seed)
            data = {k: v.to(next(model.parameters()).device) for k, v in data.items() if k != "index"}
            dsettings = DistillSettings(**d.model_dump(exclude={"enabled", "n_samples"}))
            recovery = distill(model, teacher, data, list(report["towers"]), dsettings)
        structure = record_structure(model)
        kept = {name: spec["layers"] for name, spec in structure.items()}
        removed = removed_report(params, adapter, loaded, parent_names, parent_sizes, kept)
    with atomic_dir(out) as tmp:
        adapter.save(loaded, tmp / "model")
        files = sum(f.stat().st_size for f in (tmp / "model").glob("*.safetensors"))
        parent_files = sum(f.stat().st_size for f in Path(params.model.id).glob("*.safetensors"))
        digest = hashlib.sha256(json.dumps(structure, sort_keys=True).encode()).hexdigest()
        write_json(tmp / "structure.json", {
            **{k: v for k, v in report.items() if k != "structure"},
            "params_before": params_before, "params_after": count_parameters(model),
            "weights_bytes_before": bytes_before, "weights_bytes_after": _weights_bytes(model),
            "file_bytes_before": parent_files or None, "file_bytes_after": files,
            "structure": structure, "distillation": recovery,
        })
        write_json(tmp / "sparsity.json", {"mask_sha256": digest, **removed})
        write_meta(tmp, "prune", usage.as_dict(), method=params.pruning.method, structured=True,
                   forward_passes=report["scoring_cost"])
    return str(out)
