"""Model families. Importing this package registers every adapter in ``ADAPTERS``."""

from . import dual_encoder  # noqa: F401  (registration)
from . import bert, blip2, causal_lm, clip, llava  # noqa: F401  (registration)
from . import vision_lm  # noqa: F401  (registration)
from .base import ADAPTERS, LoadedModel, ModelAdapter, Tower, detect_family, has_sample_losses, prunable_layers

__all__ = ["ADAPTERS", "LoadedModel", "ModelAdapter", "Tower", "detect_family", "has_sample_losses", "prunable_layers"]
