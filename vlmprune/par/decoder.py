"""The small interface PAR needs from a vision-language model, and the models that provide it.

A :class:`Decoder` exposes what a hand-written LLaMA-family prefill/decode loop needs: a function
from ``(input_ids, pixel_values)`` to ``inputs_embeds`` (visual features already in place), the
visual-token id (visual tokens sit where ``input_ids == image_token_id``), the token embedding for
generated tokens, the rotary embedding, the decoder layers, the final norm and the LM head.

Two models provide it (:func:`decoder_of`):

- ``LlavaForConditionalGeneration`` (transformers 5: ``model.model`` holds ``vision_tower``,
  ``multi_modal_projector`` and ``language_model``, a ``LlamaModel``; ``model.lm_head``);
- the offline LLaVA-style ``VisionLM`` (``vlmprune/models/vision_lm.py``): ``embed_inputs`` and a
  ``LlamaForCausalLM`` as ``language_model``.

Layers must be LLaMA-style (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
``post_attention_layernorm``, ``mlp``); attention variants with extra pieces (QK-norm, sliding
windows, attention sinks) are refused with a clear error rather than computed wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn


@dataclass
class Decoder:
    embed_inputs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, pixel_values) -> embeds
    embed_tokens: nn.Module
    rotary: nn.Module  # rotary(x, position_ids) -> (cos, sin)
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module
    image_token_id: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eos_token_id: int | None = None

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.embed_tokens.weight.shape[1]

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids == self.image_token_id


def _check_layers(layers: nn.ModuleList, config) -> None:
    layer = layers[0]
    attn = getattr(layer, "self_attn", None)
    needed = ("input_layernorm", "post_attention_layernorm", "mlp")
    if attn is None or not all(hasattr(layer, n) for n in needed) or \
            not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        raise NotImplementedError(f"PAR runs LLaMA-style decoder layers; {type(layer).__name__} is not one "
                                  "(needs input_layernorm, self_attn.q/k/v/o_proj, post_attention_layernorm, mlp)")
    for extra in ("q_norm", "k_norm", "sinks"):
        if hasattr(attn, extra):
            raise NotImplementedError(f"PAR's decoder loop does not implement attention with {extra} "
                                      f"({type(attn).__name__}); only plain LLaMA/Mistral-style attention")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise NotImplementedError("PAR's decoder loop does not implement sliding-window attention")


def _dims(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def _llava(model: nn.Module) -> Decoder:
    inner = model.model
    lm = inner.language_model
    config = model.config

    def embed_inputs(input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        embeds = lm.embed_tokens(input_ids)
        features = inner.get_image_features(pixel_values=pixel_values,
                                            vision_feature_layer=config.vision_feature_layer,
                                            vision_feature_select_strategy=config.vision_feature_select_strategy,
                                            return_dict=True).pooler_output
        features = torch.cat(list(features), dim=0).to(embeds.dtype)
        mask = (input_ids == config.image_token_id).unsqueeze(-1).expand_as(embeds)
        if int(mask[..., 0].sum()) != features.shape[0]:
            raise ValueError(f"{int(mask[..., 0].sum())} image tokens in input_ids but {features.shape[0]} image "
                             "features: build prompts with the adapter's prompt_ids")
        return embeds.masked_scatter(mask, features)

    _check_layers(lm.layers, config.text_config)
    heads, kv, head_dim = _dims(config.text_config)
    return Decoder(embed_inputs, lm.embed_tokens, lm.rotary_emb, lm.layers, lm.norm, model.lm_head,
                   int(config.image_token_id), heads, kv, head_dim, config.text_config.eos_token_id)


def _vision_lm(model: nn.Module) -> Decoder:
    causal = model.language_model
    lm = causal.model
    _check_layers(lm.layers, causal.config)
    heads, kv, head_dim = _dims(causal.config)
    return Decoder(model.embed_inputs, lm.embed_tokens, lm.rotary_emb, lm.layers, lm.norm, causal.lm_head,
                   int(model.config.image_token_id), heads, kv, head_dim, causal.config.eos_token_id)


def decoder_of(model: nn.Module) -> Decoder:
    """The :class:`Decoder` view of a supported vision-language model (see the module docstring)."""
    name = type(model).__name__
    if name == "LlavaForConditionalGeneration":
        return _llava(model)
    if hasattr(model, "embed_inputs") and hasattr(model, "language_model"):
        return _vision_lm(model)
    raise NotImplementedError(f"PAR supports LlavaForConditionalGeneration and the offline VisionLM; not {name}")
