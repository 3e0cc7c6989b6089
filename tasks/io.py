"""Artifact I/O shared by the stage tasks: atomic writes, stage metadata, model loading."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from params import RunParams
from vlmprune.adapters import ADAPTERS, LoadedModel, ModelAdapter, detect_family
from vlmprune.data.spec import DataSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stage_dir(params: RunParams, stage: str) -> Path:
    return Path(params.artifacts) / stage


@contextmanager
def atomic_dir(target: Path):
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` in one rename.

    On failure the temporary directory is removed and ``target`` keeps its previous content.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data) -> None:
    """Write JSON atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def write_meta(directory: Path, stage: str, usage: dict, **extra) -> None:
    write_json(Path(directory) / "meta.json", {
        "stage": stage,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "usage": usage,
        "torch": torch.__version__,
        **extra,
    })


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def adapter_for(params: RunParams, model_id: str | None = None) -> ModelAdapter:
    family = params.model.family or detect_family(model_id or params.model.id)
    return ADAPTERS.get(family)()


def load_model(params: RunParams, model_id: str | None = None) -> tuple[ModelAdapter, LoadedModel]:
    model_id = model_id or params.model.id
    adapter = adapter_for(params, model_id)
    loaded = adapter.load(model_id, DTYPES[params.model.dtype], resolve_device(params.model.device))
    return adapter, loaded


def data_spec(params: RunParams) -> DataSpec:
    return DataSpec(**params.data.model_dump())


def batches_of(data: dict[str, torch.Tensor], batch_size: int, device: str, limit: int | None = None) -> list[dict]:
    """Split a dict of per-sample tensors into batches on ``device``."""
    n = len(next(iter(data.values())))
    n = min(n, limit) if limit else n
    return [{k: v[s:min(s + batch_size, n)].to(device) for k, v in data.items()} for s in range(0, n, batch_size)]
