"""Shared helpers for the benchmark scripts: machine description and Markdown tables."""

from __future__ import annotations

import platform
import time

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
