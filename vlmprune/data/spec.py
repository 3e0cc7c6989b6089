"""Where a run's data comes from, as plain data (the validated params section converts to it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataSpec:
    """``name`` picks an offline source (``digits``, ``fashion_mnist``); ``test_fraction`` and
    ``seed`` fix the held-out split that calibration never touches."""

    name: str = "digits"
    test_fraction: float = 0.3
    seed: int = 0
