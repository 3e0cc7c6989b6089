"""Validated run parameters: the pydantic schema of ``params.yaml`` and the shipped presets."""

from .schema import RunParams, load_params, ParamsError

__all__ = ["RunParams", "load_params", "ParamsError"]
