"""The ``vlmprune`` command line: run the pipeline or one stage, validate params, serve a schedule.

Exit codes: 0 done; 2 invalid params (nothing run); 3 a user-facing error (:mod:`vlmprune.errors`:
a model or data that cannot be found or used, a missing upstream artifact, NaN/inf in activations,
an artifacts directory held by another run), printed as one ``error:`` line without a traceback;
130 interrupted. Any other exception is a bug and keeps its traceback. Artifacts already written
are never removed by a failure (every stage writes atomically).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from flows import environment

# flows.pipeline.STAGES, without importing Prefect at start-up (tests/test_cli.py checks they agree)
STAGE_NAMES = ("prepare", "calibrate", "baseline", "score", "allocate", "prune", "evaluate", "train_router",
               "evaluate_tokens", "register")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("-p", "--params", default="params.yaml", help="params file (default: params.yaml)")
        p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a parameter, e.g. -S pruning.sparsity=0.6 (repeatable)")

    run = sub.add_parser("run", help="run the whole pipeline as one Prefect flow")
    common(run)
    one = sub.add_parser("stage", help="run one stage (what dvc.yaml calls)")
    one.add_argument("name", choices=STAGE_NAMES)
    common(one)
    one.add_argument("--prefect", choices=("auto", "on", "off"), default="auto",
                     help="run the stage as a Prefect flow run: on; call it directly: off; auto (default): "
                          "on when PREFECT_API_URL points at a Prefect server, else off, since a "
                          "temporary server costs 5-13 s per process")
    check = sub.add_parser("validate", help="validate a params file and print the resolved values")
    common(check)
    serve = sub.add_parser("serve", help="serve the pipeline as a Prefect deployment on a cron schedule")
    common(serve)
    serve.add_argument("--cron", default="0 3 * * *", help="cron schedule (default: every day at 03:00)")
    serve.add_argument("--name", default="vlmprune-nightly", help="deployment name")
    convert = sub.add_parser("convert", help="save a model (a packaged GGUF alias, a hub id, a directory) as a "
                                             "safetensors checkpoint directory, which runtime.offload: disk reads")
    convert.add_argument("model_id")
    convert.add_argument("directory")
    common(convert)
    return parser


def deployment(name: str, cron: str, params_path: str, overrides: list[str]):
    """The pipeline flow as a Prefect deployment with a cron schedule."""
    from flows.pipeline import pipeline

    return pipeline.to_deployment(name=name, cron=cron,
                                  parameters={"params_path": params_path, "overrides": overrides})


def _show_progress_logs() -> None:
    """Show the INFO lines of the ``vlmprune`` loggers (e.g. "resuming from group k of n") on stderr;
    through the root logger's handlers when something (Prefect) has set them up, else through our own."""
    logger = logging.getLogger("vlmprune")
    if not logging.getLogger().handlers and not any(getattr(h, "_vlmprune", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._vlmprune = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    from vlmprune.errors import EXIT_CODE, VlmpruneError

    try:
        return _main(argv)
    except VlmpruneError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted: artifacts already written are kept; an interrupted prune stage resumes when rerun",
              file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001  (a bug, or an input error not yet given a vlmprune.errors class)
        traceback.print_exc()
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


def _main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    environment.configure()
    from params import ParamsError, load_params

    try:
        params = load_params(args.params, args.overrides)
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.command == "validate":
        import yaml

        print(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False), end="")
        print(f"{args.params}: valid", file=sys.stderr)
        return 0

    from flows.pipeline import TASKS, pipeline, stage
    from tasks.io import run_lock

    _show_progress_logs()  # after Prefect's import, which may set up the root logger

    command = f"vlmprune {args.command}" + (f" {args.name}" if args.command == "stage" else "")
    if args.command == "run":
        with run_lock(params.artifacts, command):
            outputs = pipeline(args.params, args.overrides)
        print(f"done: metrics in {outputs['evaluate']}/metrics.json; plots in {outputs['evaluate']}/*.png")
        print("compare runs: mlflow ui --backend-store-uri sqlite:///$(pwd)/mlflow.db ; dvc metrics show")
    elif args.command == "stage":
        use_prefect = args.prefect == "on" or (args.prefect == "auto" and os.environ.get("PREFECT_API_URL"))
        with run_lock(params.artifacts, command):
            if use_prefect:
                stage(args.name, args.params, args.overrides)
            else:
                TASKS[args.name].fn(params)
    elif args.command == "convert":
        from tasks.io import atomic_dir, load_model

        in_memory = params.model_copy(update={"runtime": params.runtime.model_copy(update={"offload": "none"})})
        adapter, loaded = load_model(in_memory, args.model_id)
        with atomic_dir(args.directory) as tmp:
            adapter.save(loaded, tmp)
        print(f"saved {args.model_id} ({params.model.dtype}) to {args.directory}: set model.id to it")
    elif args.command == "serve":
        from prefect import serve

        serve(deployment(args.name, args.cron, args.params, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
