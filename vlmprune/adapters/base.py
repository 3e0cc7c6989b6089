"""What the pipeline needs to know about a model family, as one adapter class per family.

An adapter loads the model through its real ``from_pretrained`` path, names its towers and the
ordered groups (blocks) of each tower, runs a tower forward for calibration, gives the model's own
loss (for global scoring) and saves the model back. Everything family-specific lives here; the
pruning engine only sees towers, groups and prunable layers.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from vlmprune.data.spec import DataSpec
from vlmprune.registry import Registry

ADAPTERS: Registry[type["ModelAdapter"]] = Registry("model family")


@dataclass
class Tower:
    """One tower of a model: its ordered groups and how to drive a forward pass through it.

    ``run(model, batch)`` runs the part of the model that reaches this tower's groups for one
    calibration batch (the engine stops it after the last group).
    """

    name: str
    groups: list[tuple[str, nn.Module]]
    run: Callable[[nn.Module, dict], Any]


@dataclass
class LoadedModel:
    model: nn.Module
    processor: Any = None  # a tokenizer or processor, saved beside the model
    extra: dict = field(default_factory=dict)
    offload: Any = None  # a vlmprune.offload.GroupOffloader when the blocks are offloaded


def is_prunable(module: nn.Module) -> bool:
    """Linear layers and ungrouped Conv2d layers (1x1 convs act as linear layers over channels)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1


def prunable_layers(model: nn.Module, group: nn.Module, include: list[str] | None = None,
                    exclude: list[str] | None = None) -> dict[str, nn.Module]:
    """The prunable layers inside ``group``, by qualified name in ``model``, in module order.

    ``include``/``exclude`` are shell-style patterns (``fnmatch``) on the qualified name; a layer is
    kept if it matches some include pattern (or there are none) and no exclude pattern.
    """
    names = {id(m): n for n, m in model.named_modules()}
    prefix = names[id(group)]
    layers = {}
    for sub_name, module in group.named_modules():
        if not is_prunable(module):
            continue
        name = f"{prefix}.{sub_name}" if sub_name else prefix
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        layers[name] = module
    return layers


class ModelAdapter(ABC):
    """The interface every model family implements."""

    family: str = ""

    @abstractmethod
    def load(self, model_id: str, dtype: torch.dtype, device: str) -> LoadedModel:
        """Load through the family's ``from_pretrained``."""

    @abstractmethod
    def towers(self, model: nn.Module) -> list[Tower]:
        """The towers in calibration order, each with its ordered groups."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The model's own scalar training loss on one calibration batch (for global scoring)."""

    def sample_losses(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Each sample's own loss on one batch, shape (B,): its mean next-token cross-entropy over its
        own scored tokens (for a per-sample search objective). Built for the families whose loss is a
        sum of per-sample terms (language models); a contrastive loss is not, since each sample's term
        depends on the rest of its batch. :func:`has_sample_losses` tells whether a family has it."""
        raise NotImplementedError(f"per-sample losses are not built for the {self.family} family (its loss is not a "
                                  "sum of per-sample terms)")

    def loss_head(self, model: nn.Module) -> nn.Module | None:
        """The module through whose input alone, in one call per forward, the loss reads every block (a
        language model's output head), or None where there is none (a contrastive loss reads two towers).
        Zeroth-order scoring may linearise the loss there (``scoring.head: linear``)."""
        return None

    def load_skeleton(self, model_id: str, dtype: torch.dtype) -> tuple[LoadedModel, Path]:
        """The model with every weight on the meta device, and the directory of its safetensors
        checkpoint (for ``runtime.offload: disk``); built for the families that override it."""
        from vlmprune.offload import OffloadError

        raise OffloadError(f"runtime.offload: disk is built for causal_lm models only, not the {self.family} family; "
                           "use runtime.offload: cpu or none")

    def save(self, loaded: LoadedModel, directory: Path) -> None:
        """Save model and processor so that :meth:`load` reads them back (``save_pretrained`` of both)."""
        loaded.model.save_pretrained(directory)
        loaded.processor.save_pretrained(str(directory))

    @abstractmethod
    def make_calibration(self, loaded: LoadedModel, spec: DataSpec, n_samples: int, seed: int) -> dict[str, torch.Tensor]:
        """``n_samples`` calibration examples drawn with ``seed``, as a dict of tensors (first dim = sample)."""

    @abstractmethod
    def evaluate(self, loaded: LoadedModel, spec: DataSpec, batch_size: int, max_samples: int | None,
                 device: str, progress: bool = False) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """The family's metrics on held-out data, and the outputs (embeddings or logits) that
        label-free fidelity compares between the dense and the pruned model."""

    @classmethod
    def matches(cls, model_id: str) -> bool:
        """Whether this family recognises ``model_id`` (used when ``model.family`` is omitted)."""
        return False


def detect_family(model_id: str) -> str:
    """The first registered family that recognises ``model_id``; a clear error otherwise."""
    for name in ADAPTERS.names():
        if ADAPTERS.get(name).matches(model_id):
            return name
    raise ValueError(
        f"cannot tell the model family of {model_id!r}; set model.family to one of: {', '.join(ADAPTERS.names())}"
    )


def has_sample_losses(adapter: ModelAdapter) -> bool:
    """Whether ``adapter``'s family gives per-sample losses (overrides :meth:`ModelAdapter.sample_losses`)."""
    return type(adapter).sample_losses is not ModelAdapter.sample_losses
