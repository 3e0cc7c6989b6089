"""Artifact I/O shared by the stage tasks: atomic writes, stage metadata, model loading, the run lock.

Faults: a killed run never leaves a file or directory that looks complete (everything is written
under a temporary name and renamed into place); a missing or unreadable upstream artifact, a model
that cannot be found and an artifacts directory held by another run each raise a
:mod:`vlmprune.errors` class whose message says what to change.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from params import RunParams
from vlmprune.adapters import ADAPTERS, LoadedModel, ModelAdapter, detect_family
from vlmprune.data.spec import DataSpec
from vlmprune.errors import ArtifactError, ModelError, ModelNotFoundError, RunLockedError
from vlmprune.offload import Checkpoint, GroupOffloader, OffloadError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stage_dir(params: RunParams, stage: str) -> Path:
    return Path(params.artifacts) / stage


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover(target: Path) -> None:
    """Undo what a run killed inside :func:`atomic_dir` left: put back the previous artifact if the
    kill fell between its two renames, and remove temporary directories of dead processes."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        if target.exists():  # killed after both renames: the old one is no longer wanted
            old.rename(target.with_name(f".{target.name}.tmp-0-{time.time_ns()}"))
        else:
            old.rename(target)
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        pid = tmp.name.split("-")[1] if tmp.name.count("-") >= 2 else ""
        if pid.isdigit() and (pid == "0" or not _pid_alive(int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_dir(target: Path):
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` in one rename.

    On failure the temporary directory is removed and ``target`` keeps its previous content. A run
    killed outright leaves only a dot-named temporary directory (``.<name>.tmp-<pid>-*``), which the
    next call removes; if the kill fell between the two renames, the next call puts back the old one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")  # only ever a complete artifact
            target.rename(old)
            tmp.rename(target)
            trash = Path(f"{tmp}-trash")
            old.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _recover(target)
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
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _missing(path: Path, what: str) -> ArtifactError:
    stage = path.parent.name
    return ArtifactError(f"{path} {what}: run the {stage} stage first (vlmprune stage {stage}, or dvc repro {stage})")


def read_json(path: Path):
    """A stage's JSON artifact; :class:`ArtifactError` naming the stage to run when missing or unreadable."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise _missing(path, "not found") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise _missing(path, f"is not valid JSON ({error})") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A stage's safetensors artifact; :class:`ArtifactError` naming the stage to run when missing or unreadable."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise _missing(path, "not found")
    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001  (safetensors raises its own error types for a bad header)
        raise _missing(path, f"is unreadable ({error})") from None


def write_meta(directory: Path, stage: str, usage: dict, **extra) -> None:
    """A stage's ``meta.json``: when it finished, what it used, and the torch version and CPU thread
    count, both of which change float rounding (zeroth-order scores, and the allocations and masks
    that follow from them, differ in their last bits between thread counts)."""
    write_json(Path(directory) / "meta.json", {
        "stage": stage,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "usage": usage,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        **extra,
    })


def resolve_device(device: str) -> str:
    """``model.device`` as torch reads it (``auto``: cuda when available, else cpu); a device this machine
    does not have is a :class:`ModelError` naming the field, not a torch error deep in a stage."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            seen = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
            raise ModelError(f"model.device is {device!r} but torch sees {seen} here; use cpu or auto (cuda when "
                             "available)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelError("model.device is 'mps' but torch sees no MPS device here; use cpu or auto")
    return device


def hub_offline() -> bool:
    """Whether Hugging Face downloads are switched off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(k, "").upper() in {"1", "ON", "YES", "TRUE"} for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_hub_cache(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:  # noqa: BLE001  (an id that is not a valid repo id is not cached)
        return False


def check_model_id(model_id: str) -> None:
    """Fail early, with what to change, when ``model_id`` cannot be found without a download while
    downloads are off: not a local path, not a packaged alias, not in the Hugging Face cache."""
    from vlmprune.adapters.causal_lm import ALIASES

    if Path(model_id).expanduser().exists() or model_id in ALIASES or not hub_offline() or _in_hub_cache(model_id):
        return
    hint = ""
    if Path(model_id).parts[-2:] == ("prepare", "model"):
        hint = " (the default model is built by the prepare stage: vlmprune stage prepare)"
    raise ModelNotFoundError(
        f"model.id {model_id!r} not found locally: no such directory{hint}, not a packaged alias "
        f"({', '.join(ALIASES)}), not in the Hugging Face cache; set HF_HUB_OFFLINE=0 (with network access) "
        "to download it, or give a local path"
    )


def adapter_for(params: RunParams, model_id: str | None = None) -> ModelAdapter:
    model_id = model_id or params.model.id
    if params.model.family:
        return ADAPTERS.get(params.model.family)()
    check_model_id(model_id)
    try:
        family = detect_family(model_id)
    except ValueError as error:
        if Path(model_id).expanduser().exists():
            raise ModelError(str(error)) from None
        raise ModelNotFoundError(
            f"model.id {model_id!r} not found: no such local directory, and its config could not be read from the "
            "Hugging Face hub (no network access, or no such model); check the id, or give a local path"
        ) from None
    return ADAPTERS.get(family)()


def load_model(params: RunParams, model_id: str | None = None) -> tuple[ModelAdapter, LoadedModel]:
    """The params' model through its family's ``from_pretrained``; a model that cannot be found or
    read raises :class:`ModelNotFoundError` with what to change, not a loader traceback.

    With ``runtime.offload`` cpu or disk the blocks are offloaded (vlmprune/offload.py):
    ``loaded.offload`` holds them, and its forward hooks bring each one in for its own call.
    """
    model_id = model_id or params.model.id
    adapter = adapter_for(params, model_id)
    check_model_id(model_id)
    dtype, device, offload = DTYPES[params.model.dtype], resolve_device(params.model.device), params.runtime.offload
    checkpoint = None
    try:
        if offload == "disk":
            loaded, directory = adapter.load_skeleton(model_id, dtype)
            checkpoint = Checkpoint(directory)
        else:
            loaded = adapter.load(model_id, dtype, "cpu" if offload == "cpu" else device)
    except OSError as error:  # FileNotFoundError, and what from_pretrained raises for a missing or bad id
        raise ModelNotFoundError(f"model.id {model_id!r} could not be loaded: {error}") from None
    if offload != "none":
        groups = {name: module for tower in adapter.towers(loaded.model) for name, module in tower.groups}
        folder = params.runtime.offload_dir or Path(params.artifacts) / ".offload"
        loaded.offload = GroupOffloader(loaded.model, groups, offload, device, checkpoint, folder).streaming()
    return adapter, loaded


def require_in_memory(params: RunParams, what: str) -> None:
    """Stop, with what to change, work that is not built for an offloaded model."""
    if params.runtime.offload != "none":
        raise OffloadError(f"{what} is not built for runtime.offload: {params.runtime.offload} (calibrate, baseline, "
                           "zeroth-order scores, OWL, layer-wise prune and evaluate are); set runtime.offload: none")


@contextmanager
def run_lock(artifacts: str | Path, command: str = ""):
    """Hold ``<artifacts>/.lock`` for the duration of a run; fail at once, naming the holder, when another
    run has it. Runs with different ``artifacts`` directories never wait on each other."""
    from filelock import FileLock, Timeout

    root = Path(artifacts)
    root.mkdir(parents=True, exist_ok=True)
    info = root / ".lock.json"
    lock = FileLock(str(root / ".lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = json.loads(info.read_text())
            who = f"pid {holder['pid']} on {holder['host']}, `{holder['command']}`, since {holder['since']}"
        except (OSError, ValueError, KeyError):
            who = "holder unknown"
        raise RunLockedError(
            f"artifacts directory {str(root)!r} is in use by another run ({who}): wait for it to finish, "
            f"or give this run its own directory (-S artifacts=<dir>)"
        ) from None
    try:
        write_json(info, {"pid": os.getpid(), "host": socket.gethostname(),
                          "command": command or " ".join(sys.argv), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        yield
    finally:
        info.unlink(missing_ok=True)
        lock.release()


def data_spec(params: RunParams) -> DataSpec:
    return DataSpec(**params.data.model_dump())


def batches_of(data: dict[str, torch.Tensor], batch_size: int, device: str, limit: int | None = None) -> list[dict]:
    """Split a dict of per-sample tensors into batches on ``device``."""
    n = len(next(iter(data.values())))
    n = min(n, limit) if limit else n
    return [{k: v[s:min(s + batch_size, n)].to(device) for k, v in data.items()} for s in range(0, n, batch_size)]
