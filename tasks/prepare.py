"""``prepare``: build and train the offline default dual encoder (a no-op for any other model)."""

from __future__ import annotations

from pathlib import Path

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
    """Train the projection heads of the packaged towers when ``model.id`` is this stage's output."""
    out = stage_dir(params, "prepare")
    if Path(params.model.id) != default_model_dir(params):
        with atomic_dir(out) as tmp:
            write_meta(tmp, "prepare", {}, skipped=f"model.id is {params.model.id!r}; nothing to prepare")
        return str(out)

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
