"""Figures written as PNG files (DVC's HTML plots need a CDN, so every plot also exists as a PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_png(fig, path: Path, **savefig_kwargs) -> None:
    """Lay out ``fig``, write it to ``path`` as a PNG (parent folders created) and close it."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, **savefig_kwargs)
    plt.close(fig)


def sparsity_per_group(rows: list[dict], path: Path, title: str, measured_key: str | None = None) -> None:
    """Bars of target sparsity per group, one colour per tower; optional measured sparsity as dots.

    ``rows``: dicts with ``group``, ``tower``, ``sparsity`` (and ``measured_key`` if given), in order.
    """
    towers = list(dict.fromkeys(r["tower"] for r in rows))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * len(rows) + 2), 3.6))
    for t, tower in enumerate(towers):
        xs = [i for i, r in enumerate(rows) if r["tower"] == tower]
        ax.bar(xs, [rows[i]["sparsity"] for i in xs], color=colours[t % len(colours)], label=tower)
    if measured_key:
        ax.plot(range(len(rows)), [r[measured_key] for r in rows], "k.", label="measured")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["group"].rsplit(".", 1)[-1] for r in rows], fontsize=7)
    ax.set_xlabel("group (block index within its tower)")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_png(fig, path)


def sparsity_per_layer_kind(rows: list[dict], path: Path, title: str) -> None:
    """One panel per tower: a line per layer kind (the layer's name within its group, e.g.
    ``self_attn.q_proj``) of its sparsity over the group index.

    ``rows``: dicts with ``tower``, ``index`` (the group's index within its tower), ``kind`` and ``sparsity``.
    """
    towers = list(dict.fromkeys(r["tower"] for r in rows))
    fig, axes = plt.subplots(1, len(towers), figsize=(6.5 * len(towers), 3.8), squeeze=False)
    for ax, tower in zip(axes[0], towers):
        members = [r for r in rows if r["tower"] == tower]
        for kind in dict.fromkeys(r["kind"] for r in members):
            points = [(r["index"], r["sparsity"]) for r in members if r["kind"] == kind]
            ax.plot(*zip(*points), ".-", label=kind.lstrip("_"), linewidth=1)  # matplotlib hides "_" labels
        ax.set_xlabel(f"{tower}: group (block index)")
        ax.set_ylabel("sparsity")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(title)
    save_png(fig, path)


def dense_vs_pruned(metrics: dict[str, dict[str, float]], path: Path, title: str) -> None:
    """Grouped bars of each metric for the dense and the pruned model."""
    names = [k for k in metrics["dense"] if k in metrics["pruned"]]
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(names) + 1), 3.4))
    width = 0.38
    for offset, which in ((-width / 2, "dense"), (width / 2, "pruned")):
        values = [metrics[which][n] for n in names]
        bars = ax.bar([i + offset for i in range(len(names))], values, width, label=which)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_png(fig, path)
