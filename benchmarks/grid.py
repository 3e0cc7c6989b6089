"""Run a grid of pruning configurations through the pipeline's own stage functions.

Stages shared by several configurations run once: ``prepare``, ``calibrate`` and ``baseline`` once
per grid, ``score`` once per scoring method (and once more for OWL's outlier ratios); ``allocate``,
``prune`` and ``evaluate`` per configuration. No MLflow tracking. Each row carries the pruned
metrics, the measured sparsity per tower and the wall time / peak memory of the stages it ran.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flows.pipeline import TASKS
from params.schema import load_params


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
    def label(self) -> str:
        alloc = self.allocation if self.allocation != "ecoflap" else f"ecoflap-{self.scoring.split('_')[0]}"
        target = self.pattern if self.pattern != "unstructured" else f"{self.sparsity:.0%}"
        return f"{alloc} + {self.pruner} @ {target}"


def _read(root: Path, stage: str, name: str = "meta.json"):
    return json.loads((root / stage / name).read_text())


def run_grid(params_path: str, configs: list[Config], base_overrides: list[str] = (), log=print) -> tuple[dict, list[dict]]:
    """Returns (dense metrics with the shared stages' costs, one row per configuration)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shared = Path(tmp) / "shared"
        first = load_params(params_path, [*base_overrides, *configs[0].overrides(), f"artifacts={shared}"])
        for stage in ("prepare", "calibrate", "baseline"):
            TASKS[stage].fn(first)
        dense = {"metrics": _read(shared, "baseline", "metrics.json"),
                 "calibrate": _read(shared, "calibrate")["usage"], "baseline": _read(shared, "baseline")["usage"]}
        scored: dict[tuple, Path] = {}
        for config in configs:
            key = (config.scoring, config.allocation == "owl")
            root = scored.get(key)
            params = load_params(params_path, [*base_overrides, *config.overrides(), f"artifacts={root or Path(tmp) / str(len(scored))}"])
            if root is None:
                root = Path(params.artifacts)
                for stage in ("prepare", "calibrate", "baseline"):
                    shutil.copytree(shared / stage, root / stage)
                TASKS["score"].fn(params)
                scored[key] = root
            for stage in ("allocate", "prune", "evaluate"):
                TASKS[stage].fn(params)
            m = _read(root, "evaluate", "metrics.json")
            row = {"config": config, "label": config.label, "pruned": m["pruned"], "sparsity": m["sparsity"],
                   "score": _read(root, "score")["usage"], "prune": m["stages"]["prune"],
                   "evaluate": m["stages"]["evaluate"]}
            rows.append(row)
            log(json.dumps({k: v for k, v in row.items() if k != "config"}, default=str))
    return dense, rows
