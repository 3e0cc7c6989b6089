"""Scorers: one global importance score per group of prunable layers (ECoFLaP stage 1).

Importing this package registers every scorer in ``SCORERS``:
``zeroth_order`` (finite differences, forward passes only) and ``first_order``
(backprop). Use
``SCORERS.get(name)(model, groups, loss_fn, batches, variant=..., seed=..., **options)``;
it returns a ``ScoreResult``. See ``base`` for the interface.
"""

from . import first_order, zeroth_order  # noqa: F401  (registration)
from .base import SCORERS, VARIANTS, Scorer, ScoreResult

__all__ = ["SCORERS", "VARIANTS", "ScoreResult", "Scorer"]
