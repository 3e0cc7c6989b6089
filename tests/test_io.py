"""Artifacts are written atomically: a failure leaves the previous artifact intact, and no half-file."""

from __future__ import annotations

import json

import pytest

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
