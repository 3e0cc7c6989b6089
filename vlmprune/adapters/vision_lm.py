"""Adapter for the offline LLaVA-style model (:mod:`vlmprune.models.vision_lm`): EfficientNet-lite0
visual tokens -> MLP projector -> SmolLM2.

Towers: ``vision`` = the 16 MBConv blocks of EfficientNet-lite0 (their 1x1 convolutions are the
prunable layers, as in the dual encoder adapter; depthwise convolutions, stem, head convolution and
BatchNorm statistics are left alone), ``language`` = the decoder layers of the language model
(``language_model.model.layers``, 30 for SmolLM2-135M). The projector, embeddings and LM head are
not pruned.

Prompt (the one the projector was trained with): ``n_image_tokens`` image placeholders, then
"{question} Answer:" (no BOS); the answer follows after a space and ends with the tokenizer's EOS.
Calibration: training-split images with the dataset's question (:data:`QUESTIONS`) answered with the
class name, loss = next-token cross-entropy on the answer tokens: the task the projector was
trained on (LLaVA's stage-1 alignment), not captioning, which this model never learned.
Evaluation: :meth:`ImageToTextAdapter.evaluate` (VQA exact match, answer loss, answer logits).
VQA-style sets (per-example questions and answers): calibration and evaluation use each image's own
question and answer, as in :mod:`vlmprune.adapters.blip2`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from vlmprune.adapters.base import ADAPTERS, LoadedModel, Tower
from vlmprune.adapters.blip2 import DEFAULT_QUESTION, QUESTIONS, ImageToTextAdapter
from vlmprune.adapters.clip import require_images
from vlmprune.data.images import draw_calibration_images, to_pixel_values
from vlmprune.data.spec import DataSpec
from vlmprune.models.vision_lm import MODEL_TYPE, VisionLM, is_vision_lm_dir


@ADAPTERS.register("vision_lm")
class VisionLMAdapter(ImageToTextAdapter):
    family = "vision_lm"
    model_class = "VisionLM"

    def load(self, model_id: str, dtype: torch.dtype, device: str) -> LoadedModel:
        from transformers import AutoTokenizer

        if not is_vision_lm_dir(model_id):
            raise FileNotFoundError(
                f"{model_id!r} is not a saved VisionLM (no config.json with model_type {MODEL_TYPE}): run the "
                "prepare stage with prepare.model: vision_lm first (vlmprune stage prepare)")
        model = VisionLM.from_pretrained(model_id).to(device=device, dtype=dtype).eval()
        return LoadedModel(model, AutoTokenizer.from_pretrained(str(Path(model_id) / "tokenizer")))

    def save(self, loaded: LoadedModel, directory: Path) -> None:
        loaded.model.save_pretrained(directory)
        loaded.processor.save_pretrained(str(Path(directory) / "tokenizer"))

    @classmethod
    def matches(cls, model_id: str) -> bool:
        return is_vision_lm_dir(model_id)

    def for_inference(self, model: VisionLM) -> VisionLM:
        """BatchNorm folded into the convolutions, channels-last (:meth:`VisionLM.fold_for_inference`)."""
        return model.fold_for_inference()

    # --- family specifics ------------------------------------------------------------------
    def vision_tower(self, model: VisionLM) -> Tower:
        blocks = [(f"vision._blocks.{i}", b) for i, b in enumerate(model.vision._blocks)]
        return Tower("vision", blocks, lambda m, b: m.image_features(b["pixel_values"]))

    def language_layers(self, model: VisionLM) -> tuple[str, nn.ModuleList]:
        return "language_model.model.layers", model.language_model.model.layers

    def image_size(self, model: VisionLM) -> int:
        return model.config.image_size

    def n_image_tokens(self, model: VisionLM) -> int:
        return model.n_image_tokens

    def prompt_ids(self, loaded: LoadedModel, text: str) -> list[int]:
        return [self.image_token_id(loaded.model)] * self.n_image_tokens(loaded.model) + self._text_ids(loaded, text)

    def question_prompt(self, question: str) -> str:
        return f"{question} Answer:"

    def _pixels(self, loaded: LoadedModel, images: np.ndarray) -> torch.Tensor:
        """EfficientNet-lite's input: x = (pixel - 127) / 128, resized to ``config.image_size``."""
        dtype = next(loaded.model.projector.parameters()).dtype
        return to_pixel_values(images, self.image_size(loaded.model)).to(dtype)

    # --- data ------------------------------------------------------------------------------
    def qa_sequences(self, loaded: LoadedModel, dataset: str, answers: list[str]) -> dict[str, torch.Tensor]:
        """The dataset's question followed by each answer, right-padded; labels = answer tokens + EOS.
        The exact sequences :meth:`evaluate` scores, so training and evaluation cannot drift apart."""
        return self._sequences(loaded, self.question_prompt(QUESTIONS.get(dataset, DEFAULT_QUESTION)), answers)

    def make_calibration(self, loaded: LoadedModel, spec: DataSpec, n_samples: int, seed: int) -> dict[str, torch.Tensor]:
        """``n_samples`` training-split images drawn with ``seed``, each with the question and its class name
        (a VQA-style set: each with its own question and answer)."""
        require_images(spec, self.family)
        data, index, labels, _, _ = draw_calibration_images(spec, n_samples, seed)
        if data.has_questions:
            sequences = self._question_sequences(loaded, data, index)
        else:
            sequences = self.qa_sequences(loaded, spec.name, [data.class_names[y] for y in labels])
        return {"index": torch.from_numpy(index), "pixel_values": self._pixels(loaded, data.images[index]),
                **sequences}
