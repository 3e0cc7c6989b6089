"""``register``: log the run to MLflow and register the pruned model under an alias.

Tracking store: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<repo>/mlflow.db`` with artifacts in ``<repo>/mlartifacts``, where <repo> is the
project root, also when DVC runs the stage in a temporary copy (``dvc exp run --temp`` works
under ``<repo>/.dvc/tmp/exps/``), so every experiment lands in the same store.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import task

from params import RunParams
from tasks.io import atomic_dir, read_json, stage_dir, write_json, write_meta
from vlmprune.profiling import measure

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def project_root(cwd: Path | None = None) -> Path:
    cwd = (cwd or Path.cwd()).resolve()
    marker = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"
    text = str(cwd)
    return Path(text.split(marker)[0]) if marker in text else cwd


def tracking_uri(params: RunParams) -> str:
    return params.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _experiment_id(mlflow, name: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(name, artifact_location=(project_root() / "mlartifacts").as_uri())


@task(name="register")
def register(params: RunParams) -> str:
    out = stage_dir(params, "register")
    if not params.tracking.enabled:
        with atomic_dir(out) as tmp:
            write_meta(tmp, "register", {}, skipped="tracking.enabled is false")
        return str(out)

    import mlflow
    from mlflow import MlflowClient

    evaluation = stage_dir(params, "evaluate")
    metrics = read_json(evaluation / "metrics.json")
    t = params.tracking
    with measure() as usage:
        mlflow.set_tracking_uri(tracking_uri(params))
        experiment_id = _experiment_id(mlflow, t.experiment)
        name = f"{params.allocation.method}+{params.pruning.method}@{params.pruning.sparsity:g}"
        with mlflow.start_run(experiment_id=experiment_id, run_name=name) as run:
            mlflow.log_params({k: str(v) for k, v in flatten(params.model_dump(mode="json")).items()})
            numbers = {k: v for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
            mlflow.log_metrics({k.replace("@", "_"): float(v) for k, v in numbers.items()})
            mlflow.set_tag("mask_sha256", metrics["mask_sha256"])
            for path in (evaluation / "metrics.json", evaluation / "sparsity.png", evaluation / "metrics.png",
                         evaluation / "sparsity_layers.json", stage_dir(params, "allocate") / "allocation.json",
                         stage_dir(params, "allocate") / "allocation.png"):
                mlflow.log_artifact(str(path), artifact_path="report")
            model_dir = stage_dir(params, "prune") / "model"
            mlflow.log_artifacts(str(model_dir), artifact_path="model")
            client = MlflowClient()
            if client.search_registered_models(filter_string=f"name = '{t.model_name}'") == []:
                client.create_registered_model(t.model_name, description="pruned models from vlmprune")
            version = client.create_model_version(
                t.model_name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                tags={"mask_sha256": metrics["mask_sha256"], "sparsity": f"{metrics['sparsity']['overall']:.4f}"},
            )
            client.set_registered_model_alias(t.model_name, t.alias, version.version)
    record = {"tracking_uri": tracking_uri(params), "experiment_id": experiment_id, "run_id": run.info.run_id,
              "model_name": t.model_name, "version": int(version.version), "alias": t.alias}
    with atomic_dir(out) as tmp:
        write_json(tmp / "registration.json", record)
        write_meta(tmp, "register", usage.as_dict())
    return str(out)
