"""Run a grid of pruning configurations through the pipeline's own stage functions.

Stages shared by several configurations run once: ``prepare``, ``calibrate`` and ``baseline`` once
per grid (:func:`run_shared`), ``score`` once per scoring method, and once more for OWL's outlier
ratios (:func:`run_score`); ``allocate``, ``prune`` and ``evaluate`` per configuration, each in its
own artifacts directory whose upstream stages are symbolic links to the shared ones
(:func:`run_config`). The three functions take and return only paths, override lists and plain
data, so benchmarks/runner.py can run them as Prefect tasks in other processes. No MLflow tracking.
Each row carries the pruned metrics, the measured sparsity per tower and the wall time / peak
memory of the stages it ran.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flows.pipeline import TASKS
from params.schema import load_params

SHARED = ("prepare", "calibrate", "baseline")


@dataclass(frozen=True)
class Config:
    allocation: str = "uniform"
    scoring: str = "none"
    pruner: str = "wanda"
    sparsity: float = 0.5
    pattern: str = "unstructured"

    def overrides(self) -> list[str]:
        return [f"allocation.method={self.allocation}", f"scoring.method={self.scoring}",
                f"pruning.method={self.pruner}", f"pruning.sparsity={self.sparsity}",
                f"pruning.pattern={self.pattern}", "tracking.enabled=false"]

    @property
    def method(self) -> str:
        """The method without its target, e.g. ``ecoflap-zeroth + wanda`` or ``uniform + wanda 2:4``."""
        alloc = self.allocation if self.allocation != "ecoflap" else f"ecoflap-{self.scoring.split('_')[0]}"
        return f"{alloc} + {self.pruner}" + ("" if self.pattern == "unstructured" else f" {self.pattern}")

    @property
    def label(self) -> str:
        alloc = self.allocation if self.allocation != "ecoflap" else f"ecoflap-{self.scoring.split('_')[0]}"
        target = self.pattern if self.pattern != "unstructured" else f"{self.sparsity:.0%}"
        return f"{alloc} + {self.pruner} @ {target}"

    @property
    def score_key(self) -> str:
        """Configurations with the same key share one ``score`` stage."""
        return self.scoring + ("-owl" if self.allocation == "owl" else "")


def _read(root: Path, stage: str, name: str = "meta.json"):
    return json.loads((Path(root) / stage / name).read_text())


def _link(source: Path, root: Path, stages) -> None:
    """Make ``root/<stage>`` point at ``source/<stage>`` (a symbolic link; a copy where links fail)."""
    root.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        target, link = (Path(source) / stage).resolve(), root / stage
        try:
            os.symlink(target, link, target_is_directory=True)
        except OSError:
            shutil.copytree(target, link)


def run_shared(params_path: str, overrides: list[str], root: str) -> dict:
    """``prepare``, ``calibrate`` and ``baseline`` into ``root``: the dense metrics and those stages' costs."""
    params = load_params(params_path, [*overrides, f"artifacts={root}"])
    for stage in SHARED:
        TASKS[stage].fn(params)
    return {"metrics": _read(root, "baseline", "metrics.json"),
            "calibrate": _read(root, "calibrate")["usage"], "baseline": _read(root, "baseline")["usage"]}


def run_score(params_path: str, overrides: list[str], config: Config, shared: str, root: str) -> dict:
    """The ``score`` stage for ``config``'s scoring method into ``root`` (shared stages linked in); its cost."""
    _link(Path(shared), Path(root), SHARED)
    TASKS["score"].fn(load_params(params_path, [*overrides, *config.overrides(), f"artifacts={root}"]))
    return _read(root, "score")["usage"]


def run_config(params_path: str, overrides: list[str], config: Config, scored: str, root: str,
               keep_model: bool = False) -> dict:
    """``allocate``, ``prune`` and ``evaluate`` for one configuration into ``root``, its upstream stages
    linked from ``scored``; the pruned model is deleted afterwards unless ``keep_model``."""
    _link(Path(scored), Path(root), (*SHARED, "score"))
    params = load_params(params_path, [*overrides, *config.overrides(), f"artifacts={root}"])
    for stage in ("allocate", "prune", "evaluate"):
        TASKS[stage].fn(params)
    m = _read(root, "evaluate", "metrics.json")
    if not keep_model:
        shutil.rmtree(Path(root) / "prune" / "model", ignore_errors=True)
    return {"label": config.label, "pruned": m["pruned"], "sparsity": m["sparsity"],
            "score": _read(root, "score")["usage"], "allocate": m["stages"]["allocate"],
            "prune": m["stages"]["prune"], "evaluate": m["stages"]["evaluate"]}


def run_grid(params_path: str, configs: list[Config], base_overrides: list[str] = (), log=print,
             on_row=None) -> tuple[dict, list[dict]]:
    """Returns (dense metrics with the shared stages' costs, one row per configuration), in one process.
    ``on_row(dense, rows)``, if given, is called after each configuration with the rows so far."""
    rows = []
    base_overrides = list(base_overrides)
    with tempfile.TemporaryDirectory() as tmp:
        shared = Path(tmp) / "shared"
        dense = run_shared(params_path, [*base_overrides, *configs[0].overrides()], str(shared))
        scored: dict[str, Path] = {}
        for i, config in enumerate(configs):
            if config.score_key not in scored:
                scored[config.score_key] = Path(tmp) / f"score-{config.score_key}"
                run_score(params_path, base_overrides, config, str(shared), str(scored[config.score_key]))
            row = {"config": config, **run_config(params_path, base_overrides, config, str(scored[config.score_key]),
                                                  str(Path(tmp) / f"config-{i}"))}
            rows.append(row)
            log(json.dumps({k: v for k, v in row.items() if k != "config"}, default=str))
            if on_row:
                on_row(dense, rows)
    return dense, rows
