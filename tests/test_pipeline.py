"""Each stage on a tiny dual encoder, then the whole flow under Prefect and its MLflow record."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import tiny_params
from flows.pipeline import STAGES, TASKS
from vlmprune.allocators import GroupInfo


def run_stages(params, stages=STAGES):
    for name in stages:
        TASKS[name].fn(params)


@pytest.fixture(scope="module")
def wanda_run(tiny_dual_encoder_dir, tmp_path_factory):
    artifacts = tmp_path_factory.mktemp("wanda") / "artifacts"
    params = tiny_params(tiny_dual_encoder_dir, artifacts, pruning={"method": "wanda", "sparsity": 0.5})
    run_stages(params)
    return params, artifacts


def test_every_stage_writes_its_artifact(wanda_run):
    _, artifacts = wanda_run
    for stage in STAGES:
        meta = json.loads((artifacts / stage / "meta.json").read_text())
        assert meta["stage"] == stage
        assert meta["torch"] == torch.__version__ and meta["torch_threads"] == torch.get_num_threads()
    assert (artifacts / "calibrate" / "calibration.safetensors").exists()
    assert (artifacts / "prune" / "model" / "model.safetensors").exists()
    for png in ("allocate/allocation.png", "evaluate/sparsity.png", "evaluate/metrics.png"):
        assert (artifacts / png).read_bytes()[:4] == b"\x89PNG"


def test_metrics_file_is_nested_and_consistent(wanda_run):
    _, artifacts = wanda_run
    metrics = json.loads((artifacts / "evaluate" / "metrics.json").read_text())
    assert set(metrics["dense"]) == set(metrics["pruned"])
    assert metrics["dense"]["image_cosine"] == pytest.approx(1.0)
    assert 0 <= metrics["pruned"]["zero_shot_accuracy"] <= 1
    assert set(metrics["sparsity"]) == {"target", "overall", "vision", "text"}
    # Wanda prunes floor(in * 0.5) per row; the tiny model's widths are even, so exactly 50%
    assert metrics["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-9)
    assert len(metrics["mask_sha256"]) == 64
    assert metrics["stages"]["prune"]["wall_s"] > 0


def test_saved_model_has_the_masked_zeros(wanda_run):
    params, artifacts = wanda_run
    masks = load_file(str(artifacts / "prune" / "masks.safetensors"))
    weights = load_file(str(artifacts / "prune" / "model" / "model.safetensors"))
    assert masks
    for name, mask in masks.items():
        weight = weights[f"{name}.weight"]
        assert mask.shape == weight.shape and mask.dtype == torch.bool
        assert torch.all(weight[mask] == 0)
        assert abs(mask.float().mean().item() - 0.5) < 1e-9


def test_same_seed_same_calibration_and_masks(wanda_run, tiny_dual_encoder_dir, tmp_path):
    params, artifacts = wanda_run
    again = params.model_copy(update={"artifacts": str(tmp_path / "artifacts")})
    run_stages(again, ["prepare", "calibrate", "score", "allocate", "prune"])
    first = load_file(str(artifacts / "calibrate" / "calibration.safetensors"))
    second = load_file(str(tmp_path / "artifacts" / "calibrate" / "calibration.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    digest = lambda root: json.loads((root / "prune" / "sparsity.json").read_text())["mask_sha256"]  # noqa: E731
    assert digest(artifacts) == digest(tmp_path / "artifacts")


@pytest.mark.parametrize("cache_inputs", [True, False])
def test_score_stage_perturbs_the_unit_the_params_name(wanda_run, tiny_dual_encoder_dir, tmp_path, cache_inputs):
    """scoring.granularity and scoring.n_directions reach the zeroth-order scorer: central differences
    cost 2 forwards per unit, batch and direction, on top of the clean forwards of the block cache."""
    params, artifacts = wanda_run
    passes = {}
    for granularity, directions in (("group", 1), ("tensor", 1), ("tensor", 2)):
        root = tmp_path / f"{granularity}{directions}"
        run = tiny_params(tiny_dual_encoder_dir, root, scoring={
            "method": "zeroth_order", "granularity": granularity, "n_directions": directions,
            "cache_inputs": cache_inputs})
        root.mkdir()
        (root / "calibrate").symlink_to(artifacts / "calibrate")
        TASKS["score"].fn(run)
        scores = json.loads((root / "score" / "scores.json").read_text())
        passes[granularity, directions] = scores["forward_passes"]
    layers = {g["name"]: len(g["layers"]) for g in scores["groups"]}  # the layout, the same in every run
    batches = params.scoring.n_samples // params.scoring.batch_size
    n_groups, n_tensors = len(layers), sum(layers.values())
    assert n_tensors > n_groups
    assert passes["tensor", 1] - passes["group", 1] == 2 * (n_tensors - n_groups) * batches
    assert passes["tensor", 2] - passes["tensor", 1] == 2 * n_tensors * batches


def test_other_seed_changes_calibration(wanda_run, tiny_dual_encoder_dir, tmp_path):
    params, artifacts = wanda_run
    other = tiny_params(tiny_dual_encoder_dir, tmp_path / "a", calibration={"seed": 1})
    TASKS["calibrate"].fn(other)
    first = load_file(str(artifacts / "calibrate" / "calibration.safetensors"))
    second = load_file(str(tmp_path / "a" / "calibrate" / "calibration.safetensors"))
    assert not torch.equal(first["index"], second["index"])


def test_registered_version_and_alias(wanda_run):
    import mlflow
    from mlflow import MlflowClient

    params, artifacts = wanda_run
    record = json.loads((artifacts / "register" / "registration.json").read_text())
    client = MlflowClient(tracking_uri=params.tracking.uri)
    version = client.get_model_version_by_alias(params.tracking.model_name, params.tracking.alias)
    assert int(version.version) == record["version"] and version.run_id == record["run_id"]
    run = client.get_run(record["run_id"])
    assert run.data.metrics["pruned.zero_shot_accuracy"] >= 0
    assert run.data.params["pruning.method"] == "wanda"
    assert run.data.tags["mask_sha256"] == json.loads((artifacts / "evaluate" / "metrics.json").read_text())["mask_sha256"]
    assert run.data.tags["prune.torch_threads"] == run.data.tags["score.torch_threads"] == str(torch.get_num_threads())
    assert run.data.tags["prune.torch"] == torch.__version__
    mlflow.set_tracking_uri(params.tracking.uri)
    files = {f.path for f in client.list_artifacts(record["run_id"], "model")}
    assert "model/model.safetensors" in files


@pytest.mark.parametrize("allocation,pruner,extra", [
    ("uniform", "magnitude", {}),
    ("uniform", "sparsegpt", {"pattern": "2:4"}),
    ("ecoflap", "wanda", {}),
    ("owl", "sparsegpt", {}),
])
def test_method_combinations_reach_target(tiny_dual_encoder_dir, tmp_path, allocation, pruner, extra):
    sections = {"allocation": {"method": allocation}, "pruning": {"method": pruner, "sparsity": 0.5, **extra},
                "tracking": {"enabled": False}}
    if allocation == "ecoflap":
        sections["scoring"] = {"method": "zeroth_order"}
    params = tiny_params(tiny_dual_encoder_dir, tmp_path / "artifacts", **sections)
    run_stages(params)
    metrics = json.loads((tmp_path / "artifacts" / "evaluate" / "metrics.json").read_text())
    masks = load_file(str(tmp_path / "artifacts" / "prune" / "masks.safetensors"))
    pruned = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    # the weights hold exactly the zeros the masks record (the tiny model has no zero weights of its own)
    assert metrics["sparsity"]["overall"] == pytest.approx(pruned / total, abs=1e-12)
    if pruner == "sparsegpt":
        # SparseGPT also zeroes dead inputs (channels a ReLU6 never opens in the tiny random model)
        # and its unstructured threshold is per 128-column block
        assert 0.49 <= pruned / total <= 0.6
    else:
        # every row of a layer drops floor(in * p_layer) weights (Wanda's reference rounding)
        allocation = json.loads((tmp_path / "artifacts" / "allocate" / "allocation.json").read_text())
        expected = sum(m.shape[0] * int(m[0].numel() * allocation["layers"][name]) for name, m in masks.items())
        assert pruned == expected
        sizes = {name: m.numel() for name, m in masks.items()}
        allocated = sum(sizes[n] * p for n, p in allocation["layers"].items())
        assert abs(allocated - 0.5 * total) <= len(masks)  # within one weight per layer


def test_layer_allocation_shares_the_budget_between_single_layers(tiny_dual_encoder_dir, tmp_path):
    from vlmprune.allocators.ecoflap import ecoflap_kept

    artifacts = tmp_path / "artifacts"
    params = tiny_params(tiny_dual_encoder_dir, artifacts, allocation={"method": "ecoflap", "granularity": "layer"},
                         scoring={"method": "first_order"}, pruning={"method": "wanda", "sparsity": 0.5},
                         tracking={"enabled": False})
    run_stages(params, STAGES[:STAGES.index("prune") + 1])
    scores = json.loads((artifacts / "score" / "scores.json").read_text())
    allocation = json.loads((artifacts / "allocate" / "allocation.json").read_text())
    sizes = {layer: n for g in scores["groups"] for layer, n in g["layers"].items()}
    for g in scores["groups"]:  # the layer scores are the group's parts
        assert sum(g["layer_scores"].values()) == pytest.approx(g["score"], rel=1e-9)
    layers = allocation["layers"]
    assert allocation["granularity"] == "layer" and set(layers) == set(sizes)
    kept = {layer: sizes[layer] - round(sizes[layer] * p) for layer, p in layers.items()}
    assert sum(kept.values()) == round(0.5 * sum(sizes.values()))  # the budget, exactly, over single layers
    assert max(layers.values()) <= 0.6 + 1e-12  # s_max = target + 0.1 holds per layer
    # each layer's own score decides: layers of one group get different sparsities
    assert any(len({layers[layer] for layer in g["layers"]}) > 1 for g in scores["groups"])
    units = [GroupInfo(layer, g["tower"], n, g["layer_scores"][layer])
             for g in scores["groups"] for layer, n in g["layers"].items()]
    assert kept == ecoflap_kept(units, 0.5)
    for g in scores["groups"]:  # group sparsities are their layers' size-weighted means
        mean = sum(sizes[layer] * layers[layer] for layer in g["layers"]) / g["n_params"]
        assert allocation["groups"][g["name"]] == pytest.approx(mean, abs=1e-12)
    assert (artifacts / "allocate" / "allocation_layers.png").read_bytes()[:4] == b"\x89PNG"
    masks = load_file(str(artifacts / "prune" / "masks.safetensors"))  # the prune stage reads the layers
    for name, mask in masks.items():
        assert int(mask[0].sum()) == int(mask.shape[1:].numel() * layers[name])


def test_whole_flow_under_prefect(prefect_harness, tiny_dual_encoder_dir, tmp_path):
    import yaml

    from flows.pipeline import pipeline

    params = tiny_params(tiny_dual_encoder_dir, tmp_path / "artifacts", tracking={"enabled": False})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    outputs = pipeline(str(path), ["pruning.sparsity=0.3"])
    assert set(outputs) == set(STAGES)
    metrics = json.loads((tmp_path / "artifacts" / "evaluate" / "metrics.json").read_text())
    assert metrics["sparsity"]["overall"] == pytest.approx(0.3, abs=0.01)


def test_head_training_is_seeded():
    from tests.tiny import build_tiny_dual_encoder
    from vlmprune.data.images import load_image_dataset
    from vlmprune.models.train_heads import train_heads

    data = load_image_dataset("digits", max_samples=64, seed=0)
    weights = []
    for build_seed in (0, 1):  # different random heads before training: the seed decides
        model, tokenizer = build_tiny_dual_encoder(seed=0)
        torch.manual_seed(build_seed)
        model.image_projection.reset_parameters()
        train_heads(model, tokenizer, data, epochs=2, batch_size=32, seed=3)
        weights.append(model.image_projection.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
