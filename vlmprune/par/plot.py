"""Accuracy against measured prefill latency, one line per policy (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from vlmprune.plots import save_png


def accuracy_vs_latency(rows: list[dict], path: Path, title: str) -> None:
    """``rows`` from :func:`vlmprune.par.evaluate.evaluate_grid`; each point labelled t<ratio>/l<ratio>."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["prefill_ms"])
        ax.plot([r["prefill_ms"] for r in points], [r["accuracy"] for r in points],
                "*" if method == "dense" else "o-", label=method, markersize=10 if method == "dense" else 5)
        for r in points:
            ax.annotate(f"t{r['token_ratio']:g}/l{r['layer_ratio']:g}", (r["prefill_ms"], r["accuracy"]),
                        fontsize=6, alpha=0.7)
    ax.set_xlabel("prefill latency, batch 1 (ms, median)")
    ax.set_ylabel("VQA accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_png(fig, path)
