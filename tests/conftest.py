"""Shared fixtures: tiny models built from configs, saved and loaded through the real paths."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


from tests.tiny import build_tiny_dual_encoder


@pytest.fixture(scope="session")
def tiny_dual_encoder_dir(tmp_path_factory):
    model, tokenizer = build_tiny_dual_encoder()
    path = tmp_path_factory.mktemp("tiny_dual_encoder")
    model.save_pretrained(path)
    tokenizer.save_pretrained(str(path / "tokenizer"))
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


