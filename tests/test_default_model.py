"""The real offline default model (packaged EfficientNet-lite0 + MiniLM towers). Slow: select with -m slow."""

from __future__ import annotations

import json

import pytest

from flows.pipeline import TASKS
from params.schema import validate

pytestmark = pytest.mark.slow


def run(artifacts, model_id, **sections):
    data = {"artifacts": str(artifacts), "model": {"id": str(model_id)}, "tracking": {"enabled": False},
            "evaluation": {"max_samples": 300}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    params = validate(data)
    for stage in ("prepare", "calibrate", "baseline", "score", "allocate", "prune", "evaluate"):
        TASKS[stage].fn(params)
    return json.loads((artifacts / "evaluate" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    artifacts = tmp_path_factory.mktemp("default") / "artifacts"
    model_id = artifacts / "prepare" / "model"
    params = validate({"artifacts": str(artifacts), "model": {"id": str(model_id)}, "prepare": {"epochs": 20}})
    TASKS["prepare"].fn(params)
    return artifacts, model_id


def test_prepared_model_is_accurate(prepared):
    artifacts, _ = prepared
    metrics = json.loads((artifacts / "prepare" / "metrics.json").read_text())
    assert metrics["zero_shot_accuracy"] > 0.9  # chance is 0.1; held-out images, unseen prompts


def test_ecoflap_beats_uniform_wanda_at_half_sparsity(prepared, tmp_path):
    _, model_id = prepared
    uniform = run(tmp_path / "u", model_id, allocation={"method": "uniform"}, scoring={"method": "none"})
    ecoflap = run(tmp_path / "e", model_id, allocation={"method": "ecoflap"}, scoring={"method": "first_order"})
    assert ecoflap["sparsity"]["overall"] == pytest.approx(0.5, abs=0.005)
    assert ecoflap["pruned"]["zero_shot_accuracy"] > uniform["pruned"]["zero_shot_accuracy"] + 0.2
    # the image tower is the sensitive one: ECoFLaP gives it less sparsity than the text tower
    assert ecoflap["sparsity"]["vision"] < ecoflap["sparsity"]["text"]
