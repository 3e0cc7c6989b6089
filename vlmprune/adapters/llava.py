"""Adapter for LLaVA (``LlavaForConditionalGeneration``).

Towers: ``vision`` = the layers of the vision tower (a CLIP ViT) whose output the model uses: with
``vision_feature_layer = -2`` (LLaVA-1.5) the last layer's output is never read, so that layer is
left out (pruning it would add sparsity that changes nothing); ``language`` = the decoder layers of
the language model. The multimodal projector, embeddings and LM head are not pruned.

Prompts follow LLaVA-1.5: ``USER: <image>\\n{text} ASSISTANT:`` with the ``<image>`` placeholder
expanded to one image token per patch feature ((image_size / patch_size)^2, plus the CLS token with
``vision_feature_select_strategy = "full"``), preceded by BOS.
Calibration: "Describe the image." answered with a training-template caption; loss = next-token
cross-entropy on the answer tokens. Evaluation: as BLIP-2 (:class:`ImageToTextAdapter`), question
"What number is in the image? Answer with one word." for digits.
"""

from __future__ import annotations

import torch.nn as nn

from vlmprune.adapters.base import ADAPTERS, LoadedModel, Tower
from vlmprune.adapters.blip2 import ImageToTextAdapter
from vlmprune.adapters.causal_lm import architectures, find_layer_list, read_config


def _inner(model: nn.Module) -> nn.Module:
    """The ``LlavaModel`` holding vision tower, projector and language model (transformers 5), or the
    model itself (transformers 4)."""
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, "vision_tower") else model


@ADAPTERS.register("llava")
class LlavaAdapter(ImageToTextAdapter):
    family = "llava"
    model_class = "LlavaForConditionalGeneration"
    caption_prompt = "USER: <image>\nDescribe the image. ASSISTANT:"

    def _used_vision_layers(self, model: nn.Module, n_layers: int) -> int:
        """How many of the first vision layers feed the features the model reads."""
        chosen = model.config.vision_feature_layer
        chosen = [chosen] if isinstance(chosen, int) else list(chosen)
        # hidden_states[0] = embeddings, hidden_states[k] = output of layer k - 1
        return max(c + n_layers + 1 if c < 0 else c for c in chosen)

    def vision_tower(self, model: nn.Module) -> Tower:
        tower = _inner(model).vision_tower
        base = "model.vision_tower" if _inner(model) is not model else "vision_tower"
        path, layers = find_layer_list(tower, model.config.vision_config.num_hidden_layers,
                                       paths=("vision_model.encoder.layers", "encoder.layers"))
        used = self._used_vision_layers(model, len(layers))
        groups = [(f"{base}.{path}.{i}", layers[i]) for i in range(used)]
        return Tower("vision", groups, lambda m, b: _inner(m).vision_tower(pixel_values=b["pixel_values"]))

    def language_layers(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        inner = _inner(model)
        base = "model.language_model" if inner is not model else "language_model"
        path, layers = find_layer_list(inner.language_model, model.config.text_config.num_hidden_layers,
                                       paths=("layers", "model.layers"))
        return f"{base}.{path}", layers

    def n_image_tokens(self, model: nn.Module) -> int:
        vision = model.config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        return n + (1 if model.config.vision_feature_select_strategy == "full" else 0)

    def prompt_ids(self, loaded: LoadedModel, text: str) -> list[int]:
        before, _, after = text.partition("<image>")
        image = [self.image_token_id(loaded.model)] * self.n_image_tokens(loaded.model)
        return self._bos(loaded) + self._text_ids(loaded, before) + image + self._text_ids(loaded, after)

    def question_prompt(self, question: str) -> str:
        return f"USER: <image>\n{question} Answer with one word. ASSISTANT:"

    @classmethod
    def matches(cls, model_id: str) -> bool:
        config = read_config(model_id)
        if config is None:
            return False
        return config.model_type == "llava" or "LlavaForConditionalGeneration" in architectures(config)
