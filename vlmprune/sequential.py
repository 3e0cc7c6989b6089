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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from vlmprune.pruners import InputStats, Pruner, set_weight_matrix, weight_matrix


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


def prune_layer(layer: nn.Module, pruner: Pruner, stats: InputStats | None, sparsity: float,
                nm: tuple[int, int] | None) -> torch.Tensor:
    """Prune one layer in place; return its mask (True = pruned) on the CPU."""
    new_weight, mask = pruner.prune(weight_matrix(layer), stats, sparsity, nm)
    set_weight_matrix(layer, new_weight)
    return mask.reshape(layer.weight.shape).cpu()


@torch.no_grad()
def prune_tower_sequential(model: nn.Module, run: Callable[[nn.Module, dict], Any], batches: list[dict],
                           groups: list[tuple[str, nn.Module, dict[str, nn.Module]]],
                           layer_sparsity: dict[str, float], pruner: Pruner, nm: tuple[int, int] | None,
                           progress: bool = True, desc: str = "prune") -> dict[str, torch.Tensor]:
    """Prune one tower group by group; ``groups`` holds (name, module, {layer name: layer}).

    Returns the masks by layer name. A pruner that needs no inputs (magnitude) skips calibration.
    """
    masks: dict[str, torch.Tensor] = {}
    if not pruner.needs_inputs:
        for _, _, layers in tqdm(groups, desc=desc, disable=not progress, leave=False):
            for name, layer in layers.items():
                masks[name] = prune_layer(layer, pruner, None, layer_sparsity[name], nm)
        return masks

    hidden, calls = capture_group_inputs(model, run, batches, [g for _, g, _ in groups])
    for index, (_, group, layers) in enumerate(tqdm(groups, desc=desc, disable=not progress, leave=False)):
        group_calls = [c[index] for c in calls]
        stats = collect_stats(group, layers, hidden, group_calls, pruner.needs_hessian)
        for name, layer in layers.items():
            masks[name] = prune_layer(layer, pruner, stats.pop(name), layer_sparsity[name], nm)
        if index + 1 < len(groups):
            hidden = [run_group(group, h, call) for h, call in zip(hidden, group_calls)]
    return masks
