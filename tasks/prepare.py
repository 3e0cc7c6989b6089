"""``prepare``: build and train the offline default model (a no-op for any other model).

``prepare.model: dual_encoder`` (default): the CLIP-style dual encoder's projection heads.
``prepare.model: vision_lm``: the LLaVA-style EfficientNet-lite0 -> projector -> SmolLM2 model's
projector. Either way ``prepare/metrics.json`` holds the training loss, the held-out metrics of the
dense model and the training time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task

from params import RunParams
from tasks.io import atomic_dir, data_spec, stage_dir, write_json, write_meta
from vlmprune.adapters.base import LoadedModel
from vlmprune.adapters.dual_encoder import DualEncoderAdapter
from vlmprune.data.images import image_split
from vlmprune.models.dual_encoder import DualEncoder, packaged_tokenizer
from vlmprune.models.train_heads import train_heads
from vlmprune.profiling import measure


def default_model_dir(params: RunParams) -> Path:
    return stage_dir(params, "prepare") / "model"


@task(name="prepare")
def prepare(params: RunParams) -> str:
    """Train the offline default model named by ``prepare.model`` when ``model.id`` is this stage's output."""
    out = stage_dir(params, "prepare")
    if Path(params.model.id) != default_model_dir(params):
        with atomic_dir(out) as tmp:
            write_meta(tmp, "prepare", {}, skipped=f"model.id is {params.model.id!r}; nothing to prepare")
        return str(out)
    if params.prepare.model == "vision_lm":
        return prepare_vision_lm(params, out)

    p, spec = params.prepare, data_spec(params)
    with measure() as usage:
        model = DualEncoder.from_packaged_towers(embed_dim=p.embed_dim, image_size=p.image_size)
        tokenizer = packaged_tokenizer()
        data, train, _ = image_split(spec)
        result = train_heads(model, tokenizer, data.subset(train), epochs=p.epochs,
                             batch_size=p.batch_size, lr=p.lr, seed=p.seed)
        loaded = LoadedModel(model, tokenizer)
        metrics, _ = DualEncoderAdapter().evaluate(loaded, spec, batch_size=64, max_samples=None, device="cpu")
    with atomic_dir(out) as tmp:
        DualEncoderAdapter().save(loaded, tmp / "model")
        write_json(tmp / "metrics.json", {"train_loss": result.final_loss, **metrics})
        write_meta(tmp, "prepare", usage.as_dict(), train_examples=len(train))
    return str(out)


def prepare_vision_lm(params: RunParams, out: Path) -> str:
    """Train the projector of the packaged EfficientNet-lite0 -> SmolLM2 model on the training split
    (a seeded subset of ``train_examples``), then measure VQA accuracy on the held-out split."""
    from vlmprune.adapters.vision_lm import VisionLMAdapter
    from vlmprune.models.train_projector import train_projector
    from vlmprune.models.vision_lm import VisionLM

    p, spec = params.prepare.vision_lm, data_spec(params)
    data, train, test = image_split(spec)
    if p.train_examples is not None and p.train_examples < len(train):
        train = np.sort(np.random.default_rng(params.prepare.seed).choice(train, p.train_examples, replace=False))
    model, tokenizer = VisionLM.from_packaged(image_size=p.image_size, feature_grid=p.feature_grid,
                                              feature_blocks=p.feature_blocks, seed=params.prepare.seed)
    with measure() as training:
        result = train_projector(model, tokenizer, data.subset(train), steps=p.steps, batch_size=p.batch_size,
                                 lr=p.lr, seed=params.prepare.seed, token_drop=p.token_drop,
                                 drop_ratios=tuple(p.token_drop_ratios), drop_k=p.token_drop_k)
    loaded = LoadedModel(model, tokenizer)
    with measure() as evaluation:
        metrics, _ = VisionLMAdapter().evaluate(loaded, spec, batch_size=64, max_samples=None, device="cpu")
    with atomic_dir(out) as tmp:
        VisionLMAdapter().save(loaded, tmp / "model")
        write_json(tmp / "metrics.json", {
            "train_loss": result.final_loss, **metrics, "chance_accuracy": 1 / len(data.class_names),
            "train_seconds": round(training.wall_s, 3), "eval_seconds": round(evaluation.wall_s, 3)})
        write_meta(tmp, "prepare", training.as_dict(), model="vision_lm", train_examples=len(train),
                   held_out_examples=len(test), steps=result.steps, n_image_tokens=model.n_image_tokens,
                   eval_usage=evaluation.as_dict())
    return str(out)
