"""Physical removal of attention heads, FFN neurons (MBConv expanded channels) and whole layers.

Every operation rebuilds the affected weights as smaller tensors (``W[keep]`` for output rows,
``W[:, keep]`` for input columns) and updates the shape attributes, so parameter count, file size
and latency all fall. The computation on what is kept is unchanged:

- heads: attention output ``o(concat_h softmax(q_h k_h^T / sqrt(d)) v_h)`` is a sum over heads of
  ``W_o[:, h] * context_h``, so dropping rows of q/k/v and the matching columns of ``W_o`` equals
  zeroing that head's context (the ``W_o`` bias stays). Under GQA the unit is one KV head with its
  g query heads (:class:`~vlmprune.structured.towers.Attention`): its k/v rows are read by those
  queries only, so removing the unit equals zeroing the context of its g query heads, and
  ``num_key_value_groups`` (g) is unchanged;
- FFN neurons / expanded channels: ``W_down act(W_up x + b)`` (gated: ``W_down (act(W_gate x) *
  W_up x)``) is a sum over neurons, so dropping a row of ``W_up`` (and of ``W_gate``, and BN/depthwise
  channels in MBConv, which act per channel) with the matching column of ``W_down`` equals zeroing
  that neuron's activation;
- layers on a residual path: ``x + f(x)`` without ``f`` is ``x``, so the layer is deleted.

A pruned model is described by :func:`current_structure`: per tower, the kept layers (indices in
the dense parent) and each kept layer's head count and width. Saved in the model config
(``structure``), it lets a loader build the dense parent from its unchanged config, cut it with
:func:`apply_structure` and then load the smaller weights (transformers configs cannot express
uneven head counts or widths per layer).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from vlmprune.structured.towers import Attention, StructuredTower, Width, structured_towers

PARENT_INDEX = "_structured_parent_index"


def _index(keep: Iterable[int], device) -> torch.Tensor:
    return torch.as_tensor(sorted(int(i) for i in keep), dtype=torch.long, device=device)


def _param(tensor: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone().contiguous(), requires_grad=like.requires_grad)


def slice_linear(layer: nn.Linear, keep: torch.Tensor, dim: int) -> None:
    """Keep output rows (``dim=0``, with the bias) or input columns (``dim=1``) of a Linear layer."""
    layer.weight = _param(layer.weight.index_select(dim, keep), layer.weight)
    if dim == 0:
        if layer.bias is not None:
            layer.bias = _param(layer.bias[keep], layer.bias)
        layer.out_features = len(keep)
    else:
        layer.in_features = len(keep)


def slice_conv(conv: nn.Conv2d, keep: torch.Tensor, dim: int) -> None:
    """Keep output (``dim=0``) or input (``dim=1``) channels of an ungrouped conv; a depthwise conv
    (groups == channels) keeps the same channels on both sides."""
    if conv.groups > 1:
        if conv.groups != conv.in_channels or conv.groups != conv.out_channels:
            raise NotImplementedError("only ungrouped or depthwise convolutions can be sliced")
        conv.weight = _param(conv.weight[keep], conv.weight)
        conv.in_channels = conv.out_channels = conv.groups = len(keep)
    elif dim == 0:
        conv.weight = _param(conv.weight[keep], conv.weight)
        conv.out_channels = len(keep)
    else:
        conv.weight = _param(conv.weight[:, keep], conv.weight)
        conv.in_channels = len(keep)
    if conv.bias is not None and (dim == 0 or conv.groups > 1):
        conv.bias = _param(conv.bias[keep], conv.bias)


def slice_batchnorm(bn: nn.BatchNorm2d, keep: torch.Tensor) -> None:
    bn.weight = _param(bn.weight[keep], bn.weight)
    bn.bias = _param(bn.bias[keep], bn.bias)
    bn.running_mean = bn.running_mean[keep].clone()
    bn.running_var = bn.running_var[keep].clone()
    bn.num_features = len(keep)


def keep_heads(attention: Attention, heads: Iterable[int]) -> None:
    """Keep only ``heads`` (indices among the current heads) of one attention block."""
    heads = sorted(int(h) for h in heads)
    if not heads:
        raise ValueError("cannot remove every head of a layer; remove the layer instead")
    device = attention.q.weight.device
    keep_q, keep_kv = _index(attention.query_index(heads), device), _index(attention.kv_index(heads), device)
    slice_linear(attention.q, keep_q, 0)
    for proj in (attention.k, attention.v):
        slice_linear(proj, keep_kv, 0)
    slice_linear(attention.o, keep_q, 1)
    owner = attention.owner
    for name in ("num_attention_heads", "num_heads"):
        if hasattr(owner, name):
            setattr(owner, name, len(heads) * attention.group)
    if hasattr(owner, "num_key_value_heads"):
        owner.num_key_value_heads = len(heads)
    if hasattr(owner, "all_head_size"):
        owner.all_head_size = len(keep_q)


def keep_width(width: Width, neurons: Iterable[int]) -> None:
    """Keep only ``neurons`` (FFN neurons or MBConv expanded channels, current indices)."""
    keep = _index(neurons, width.down.weight.device)
    if len(keep) == 0:
        raise ValueError("cannot remove every FFN neuron of a layer; remove the layer instead")
    if width.kind in ("linear", "gated"):
        for up in (width.up, *width.extra):
            slice_linear(up, keep, 0)
        slice_linear(width.down, keep, 1)
        return
    bn0, depthwise, bn1 = width.extra
    slice_conv(width.up, keep, 0)
    slice_batchnorm(bn0, keep)
    slice_conv(depthwise, keep, 0)
    slice_batchnorm(bn1, keep)
    slice_conv(width.down, keep, 1)


def tag_parent_indices(tower: StructuredTower) -> None:
    """Remember each layer's index in the dense parent (once, before any layer is dropped)."""
    for i, layer in enumerate(tower.layers):
        if not hasattr(layer, PARENT_INDEX):
            setattr(layer, PARENT_INDEX, i)


def parent_indices(tower: StructuredTower) -> list[int]:
    return [getattr(layer, PARENT_INDEX, i) for i, layer in enumerate(tower.layers)]


def keep_layers(tower: StructuredTower, layers: Iterable[int]) -> None:
    """Keep only ``layers`` (current indices); the others must be residual (droppable) layers."""
    tag_parent_indices(tower)
    keep = sorted(int(i) for i in layers)
    current = list(tower.layers)
    for i, layer in enumerate(current):
        if i not in keep and not tower.droppable(layer):
            raise ValueError(f"{tower.name} layer {i} has no residual path and cannot be removed")
    kept = [current[i] for i in keep]
    for position, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position  # (KV-cache slot; unused by encoders but kept consistent)
    setattr(tower.parent, tower.attr, nn.ModuleList(kept))


def current_structure(model: nn.Module, names: list[str] | None = None) -> dict:
    """Per tower: kept layers (indices in the dense parent), heads (head units: KV heads under GQA)
    and width of each kept layer."""
    out = {}
    for tower in structured_towers(model, names):
        heads, widths = [], []
        for layer in tower.layers:
            attention, width = tower.attention(layer), tower.width(layer)
            heads.append(attention.n_heads if attention else 0)
            widths.append(width.size if width else 0)
        out[tower.name] = {"layers": parent_indices(tower), "heads": heads, "widths": widths}
    return out


def apply_structure(model: nn.Module, structure: dict) -> nn.Module:
    """Cut a freshly built dense parent to ``structure`` (shapes only; load the weights afterwards)."""
    for tower in structured_towers(model, [t for t in structure]):
        spec = structure[tower.name]
        keep_layers(tower, spec["layers"])
        for layer, heads, width in zip(tower.layers, spec["heads"], spec["widths"], strict=True):
            attention, ffn = tower.attention(layer), tower.width(layer)
            if attention is not None and heads != attention.n_heads:
                keep_heads(attention, range(heads))
            if ffn is not None and width != ffn.size:
                keep_width(ffn, range(width))
    return model


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
