"""PAR stages: ``train_router`` trains the meta-router (label-free, against the full outputs of the
model it prunes) and saves it as ``router.safetensors`` + ``router.json``; ``evaluate_tokens``
measures accuracy and batch-1 latency of every operating point for the router, the attention-score
(FastV + Block Influence) and the random policies; with ``par.spread > 0`` also for the router plus
the spatial-spread prior and for the prior alone (:mod:`vlmprune.par.spread`). Both write a
"skipped" meta when ``par.enabled`` is false.

``par.model`` picks the model both stages load: ``dense`` (``model.id``) or ``pruned`` (the prune
stage's ``artifacts/prune/model``, loaded as the evaluate stage loads it); that model's own 100%
tokens / 100% layers outputs are the teacher. ``router.json`` records the model's fingerprint
(:func:`vlmprune.par.router.model_fingerprint`); ``evaluate_tokens`` and the register stage (which
attaches a ``pruned`` router to the registered model) refuse a router trained on another model.

Run one stage: ``python -m tasks.router train_router [-p params.yaml] [-S key=value ...]``
(what dvc.yaml calls), or through ``flows.pipeline``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from prefect import task

from params import RunParams, load_params
from tasks.io import (
    atomic_dir, data_spec, load_model, read_json, require_in_memory, resolve_device, stage_dir, write_json, write_meta,
)
from vlmprune.adapters.blip2 import ImageToTextAdapter
from vlmprune.errors import ArtifactError
from vlmprune.par.decoder import decoder_of
from vlmprune.par.evaluate import evaluate_grid, vqa_set
from vlmprune.par.plot import accuracy_vs_latency
from vlmprune.par.policies import AttentionPolicy, RandomPolicy, RouterPolicy, block_influence
from vlmprune.par.router import (
    MetaRouter, RouterConfig, load_router, model_fingerprint, recorded_fingerprint, save_router,
)
from vlmprune.par.spread import DitherPolicy, SpreadPolicy
from vlmprune.par.train import make_examples, operating_points, train_router as fit_router
from vlmprune.profiling import measure


def _skip(params: RunParams, stage: str) -> str | None:
    if params.par.enabled:
        return None
    out = stage_dir(params, stage)
    with atomic_dir(out) as tmp:
        write_meta(tmp, stage, {}, skipped="par.enabled is false")
    return str(out)


def par_model_id(params: RunParams) -> str:
    """The model PAR trains and evaluates on: ``model.id`` (par.model dense) or the prune stage's
    output directory (par.model pruned), which must exist."""
    if params.par.model == "dense":
        return params.model.id
    pruned = stage_dir(params, "prune") / "model"
    if not pruned.is_dir():
        raise ArtifactError(f"{pruned} not found, and par.model is pruned: run the prune stage first (vlmprune stage "
                            "prune, or dvc repro prune), or set par.model: dense")
    return str(pruned)


def fingerprint_of(model_id: str) -> dict | None:
    """:func:`model_fingerprint` of a local model directory; None for a hub id or a packaged alias."""
    return model_fingerprint(model_id) if Path(model_id).is_dir() else None


def _load(params: RunParams, model_id: str):
    require_in_memory(params, "par (token and layer pruning)")
    adapter, loaded = load_model(params, model_id)
    if not isinstance(adapter, ImageToTextAdapter):
        raise ValueError(f"par needs an image-to-text model (llava, vision_lm); model.family is {adapter.family!r}")
    adapter.for_inference(loaded.model)  # both stages only run the model (vision_lm: BatchNorm folded)
    return adapter, loaded, decoder_of(loaded.model)


def _log_mlflow(params: RunParams, run_name: str, metrics: dict, artifacts: list, steps: list[float] | None = None):
    if not params.tracking.enabled:
        return None
    import mlflow

    from tasks.register import _experiment_id, flatten, tracking_uri

    mlflow.set_tracking_uri(tracking_uri(params))
    with mlflow.start_run(experiment_id=_experiment_id(mlflow, params.tracking.experiment), run_name=run_name) as run:
        mlflow.log_params({f"par.{k}": str(v) for k, v in params.par.model_dump(mode="json").items()}
                          | {"model.id": params.model.id, "data.name": params.data.name})
        mlflow.log_metrics({k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float))})
        for i, loss in enumerate(steps or []):
            mlflow.log_metric("router_loss", loss, step=i)
        for path in artifacts:
            mlflow.log_artifact(str(path), artifact_path="par")
    return run.info.run_id


@task(name="train_router")
def train_router(params: RunParams) -> str:
    skipped = _skip(params, "train_router")
    if skipped:
        return skipped
    p, out = params.par, stage_dir(params, "train_router")
    device = resolve_device(params.model.device)
    model_id = par_model_id(params)
    with measure() as usage:
        fingerprint = fingerprint_of(model_id)
        adapter, loaded, dec = _load(params, model_id)
        p_k = p.k
        data = vqa_set(adapter, loaded, data_spec(params), "train", p.train_samples, p.seed)
        examples = make_examples(dec, data.input_ids.to(device), data.pixel_values.to(device), p_k,
                                 data.max_new_tokens, batch_size=p.batch_size, progress=True)
        influence = block_influence(dec, data.input_ids.to(device), data.pixel_values[:64].to(device), p.batch_size)
        torch.manual_seed(p.seed)
        router = MetaRouter(RouterConfig(dec.hidden_size, dec.n_layers, p_k, p.router_width,
                                         list(p.token_ratios), list(p.layer_ratios))).to(device)
        started = time.perf_counter()
        losses = fit_router(dec, router, examples, p.steps, p.lr, p.batch_size, p.seed, progress=True,
                            token_loss=p.token_loss, n_subsets=p.token_subsets, token_sets=p.token_sets)
        train_s = time.perf_counter() - started
    tail = max(1, len(losses) // 10)
    metrics = {"loss_first": sum(losses[:tail]) / tail, "loss_last": sum(losses[-tail:]) / tail,
               "train_s": train_s, "examples": len(examples)}
    with atomic_dir(out) as tmp:
        save_router(router, tmp, model_id=model_id, par_model=p.model, model=fingerprint, block_influence=influence,
                    losses=losses, **metrics)
        write_json(tmp / "metrics.json", metrics)
        run_id = _log_mlflow(params, f"par-router k{p_k}", metrics, [tmp / "router.json", tmp / "router.safetensors"],
                             losses)
        write_meta(tmp, "train_router", usage.as_dict(), mlflow_run_id=run_id)
    return str(out)


@task(name="evaluate_tokens")
def evaluate_tokens(params: RunParams) -> str:
    skipped = _skip(params, "evaluate_tokens")
    if skipped:
        return skipped
    p, out = params.par, stage_dir(params, "evaluate_tokens")
    device = resolve_device(params.model.device)
    router_dir = stage_dir(params, "train_router")
    threads = torch.get_num_threads()
    model_id = par_model_id(params)
    with measure() as usage:
        facts = read_json(router_dir / "router.json")
        fingerprint = fingerprint_of(model_id)
        if fingerprint and recorded_fingerprint(router_dir) != fingerprint["sha256"]:
            raise ArtifactError(f"the router in {router_dir} was trained on {facts.get('model_id')!r}, not on the model "
                                f"evaluated now ({model_id}, par.model {p.model}): rerun the train_router stage")
        adapter, loaded, dec = _load(params, model_id)
        router = load_router(router_dir, device)
        influence = facts["block_influence"]
        data = vqa_set(adapter, loaded, data_spec(params), "test", p.eval_samples)
        policies = {"router": RouterPolicy(router), "attention": AttentionPolicy(influence),
                    "random": RandomPolicy(p.seed)}
        if p.spread > 0:
            policies |= {"router+spread": SpreadPolicy(policies["router"], p.spread), "dither": DitherPolicy(p.seed)}
        if p.threads:
            torch.set_num_threads(p.threads)
        try:
            rows = evaluate_grid(dec, data, policies, operating_points(p.token_ratios, p.layer_ratios), p.k,
                                 batch_size=params.evaluation.batch_size, repeats=p.latency_repeats, device=device,
                                 progress=True)
        finally:
            torch.set_num_threads(threads)
    metrics = {"rows": rows, "par_model": p.model, "threads": p.threads or threads, "eval_samples": len(data.labels),
               **{f"{r['method']}.t{r['token_ratio']:g}_l{r['layer_ratio']:g}.{m}": r[m] for r in rows
                  for m in ("accuracy", "prefill_speedup")}}
    with atomic_dir(out) as tmp:
        write_json(tmp / "metrics.json", metrics)
        accuracy_vs_latency(rows, tmp / "accuracy_latency.png", f"PAR on {params.model.id} ({p.model}, k={p.k})")
        run_id = _log_mlflow(params, f"par-eval k{p.k}", {k: v for k, v in metrics.items() if k != "rows"},
                             [tmp / "metrics.json", tmp / "accuracy_latency.png"])
        write_meta(tmp, "evaluate_tokens", usage.as_dict(), mlflow_run_id=run_id)
    return str(out)


TASKS = {"train_router": train_router, "evaluate_tokens": evaluate_tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.router", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=tuple(TASKS))
    parser.add_argument("-p", "--params", default="params.yaml")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    from flows import environment

    environment.configure()
    TASKS[args.stage].fn(load_params(args.params, args.overrides))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    sys.exit(main())
