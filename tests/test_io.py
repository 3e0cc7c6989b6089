"""Artifacts are written atomically: a failure leaves the previous artifact intact, and no half-file."""

from __future__ import annotations

import json

import pytest
import torch

from tasks.io import atomic_dir, write_json


def test_atomic_dir_replaces_on_success(tmp_path):
    target = tmp_path / "stage"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]


def test_atomic_dir_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "stage"
    with atomic_dir(target) as tmp:
        (tmp / "model.bin").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "model.bin").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (target / "model.bin").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]  # no temporary left behind


def test_write_json_failure_keeps_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})  # not serialisable: fails half-way through dumping
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# ---- streamed safetensors ----------------------------------------------------------------------

def test_streamed_safetensors_read_back_by_safetensors_itself(tmp_path):
    from safetensors.torch import load_file

    from vlmprune.safetensors_io import LazyTensors, write_streaming

    tensors = {"b.mask": torch.rand(3, 5) > 0.5, "a.weight": torch.randn(7), "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
               "d": torch.randn(2, 2).to(torch.bfloat16)}
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    write_streaming(tmp_path / "x.safetensors", specs, iter(tensors.items()), metadata={"kind": "masks"})
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    lazy = LazyTensors(tmp_path / "x.safetensors")
    assert sorted(lazy) == sorted(tensors) and len(lazy) == 4 and torch.equal(lazy["c"], tensors["c"])


@pytest.mark.parametrize("bad", ["order", "shape", "missing"])
def test_streamed_safetensors_refuse_what_the_header_does_not_say_and_leave_no_file(tmp_path, bad):
    from vlmprune.safetensors_io import write_streaming

    tensors = [("a", torch.zeros(2, dtype=torch.bool)), ("b", torch.ones(3))]
    specs = {name: (t.dtype, tuple(t.shape)) for name, t in tensors}
    if bad == "order":
        tensors.reverse()
    elif bad == "shape":
        tensors[1] = ("b", torch.ones(4))
    else:
        tensors.pop()
    with pytest.raises(ValueError, match="write_streaming"):
        write_streaming(tmp_path / "x.safetensors", specs, iter(tensors))
    assert list(tmp_path.iterdir()) == []
