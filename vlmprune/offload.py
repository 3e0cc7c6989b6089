"""Block-wise offloading: keep a model's groups (blocks) off the compute device, one at a time on it.

Two modes, for models larger than the memory they are pruned in:

- ``cpu``: the model is loaded on the CPU; everything outside the groups (embeddings, norms, heads)
  moves to the compute device, and each group moves there only while it runs or is pruned. Peak
  device memory: the resident part, one group and the calibration activations. On a machine
  without a GPU the compute device is the CPU, and this mode changes nothing.
- ``disk``: the group weights stay in the model's safetensors checkpoint (read per group, never
  all at once); a group that was changed (pruned) is written to a working folder and read from
  there afterwards. Peak resident memory: the resident part, one group and the activations.

A group is brought in either for a single forward call (the forward hooks that :meth:`streaming`
installs, so any forward-only code works unchanged) or for as long as a ``with hold(name)`` block
lasts (pruning: the weights are read, changed and written back once).

Memory given back: glibc's malloc raises its mmap threshold each time a large block is freed, so
after the first group leaves, later ones are served from the heap, whose free pages it keeps, and
resident memory grows back towards the whole model (pruning SmolLM2 from disk peaked at 1370 MB,
above the 1172 MB of pruning it in memory). In disk mode the offloader therefore calls
``malloc_trim(0)`` on glibc systems each time a group leaves (816 MB peak, benchmarks/offload.py;
fixing the threshold with ``mallopt`` gave 702 MB, but every large allocation then maps fresh
pages: 3.5 s per group against 2.5 s, both measured on a loaded machine).

Tensors are swapped in place (``torch.utils.swap_tensors``), so a parameter shared by two modules
(tied embeddings) stays shared, and every reference to a parameter object stays valid.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import platform
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

import psutil
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vlmprune.errors import VlmpruneError

OffloadMode = Literal["cpu", "disk"]
OFFLOAD_MODES = ("none", "cpu", "disk")


class OffloadError(VlmpruneError):
    """A model that cannot be offloaded the way the params ask."""


class Checkpoint:
    """The tensors of a safetensors checkpoint directory (one file, or shards with an index), by name."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        elif single.exists():
            with safe_open(str(single), "pt") as f:
                self.files = {name: single for name in f.keys()}
        else:
            raise OffloadError(
                f"runtime.offload: disk reads the model's safetensors checkpoint, and {directory} has none "
                "(model.safetensors or model.safetensors.index.json); convert the model once with "
                "`vlmprune convert MODEL_ID DIRECTORY` and set model.id to that directory"
            )

    def names(self) -> set[str]:
        return set(self.files)

    def read(self, names: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The named tensors, copied out of the files (each file is opened once and closed again)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        for file, members in by_file.items():
            with safe_open(str(file), "pt", device=str(device)) as f:
                for name in members:
                    tensors[name] = f.get_tensor(name)
        return tensors


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, which hands the heap's free pages back to the OS; None elsewhere."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and persistent buffers, by name (what a checkpoint stores)."""
    return dict(module.state_dict(keep_vars=True))


def _swap(old: torch.Tensor, value: torch.Tensor) -> None:
    """Put ``value`` into the tensor object ``old`` (a Parameter stays a Parameter)."""
    new = nn.Parameter(value, requires_grad=False) if isinstance(old, nn.Parameter) else value
    torch.utils.swap_tensors(old, new)


class GroupOffloader:
    """Keeps the ``groups`` (name -> module) of ``model`` off ``device`` between uses; see the module docstring.

    ``checkpoint`` (disk mode) holds the model's weights under its state-dict names; changed groups
    go to a folder ``offload-<pid>-*`` under ``folder`` (the system's temporary folder by default),
    removed by :meth:`close` or when the offloader is collected.
    """

    def __init__(self, model: nn.Module, groups: dict[str, nn.Module], mode: OffloadMode,
                 device: str | torch.device, checkpoint: Checkpoint | None = None, folder: str | Path | None = None):
        if mode not in ("cpu", "disk"):
            raise OffloadError(f"runtime.offload must be one of {', '.join(OFFLOAD_MODES)}; got {mode!r}")
        if mode == "disk" and checkpoint is None:
            raise OffloadError("runtime.offload: disk needs the model's safetensors checkpoint")
        self.model, self.groups, self.mode = model, groups, mode
        self.device = torch.device(device)
        self.checkpoint = checkpoint
        paths = {id(module): path for path, module in model.named_modules()}
        missing = [name for name, module in groups.items() if id(module) not in paths]
        if missing:
            raise OffloadError(f"offload: group {missing[0]!r} is not a submodule of the model")
        self.prefix = {name: paths[id(module)] + "." for name, module in groups.items()}
        self.held: set[str] = set()
        self.written: set[str] = set()
        self._handles: list = []
        self._root = Path(folder) if folder else Path(tempfile.gettempdir())
        self._folder: Path | None = None  # made at the first write
        self._place_resident()
        for name in groups:
            self._release(name, write=False)

    # -- placement ------------------------------------------------------------------------------

    def _in_group(self, name: str) -> bool:
        return any(name.startswith(p) for p in self.prefix.values())

    def resident_names(self) -> list[str]:
        """State-dict names of the tensors that stay on the device (outside every group)."""
        return [n for n in _tensors(self.model) if not self._in_group(n)]

    def _place_resident(self) -> None:
        state = _tensors(self.model)
        names = self.resident_names()
        if self.mode == "disk":
            stored = {id(state[n]) for n in state if n in self.checkpoint.files}  # tied names share one tensor
            missing = [n for n in state if id(state[n]) not in stored]
            if missing:
                raise OffloadError(
                    f"runtime.offload: disk: the checkpoint has no tensor {missing[0]!r} ({len(missing)} missing); it "
                    "must hold the model's own state-dict names: save it with `vlmprune convert MODEL_ID DIRECTORY`"
                )
            read = [n for n in names if n in self.checkpoint.files]
            values = self.checkpoint.read(read, self.device)
            for name in read:
                _swap(state[name], values[name])
        else:
            for name in names:
                if state[name].device != self.device:
                    _swap(state[name], state[name].detach().to(self.device))
        for name, buffer in self.model.named_buffers():  # non-persistent buffers (rotary tables): tiny, kept
            if name not in state and buffer.device != self.device and not buffer.is_meta:
                _swap(buffer, buffer.to(self.device))

    @property
    def folder(self) -> Path:
        """The working folder of changed groups, ``<root>/offload-<pid>-*``; made when first needed, after
        removing the folders that killed runs left behind."""
        if self._folder is None:
            self._root.mkdir(parents=True, exist_ok=True)
            for stale in self._root.glob("offload-*-*"):
                pid = stale.name.split("-")[1]
                if pid.isdigit() and not psutil.pid_exists(int(pid)):
                    shutil.rmtree(stale, ignore_errors=True)
            self._folder = Path(tempfile.mkdtemp(prefix=f"offload-{os.getpid()}-", dir=self._root))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._folder), True)
        return self._folder

    def close(self) -> None:
        """Remove the hooks and the working folder (the offloaded groups' changes are lost: save first)."""
        self.remove_hooks()
        if self._folder is not None:
            self._cleanup()

    def _group_file(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def _fetch(self, name: str) -> None:
        if self.mode == "cpu" and self.device.type == "cpu":
            return  # already there
        group = self.groups[name]
        state = _tensors(group)
        if self.mode == "cpu":
            values = {k: v.detach().to(self.device) for k, v in state.items()}
        elif name in self.written:
            with safe_open(str(self._group_file(name)), "pt", device=str(self.device)) as f:
                values = {k: f.get_tensor(k) for k in state}
        else:
            full = self.checkpoint.read([self.prefix[name] + k for k in state], self.device)
            values = {k: full[self.prefix[name] + k] for k in state}
        for key, tensor in state.items():
            _swap(tensor, values[key])

    def _release(self, name: str, write: bool) -> None:
        if self.mode == "cpu" and self.device.type == "cpu":
            return
        group = self.groups[name]
        state = _tensors(group)
        if self.mode == "cpu":
            for tensor in state.values():
                if tensor.device != torch.device("cpu"):
                    _swap(tensor, tensor.detach().to("cpu"))
            return
        if write:
            target = self._group_file(name)
            tmp = target.with_name(f".{target.name}.tmp")
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
            tmp.replace(target)
            self.written.add(name)
        for tensor in state.values():
            if not tensor.is_meta:
                _swap(tensor, torch.empty_like(tensor, device="meta"))
        if _malloc_trim() is not None:
            _malloc_trim()(0)

    # -- use ------------------------------------------------------------------------------------

    @contextmanager
    def hold(self, name: str, write: bool = True) -> Iterator[nn.Module]:
        """Bring group ``name`` onto the device for the block; on exit put it back (disk: written
        to the working folder first when ``write``, so the changes are kept)."""
        self._fetch(name)
        self.held.add(name)
        try:
            yield self.groups[name]
        finally:
            self.held.discard(name)
            self._release(name, write)

    def read_only(self, name: str):
        """``hold(name, write=False)``: for work that reads the weights or puts them back as they were."""
        return self.hold(name, write=False)

    def streaming(self) -> "GroupOffloader":
        """Install forward hooks that bring each group in for its own call (unless it is held)."""
        if self._handles:
            return self

        def pre(name):
            def hook(module, args):
                if name not in self.held:
                    self._fetch(name)
            return hook

        def post(name):
            def hook(module, args, output):
                if name not in self.held:
                    self._release(name, write=False)
            return hook

        for name, group in self.groups.items():
            self._handles.append(group.register_forward_pre_hook(pre(name)))
            self._handles.append(group.register_forward_hook(post(name)))
        return self

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def save_pretrained(self, directory: str | Path) -> None:
        """``save_pretrained`` for an offloaded model: its config (and generation config) and its
        weights under the checkpoint's own tensor names, one group in memory at a time."""
        self.model.config.save_pretrained(directory)
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(directory)
        names = self.checkpoint.names() if self.checkpoint else None
        state = _tensors(self.model)
        self.save_checkpoint(directory, [n for n in state if names is None or n in names])

    def save_checkpoint(self, directory: str | Path, names: list[str]) -> None:
        """Write the tensors ``names`` (state-dict names) as safetensors shards, the resident tensors
        first and then one shard per group, with an index: what ``from_pretrained`` reads back. At
        most one group is in memory at a time."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = _tensors(self.model)
        shards = [[n for n in names if not self._in_group(n)]]
        shards += [[n for n in names if n.startswith(self.prefix[g])] for g in self.groups]
        owners = [None] + list(self.groups)
        shards, owners = zip(*[(s, o) for s, o in zip(shards, owners) if s])
        weight_map, total = {}, 0
        for index, (members, owner) in enumerate(zip(shards, owners), start=1):
            file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            if owner is None:
                tensors = {n: state[n].detach().cpu().contiguous() for n in members}
            else:
                with self.hold(owner, write=False) as group:
                    local = _tensors(group)
                    tensors = {n: local[n[len(self.prefix[owner]):]].detach().cpu().contiguous() for n in members}
            save_file(tensors, str(directory / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(members, file))
            total += sum(v.numel() * v.element_size() for v in tensors.values())
            del tensors
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
