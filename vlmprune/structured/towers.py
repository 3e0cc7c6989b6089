"""What structured pruning needs to know about a tower: its layers, their heads and FFN widths.

A *structured tower* names, for each layer (transformer layer or MBConv block), the modules that
hold its prunable units:

- attention heads: the query/key/value projections (output rows) and the output projection (input
  columns); head ``h`` owns rows/columns ``h * head_dim : (h + 1) * head_dim``;
- FFN neurons: the up projection (output rows) and the down projection (input columns); for an
  MBConv block the *expanded channels*: expand conv + BN0 (outputs), depthwise conv + BN1, and the
  project conv (inputs);
- the whole layer, when it sits on a residual path (dropping it leaves ``x -> x``).

It also gives the tower's *tail*, which maps the last layer's output to the normalised embedding,
so that a forward can start at any layer from cached inputs (:mod:`vlmprune.structured.mope`).

Families: the offline dual encoder (BERT text tower, EfficientNet-lite vision tower),
``CLIPModel`` (two pre-norm transformer towers) and LLaMA-style causal LMs (Llama, SmolLM2, Qwen2,
Mistral: ``self_attn.{q,k,v,o}_proj`` and a gated ``mlp.{gate,up,down}_proj``), whose tower
``language`` ends in the final norm and the LM head (its tail gives logits, not an embedding).

Grouped-query attention (GQA): ``g = num_attention_heads / num_key_value_heads`` query heads share
one key/value head. A prunable *head unit* is then one KV head together with its g query heads
(rows ``u*d:(u+1)*d`` of k/v, rows ``u*g*d:(u+1)*g*d`` of q, the same columns of o), so every
kept KV head still serves exactly g query heads and ``num_key_value_groups`` stays uniform
(``g = 1`` is plain multi-head attention, one unit per head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Attention:
    """The head-carrying modules of one attention block (rows of q/k/v, columns of o)."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    owner: nn.Module  # the module whose head-count attributes are updated
    head_dim: int
    group: int = 1    # query heads per key/value head (GQA); a unit is one KV head and its queries

    @property
    def n_heads(self) -> int:
        """Prunable head units: KV heads under GQA, heads otherwise."""
        return self.q.out_features // (self.head_dim * self.group)

    def query_index(self, units) -> list[int]:
        """Rows of q (columns of o) owned by ``units``."""
        w = self.head_dim * self.group
        return [u * w + j for u in units for j in range(w)]

    def kv_index(self, units) -> list[int]:
        """Rows of k and v owned by ``units``."""
        d = self.head_dim
        return [u * d + j for u in units for j in range(d)]


@dataclass
class Width:
    """The FFN (or expanded-channel) modules of one layer. ``kind`` is ``linear`` or ``mbconv``."""

    kind: str                # linear | gated (down(act(gate x) * up x)) | mbconv
    up: nn.Module            # Linear (rows) or 1x1 expand conv (output channels)
    down: nn.Module          # Linear (columns) or 1x1 project conv (input channels)
    extra: tuple = ()        # mbconv: (bn0, depthwise conv, bn1); gated: (gate,); sliced along the same units

    @property
    def size(self) -> int:
        return self.down.in_channels if self.kind == "mbconv" else self.down.in_features


@dataclass
class StructuredTower:
    """One tower: its layer list (``parent.<attr>`` is the ModuleList), per-layer units and its tail."""

    name: str
    parent: nn.Module
    attr: str
    attention: Callable[[nn.Module], Attention | None]
    width: Callable[[nn.Module], Width | None]
    droppable: Callable[[nn.Module], bool]
    tail: Callable[[torch.Tensor, dict], torch.Tensor]      # last hidden -> normalised embedding

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.parent, self.attr)

    def prefix(self, model: nn.Module) -> str:
        names = {id(m): n for n, m in model.named_modules()}
        return f"{names[id(self.parent)]}.{self.attr}"


def layer_output(output):
    """Layers return a tensor (transformers 5) or a tuple whose first item is the hidden states."""
    return output[0] if isinstance(output, (tuple, list)) else output


# ---- the offline dual encoder ----------------------------------------------------------------

def _bert_attention(layer) -> Attention:
    s = layer.attention.self
    return Attention(s.query, s.key, s.value, layer.attention.output.dense, s, s.attention_head_size)


def _bert_width(layer) -> Width:
    return Width("linear", layer.intermediate.dense, layer.output.dense)


def _mbconv_width(block) -> Width | None:
    if block._block_args.expand_ratio == 1 or block.has_se:
        return None  # no expand conv: the depthwise channels are the block's inputs (lite0 has no SE)
    return Width("mbconv", block._expand_conv, block._project_conv, (block._bn0, block._depthwise_conv, block._bn1))


def _mbconv_residual(block) -> bool:
    """The library's own skip condition (stride is an int 1 only on repeated blocks)."""
    a = block._block_args
    return bool(block.id_skip and a.stride == 1 and a.input_filters == a.output_filters)


def dual_encoder_towers(model) -> list[StructuredTower]:
    vision, text = model.vision, model.text

    def vision_tail(x, batch):
        x = vision._swish(vision._bn1(vision._conv_head(x)))
        return F.normalize(model.image_projection(x.mean(dim=(2, 3))), dim=-1)

    def text_tail(x, batch):
        mask = batch["attention_mask"].unsqueeze(-1).to(x.dtype)
        pooled = (x * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(model.text_projection(pooled), dim=-1)

    return [
        StructuredTower("vision", vision, "_blocks", lambda b: None, _mbconv_width, _mbconv_residual,
                        vision_tail),
        StructuredTower("text", text.encoder, "layer", _bert_attention, _bert_width, lambda layer: True,
                        text_tail),
    ]


# ---- CLIPModel -------------------------------------------------------------------------------

def _clip_attention(layer) -> Attention:
    a = layer.self_attn
    return Attention(a.q_proj, a.k_proj, a.v_proj, a.out_proj, a, a.head_dim)


def _clip_width(layer) -> Width:
    return Width("linear", layer.mlp.fc1, layer.mlp.fc2)


def clip_towers(model) -> list[StructuredTower]:
    vm, tm = model.vision_model, model.text_model

    def vision_tail(x, batch):
        return F.normalize(model.visual_projection(vm.post_layernorm(x[:, 0, :])), dim=-1)

    def text_tail(x, batch):
        x = tm.final_layer_norm(x)
        ids = batch["input_ids"].to(torch.int)
        position = ids.argmax(-1) if tm.eos_token_id == 2 else (ids == tm.eos_token_id).int().argmax(-1)
        return F.normalize(model.text_projection(x[torch.arange(len(x), device=x.device), position]), dim=-1)

    return [
        StructuredTower("vision", vm.encoder, "layers", _clip_attention, _clip_width, lambda layer: True,
                        vision_tail),
        StructuredTower("text", tm.encoder, "layers", _clip_attention, _clip_width, lambda layer: True,
                        text_tail),
    ]


# ---- LLaMA-style causal LMs --------------------------------------------------------------------

def _llama_style(layer: nn.Module) -> bool:
    a, m = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return (a is not None and m is not None and all(isinstance(getattr(a, n, None), nn.Linear)
                                                   for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and all(isinstance(getattr(m, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")))


def _llama_attention(layer) -> Attention:
    a = layer.self_attn
    return Attention(a.q_proj, a.k_proj, a.v_proj, a.o_proj, a, a.head_dim,
                     a.q_proj.out_features // a.k_proj.out_features)


def _llama_width(layer) -> Width:
    m = layer.mlp
    return Width("gated", m.up_proj, m.down_proj, (m.gate_proj,))


def is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM")


def causal_lm_towers(model) -> list[StructuredTower]:
    """The decoder layers of a LLaMA-style causal LM as the tower ``language`` (the adapter's name);
    tail: final norm, then the LM head (logits)."""
    from vlmprune.adapters.causal_lm import find_layer_list

    path, layers = find_layer_list(model, getattr(model.config, "num_hidden_layers", None))
    if not all(_llama_style(layer) for layer in layers):
        raise NotImplementedError(
            f"structured pruning of causal LMs is built for LLaMA-style decoder layers (self_attn.q/k/v/o_proj and a "
            f"gated mlp.gate/up/down_proj: Llama, SmolLM2, Qwen2, Mistral), not {type(model).__name__}: use "
            "pruning.method magnitude, wanda or sparsegpt for this model")
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    norm, head = getattr(parent, "norm", None), model.get_output_embeddings()
    if norm is None or head is None:
        raise NotImplementedError(f"{type(model).__name__}: no final norm at {parent_path}.norm or no LM head")

    def tail(x, batch):
        return head(norm(x))

    return [StructuredTower("language", parent, attr, _llama_attention, _llama_width, lambda layer: True, tail)]


def structured_towers(model: nn.Module, names: list[str] | None = None) -> list[StructuredTower]:
    """The structured towers of a supported model, optionally only those named in ``names``."""
    from vlmprune.models.dual_encoder import DualEncoder

    if isinstance(model, DualEncoder):
        towers = dual_encoder_towers(model)
    elif type(model).__name__ == "CLIPModel":
        towers = clip_towers(model)
    elif is_causal_lm(model):
        towers = causal_lm_towers(model)
    else:
        raise NotImplementedError(
            f"structured pruning is built for the dual_encoder, clip and (LLaMA-style) causal_lm families, not "
            f"{type(model).__name__}: use pruning.method magnitude, wanda or sparsegpt for this model"
        )
    known = [t.name for t in towers]
    for name in names or []:
        if name not in known:
            raise ValueError(f"unknown tower {name!r}; this model has: {', '.join(known)}")
    return [t for t in towers if names is None or t.name in names]


def tower_embed(model: nn.Module, tower: StructuredTower, batch: dict) -> torch.Tensor:
    """The tower's normalised embedding of ``batch`` (what the model's own encode method returns)."""
    from vlmprune.models.dual_encoder import DualEncoder

    if isinstance(model, DualEncoder):
        if tower.name == "vision":
            return model.encode_image(batch["pixel_values"])
        return model.encode_text(batch["input_ids"], batch["attention_mask"])
    if tower.name == "vision":
        out = model.get_image_features(pixel_values=batch["pixel_values"])
    else:
        out = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(out, dim=-1)


def logit_scale(model: nn.Module) -> torch.Tensor:
    return model.logit_scale.exp()
