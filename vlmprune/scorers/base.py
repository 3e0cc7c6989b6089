"""The scorer interface (ECoFLaP stage 1, METHODS.md section 2), its registry and shared helpers.

A scorer gives every *group* of prunable layers (a transformer block, or a
single layer) one global importance score from the model's own loss on a few
calibration batches. It knows nothing about model families:

    score(model, groups, loss_fn, batches, *, variant="grad", seed=0,
          progress=False, **options) -> ScoreResult

- ``groups``: group name -> {qualified layer name: prunable module}; a module
  is scored through its ``weight`` (an ``nn.Linear`` or ``nn.Conv2d``; biases
  are not scored). Layer names are unique across groups and no weight appears
  twice.
- ``loss_fn(model, batch)``: the model's scalar training loss on one batch.
- ``batches``: calibration batches, already on the model's device.

Variants (the per-layer score s_l; g is the gradient of the loss w.r.t. W_l on
one batch, the sums run over the layer's elements and over the batches):

- ``grad``: the size of g alone;
- ``weight_grad``: sum |W| * |g|;
- ``weight_grad_sq``: sum W^2 * g^2.

The group score is S_g = sum of s_l over the group's layers. Every scorer
leaves the weights bit-identical, the ``requires_grad`` flags and the modules'
train/eval flags as it found them.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
from torch import Tensor, nn

from vlmprune.registry import Registry

VARIANTS = ("grad", "weight_grad", "weight_grad_sq")

LossFn = Callable[[nn.Module, dict], Tensor]


@dataclass
class ScoreResult:
    """Scores of one scoring run and what it cost.

    group_scores: S_g = sum of the layer scores s_l of the group.
    layer_scores: s_l per qualified layer name.
    forward_passes: full or partial forward passes actually run.
    backward_passes: backward passes actually run.
    """

    group_scores: dict[str, float]
    layer_scores: dict[str, float]
    forward_passes: int
    backward_passes: int


class Scorer(Protocol):
    def __call__(
        self,
        model: nn.Module,
        groups: dict[str, dict[str, nn.Module]],
        loss_fn: LossFn,
        batches: list[dict],
        *,
        variant: str = "grad",
        seed: int = 0,
        progress: bool = False,
        **options,
    ) -> ScoreResult: ...


SCORERS: Registry[Scorer] = Registry("scorer")


@dataclass(frozen=True)
class ScoredLayer:
    """One prunable layer: its group, its qualified name and its weight parameter."""

    group: str
    name: str
    weight: nn.Parameter


def check_variant(variant: str) -> None:
    """An unknown variant is an error that lists the known ones."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown score variant {variant!r}; known: {', '.join(VARIANTS)}")


def check_batches(batches: list[dict]) -> None:
    if not batches:
        raise ValueError("no calibration batches to score with")


def collect_layers(model: nn.Module, groups: dict[str, dict[str, nn.Module]]) -> list[ScoredLayer]:
    """Flatten ``groups`` into scored layers, in order, checking that they make sense.

    Every group holds at least one layer; every layer has a ``weight`` parameter
    of ``model``; layer names are unique across groups and no weight is listed
    twice (it would be scored, and perturbed, twice).
    """
    if not groups:
        raise ValueError("no groups to score")
    model_params = {id(p) for p in model.parameters()}
    layers: list[ScoredLayer] = []
    seen_names: dict[str, str] = {}
    seen_weights: dict[int, str] = {}
    for group, members in groups.items():
        if not members:
            raise ValueError(f"group {group!r} has no layers")
        for name, module in members.items():
            if name in seen_names:
                raise ValueError(f"layer {name!r} is listed in groups {seen_names[name]!r} and {group!r}")
            weight = getattr(module, "weight", None)
            if not isinstance(weight, nn.Parameter):
                raise ValueError(f"layer {name!r} ({type(module).__name__}) has no weight parameter")
            if id(weight) in seen_weights:
                raise ValueError(f"layers {seen_weights[id(weight)]!r} and {name!r} share one weight")
            if id(weight) not in model_params:
                raise ValueError(f"the weight of layer {name!r} is not a parameter of the model")
            seen_names[name] = group
            seen_weights[id(weight)] = name
            layers.append(ScoredLayer(group, name, weight))
    return layers


def group_totals(layers: list[ScoredLayer], layer_scores: dict[str, float]) -> dict[str, float]:
    """S_g = sum of s_l over each group's layers (exactly rounded sum)."""
    members: dict[str, list[float]] = {}
    for layer in layers:
        members.setdefault(layer.group, []).append(layer_scores[layer.name])
    return {group: math.fsum(values) for group, values in members.items()}


@contextlib.contextmanager
def module_modes(model: nn.Module, train: bool) -> Iterator[None]:
    """Put every module in train (or eval) mode for the duration; restore each module's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(train)
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def only_these_require_grad(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Freeze every parameter of ``model`` except ``params``; restore all flags afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def isolated_rng(params: list[Tensor], seed: int) -> Iterator[Callable[[int], None]]:
    """Seed the global RNGs for the duration only; yields a function that re-seeds them.

    The RNGs are the CPU one and those of the CUDA devices holding ``params``.
    Whatever randomness the loss function draws (dropout when the model is left
    in train mode, sampled noise) is then fixed by the seed, and the caller's
    RNG state is as it was afterwards.
    """
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})

    def reseed(value: int) -> None:
        torch.random.default_generator.manual_seed(value)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(value)

    with torch.random.fork_rng(devices=cuda):
        reseed(seed)
        yield reseed


def derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and a path of names/indices, stable across runs and platforms."""
    text = "\x1f".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 for accumulating scores, float32 where the device has no float64 (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar, or a silent stand-in when progress is off."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)
