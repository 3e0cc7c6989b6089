"""Adapter for the offline default dual encoder (:mod:`vlmprune.models.dual_encoder`).

Towers: ``vision`` = the 16 MBConv blocks of EfficientNet-lite0 (their 1x1 convolutions are the
prunable layers; depthwise convolutions, the stem, the head convolution and BatchNorm statistics are
left alone), ``text`` = the 6 BERT layers of MiniLM. The projection heads are not pruned.
Calibration loss: the multi-positive contrastive loss the heads were trained with.
Data: image-caption pairs from the offline image datasets (:mod:`vlmprune.data.images`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from vlmprune.adapters.base import ADAPTERS, LoadedModel, ModelAdapter, Tower
from vlmprune.data.images import draw_calibration_images, image_split, to_pixel_values
from vlmprune.data.spec import DataSpec
from vlmprune.evaluators.zero_shot import (class_embeddings, embed_images, embed_texts, eval_captions,
                                           retrieval_recalls, zero_shot_accuracy)
from vlmprune.models.dual_encoder import DualEncoder, is_dual_encoder_dir
from vlmprune.models.train_heads import multi_positive_contrastive_loss


@ADAPTERS.register("dual_encoder")
class DualEncoderAdapter(ModelAdapter):
    family = "dual_encoder"

    def load(self, model_id: str, dtype: torch.dtype, device: str) -> LoadedModel:
        from transformers import AutoTokenizer

        path = Path(model_id)
        if not is_dual_encoder_dir(path):
            raise FileNotFoundError(
                f"{model_id!r} is not a saved dual encoder (no config.json with model_type "
                "vlmprune_dual_encoder): run the prepare stage first (dvc repro prepare)"
            )
        model = DualEncoder.from_pretrained(path).to(device=device, dtype=dtype).eval()
        return LoadedModel(model, AutoTokenizer.from_pretrained(str(path / "tokenizer")))

    def towers(self, model: DualEncoder) -> list[Tower]:
        vision = [(f"vision._blocks.{i}", b) for i, b in enumerate(model.vision._blocks)]
        text = [(f"text.encoder.layer.{i}", l) for i, l in enumerate(model.text.encoder.layer)]
        return [
            Tower("vision", vision, lambda m, b: m.encode_image(b["pixel_values"])),
            Tower("text", text, lambda m, b: m.encode_text(b["input_ids"], b["attention_mask"])),
        ]

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        return multi_positive_contrastive_loss(logits, batch["labels"])

    def save(self, loaded: LoadedModel, directory: Path) -> None:
        loaded.model.save_pretrained(directory)
        loaded.processor.save_pretrained(str(Path(directory) / "tokenizer"))

    @classmethod
    def matches(cls, model_id: str) -> bool:
        return is_dual_encoder_dir(model_id)

    def make_calibration(self, loaded: LoadedModel, spec: DataSpec, n_samples: int, seed: int) -> dict[str, torch.Tensor]:
        """``n_samples`` image-caption pairs drawn with ``seed`` from the training split.

        Each image is paired with a caption of its class from a training template, also drawn with
        ``seed``; held-out images and evaluation templates are never used for calibration.
        """
        data, index, labels, captions, _ = draw_calibration_images(spec, n_samples, seed)
        tokens = loaded.processor(captions, padding=True, return_tensors="pt")
        return {
            "index": torch.from_numpy(index),
            "pixel_values": to_pixel_values(data.images[index], loaded.model.config.image_size),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "labels": torch.from_numpy(labels),
        }

    def evaluate(self, loaded: LoadedModel, spec: DataSpec, batch_size: int, max_samples: int | None,
                 device: str, progress: bool = False) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Zero-shot accuracy on the held-out split with evaluation-only templates, and class-aware
        retrieval R@1/R@5 both ways between the held-out images and one evaluation-template caption each.

        Returns ``(metrics, embeddings)``; the embeddings (images, class texts, captions) feed the label-free
        fidelity metrics that compare a pruned model with its dense parent.
        """
        data, _, test = image_split(spec)
        test = test[:max_samples] if max_samples else test
        model, tokenizer = loaded.model, loaded.processor
        images = embed_images(model.encode_image, data.images[test], model.config.image_size,
                              batch_size=batch_size, device=device, progress=progress)
        classes = class_embeddings(model.encode_text, tokenizer, data.class_names, data.eval_templates, device=device)
        labels = data.labels[test]
        captions = embed_texts(model.encode_text, tokenizer,
                               eval_captions(data.class_names, data.eval_templates, labels, spec.seed), device=device)
        metrics = {"zero_shot_accuracy": zero_shot_accuracy(images, classes, labels),
                   **retrieval_recalls(images, captions, labels)}
        return metrics, {"image": images, "text": classes, "caption": captions}
