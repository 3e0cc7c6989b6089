"""Every benchmark of a profile in one Prefect flow: tables, CSV, plots, MLflow runs, README sections.

    python -m benchmarks.runner --profile quick                     # this machine, about 20 minutes
    python -m benchmarks.runner --profile quick --update-readme     # ... and rewrite README's marked tables
    python -m benchmarks.runner --profile readme --update-readme    # every README table (about 45-60 minutes)
    python -m benchmarks.runner --profile full --dask --workers 2   # fan out over a local Dask cluster
    python -m benchmarks.runner --profile gpu --dask-address tcp://scheduler:8786
    python -m benchmarks.runner --profile quick --suites dual_encoder --limit 2 --no-mlflow   # a smoke run

Profiles and suites: benchmarks/profiles.yaml (format in benchmarks/suites.py); ``readme`` is ``quick``
plus the stand-alone benchmarks (scoring cost, structured pruning, policy search, PAR tokens) as script
suites, each building its model offline and writing its table into the README region named after the
suite. For a grid suite the flow runs, as Prefect tasks: the shared stages (prepare, calibrate, baseline) once, ``score`` once
per scoring method, then every configuration's allocate/prune/evaluate, each in its own artifacts
directory under a work directory. Tasks receive paths, override lists and configurations, never
models, so they can run in other processes: with ``--dask`` (or ``--dask-address``) the task runner
is prefect-dask's ``DaskTaskRunner`` (``pip install -e ".[dask]"``); otherwise one task runs at a
time in the flow's process, which keeps the stage timings free of competition. Workers of a cluster
on other machines (``--dask-address``) need this repository at the same path, the work directory on
a shared filesystem (``--work``) and ``PREFECT_API_URL`` pointing at a shared Prefect server; that
setup is not exercised by the tests (a local cluster is).

MLflow: one parent run per invocation (params: profile, command, machine, versions) with one nested
run per configuration (params: the configuration; metrics: its numeric fields, stage costs
included), and the report files as artifacts of the parent. Store: ``--mlflow-uri``, else
``$MLFLOW_TRACKING_URI``, else ``sqlite:///<repo>/mlflow.db`` (as tasks/register.py resolves it).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from benchmarks.common import machine
from benchmarks.grid import Config, run_config, run_score, run_shared
from benchmarks.report import SuiteResult, update_readme, versions, write_report
from benchmarks.suites import (
    PROFILES,
    GridSuite,
    ScriptSuite,
    check_profile,
    dense_row,
    grid_result,
    grid_row,
    resolve_profile,
    run_script,
)

EXPERIMENT = "vlmprune-benchmarks"
DASK_MISSING = ('--dask needs prefect-dask (Prefect\'s Dask task runner): pip install -e ".[dask]" '
                '(or pip install "prefect-dask>=0.3.7")')


def _threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@task(name="bench-prepare", cache_policy=NO_CACHE)
def prepare_model(params_path: str, overrides: list[str]) -> str:
    """Build the offline default model (the ``prepare`` stage, into the repository's artifacts) when the
    suite uses it and it is missing; any other model is loaded by the stages themselves."""
    from flows.pipeline import TASKS
    from params.schema import load_params
    from tasks.prepare import default_model_dir

    params = load_params(params_path, overrides)
    model = Path(params.model.id)
    if model == default_model_dir(params) and not (model / "config.json").exists():
        TASKS["prepare"].fn(params)
    return str(model)


@task(name="bench-shared", cache_policy=NO_CACHE)
def shared_task(params_path: str, overrides: list[str], root: str, threads: int | None = None) -> dict:
    _threads(threads)
    return run_shared(params_path, overrides, root)


@task(name="bench-score", cache_policy=NO_CACHE)
def score_task(params_path: str, overrides: list[str], config: Config, shared: str, root: str,
               threads: int | None = None) -> dict:
    _threads(threads)
    return run_score(params_path, overrides, config, shared, root)


@task(name="bench-config", cache_policy=NO_CACHE)
def config_task(params_path: str, overrides: list[str], config: Config, scored: str, root: str,
                threads: int | None = None) -> dict:
    _threads(threads)
    return run_config(params_path, overrides, config, scored, root)


@task(name="bench-script", cache_policy=NO_CACHE)
def script_task(function: str, profile: str, out: str, kwargs: dict) -> dict:
    return run_script(function, profile, out, kwargs)


# ---- MLflow ----

def tracking_uri(uri: str | None = None) -> str:
    from tasks.register import project_root

    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def _experiment_id(mlflow, name: str, uri: str) -> str:
    """The experiment's id, created if missing; a SQLite store keeps its artifacts in ``mlartifacts/``
    beside the database file (``<repo>/mlartifacts`` for the default store, as tasks/register.py)."""
    from tasks.register import _created_or_existing, retry_locked

    found = retry_locked(mlflow.get_experiment_by_name, name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return _created_or_existing(lambda: mlflow.create_experiment(name, artifact_location=location),
                                lambda: mlflow.get_experiment_by_name(name).experiment_id)


def _split(row: dict) -> tuple[dict, dict]:
    """A row's text fields (MLflow params) and numeric fields (metrics); the target is both."""
    params = {k: str(v) for k, v in row.items() if not isinstance(v, (int, float)) or isinstance(v, bool)}
    metrics = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if "target" in row:
        params["target"] = str(row["target"])
    return params, metrics


def log_nested(mlflow, row: dict, settings: list[str]) -> str:
    from tasks.register import retry_locked

    params, metrics = _split(row)
    parent = mlflow.active_run()
    with mlflow.start_run(run_name=f"{row.get('suite')}: {row.get('label', row.get('method'))}", nested=True,
                          experiment_id=parent.info.experiment_id) as run:
        retry_locked(mlflow.log_params, {**params, "settings": " ".join(settings)})
        if metrics:
            retry_locked(mlflow.log_metrics, metrics)
    return run.info.run_id


# ---- the flow ----

@flow(name="vlmprune-benchmark", log_prints=True)
def benchmark(profile: str = "quick", suites: list[str] | None = None, profiles_path: str = str(PROFILES),
              out: str | None = None, tracking: bool = True, mlflow_uri: str | None = None,
              experiment: str = EXPERIMENT, limit: int | None = None, work: str | None = None,
              keep_work: bool = False, threads: int | None = None, command: str = "",
              runner: str = "sequential", readme: str | None = None, published: bool = True) -> dict:
    """Run a profile's suites and write the report; returns the report's files, its README sections,
    the MLflow parent run id (or None) and the number of failed configurations."""
    spec = resolve_profile(profile, profiles_path, suites)
    print(f"profile {profile}: {check_profile(spec)} grid configuration(s) validated")
    out_dir = Path(out or f"benchmarks/results/{profile}")
    work_dir = Path(work) if work else Path(tempfile.mkdtemp(prefix="vlmprune-bench-"))
    command = command or f"benchmark(profile={profile!r})"

    for suite in spec.suites.values():  # before any fan-out, so no stage competes with it
        if isinstance(suite, GridSuite):
            prepare_model(suite.params, suite.overrides)
    submitted = {}  # suite -> (shared future, [(config, future)]) or a script future
    for name, suite in spec.suites.items():
        if isinstance(suite, ScriptSuite):
            submitted[name] = script_task.with_options(task_run_name=f"{name}: script").submit(
                suite.function, profile, str(out_dir), suite.kwargs)
            continue
        configs = suite.configs()[:limit] if limit else suite.configs()
        root = work_dir / name
        shared = shared_task.with_options(task_run_name=f"{name}: prepare, calibrate, baseline").submit(
            suite.params, [*suite.overrides, *configs[0].overrides()], str(root / "shared"), threads)
        scores, runs = {}, []
        for i, config in enumerate(configs):
            if config.score_key not in scores:
                scores[config.score_key] = (str(root / f"score-{config.score_key}"), score_task.with_options(
                    task_run_name=f"{name}: score {config.score_key}").submit(
                    suite.params, suite.overrides, config, str(root / "shared"), str(root / f"score-{config.score_key}"),
                    threads, wait_for=[shared]))
            scored, score_future = scores[config.score_key]
            runs.append((config, config_task.with_options(task_run_name=f"{name}: {config.label}").submit(
                suite.params, suite.overrides, config, scored, str(root / f"config-{i}"), threads,
                wait_for=[score_future])))
        submitted[name] = (shared, runs)

    mlflow, parent = None, None
    if tracking:
        import mlflow

        uri = tracking_uri(mlflow_uri)
        mlflow.set_tracking_uri(uri)
        parent = mlflow.start_run(experiment_id=_experiment_id(mlflow, experiment, uri),
                                  run_name=f"benchmark {profile}")
        mlflow.log_params({"profile": profile, "command": command[:6000], "machine": machine(),
                           "versions": versions(), "suites": ",".join(spec.suites), "runner": runner,
                           "limit": str(limit)})
    try:
        results, failed = [], 0
        for name, suite in spec.suites.items():
            if isinstance(suite, ScriptSuite):
                try:
                    result = SuiteResult(**{**submitted[name].result(), "name": name, "title": suite.title})
                except Exception as error:  # noqa: BLE001  (listed in the report; the other suites go on)
                    failed += 1
                    print(f"{name}: {suite.function} failed: {error}")
                    result = SuiteResult(name=name, title=suite.title, metric="", higher_is_better=True,
                                         columns=["method"], methodology=f"`{suite.function}` failed.",
                                         rows=[{"method": name, "error": f"{type(error).__name__}: {error}"}])
                if mlflow:
                    for row in result.rows:
                        if "error" not in row:
                            log_nested(mlflow, {"suite": name, **row}, [suite.function])
                results.append(result)
                continue
            shared, runs = submitted[name]
            try:
                dense = dense_row(name, shared.result())
            except Exception as error:  # noqa: BLE001  (report the failure; the other suites go on)
                dense = None
                print(f"{name}: shared stages failed: {error}")
            rows = []
            for config, future in runs:
                try:
                    row = grid_row(name, config, future.result())
                except Exception as error:  # noqa: BLE001  (a failed configuration is listed in the report)
                    row = {"suite": name, "method": config.method, "label": config.label, **asdict(config),
                           "error": f"{type(error).__name__}: {error}"}
                    failed += 1
                rows.append(row)
                if mlflow and "error" not in row:
                    log_nested(mlflow, row, [suite.params, *suite.overrides])
            if mlflow and dense:
                mlflow.log_metrics({f"{name}.dense.{k}": float(v) for k, v in dense.items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
            results.append(grid_result(name, suite, dense, rows))
        # a run of some suites merges into the existing report and keeps its published table, which
        # needs every suite
        written = write_report(results, out_dir, profile, command, runner, spec.description, readme=readme,
                               merge=bool(suites), **({} if published and not suites else {"published": None}))
        if mlflow:
            for path in written["files"]:
                mlflow.log_artifact(path, artifact_path="report")
            mlflow.log_metric("failed_configurations", failed)
    finally:
        if parent is not None:
            mlflow.end_run()
        if not keep_work and not work:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(f"report: {out_dir / 'report.md'}")
    return {**written, "parent_run_id": parent.info.run_id if parent else None, "failed": failed}


def api_for_workers() -> None:
    """Dask workers are other processes: with no ``PREFECT_API_URL`` each would start a temporary Prefect
    server of its own. Start this process's temporary server now (the one its flow run will use) and
    point the local workers, which inherit the environment, at it. Workers on other machines need
    ``PREFECT_API_URL`` set to a shared server in their own environment."""
    from prefect.settings import PREFECT_API_URL

    if os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url


def task_runner(dask: bool, address: str | None = None, workers: int = 2):
    """One task at a time in this process, or prefect-dask's DaskTaskRunner on a local cluster of
    ``workers`` single-threaded worker processes (or the cluster at ``address``)."""
    if not dask and not address:
        return ThreadPoolTaskRunner(max_workers=1)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise SystemExit(DASK_MISSING) from None
    if address:
        return DaskTaskRunner(address=address)
    api_for_workers()
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})


def main(argv: list[str] | None = None) -> int:
    from flows import environment

    environment.configure()
    # the temporary Prefect server's default 20 s to start is too short on a loaded 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick", help="a profile of --profiles (quick, readme, full, gpu)")
    parser.add_argument("--profiles", default=str(PROFILES), help="the profiles file")
    parser.add_argument("--suites", nargs="+", help="only these suites of the profile")
    parser.add_argument("--out", help="output directory (default benchmarks/results/<profile>)")
    parser.add_argument("--dask", action="store_true", help="fan out over a local Dask cluster (prefect-dask)")
    parser.add_argument("--dask-address", help="the scheduler of an existing Dask cluster (implies --dask)")
    parser.add_argument("--workers", type=int, default=2, help="local Dask worker processes (default 2)")
    parser.add_argument("--threads", type=int, help="torch threads per task (default: all cores, or cores/workers "
                        "with a local Dask cluster)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--mlflow-uri", help="tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///<repo>/mlflow.db)")
    parser.add_argument("--experiment", default=EXPERIMENT)
    parser.add_argument("--limit", type=int, help="only the first N configurations of each grid suite (smoke runs)")
    parser.add_argument("--work", help="keep the stage artifacts in this directory (default: a temporary one)")
    parser.add_argument("--update-readme", action="store_true",
                        help="replace the README's <!-- benchmark:<suite>:start/end --> regions with the tables")
    parser.add_argument("--readme", default="README.md")
    args = parser.parse_args(argv)
    if args.update_readme and args.limit:
        parser.error("--update-readme needs every configuration: drop --limit")
    dask = args.dask or bool(args.dask_address)
    threads = args.threads
    if dask and not args.dask_address and threads is None:
        threads = max(1, (os.cpu_count() or 1) // args.workers)
    runner = ("sequential (Prefect ThreadPoolTaskRunner, one task at a time)" if not dask else
              f"prefect-dask DaskTaskRunner ({args.dask_address or f'local cluster, {args.workers} worker processes'}"
              f"{f', {threads} torch threads per task' if threads else ''})")
    result = benchmark.with_options(task_runner=task_runner(dask, args.dask_address, args.workers))(
        profile=args.profile, suites=args.suites, profiles_path=args.profiles, out=args.out,
        tracking=not args.no_mlflow, mlflow_uri=args.mlflow_uri, experiment=args.experiment, limit=args.limit,
        work=args.work, threads=threads, command="python -m benchmarks.runner " + shlex.join(argv), runner=runner,
        readme=args.readme if args.update_readme else None)
    if args.update_readme:
        names = update_readme(args.readme, result["sections"])  # a run of some suites has no published table
        print(f"{args.readme}: replaced the sections {', '.join(names)}")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
