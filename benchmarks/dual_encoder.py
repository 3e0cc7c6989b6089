"""Zero-shot accuracy of the offline default dual encoder after pruning: allocation x pruner x sparsity.

Runs the pipeline's own stage functions (no tracking) on the model built by ``dvc repro prepare``
(or by this script if it is missing), and prints a Markdown table; also written to
benchmarks/results/dual_encoder.md. Usage:

    python -m benchmarks.dual_encoder [--sparsities 0.3 0.5 0.6] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import machine, markdown_table
from flows.pipeline import TASKS
from params.schema import load_params

METHODS = [
    ("uniform", "none", "magnitude"),
    ("uniform", "none", "wanda"),
    ("uniform", "none", "sparsegpt"),
    ("owl", "none", "wanda"),
    ("ecoflap", "zeroth_order", "wanda"),
    ("ecoflap", "first_order", "wanda"),
    ("ecoflap", "zeroth_order", "sparsegpt"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.6])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    base = load_params(args.params)
    if not (Path(base.model.id) / "config.json").exists():
        TASKS["prepare"].fn(base)
    dense = json.loads((Path(base.artifacts) / "prepare" / "metrics.json").read_text())["zero_shot_accuracy"]
    rows = [{"allocation": "dense", "scores": "", "pruner": "", "sparsity": 0.0, "accuracy": dense,
             "vision": 0.0, "text": 0.0}]
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in args.sparsities:
            for allocation, scoring, pruner in METHODS:
                overrides = [f"artifacts={tmp}/run", f"allocation.method={allocation}", f"scoring.method={scoring}",
                             f"pruning.method={pruner}", f"pruning.sparsity={sparsity}", "tracking.enabled=false"]
                params = load_params(args.params, overrides)
                for stage in ("prepare", "calibrate", "score", "allocate", "prune", "evaluate"):
                    TASKS[stage].fn(params)
                m = json.loads((Path(tmp) / "run" / "evaluate" / "metrics.json").read_text())
                row = {"allocation": allocation, "scores": scoring if scoring != "none" else "", "pruner": pruner,
                       "sparsity": round(m["sparsity"]["overall"], 3), "accuracy": m["pruned"]["zero_shot_accuracy"],
                       "vision": round(m["sparsity"]["vision"], 3), "text": round(m["sparsity"]["text"], 3),
                       "score s": m["stages"]["score"]["wall_s"], "prune s": m["stages"]["prune"]["wall_s"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    columns = ["allocation", "scores", "pruner", "sparsity", "vision", "text", "accuracy", "score s", "prune s"]
    table = markdown_table(rows, columns)
    text = (f"Zero-shot accuracy on held-out digits (prompts unseen in training), default dual encoder.\n"
            f"Machine: {machine()}.\nCommand: python -m benchmarks.dual_encoder "
            f"--sparsities {' '.join(map(str, args.sparsities))}\n\n{table}\n")
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "dual_encoder.md").write_text(text)


if __name__ == "__main__":
    main()
