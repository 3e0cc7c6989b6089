"""The pruning pipeline as one Prefect flow, and a flow that runs a single stage (what DVC calls).

calibrate -> score -> allocate -> prune -> evaluate -> register, after ``prepare`` (which builds
the offline default model, or does nothing for any other model); ``baseline`` evaluates the dense
model once, beside them. The PAR stages (train_router -> evaluate_tokens) run after prune and before
register: with ``par.model: pruned`` they load the pruned model, and register logs the router beside it.
"""

from __future__ import annotations

from prefect import flow

from params import load_params
from tasks.allocate import allocate
from tasks.calibrate import calibrate
from tasks.evaluate import baseline, evaluate
from tasks.prepare import prepare
from tasks.prune import prune
from tasks.register import register
from tasks.router import evaluate_tokens, train_router
from tasks.score import score

TASKS = {
    "prepare": prepare,
    "calibrate": calibrate,
    "baseline": baseline,
    "score": score,
    "allocate": allocate,
    "prune": prune,
    "evaluate": evaluate,
    "train_router": train_router,  # PAR (par.enabled; else a "skipped" meta); after prune (par.model pruned)
    "evaluate_tokens": evaluate_tokens,
    "register": register,  # last: attaches the router trained on the pruned model
}
STAGES = tuple(TASKS)


@flow(name="vlmprune-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, str]:
    """Run every stage in order; returns each stage's artifact directory."""
    params = load_params(params_path, overrides)
    return {stage: TASKS[stage](params) for stage in STAGES}


@flow(name="vlmprune-stage", log_prints=True)
def stage(name: str, params_path: str = "params.yaml", overrides: list[str] | None = None) -> str:
    """Run one stage (its inputs must exist, as DVC guarantees)."""
    return TASKS[name](load_params(params_path, overrides))
