"""Shared helpers for the benchmark scripts: machine description and Markdown tables."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import psutil
import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{time.strftime('%Y-%m-%d')}, {psutil.cpu_count(logical=True)} CPU cores ({cpu}), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {gpu}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


REPO = Path(__file__).resolve().parents[1]


def default_dual_encoder(artifacts: str | Path = "artifacts") -> str:
    """The offline default dual encoder at ``<artifacts>/prepare/model``, built by the prepare stage
    (params/presets/default.yaml) when it is missing; returns its directory. With the default
    ``artifacts`` this is the repository's model, which the grid suites build and use too."""
    from flows.pipeline import TASKS
    from params.schema import load_params

    model = Path(artifacts) / "prepare" / "model"
    if not (model / "config.json").exists():
        params = load_params(str(REPO / "params/presets/default.yaml"),
                             [f"artifacts={artifacts}", f"model.id={model}", "tracking.enabled=false"])
        TASKS["prepare"].fn(params)
    return str(model)


def shell_command(module: str, options: dict) -> str:
    """``python -m <module> --a 1 --b x y``: the command line that reproduces a run with ``options``
    (None and False are left out, True is a bare flag, a list is spread)."""
    parts = ["python", "-m", module]
    for key, value in options.items():
        if value is None or value is False:
            continue
        parts.append("--" + key.replace("_", "-"))
        if value is not True:
            parts += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return " ".join(parts)
