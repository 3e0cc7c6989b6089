"""Resume of an interrupted ``prune`` stage: one checkpoint per finished group, outside the stage's output.

The checkpoints live in ``<artifacts>/.resume/prune/`` (DVC deletes a stage's outputs before it runs
the stage, so they cannot live in ``<artifacts>/prune/``). Each is a safetensors file with the
group's pruned weights and masks, written under a temporary name and renamed into place, and
stamped with the *run digest*: a SHA-256 of everything that determines the pruned model (the
model, data, calibration and pruning params, the torch version, the allocation and calibration
files, the model directory's file names, sizes and times). A checkpoint whose digest differs from
the current run's is never used: the store is emptied, with a log line. The store is deleted once
the stage's artifact is complete.

For tests only: ``VLMPRUNE_TEST_EXIT_AFTER_GROUPS=k`` makes the process exit at once
(``os._exit(75)``, as a kill would: no cleanup) when k groups are finished and checkpointed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlmprune.sequential import GroupState

TEST_EXIT_ENV = "VLMPRUNE_TEST_EXIT_AFTER_GROUPS"
TEST_EXIT_CODE = 75
_logger = logging.getLogger("vlmprune.tasks")


def log(message: str) -> None:
    """Log to the Prefect run when there is one, else to the ``vlmprune`` logger."""
    try:
        from prefect.logging import get_run_logger

        get_run_logger().info(message)
    except Exception:  # noqa: BLE001  (no Prefect run context: a direct call of the task function)
        _logger.info(message)


def _hash_file(digest, path: Path) -> None:
    digest.update(str(path.name).encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)


def run_digest(sections: dict, files: list[Path], model_dir: Path | None) -> str:
    """SHA-256 of the params sections, the torch version and CPU thread count (both change float
    rounding, so a run resumed under others would not equal an uninterrupted one), the bytes of
    ``files`` and the listing of ``model_dir``."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"params": sections, "torch": torch.__version__, "threads": torch.get_num_threads()},
                             sort_keys=True).encode())
    for path in files:
        if Path(path).exists():
            _hash_file(digest, Path(path))
    if model_dir is not None and model_dir.is_dir():
        for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(model_dir)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


class ResumeStore:
    """The finished groups' checkpoints of one run digest."""

    def __init__(self, directory: Path, digest: str) -> None:
        self.directory = Path(directory)
        self.digest = digest
        self.finished = 0  # groups finished in this run, restored ones included

    def open(self) -> int:
        """Discard checkpoints of another digest; return how many valid checkpoints there are."""
        stamp = self.directory / "digest.txt"
        if self.directory.exists():
            old = stamp.read_text().strip() if stamp.exists() else None
            if old != self.digest:
                log(f"discarding prune checkpoints in {self.directory}: they were made with other params or inputs")
                shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if not stamp.exists():
            tmp = stamp.with_name(f".digest.txt.{os.getpid()}")
            tmp.write_text(self.digest + "\n")
            os.replace(tmp, stamp)
        return len(list(self.directory.glob("*.safetensors")))

    def _path(self, group: str) -> Path:
        return self.directory / f"{group}.safetensors"

    def load(self, group: str) -> GroupState | None:
        """The checkpoint of ``group``, or None when there is none for this digest."""
        path = self._path(group)
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("digest") != self.digest:
                return None
            state = {key: f.get_tensor(key) for key in f.keys()}
        self.finished += 1
        return state

    def masks(self, group: str) -> dict[str, torch.Tensor]:
        """The masks in ``group``'s checkpoint, by layer name (the checkpoint must exist)."""
        with safe_open(str(self._path(group)), framework="pt") as f:
            return {key[: -len(".mask")]: f.get_tensor(key) for key in f.keys() if key.endswith(".mask")}

    def save(self, group: str, state: GroupState) -> None:
        """Write ``group``'s checkpoint atomically (temporary name, then rename)."""
        path = self._path(group)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"digest": self.digest})
        os.replace(tmp, path)
        self.finished += 1
        exit_after = os.environ.get(TEST_EXIT_ENV)
        if exit_after and self.finished >= int(exit_after):
            os._exit(TEST_EXIT_CODE)

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        parent = self.directory.parent
        if parent.exists() and not any(parent.iterdir()):
            parent.rmdir()
