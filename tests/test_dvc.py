"""``dvc repro`` in a temporary copy of the project on the tiny model: runs, then skips; an experiment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def sh(*args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def project(tiny_dual_encoder_dir, tmp_path_factory):
    if shutil.which("dvc") is None or shutil.which("vlmprune") is None:
        pytest.fail("dvc and the vlmprune console script must be installed (pip install -e .)")
    repo = tmp_path_factory.mktemp("project")
    for name in ("vlmprune", "tasks", "flows", "params"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["id"] = str(tiny_dual_encoder_dir)
    params["calibration"].update(n_samples=16, batch_size=8)
    params["scoring"].update(n_samples=8, batch_size=4)
    params["evaluation"]["max_samples"] = 64
    params["tracking"]["model_name"] = "tiny-dvc"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("/artifacts/\n/mlflow.db\n/mlartifacts/\n/.prefect/\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    sh("git", "init", "-q", cwd=repo, env=env)
    sh("dvc", "init", "-q", cwd=repo, env=env)
    sh("dvc", "config", "core.analytics", "false", cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "init", cwd=repo, env=env)
    return repo, env


def test_repro_runs_then_skips(project):
    repo, env = project
    sh("dvc", "repro", cwd=repo, env=env)
    metrics = json.loads((repo / "artifacts" / "evaluate" / "metrics.json").read_text())
    assert metrics["sparsity"]["overall"] == pytest.approx(0.5, abs=0.01)
    assert (repo / "mlflow.db").exists()
    second = sh("dvc", "repro", cwd=repo, env=env)
    assert "Running stage" not in second
    for stage in ("calibrate", "baseline", "score", "allocate", "prune", "evaluate", "register"):
        assert f"Stage '{stage}' didn't change, skipping" in second
    shown = sh("dvc", "metrics", "show", cwd=repo, env=env)
    assert "pruned.zero_shot_accuracy" in shown


def test_exp_run_gives_a_second_experiment(project):
    repo, env = project
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "baseline", cwd=repo, env=env)
    out = sh("dvc", "exp", "run", "-S", "pruning.sparsity=0.3", cwd=repo, env=env)
    assert "Running stage 'prune'" in out and "Running stage 'calibrate'" not in out
    diff = sh("dvc", "params", "diff", cwd=repo, env=env)
    assert "pruning.sparsity" in diff and "0.3" in diff
    shown = sh("dvc", "exp", "show", "--csv", cwd=repo, env=env)
    assert "0.3" in shown
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'tiny-dvc'")
    assert len(versions) == 2
