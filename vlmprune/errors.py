"""User-facing errors: a bad input or a run that cannot go on, each with one message naming what to change.

The command line (``flows/cli.py``) prints ``error: <message>`` for any :class:`VlmpruneError`,
without a traceback, and exits with :data:`EXIT_CODE`; any other exception is a bug and keeps its
traceback. Each class also derives from the built-in exception it refines (``ValueError``,
``FileNotFoundError``, ...), so code that catches the built-in keeps working; raising one of these
instead of the built-in is a one-word change.
"""

from __future__ import annotations

EXIT_CODE = 3  # 2 is taken by invalid params (params.ParamsError)


class VlmpruneError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class ModelNotFoundError(VlmpruneError, FileNotFoundError):
    """``model.id`` is neither a local directory, a packaged alias, nor a model the hub gave us."""


class ModelError(VlmpruneError, ValueError):
    """The model was found but cannot be used as asked (its family cannot be told, ...)."""


class DataError(VlmpruneError, ValueError):
    """The data cannot give what the params ask for (too few samples, a corpus shorter than one window)."""


class DataNotFoundError(VlmpruneError, FileNotFoundError):
    """A data file, folder or dataset named in the params does not exist."""


class ArtifactError(VlmpruneError, FileNotFoundError):
    """An upstream stage's artifact is missing, unreadable or does not match the params."""


class NonFiniteError(VlmpruneError, FloatingPointError):
    """NaN or inf appeared in activations, layer statistics or pruned weights."""


class RunLockedError(VlmpruneError, RuntimeError):
    """Another run holds the artifacts directory."""


class AllocationError(VlmpruneError, ValueError):
    """The target sparsity cannot be met under the allocation's limits (``allocation.s_max``)."""
