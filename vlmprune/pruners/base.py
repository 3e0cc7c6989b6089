"""The local (layer-wise) pruner interface, its registry and the sparsity pattern parser.

A pruner sees one layer as a 2-D float matrix W (out, in) plus, if it asks for
them, the statistics of that layer's input (``InputStats``). It returns the
new weight and a bool mask of the same shape, True where a weight was pruned
(set to zero). Pruners never decide the sparsity: an allocator does.

Sparsity patterns (METHODS.md section 1):

- unstructured: a fraction ``sparsity`` of the weights is pruned;
- N:M (``nm=(N, M)``): in every group of M consecutive input columns of every
  row exactly N weights are pruned, the ``prune_n``/``prune_m`` convention of
  locuslab/wanda and IST-DASLab/sparsegpt ("2:4" prunes 2 of every 4). When
  ``nm`` is given, ``sparsity`` is ignored.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

from torch import Tensor

from vlmprune.registry import Registry

from .stats import InputStats

PRUNERS: Registry[type["Pruner"]] = Registry("pruner")

_ALLOWED_PATTERNS = "'unstructured' or 'N:M' with integers 0 < N < M (e.g. '2:4', '4:8')"


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M) with 0 < N < M; anything else -> ValueError."""
    text = pattern.strip().lower() if isinstance(pattern, str) else ""
    if text == "unstructured":
        return None
    match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if 0 < n < m:
            return n, m
    raise ValueError(f"unknown sparsity pattern {pattern!r}; allowed: {_ALLOWED_PATTERNS}")


def check_prune_args(weight: Tensor, sparsity: float, nm: tuple[int, int] | None) -> None:
    """Validate the arguments shared by every pruner."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D (out, in) matrix; got shape {tuple(weight.shape)}")
    if nm is None:
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be within [0, 1]; got {sparsity}")
        return
    n, m = nm
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M; got {n}:{m}")
    if weight.shape[1] % m != 0:
        raise ValueError(f"N:M pattern {n}:{m} needs in ({weight.shape[1]}) divisible by M={m}")


class Pruner(ABC):
    """Prunes one layer's weight matrix.

    Class attributes: ``name`` (registry key), ``needs_inputs`` (needs an
    ``InputStats`` of the layer input), ``needs_hessian`` (that ``InputStats``
    must be built with ``need_hessian=True``).
    """

    name: str = ""
    needs_inputs: bool = False
    needs_hessian: bool = False

    @abstractmethod
    def prune(
        self,
        weight: Tensor,
        stats: InputStats | None,
        sparsity: float,
        nm: tuple[int, int] | None,
    ) -> tuple[Tensor, Tensor]:
        """Return ``(new_weight, mask)``.

        ``weight`` is the (out, in) float matrix; ``mask`` is bool of the same
        shape, True = pruned; ``new_weight`` is zero wherever ``mask`` is True.
        ``nm=(N, M)`` asks for N pruned in every M consecutive columns and
        overrides ``sparsity``.
        """
