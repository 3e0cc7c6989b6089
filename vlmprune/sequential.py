"""Block-by-block ("sequential") calibration and pruning, as the Wanda and SparseGPT reference codes do it.

For each tower: run the calibration batches once up to the tower's last group, recording the input
of group 0 and the extra arguments every group is called with (attention masks, position embeddings:
the same objects for every group, so they cost no extra memory). Then for each group in order:

1. run the current hidden states through the group with forward hooks on its prunable layers, to
   accumulate each layer's input statistics (Wanda: column norms; SparseGPT: H = 2 X^T X / n);
2. prune every layer of the group with its own sparsity;
3. run the hidden states through the *pruned* group: its outputs are the next group's inputs.

Only one group's activations for the calibration batches are held at a time. Calibration samples
are pushed through a group in batches (the references push one sample at a time).

Faults: the group-0 inputs, every layer's input statistics, every pruned weight and every group's
output are checked for NaN/inf; the first non-finite value raises :class:`NonFiniteError` naming the
group and the first module (in call order) whose output is not finite, before anything is written.

Offloading: ``hold(group name)``, when given, is a context manager that keeps the group's weights
on the device while it is calibrated, pruned and run (vlmprune/offload.py); the calibration
forward brings each group in for its own call.

Resume: ``restore(group name)`` may return a finished group's pruned weights and masks (what
``on_group_done`` was given when it finished); the group is then not pruned again, only run to
get the next group's inputs. Same weights and the same ops on the same inputs: the result is bit
for bit that of an uninterrupted run.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from vlmprune.errors import NonFiniteError
from vlmprune.pruners import InputStats, Pruner, set_weight_matrix, weight_matrix

# what a NaN/inf error tells the user to change
NONFINITE_HINT = ("nothing was written and earlier artifacts are kept; check the model's weights (model.id) and "
                  "model.dtype (float16 overflows: use float32 or bfloat16)")


class _StopForward(Exception):
    """Raised by a hook to end a calibration forward once the tower's last group has run."""


@dataclass
class GroupCall:
    """How a group was called, minus its hidden-state input."""

    args: tuple
    kwargs: dict
    hidden_key: str | None  # None: the hidden state is the first positional argument


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, GroupCall]:
    if args:
        return args[0], GroupCall(args[1:], dict(kwargs), None)
    return kwargs["hidden_states"], GroupCall((), {k: v for k, v in kwargs.items() if k != "hidden_states"}, "hidden_states")


def run_group(group: nn.Module, hidden: torch.Tensor, call: GroupCall) -> torch.Tensor:
    """Call ``group`` on ``hidden`` with the recorded extra arguments; return its hidden-state output."""
    if call.hidden_key is None:
        out = group(hidden, *call.args, **call.kwargs)
    else:
        out = group(*call.args, **{**call.kwargs, call.hidden_key: hidden})
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_group_inputs(model: nn.Module, run: Callable[[nn.Module, dict], Any], batches: list[dict],
                         groups: list[nn.Module]) -> tuple[list[torch.Tensor], list[list[GroupCall]]]:
    """Inputs of ``groups[0]`` per batch, and each group's call arguments per batch.

    Returns ``(hidden, calls)`` with ``hidden[b]`` the group-0 input of batch b and ``calls[b][g]``
    the arguments group g was called with. Hooks are removed even if the forward fails.
    """
    hidden: list[torch.Tensor] = []
    calls: list[list[GroupCall]] = []
    current: list[GroupCall] = []

    def pre_hook(index: int):
        def hook(module, args, kwargs):
            h, call = _split_hidden(args, kwargs)
            if index == 0:
                hidden.append(h.detach())
            current.append(call)
        return hook

    def stop(module, args, output):
        raise _StopForward

    handles = [g.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, g in enumerate(groups)]
    handles.append(groups[-1].register_forward_hook(stop))
    try:
        for batch in batches:
            current = []
            try:
                run(model, batch)
            except _StopForward:
                pass
            if len(current) != len(groups):
                raise RuntimeError(f"the calibration forward reached {len(current)} of {len(groups)} groups")
            calls.append(current)
    finally:
        for handle in handles:
            handle.remove()
    return hidden, calls


@torch.no_grad()
def collect_stats(group: nn.Module, layers: dict[str, nn.Module], hidden: list[torch.Tensor],
                  calls: list[GroupCall], need_hessian: bool) -> dict[str, InputStats]:
    """Input statistics of each layer of ``group`` over all calibration batches."""
    stats = {name: InputStats(layer, need_hessian) for name, layer in layers.items()}
    handles = [layers[name].register_forward_hook(s) for name, s in stats.items()]
    try:
        for h, call in zip(hidden, calls):
            run_group(group, h, call)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _finite(value) -> bool:
    """True when every tensor in ``value`` (a tensor, or a tuple/list of them and other things) is finite."""
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, (tuple, list)):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):  # a transformers ModelOutput
        return all(_finite(v) for v in value.values())
    return True


class _Found(Exception):
    """Raised by a hook to end the search once a non-finite output is found."""


@torch.no_grad()
def first_nonfinite_module(group: nn.Module, prefix: str, hidden: list[torch.Tensor],
                           calls: list[GroupCall]) -> str | None:
    """The full name of the first module of ``group`` (in call order) whose output holds NaN or inf.

    A module returns after its children, so this is the innermost module where the value first
    appears; None when every output is finite.
    """
    found: list[str] = []

    def hook(name: str):
        def check(module, args, output):
            if not _finite(output):
                found.append(name)
                raise _Found
        return check

    handles = [m.register_forward_hook(hook(f"{prefix}.{n}" if n else prefix)) for n, m in group.named_modules()]
    try:
        for h, call in zip(hidden, calls):
            try:
                run_group(group, h, call)
            except _Found:
                return found[0]
    finally:
        for handle in handles:
            handle.remove()
    return None


def _raise_nonfinite(name: str, group: nn.Module, hidden: list[torch.Tensor], calls: list[GroupCall],
                     when: str) -> None:
    module = first_nonfinite_module(group, name, hidden, calls)
    where = f"first in the output of {module}" if module else "in its layer statistics"
    raise NonFiniteError(f"NaN or inf in group {name} ({when}): {where}; {NONFINITE_HINT}")


def _stats_finite(stats: InputStats) -> bool:
    return _finite(stats.col_sq_norm) and (stats.hessian is None or _finite(stats.hessian))


def prune_layer(layer: nn.Module, pruner: Pruner, stats: InputStats | None, sparsity: float,
                nm: tuple[int, int] | None, name: str = "layer") -> torch.Tensor:
    """Prune one layer in place; return its mask (True = pruned) on the CPU.

    Raises :class:`NonFiniteError` (before changing the layer) when the pruned weight holds NaN or inf.
    """
    new_weight, mask = pruner.prune(weight_matrix(layer), stats, sparsity, nm)
    if not _finite(new_weight):
        raise NonFiniteError(f"NaN or inf in the pruned weight of {name}; {NONFINITE_HINT}")
    set_weight_matrix(layer, new_weight)
    return mask.reshape(layer.weight.shape).cpu()


GroupState = dict[str, torch.Tensor]  # "<layer>.weight" and "<layer>.mask" for each layer of a group


def group_state(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> GroupState:
    """A finished group's pruned weights and masks, on the CPU (what ``on_group_done`` receives)."""
    state = {}
    for name, layer in layers.items():
        state[f"{name}.weight"] = layer.weight.detach().cpu().clone()
        state[f"{name}.mask"] = masks[name]
    return state


@torch.no_grad()
def restore_group(layers: dict[str, nn.Module], state: GroupState, masks: dict[str, torch.Tensor]) -> None:
    """Put a finished group's saved weights back into its layers and its masks into ``masks``."""
    for name, layer in layers.items():
        layer.weight.copy_(state[f"{name}.weight"].to(device=layer.weight.device))
        masks[name] = state[f"{name}.mask"]


@torch.no_grad()
def prune_tower_sequential(model: nn.Module, run: Callable[[nn.Module, dict], Any], batches: list[dict],
                           groups: list[tuple[str, nn.Module, dict[str, nn.Module]]],
                           layer_sparsity: dict[str, float], pruner: Pruner, nm: tuple[int, int] | None,
                           progress: bool = True, desc: str = "prune",
                           restore: Callable[[str], GroupState | None] | None = None,
                           on_group_done: Callable[[str, GroupState], None] | None = None,
                           hold: Callable[[str], AbstractContextManager] | None = None,
                           keep_masks: bool = True) -> dict[str, torch.Tensor]:
    """Prune one tower group by group; ``groups`` holds (name, module, {layer name: layer}).

    Returns the masks by layer name (none with ``keep_masks=False``: a finished group's masks are
    then only given to ``on_group_done``, so they never pile up in memory). A pruner that needs no
    inputs (magnitude) skips calibration. ``restore`` and ``on_group_done`` give resume, ``hold``
    offloading (see the module docstring); all optional.
    """
    masks: dict[str, torch.Tensor] = {}
    hold = hold or (lambda name: nullcontext())

    def finished(layers: dict[str, nn.Module]) -> None:
        if not keep_masks:
            for name in layers:
                masks.pop(name, None)

    def restored(name: str, layers: dict[str, nn.Module]) -> bool:
        state = restore(name) if restore else None
        if state is not None:
            restore_group(layers, state, masks)
        return state is not None

    if not pruner.needs_inputs:
        for group_name, _, layers in tqdm(groups, desc=desc, disable=not progress, leave=False):
            with hold(group_name):
                if not restored(group_name, layers):
                    for name, layer in layers.items():
                        masks[name] = prune_layer(layer, pruner, None, layer_sparsity[name], nm, name)
                    if on_group_done:
                        on_group_done(group_name, group_state(layers, masks))
            finished(layers)
        return masks

    hidden, calls = capture_group_inputs(model, run, batches, [g for _, g, _ in groups])
    if not all(_finite(h) for h in hidden):
        raise NonFiniteError(f"NaN or inf in the input of group {groups[0][0]}, the tower's first group: the "
                             f"layers before it (embeddings, stem) produce it; {NONFINITE_HINT}")
    for index, (group_name, group, layers) in enumerate(tqdm(groups, desc=desc, disable=not progress, leave=False)):
        group_calls = [c[index] for c in calls]
        with hold(group_name):
            was_restored = restored(group_name, layers)
            if not was_restored:
                stats = collect_stats(group, layers, hidden, group_calls, pruner.needs_hessian)
                if not all(_stats_finite(s) for s in stats.values()):
                    _raise_nonfinite(group_name, group, hidden, group_calls, "dense weights, before pruning")
                for name, layer in layers.items():
                    masks[name] = prune_layer(layer, pruner, stats.pop(name), layer_sparsity[name], nm, name)
            # the next group's inputs; the last group's output is computed only to check it
            outputs = [run_group(group, h, call) for h, call in zip(hidden, group_calls)]
            if not all(_finite(o) for o in outputs):
                _raise_nonfinite(group_name, group, hidden, group_calls, "after pruning")
            if on_group_done and not was_restored:
                on_group_done(group_name, group_state(layers, masks))
            hidden = outputs
        finished(layers)
    return masks
