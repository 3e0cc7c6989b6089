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

    with prefect_test_harness(server_startup_timeout=180):  # the default 30 s fails on a loaded 2-core machine
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run as fast on one intra-op thread, and it avoids the thread-pool stalls (10-100x slower
    forwards) seen when other processes load the CPU. Use with pytestmark = pytest.mark.usefixtures("one_thread")."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


