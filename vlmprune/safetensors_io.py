"""Safetensors files too large to hold in memory at once: written tensor by tensor, read lazily.

``safetensors.torch.save_file`` needs every tensor in memory together; a pruning run's masks (one
byte per weight) can outgrow memory on a large model. The format is simple enough to stream
(https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian header length N,
N bytes of JSON mapping each name to its dtype, shape and ``data_offsets`` [begin, end) in the
byte buffer that follows (padded with spaces so the buffer starts 8-byte aligned), then the
buffer. Since shapes and dtypes are known before any data, the header is written first and each
tensor appended as it comes. The files are read back by ``safetensors`` itself.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int32: "I32", torch.int64: "I64",
          torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}


def write_streaming(path: str | Path, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                    tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors come one at a time, in the order of ``specs``.

    ``specs`` maps each name to its (dtype, shape); ``tensors`` yields (name, tensor) in the same
    order, each matching its spec (checked). Written under a temporary name, then renamed.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (dtype, shape) in specs.items():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    expected = iter(specs.items())
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for name, tensor in tensors:
                want_name, (dtype, shape) = next(expected, (None, (None, None)))
                if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"write_streaming: got {name!r} {tensor.dtype} {tuple(tensor.shape)}, expected "
                                     f"{want_name!r} {dtype} {shape}")
                f.write(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            left = next(expected, None)
            if left is not None:
                raise ValueError(f"write_streaming: no tensor came for {left[0]!r}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class LazyTensors(Mapping):
    """A safetensors file as a read-only mapping; each tensor is read when it is looked up."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with safe_open(self.path, "pt") as f:
            self._names = list(f.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        with safe_open(self.path, "pt") as f:
            return f.get_tensor(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
