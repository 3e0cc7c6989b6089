"""Local (layer-wise) pruners: magnitude, Wanda and SparseGPT (METHODS.md section 1).

Importing this package registers all three in ``PRUNERS``;
``PRUNERS.get("wanda")()`` gives a pruner instance.
"""

from . import magnitude, sparsegpt, wanda  # noqa: F401  (registration)
from .base import PRUNERS, Pruner, parse_pattern
from .stats import InputStats, set_weight_matrix, weight_matrix

__all__ = [
    "PRUNERS",
    "Pruner",
    "InputStats",
    "parse_pattern",
    "weight_matrix",
    "set_weight_matrix",
]
