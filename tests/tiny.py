"""Tiny models built from configs, and params for fast runs on them."""

from __future__ import annotations

import torch


def build_tiny_dual_encoder(seed: int = 0):
    """A dual encoder with an EfficientNet-lite0 of width 0.25 and a 2-layer BERT of width 32."""
    from transformers import BertConfig

    from vlmprune.models.dual_encoder import DualEncoder, DualEncoderConfig, packaged_tokenizer

    torch.manual_seed(seed)
    tokenizer = packaged_tokenizer()
    text = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    config = DualEncoderConfig(image_overrides={"width_coefficient": 0.25, "image_size": 32},
                               image_size=32, text_config=text.to_dict(), embed_dim=16)
    return DualEncoder(config).eval(), tokenizer


def tiny_params(model_dir, artifacts, **sections):
    """Validated params for a fast run on the tiny dual encoder."""
    from params.schema import validate

    data = {
        "artifacts": str(artifacts),
        "model": {"id": str(model_dir)},
        "calibration": {"n_samples": 16, "batch_size": 8},
        "scoring": {"n_samples": 8, "batch_size": 4},
        "evaluation": {"max_samples": 64},
        "tracking": {"uri": f"sqlite:///{artifacts}/mlflow.db", "model_name": "tiny"},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return validate(data)
