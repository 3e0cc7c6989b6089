"""The pruning pipeline as one Prefect flow, and a flow that runs a single stage (what DVC calls).

calibrate -> score -> allocate -> prune -> evaluate -> register, after ``prepare`` (which builds
the offline default model, or does nothing for any other model); ``baseline`` evaluates the dense
model once, beside them. The PAR stages (train_router -> evaluate_tokens) run after prune and before
register: with ``par.model: pruned`` they load the pruned model, and register logs the router beside it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from prefect import flow

from params import load_params

# stage -> "module:task", in pipeline order; register is last: it attaches the router trained on the
# pruned model. train_router runs PAR (par.enabled; else a "skipped" meta) after prune (par.model pruned).
_TASK_PATHS = {
    "prepare": "tasks.prepare:prepare",
    "calibrate": "tasks.calibrate:calibrate",
    "baseline": "tasks.evaluate:baseline",
    "score": "tasks.score:score",
    "allocate": "tasks.allocate:allocate",
    "prune": "tasks.prune:prune",
    "evaluate": "tasks.evaluate:evaluate",
    "train_router": "tasks.router:train_router",
    "evaluate_tokens": "tasks.router:evaluate_tokens",
    "register": "tasks.register:register",
}


class _Tasks(Mapping):
    """The stages' Prefect tasks by name, each module imported when its task is first asked for: a
    ``vlmprune stage`` process imports its own task's dependencies only (importing every task module
    took about 7 s per stage process, one task's 3-4 s; benchmarks/results/hand_runs.md)."""

    def __getitem__(self, name: str):
        module, attribute = _TASK_PATHS[name].split(":")
        return getattr(importlib.import_module(module), attribute)

    def __iter__(self) -> Iterator[str]:
        return iter(_TASK_PATHS)

    def __len__(self) -> int:
        return len(_TASK_PATHS)


TASKS = _Tasks()
STAGES = tuple(_TASK_PATHS)


@flow(name="vlmprune-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, str]:
    """Run every stage in order; returns each stage's artifact directory."""
    params = load_params(params_path, overrides)
    return {stage: TASKS[stage](params) for stage in STAGES}


@flow(name="vlmprune-stage", log_prints=True)
def stage(name: str, params_path: str = "params.yaml", overrides: list[str] | None = None) -> str:
    """Run one stage (its inputs must exist, as DVC guarantees)."""
    return TASKS[name](load_params(params_path, overrides))
