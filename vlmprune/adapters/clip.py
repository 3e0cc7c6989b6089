"""Adapter for CLIP (``CLIPModel``): contrastive image-text dual encoders.

Towers: ``vision`` = the ViT encoder layers (``vision_model.encoder.layers``), ``text`` = the text
transformer layers (``text_model.encoder.layers``). Embeddings, the final layer norms and the two
projections are not pruned.
Calibration loss: CLIP's own symmetric contrastive loss, ``model(..., return_loss=True).loss``, on
image-caption pairs. Data: the offline image datasets (:mod:`vlmprune.data.images`, digits by
default) with captions from the training templates; evaluation uses the held-out images and the
evaluation-only templates:

- ``zero_shot_accuracy`` (prompt-ensembled class embeddings, :mod:`vlmprune.evaluators.zero_shot`);
- class-aware image-text retrieval: every held-out image is paired with one caption of its class
  (a seeded evaluation template). Captions of one class are near duplicates, so a retrieved item
  counts as correct when it belongs to the query's class: ``i2t_r1``/``i2t_r5`` (image -> captions)
  and ``t2i_r1``/``t2i_r5`` (caption -> images) are the fractions of queries with a correct item in
  their top 1 / top 5.

Images: uint8 arrays, greyscale (replicated to RGB) or RGB, resized (bilinear) to the vision
config's ``image_size``, scaled to [0, 1] and normalised with the processor's
``image_mean``/``image_std`` (CLIP's defaults when the processor has none). The helpers here are shared with BLIP-2 and LLaVA.
"""

from __future__ import annotations


import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmprune.adapters.base import ADAPTERS, LoadedModel, ModelAdapter, Tower
from vlmprune.adapters.causal_lm import architectures, read_config
from vlmprune.data.images import channels_first, draw_calibration_images, image_split
from vlmprune.data.spec import IMAGE_SOURCES, DataSpec
from vlmprune.evaluators.zero_shot import class_embeddings, eval_captions, retrieval_recalls, zero_shot_accuracy

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------
# helpers shared with BLIP-2 and LLaVA

def require_images(spec: DataSpec, family: str) -> None:
    if spec.name not in IMAGE_SOURCES:
        raise ValueError(f"the {family} family needs an image dataset but data.name is {spec.name!r}: "
                         f"set data.name to one of: {', '.join(IMAGE_SOURCES)}")


def image_stats(processor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    image_processor = getattr(processor, "image_processor", None)
    mean = getattr(image_processor, "image_mean", None) or CLIP_MEAN
    std = getattr(image_processor, "image_std", None) or CLIP_STD
    return tuple(mean), tuple(std)


def pixel_values(images: np.ndarray, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """uint8 greyscale (n, h, w) or RGB (n, h, w, 3) -> float (n, 3, size, size): bilinear resize, /255,
    (x - mean) / std."""
    x = F.interpolate(channels_first(images) / 255.0, size=(size, size), mode="bilinear", align_corners=False)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous()


def tokenizer_of(processor):
    """The text tokenizer of a processor (or the tokenizer itself)."""
    return getattr(processor, "tokenizer", None) or processor


def load_processor(model_id: str):
    """``AutoProcessor`` when the model has one, else its ``AutoTokenizer``."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(model_id)
        if getattr(processor, "tokenizer", None) is not None:
            return processor
    except Exception:  # noqa: BLE001  (no processor files: fall back to the tokenizer)
        pass
    return AutoTokenizer.from_pretrained(model_id)


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def features(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose pooler is the projection (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ----------------------------------------------------------------------------------------------

@ADAPTERS.register("clip")
class CLIPAdapter(ModelAdapter):
    family = "clip"

    def load(self, model_id: str, dtype: torch.dtype, device: str) -> LoadedModel:
        from transformers import CLIPModel

        from vlmprune.structured.persist import load_structured_clip, saved_structure

        if saved_structure(model_id):  # structurally pruned: uneven head counts and widths per layer
            model = load_structured_clip(model_id, dtype)
        else:
            model = CLIPModel.from_pretrained(model_id, dtype=dtype)
        return LoadedModel(model.to(device).eval(), load_processor(model_id))

    def towers(self, model: nn.Module) -> list[Tower]:
        vision = [(f"vision_model.encoder.layers.{i}", l) for i, l in enumerate(model.vision_model.encoder.layers)]
        text = [(f"text_model.encoder.layers.{i}", l) for i, l in enumerate(model.text_model.encoder.layers)]
        return [
            Tower("vision", vision, lambda m, b: m.vision_model(pixel_values=b["pixel_values"])),
            Tower("text", text, lambda m, b: m.text_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])),
        ]

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], return_loss=True).loss

    @classmethod
    def matches(cls, model_id: str) -> bool:
        config = read_config(model_id)
        if config is None:
            return False
        return config.model_type == "clip" or "CLIPModel" in architectures(config)

    def _tokenize(self, loaded: LoadedModel, texts: list[str]) -> dict[str, torch.Tensor]:
        max_length = loaded.model.config.text_config.max_position_embeddings
        return tokenizer_of(loaded.processor)(texts, padding=True, truncation=True, max_length=max_length,
                                              return_tensors="pt")

    def _pixels(self, loaded: LoadedModel, images: np.ndarray) -> torch.Tensor:
        mean, std = image_stats(loaded.processor)
        return pixel_values(images, loaded.model.config.vision_config.image_size, mean, std)

    def make_calibration(self, loaded: LoadedModel, spec: DataSpec, n_samples: int, seed: int) -> dict[str, torch.Tensor]:
        """``n_samples`` training-split image-caption pairs (captions from the training templates)."""
        require_images(spec, self.family)
        data, index, labels, captions, _ = draw_calibration_images(spec, n_samples, seed)
        tokens = self._tokenize(loaded, captions)
        return {
            "index": torch.from_numpy(index),
            "pixel_values": self._pixels(loaded, data.images[index]).to(model_dtype(loaded.model)),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "labels": torch.from_numpy(labels),
        }

    @torch.no_grad()
    def evaluate(self, loaded: LoadedModel, spec: DataSpec, batch_size: int, max_samples: int | None,
                 device: str, progress: bool = False) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Zero-shot accuracy and class-aware retrieval R@1/R@5 on the held-out images.

        Returns ``(metrics, outputs)``; outputs (normalised image, class-text and caption embeddings)
        feed the cosine fidelity.
        """
        require_images(spec, self.family)
        data, _, test = image_split(spec)
        test = test[:max_samples] if max_samples else test
        model, dtype = loaded.model, model_dtype(loaded.model)

        def encode_text(input_ids, attention_mask):
            return features(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

        images = []
        for start in range(0, len(test), batch_size):
            pixels = self._pixels(loaded, data.images[test[start:start + batch_size]]).to(device, dtype)
            images.append(F.normalize(features(model.get_image_features(pixel_values=pixels)).float(), dim=-1).cpu())
        images = torch.cat(images)
        labels = data.labels[test]
        classes = class_embeddings(encode_text, _Tokenize(self, loaded), data.class_names, data.eval_templates,
                                   device=device)
        captions = eval_captions(data.class_names, data.eval_templates, labels, spec.seed)
        texts = []
        for start in range(0, len(captions), batch_size):
            tokens = self._tokenize(loaded, captions[start:start + batch_size]).to(device)
            texts.append(F.normalize(encode_text(tokens["input_ids"], tokens["attention_mask"]).float(), dim=-1).cpu())
        texts = torch.cat(texts)
        metrics = {"zero_shot_accuracy": zero_shot_accuracy(images, classes, labels),
                   **retrieval_recalls(images, texts, labels)}
        return metrics, {"image": images, "text": classes, "caption": texts}


class _Tokenize:
    """A tokenizer call with the model's text length limit, for :func:`class_embeddings`."""

    def __init__(self, adapter: CLIPAdapter, loaded: LoadedModel):
        self.adapter, self.loaded = adapter, loaded

    def __call__(self, texts, padding=True, return_tensors="pt"):
        return self.adapter._tokenize(self.loaded, list(texts))
