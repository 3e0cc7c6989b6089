"""``register``: log the run to MLflow and register the pruned model under an alias.

With ``par.enabled`` and ``par.model: pruned`` the PAR router trained on this pruned model is
logged beside its weights, as ``model/router/`` (``router.safetensors``, ``router.json``), after
checking its recorded fingerprint against the model; load it with
:func:`vlmprune.par.router.load_model_router` on the downloaded model directory. Otherwise
``registration.json`` says under ``par_router`` that no router is attached, and why.

Tracking store: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<repo>/mlflow.db`` with artifacts in ``<repo>/mlartifacts``, where <repo> is the
project root, also when DVC runs the stage in a temporary copy (``dvc exp run --temp`` works
under ``<repo>/.dvc/tmp/exps/``), so every experiment lands in the same store.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

from prefect import task

from params import RunParams
from tasks.io import atomic_dir, read_json, stage_dir, write_json, write_meta
from vlmprune.errors import ArtifactError
from vlmprune.par.router import CONFIG, MODEL_ROUTER_DIR, WEIGHTS, model_fingerprint, recorded_fingerprint
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


def retry_locked(fn, *args, attempts: int = 8, **kwargs):
    """Call ``fn``, retrying with a growing pause while SQLite answers "database is locked" (two runs
    writing to the same store at once); other errors go through at once."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001  (SQLAlchemy's OperationalError, maybe wrapped by MLflow)
            if "database is locked" not in str(error) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2 ** attempt)


def _created_or_existing(create, get):
    """``create()``; if a concurrent run created the same thing first, ``get()`` instead."""
    from mlflow.exceptions import MlflowException

    try:
        return retry_locked(create)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return retry_locked(get)


@contextmanager
def store_lock(uri: str, timeout_s: float = 600):
    """For a SQLite store, hold ``<db file>.lock`` while registering, so that runs registering at the
    same time take turns (SQLite has one writer; two processes creating a fresh store at once race in
    its schema migration). Other stores (a tracking server) take care of concurrent clients themselves."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=timeout_s):
        yield


def _experiment_id(mlflow, name: str) -> str:
    experiment = retry_locked(mlflow.get_experiment_by_name, name)
    if experiment is not None:
        return experiment.experiment_id
    return _created_or_existing(
        lambda: mlflow.create_experiment(name, artifact_location=(project_root() / "mlartifacts").as_uri()),
        lambda: mlflow.get_experiment_by_name(name).experiment_id)


def rounding_tags(params: RunParams) -> dict[str, str]:
    """The torch version and CPU thread count of the score and prune stages (from their ``meta.json``):
    runs that differ in either round differently, so their scores and masks may differ in the last
    bits (README, "Results")."""
    tags = {}
    for stage in ("score", "prune"):
        meta = stage_dir(params, stage) / "meta.json"
        recorded = read_json(meta) if meta.exists() else {}
        tags.update({f"{stage}.{key}": str(recorded[key]) for key in ("torch", "torch_threads") if key in recorded})
    return tags


def router_to_attach(params: RunParams, model_dir: Path) -> tuple[list[Path], dict]:
    """The PAR router files to log beside the registered model, and the ``par_router`` note of
    ``registration.json``. Only a router trained on this very model (``par.model: pruned``, same
    fingerprint) is attached; a stale one raises :class:`ArtifactError`."""
    p = params.par
    if not p.enabled:
        return [], {"attached": False, "reason": "par.enabled is false: no router was trained"}
    if p.model == "dense":
        return [], {"attached": False, "reason": "par.model is dense: the router was trained on the dense model "
                                                 "(model.id), whose hidden states and outputs differ from the "
                                                 "registered pruned model's; set par.model: pruned to train it on the "
                                                 "pruned model and register it beside it"}
    router_dir = stage_dir(params, "train_router")
    recorded = recorded_fingerprint(router_dir)
    actual = model_fingerprint(model_dir)["sha256"]
    if recorded != actual:
        raise ArtifactError(f"the router in {router_dir} was not trained on the model in {model_dir} (fingerprint "
                            f"{str(recorded)[:12]} vs {actual[:12]}): rerun the train_router stage after prune")
    return [router_dir / WEIGHTS, router_dir / CONFIG], {
        "attached": True, "path": f"model/{MODEL_ROUTER_DIR}", "model_sha256": actual,
        "loader": "vlmprune.par.router.load_model_router(<downloaded model dir>)"}


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
    model_dir = stage_dir(params, "prune") / "model"
    router_files, router_note = router_to_attach(params, model_dir)
    with measure() as usage, store_lock(tracking_uri(params)):
        mlflow.set_tracking_uri(tracking_uri(params))
        experiment_id = _experiment_id(mlflow, t.experiment)
        name = f"{params.allocation.method}+{params.pruning.method}@{params.pruning.sparsity:g}"
        with mlflow.start_run(experiment_id=experiment_id, run_name=name) as run:
            mlflow.log_params({k: str(v) for k, v in flatten(params.model_dump(mode="json")).items()})
            numbers = {k: v for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
            mlflow.log_metrics({k.replace("@", "_"): float(v) for k, v in numbers.items()})
            mlflow.set_tag("mask_sha256", metrics["mask_sha256"])
            mlflow.set_tags(rounding_tags(params))
            for path in (evaluation / "metrics.json", evaluation / "sparsity.png", evaluation / "metrics.png",
                         evaluation / "sparsity_layers.json", stage_dir(params, "allocate") / "allocation.json",
                         stage_dir(params, "allocate") / "allocation.png"):
                mlflow.log_artifact(str(path), artifact_path="report")
            from tasks.search import log_candidates  # allocation.method search: every candidate policy

            log_candidates(mlflow, stage_dir(params, "allocate"))
            mlflow.log_artifacts(str(model_dir), artifact_path="model")
            for path in router_files:  # PAR router beside the weights (par.model pruned)
                mlflow.log_artifact(str(path), artifact_path=f"model/{MODEL_ROUTER_DIR}")
            client = MlflowClient()
            # concurrent runs may register into the same store: each gets its own version; the
            # alias ends on the last one registered
            if retry_locked(client.search_registered_models, filter_string=f"name = '{t.model_name}'") == []:
                _created_or_existing(
                    lambda: client.create_registered_model(t.model_name, description="pruned models from vlmprune"),
                    lambda: client.get_registered_model(t.model_name))
            version = retry_locked(
                client.create_model_version,
                t.model_name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                tags={"mask_sha256": metrics["mask_sha256"], "sparsity": f"{metrics['sparsity']['overall']:.4f}",
                      "par_router": "attached" if router_note["attached"] else "none"},
            )
            retry_locked(client.set_registered_model_alias, t.model_name, t.alias, version.version)
    record = {"tracking_uri": tracking_uri(params), "experiment_id": experiment_id, "run_id": run.info.run_id,
              "model_name": t.model_name, "version": int(version.version), "alias": t.alias, "par_router": router_note}
    with atomic_dir(out) as tmp:
        write_json(tmp / "registration.json", record)
        write_meta(tmp, "register", usage.as_dict())
    return str(out)
