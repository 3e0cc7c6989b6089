"""A local image folder described by a CSV or JSONL annotation file (``data.name: image_folder``).

``data.path`` is the folder; ``data.annotations`` the annotation file (a path as given, else relative
to the folder; default: the first of ``labels.csv``, ``labels.jsonl``, ``captions.csv``,
``captions.jsonl`` found in the folder). One row per image, with the columns

- ``data.image_column`` (default ``image``): the image file, relative to the folder;
- ``data.label_column`` (default ``label``): its class name. Class names are the distinct labels,
  sorted; they feed the zero-shot prompts and are the VQA answers;
- ``data.caption_column`` (default ``caption``, optional): free text used as the image's calibration
  caption instead of a template caption (rows with an empty caption use a template).

CSV files need a header row; a JSONL file holds one JSON object per line. Images are decoded with
Pillow when used (:class:`vlmprune.data.decode.LazyImages`), RGB, resized and centre-cropped to
``data.image_size``. Per-example VQA questions (``question``/``answer`` columns) are not built.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from vlmprune.data.decode import LazyImages
from vlmprune.data.spec import DEFAULT_ANNOTATIONS, DataSpec
from vlmprune.errors import DataError, DataNotFoundError

NOT_BUILT_COLUMNS = ("question", "answer")


def folder_of(spec: DataSpec) -> Path:
    if not spec.path:
        raise DataError("data.name 'image_folder' needs data.path: the folder holding the images")
    folder = Path(spec.path)
    if not folder.is_dir():
        raise DataNotFoundError(f"data.path: image folder {str(folder)!r} not found (working directory "
                                f"{Path.cwd()}); set data.path to an existing folder")
    return folder


def annotation_file(spec: DataSpec) -> Path:
    """The annotation file of ``spec``: ``data.annotations`` as given or inside the folder, else a default."""
    folder = folder_of(spec)
    if spec.annotations:
        candidates = [Path(spec.annotations)]
        if not candidates[0].is_absolute():
            candidates.append(folder / spec.annotations)
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise DataNotFoundError(f"data.annotations: {spec.annotations!r} not found (looked for "
                                f"{' and '.join(repr(str(c)) for c in candidates)}); set data.annotations "
                                "to an existing .csv or .jsonl file")
    for name in DEFAULT_ANNOTATIONS:
        if (folder / name).is_file():
            return folder / name
    raise DataNotFoundError(f"no annotation file in {str(folder)!r}: looked for {', '.join(DEFAULT_ANNOTATIONS)}; "
                            "add one or set data.annotations")


def read_rows(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """The rows of a CSV (with a header) or JSONL file, and its columns in order of appearance."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [dict(row) for row in reader]
            return rows, list(reader.fieldnames or [])
    if suffix in (".jsonl", ".ndjson"):
        rows, columns = [], {}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{str(path)!r} line {number} is not valid JSON ({error})") from None
            if not isinstance(row, dict):
                raise DataError(f"{str(path)!r} line {number} is not a JSON object")
            rows.append({k: "" if v is None else str(v) for k, v in row.items()})
            columns.update(dict.fromkeys(row))
        return rows, list(columns)
    raise DataError(f"data.annotations: {str(path)!r} is neither .csv nor .jsonl")


def require_columns(where: str, columns: list[str], needed: dict[str, str]) -> None:
    """A clear error naming each missing column (and the field that names it) and the columns present."""
    for field, column in needed.items():
        if column not in columns:
            raise DataError(f"{where} has no column {column!r} ({field}); columns present: "
                             f"{', '.join(columns) or 'none'}")


def load_folder(spec: DataSpec):
    """The :class:`~vlmprune.data.images.ImageDataset` of an image folder (images decoded on access)."""
    from vlmprune.data.images import ImageDataset

    folder = folder_of(spec)
    path = annotation_file(spec)
    rows, columns = read_rows(path)
    where = f"annotation file {str(path)!r}"
    not_built = [c for c in NOT_BUILT_COLUMNS if c in columns]
    if not_built:
        raise NotImplementedError(f"{where} has column(s) {', '.join(not_built)}: per-example VQA questions are "
                                  "not built; put the answer (a class name) in the label column and drop them")
    require_columns(where, columns, {"data.image_column": spec.image_column, "data.label_column": spec.label_column})
    if not rows:
        raise DataError(f"{where} lists no images: the dataset is empty")
    files, names = [], []
    for number, row in enumerate(rows, start=1):
        image, label = (row.get(spec.image_column) or "").strip(), (row.get(spec.label_column) or "").strip()
        if not image or not label:
            empty = spec.image_column if not image else spec.label_column
            raise DataError(f"{where} row {number}: empty {empty!r} value")
        files.append(folder / image)
        names.append(label)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataNotFoundError(f"{len(missing)} image(s) listed in {where} not found: {shown}")
    class_names = sorted(set(names))
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index[n] for n in names], dtype=np.int64)
    captions = None
    if spec.caption_column in columns:
        captions = [(row.get(spec.caption_column) or "").strip() or None for row in rows]
    images = LazyImages(lambda i: Image.open(files[i]), lambda i: repr(str(files[i])), range(len(files)),
                        spec.image_size)
    return ImageDataset(spec.name, images, labels, class_names, captions=captions)

