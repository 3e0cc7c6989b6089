"""The schema of ``params.yaml``: one pydantic model per section, unknown keys refused.

``load_params(path, overrides)`` reads the YAML file, applies ``section.key=value`` overrides
(as ``dvc exp run -S`` does) and validates everything before any work starts. A bad file raises
:class:`ParamsError`, whose message names each bad field, its value and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlmprune.adapters import ADAPTERS
from vlmprune.allocators import ALLOCATORS
from vlmprune.pruners import PRUNERS, parse_pattern
from vlmprune.scorers import SCORERS


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_name(value: str | None, registry, field: str) -> str | None:
    if value is not None and value not in registry:
        raise ValueError(f"{field} {value!r} is not one of: {', '.join(registry.names())}")
    return value


class ModelParams(Section):
    family: str | None = Field(None, description="model family; detected from the model when omitted")
    id: str = Field("artifacts/prepare/model", description="Hugging Face model id or local directory")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto (cuda when available)")

    @field_validator("family")
    @classmethod
    def _family(cls, v):
        return _check_name(v, ADAPTERS, "model.family")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", v):
            raise ValueError(f"device {v!r} is not one of: cpu, auto, cuda, cuda:N, mps")
        return v


class PrepareParams(Section):
    """Training of the offline default dual encoder's projection heads (towers locked)."""

    embed_dim: int = Field(256, ge=8, le=4096)
    image_size: int = Field(96, ge=32, le=512)
    epochs: int = Field(40, ge=1, le=1000)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0, le=1)
    seed: int = Field(0, ge=0)


class DataParams(Section):
    """Image sets (digits, fashion_mnist) for the image families; text corpora (wikipedia,
    text_file) for the language families. ``path``, ``seq_len``, ``eval_windows`` and ``stride``
    concern text only (see vlmprune/data/spec.py)."""

    name: Literal["digits", "fashion_mnist", "wikipedia", "text_file"] = "digits"
    test_fraction: float = Field(0.3, gt=0, lt=1)
    seed: int = Field(0, ge=0, description="seed of the train/held-out split")
    path: str | None = Field(None, description="text_file: the UTF-8 text file (its last test_fraction is held out)")
    seq_len: int = Field(512, ge=8, le=1_048_576, description="text: tokens per calibration and evaluation window")
    eval_windows: int | None = Field(40, ge=1, description="text: held-out windows evaluated (all when null)")
    stride: int | None = Field(None, ge=1, description="text: step between evaluation windows (null = seq_len)")

    @model_validator(mode="after")
    def _text_fields(self):
        if self.name == "text_file" and not self.path:
            raise ValueError("data.name 'text_file' needs data.path: the UTF-8 text file to calibrate and evaluate on")
        if self.name != "text_file" and self.path is not None:
            raise ValueError(f"data.path is only read when data.name is 'text_file' (data.name is {self.name!r}): "
                             "remove data.path or set data.name: text_file")
        if self.stride is not None and self.stride > self.seq_len:
            raise ValueError(f"data.stride ({self.stride}) exceeds data.seq_len ({self.seq_len}): tokens between "
                             "windows would never be scored; lower data.stride")
        return self


class CalibrationParams(Section):
    n_samples: int = Field(128, ge=1, description="calibration examples for the fine (pruning) stage")
    batch_size: int = Field(32, ge=1, description="examples pushed through a block at once")
    seed: int = Field(0, ge=0)


class ScoringParams(Section):
    method: str = Field("zeroth_order", description="global importance scores per group: none, zeroth_order, first_order")
    variant: Literal["grad", "weight_grad", "weight_grad_sq"] = "grad"
    n_samples: int = Field(32, ge=1, description="scoring uses the first n_samples calibration examples")
    batch_size: int = Field(8, ge=1)
    seed: int = Field(0, ge=0)
    cache_inputs: bool = Field(True, description="zeroth_order: run each perturbed forward from the perturbed "
                                                 "block on, the earlier blocks answering from a clean forward")
    checkpointing: bool = Field(True, description="first_order: activation checkpointing (recompute each block's "
                                                  "activations in the backward pass instead of storing them)")
    difference: Literal["central", "forward"] = Field(
        "central", description="zeroth_order: central (2 forwards per block, the reference) or forward "
                               "(1 forward per block, reuses the clean loss; needs cache_inputs)")

    @field_validator("method")
    @classmethod
    def _method(cls, v):
        if v == "none":
            return v
        return _check_name(v, SCORERS, "scoring.method")

    @model_validator(mode="after")
    def _difference(self):
        if self.difference == "forward" and not (self.method == "zeroth_order" and self.cache_inputs):
            raise ValueError("scoring.difference 'forward' needs scoring.method: zeroth_order and "
                             "scoring.cache_inputs: true (it reuses the clean loss of the cached forward)")
        return self


class OwlParams(Section):
    lam: float = Field(0.08, ge=0, lt=1)
    M: float = Field(5.0, gt=0)
    weighted: bool = Field(True, description="shift so the parameter-weighted mean equals the target "
                                             "(the reference's plain mean over groups: false)")


class AllocationParams(Section):
    method: str = "ecoflap"
    s_max: float | None = Field(None, gt=0, lt=1, description="ecoflap: largest group sparsity (default target + 0.1)")
    owl: OwlParams = OwlParams()

    @field_validator("method")
    @classmethod
    def _method(cls, v):
        return _check_name(v, ALLOCATORS, "allocation.method")


class SparseGPTParams(Section):
    blocksize: int = Field(128, ge=1)
    percdamp: float = Field(0.01, gt=0, le=1)


class PruningParams(Section):
    method: str = "wanda"
    sparsity: float = Field(0.5, ge=0, lt=1, description="target fraction of prunable weights set to zero")
    pattern: str = Field("unstructured", description="unstructured or N:M (2:4, 4:8)")
    towers: list[str] | None = Field(None, description="towers to prune; all when omitted")
    include: list[str] = Field(default_factory=list, description="fnmatch patterns of layer names to prune")
    exclude: list[str] = Field(default_factory=list, description="fnmatch patterns of layer names to keep dense")
    sparsegpt: SparseGPTParams = SparseGPTParams()

    @field_validator("method")
    @classmethod
    def _method(cls, v):
        return _check_name(v, PRUNERS, "pruning.method")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v):
        parse_pattern(v)
        return v

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)


class EvaluationParams(Section):
    batch_size: int = Field(64, ge=1)
    max_samples: int | None = Field(None, ge=1, description="cap on held-out examples (all when omitted)")


class TrackingParams(Section):
    enabled: bool = True
    experiment: str = Field("vlmprune", min_length=1)
    model_name: str = Field("vlmprune-dual-encoder", min_length=1, description="registered model name")
    alias: str = Field("candidate", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    uri: str | None = Field(None, description="tracking URI; default sqlite:///<repo>/mlflow.db or $MLFLOW_TRACKING_URI")


class RunParams(Section):
    artifacts: str = Field("artifacts", description="directory of the stage artifacts")
    model: ModelParams = ModelParams()
    prepare: PrepareParams = PrepareParams()
    data: DataParams = DataParams()
    calibration: CalibrationParams = CalibrationParams()
    scoring: ScoringParams = ScoringParams()
    allocation: AllocationParams = AllocationParams()
    pruning: PruningParams = PruningParams()
    evaluation: EvaluationParams = EvaluationParams()
    tracking: TrackingParams = TrackingParams()

    @model_validator(mode="after")
    def _consistent(self):
        if self.scoring.n_samples > self.calibration.n_samples:
            raise ValueError(
                f"scoring.n_samples ({self.scoring.n_samples}) exceeds calibration.n_samples "
                f"({self.calibration.n_samples}): scoring draws from the calibration sample"
            )
        if self.allocation.method == "ecoflap" and self.scoring.method == "none":
            raise ValueError("allocation.method 'ecoflap' needs scores: set scoring.method to zeroth_order or first_order")
        s_max = self.allocation.s_max
        if s_max is not None and s_max < self.pruning.sparsity:
            raise ValueError(
                f"allocation.s_max ({s_max}) is below pruning.sparsity ({self.pruning.sparsity}): "
                "no allocation can reach the target; raise allocation.s_max"
            )
        return self


class ParamsError(ValueError):
    """A params file that does not validate; the message lists every bad field."""


def _format(error: ValidationError, source: str) -> str:
    lines = [f"{source}: {error.error_count()} invalid parameter(s)"]
    for e in error.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown key (value {e['input']!r}); check the spelling against params/schema.py")
        else:
            message = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {field} = {e['input']!r}: {message}")
    return "\n".join(lines)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``2:4`` as the base-60 integer 124; like YAML 1.2 (and DVC), keep it a string."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if not (tag.endswith(":int") and ":" in regexp.pattern.replace("tag:", ""))]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def read_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def _parse_scalar(text: str):
    return read_yaml(text) if text != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (YAML scalars) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ParamsError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = _parse_scalar(value)
    return data


def validate(data: dict, source: str = "params") -> RunParams:
    try:
        return RunParams.model_validate(data)
    except ValidationError as error:
        raise ParamsError(_format(error, source)) from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> RunParams:
    """Read, override and validate a params file."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file {path} not found")
    try:
        data = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections")
    apply_overrides(data, overrides or [])
    return validate(data, str(path))
