"""First-order group scores: true gradients by backprop, reduced to scalars as soon as they exist."""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .base import (
    SCORERS,
    accumulation_dtype,
    LossFn,
    ScoredLayer,
    ScoreResult,
    check_batches,
    check_variant,
    collect_layers,
    group_totals,
    isolated_rng,
    module_modes,
    only_these_require_grad,
    progress_bar,
)

NORMS = ("l1", "l2", "l2_group")


@SCORERS.register("first_order")
def first_order(
    model: nn.Module,
    groups: dict[str, dict[str, nn.Module]],
    loss_fn: LossFn,
    batches: list[dict],
    *,
    variant: str = "grad",
    seed: int = 0,
    progress: bool = False,
    norm: str = "l1",
    checkpointing: bool = False,
    eval_mode: bool = True,
) -> ScoreResult:
    """Score groups by the true gradient of the loss: one forward and one backward per batch.

    With g_lb the gradient of batch b's loss w.r.t. the prunable weight W_l,
    the layer score s_l sums over batches b (and over the tensor's elements):

    - ``grad``, ``norm="l1"`` (default): s_l = sum_b sum |g_lb|, the reference's
      "GradOnly" score (an L1 norm); ``norm="l2"``: s_l = sum_b ||g_lb||_2, the
      quantity the zeroth-order scores at tensor granularity track (up to
      sqrt(2/pi)); ``norm="l2_group"``: S_g = sum_b ||g_gb||_2 with g_gb the
      whole group's gradient (all its prunable tensors concatenated), the
      quantity the zeroth-order scores at group granularity (the default)
      track, up to sqrt(2/pi). Its layer scores split each batch's group norm
      by squared-norm share, s_l = sum_b ||g_lb||_2^2 / ||g_gb||_2, so they
      sum to S_g;
    - ``weight_grad``: s_l = sum_b sum |W_l * g_lb|;
    - ``weight_grad_sq``: s_l = sum_b sum (W_l * g_lb)^2.

    ``norm`` applies to ``grad`` only. S_g = sum of s_l over the group. The
    reference (ylsung/ECoFLaP, ``compute_importance_scores``) keeps the
    element-wise mean over batches of |g| (or g^2) and multiplies it by |W|
    (or W^2) afterwards; summed over a tensor that is the same quantity
    divided by the number of batches, a factor shared by every group that
    changes neither the ranking nor ECoFLaP's allocation (which uses
    S_g / sum S). For ``weight_grad_sq`` the reference averages g^2 over
    batches before multiplying by W^2, which is what this sums.

    Memory: each prunable weight's gradient is reduced to its scalar the
    moment it has been accumulated (``register_post_accumulate_grad_hook``)
    and then dropped (``param.grad = None``), so at most a few full gradient
    tensors exist at once, never the full set. Only the prunable weights
    require grad while scoring, so no other parameter gradient is computed or
    stored; every ``requires_grad`` flag and any ``.grad`` the prunable weights
    held before are restored afterwards. The activations kept for the
    backward pass remain the main extra cost over a forward pass.

    Options:
        norm: "l1", "l2" or "l2_group", for the ``grad`` variant.
        checkpointing: if True and the model is a Hugging Face model (it has
            ``gradient_checkpointing_enable``), turn activation (gradient)
            checkpointing on for the duration and off again afterwards:
            activations inside each checkpointed block are recomputed during
            the backward pass instead of being stored, trading about one more
            forward of compute for activation memory. The recompute is
            counted as one more (partial) forward pass per batch. Hugging Face
            checkpoints only modules in train mode, so with ``eval_mode`` the
            checkpointed blocks alone are flagged as training (their
            submodules stay in eval mode, so dropout stays off).
        eval_mode: put every module in eval mode while scoring (default);
            each module's own flag is restored afterwards.

    ``seed`` seeds the global RNGs for the duration (any randomness the loss
    draws, e.g. dropout with ``eval_mode=False``) and leaves the caller's RNG
    state untouched.
    """
    check_variant(variant)
    check_batches(batches)
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")

    layers = collect_layers(model, groups)
    weights = [layer.weight for layer in layers]
    reduce = _reducer(variant, norm)
    batch_values = {  # each layer's scalar for the batch in progress, written by its gradient hook
        layer.name: torch.zeros((), dtype=accumulation_dtype(layer.weight.device), device=layer.weight.device)
        for layer in layers
    }
    totals = {name: torch.zeros_like(value) for name, value in batch_values.items()}
    saved_grads = [(w, w.grad) for w in weights]
    handles = []
    forwards = backwards = 0
    modes = module_modes(model, train=False) if eval_mode else contextlib.nullcontext()
    try:
        with (
            modes,
            only_these_require_grad(model, weights),
            _checkpointing(model, checkpointing) as recomputes,
            isolated_rng(weights, seed),
            torch.enable_grad(),
            progress_bar(len(batches), "first-order scores", progress) as bar,
        ):
            for w in weights:
                w.grad = None
            for layer in layers:  # a hook needs requires_grad=True when it is registered
                handles.append(layer.weight.register_post_accumulate_grad_hook(_hook(reduce, batch_values, layer.name)))
            for b, batch in enumerate(batches):
                loss = loss_fn(model, batch)
                forwards += 1
                if not (isinstance(loss, Tensor) and loss.requires_grad):
                    raise RuntimeError(
                        f"the loss of batch {b} does not depend on any prunable weight "
                        "(was it computed under torch.no_grad() or detached?)"
                    )
                loss.backward()
                _add_batch(totals, batch_values, layers, norm)
                backwards += 1
                forwards += recomputes
                bar.update(1)
    finally:
        for handle in handles:
            handle.remove()
        for w, grad in saved_grads:
            w.grad = grad

    layer_scores = {name: float(total) for name, total in totals.items()}
    return ScoreResult(group_totals(layers, layer_scores), layer_scores, forwards, backwards)


def _reducer(variant: str, norm: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The per-batch scalar of one tensor, from its weight and gradient, in float64 (float32 on MPS)."""
    if variant == "grad" and norm == "l2_group":  # squared: the group's norm is taken once all its layers are in
        return lambda w, g: torch.linalg.vector_norm(g, 2, dtype=accumulation_dtype(g.device)).square()
    if variant == "grad":
        order = 1 if norm == "l1" else 2
        return lambda w, g: torch.linalg.vector_norm(g, order, dtype=accumulation_dtype(g.device))
    if variant == "weight_grad":
        return lambda w, g: torch.linalg.vector_norm(w * g, 1, dtype=accumulation_dtype(g.device))
    return lambda w, g: torch.linalg.vector_norm(w * g, 2, dtype=accumulation_dtype(g.device)).square()


def _hook(reduce: Callable[[Tensor, Tensor], Tensor], batch_values: dict[str, Tensor], name: str):
    def on_accumulated(param: nn.Parameter) -> None:
        if param.grad is not None:
            with torch.no_grad():
                batch_values[name] += reduce(param.detach(), param.grad)
        param.grad = None

    return on_accumulated


def _add_batch(
    totals: dict[str, Tensor], batch_values: dict[str, Tensor], layers: list[ScoredLayer], norm: str
) -> None:
    """Add one batch's layer scalars to the totals and zero them for the next batch (on device, no sync).

    ``l2_group``: the scalars are squared norms ||g_lb||^2; layer l gets
    ||g_lb||^2 / ||g_gb|| with ||g_gb||^2 the sum over its group, so the
    group's layers add up to ||g_gb|| (0 for a group whose gradient is 0).
    """
    if norm == "l2_group":
        group_norm: dict[str, Tensor] = {}
        for layer in layers:
            group_norm[layer.group] = group_norm.get(layer.group, 0) + batch_values[layer.name]
        group_norm = {group: value.sqrt() for group, value in group_norm.items()}
        for layer in layers:
            norm_g = group_norm[layer.group]
            totals[layer.name] += torch.where(norm_g > 0, batch_values[layer.name] / norm_g, 0.0)
    else:
        for name, value in batch_values.items():
            totals[name] += value
    for value in batch_values.values():
        value.zero_()


@contextlib.contextmanager
def _checkpointing(model: nn.Module, enabled: bool) -> Iterator[int]:
    """Hugging Face activation checkpointing for the duration; yields the extra forwards per batch (0 or 1).

    Leaves the model as found: checkpointing off again (unless it was on
    before), no input-embedding hook left behind, train/eval flags restored.
    """
    if not enabled:
        yield 0
        return
    if not hasattr(model, "gradient_checkpointing_enable"):
        warnings.warn(f"checkpointing=True ignored: {type(model).__name__} has no gradient_checkpointing_enable",
                      stacklevel=4)
        yield 0
        return
    # transformers >= 5 renamed these methods; the old names warn that they are deprecated
    new_api = hasattr(model, "activation_checkpointing_enable")
    was_on = bool(getattr(model, "is_activation_checkpointing" if new_api else "is_gradient_checkpointing", False))
    had_input_hooks = bool(getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None))
    flags = [(m, m.training) for m in model.modules()]
    turned_on = False
    if not was_on:
        try:
            if new_api:
                model.activation_checkpointing_enable()
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            turned_on = True
        except ValueError as err:  # the architecture does not support it
            warnings.warn(f"checkpointing=True ignored: {err}", stacklevel=4)
            yield 0
            return
    try:
        # checkpointing only acts on modules in train mode: flag those modules alone, so their
        # submodules (dropout, attention dropout) stay in whatever mode the caller chose
        for m in model.modules():
            if getattr(m, "gradient_checkpointing", False) is True:
                m.training = True
        yield 1
    finally:
        for m, flag in flags:
            m.training = flag
        if turned_on:
            if new_api:
                model.activation_checkpointing_disable()
            else:
                model.gradient_checkpointing_disable()
            if not had_input_hooks and hasattr(model, "disable_input_require_grads"):
                model.disable_input_require_grads()
