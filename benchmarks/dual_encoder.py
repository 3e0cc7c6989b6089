"""Zero-shot accuracy of the offline default dual encoder after pruning: allocation x pruner x sparsity.

Runs the pipeline's stage functions (benchmarks/grid.py) on the model built by ``dvc repro prepare``
(built here if missing), prints a Markdown table and writes it to benchmarks/results/dual_encoder.md.

    python -m benchmarks.dual_encoder [--sparsities 0.3 0.5 0.6]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import machine, markdown_table
from benchmarks.grid import Config, run_grid
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
        TASKS["prepare"].fn(base)  # the default model is built by the prepare stage
    configs = [Config(a, s, p, sparsity) for sparsity in args.sparsities for a, s, p in METHODS]
    dense, rows = run_grid(args.params, configs)
    table = [{"method": "dense", "sparsity": 0.0, "accuracy": dense["metrics"]["zero_shot_accuracy"]}]
    for r in rows:
        table.append({"method": r["label"], "sparsity": r["sparsity"]["overall"], "vision": r["sparsity"]["vision"],
                      "text": r["sparsity"]["text"], "accuracy": r["pruned"]["zero_shot_accuracy"],
                      "image cos": r["pruned"]["image_cosine"]})
    text = (f"Zero-shot accuracy on held-out digits (prompt templates unseen in training), default dual encoder,\n"
            f"both towers pruned; sparsity measured over all prunable weights and per tower.\n"
            f"Machine: {machine()}.\nCommand: python -m benchmarks.dual_encoder --sparsities "
            f"{' '.join(map(str, args.sparsities))}\n\n"
            f"{markdown_table(table, ['method', 'sparsity', 'vision', 'text', 'accuracy', 'image cos'])}\n")
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "dual_encoder.md").write_text(text)


if __name__ == "__main__":
    main()
