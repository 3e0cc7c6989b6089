"""A local image folder described by a CSV or JSONL annotation file (``data.name: image_folder``).

``data.path`` is the folder; ``data.annotations`` the annotation file (a path as given, else relative
to the folder; default: the first of ``labels.csv``, ``labels.jsonl``, ``captions.csv``,
``captions.jsonl`` found in the folder). One row per image, with the columns

- ``data.image_column`` (default ``image``): the image file, relative to the folder;
- ``data.label_column`` (default ``label``): its class name. Class names are the distinct labels,
  sorted; they feed the zero-shot prompts and are the VQA answers;
- ``data.caption_column`` (default ``caption``, optional): free text used as the image's calibration
  caption instead of a template caption (rows with an empty caption use a template);
- ``data.question_column`` and ``data.answer_column`` (defaults ``question``, ``answer``, optional,
  together; VQA-style sets): a question about the image and its reference answer, non-empty on every
  row. The image-to-text families then calibrate on each image's own question and answer and score
  their answers against it. The label column becomes optional: without it the class names are the
  distinct answers (sorted) and each image's label is its answer's index among them.

CSV files need a header row; a JSONL file holds one JSON object per line. Images are decoded with
Pillow when used (:class:`vlmprune.data.decode.LazyImages`), RGB, resized and centre-cropped to
``data.image_size``.
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


def has_questions(where: str, columns: list[str], spec: DataSpec) -> bool:
    """Whether the set has per-example questions: both ``data.question_column`` and
    ``data.answer_column`` present (one without the other is an error)."""
    question, answer = spec.question_column in columns, spec.answer_column in columns
    if question != answer:
        have, lack = (("question", "answer") if question else ("answer", "question"))
        raise DataError(f"{where} has a {have} column {getattr(spec, have + '_column')!r} (data.{have}_column) "
                         f"but no {lack} column {getattr(spec, lack + '_column')!r} (data.{lack}_column): VQA "
                         f"examples need both; add the {lack} column, set data.{lack}_column to it, or drop the "
                         f"{have} column; columns present: {', '.join(columns)}")
    return question


def question_values(where: str, column: str, field: str, values: list, first_row: int) -> list[str]:
    """The stripped strings of a question or answer column; an empty or non-text value is an error
    naming its row (``first_row`` is the number of the first value: 1 for files, 0 for datasets)."""
    out = []
    for number, value in enumerate(values, start=first_row):
        if isinstance(value, (list, tuple, dict)):
            raise DataError(f"{where} row {number}: {column!r} ({field}) holds {type(value).__name__} {value!r}, "
                             "not one text value; point the field at a column with one string per example")
        text = "" if value is None else str(value).strip()
        if not text:
            raise DataError(f"{where} row {number}: empty {column!r} value ({field}); every example needs a "
                             "question and an answer")
        out.append(text)
    return out


def labels_of(names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Integer labels and the sorted distinct class names of a list of names."""
    class_names = sorted(set(names))
    index = {name: i for i, name in enumerate(class_names)}
    return np.array([index[n] for n in names], dtype=np.int64), class_names


def load_folder(spec: DataSpec):
    """The :class:`~vlmprune.data.images.ImageDataset` of an image folder (images decoded on access)."""
    from vlmprune.data.images import ImageDataset

    folder = folder_of(spec)
    path = annotation_file(spec)
    rows, columns = read_rows(path)
    where = f"annotation file {str(path)!r}"
    vqa = has_questions(where, columns, spec)
    needed = {"data.image_column": spec.image_column}
    if not vqa or spec.label_column in columns:
        needed["data.label_column"] = spec.label_column
    require_columns(where, columns, needed)
    if not rows:
        raise DataError(f"{where} lists no images: the dataset is empty")
    questions = answers = None
    if vqa:
        questions = question_values(where, spec.question_column, "data.question_column",
                                    [row.get(spec.question_column) for row in rows], 1)
        answers = question_values(where, spec.answer_column, "data.answer_column",
                                  [row.get(spec.answer_column) for row in rows], 1)
    files, names = [], []
    for number, row in enumerate(rows, start=1):
        image = (row.get(spec.image_column) or "").strip()
        label = (row.get(spec.label_column) or "").strip() if "data.label_column" in needed else answers[number - 1]
        if not image or not label:
            empty = spec.image_column if not image else spec.label_column
            raise DataError(f"{where} row {number}: empty {empty!r} value")
        files.append(folder / image)
        names.append(label)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataNotFoundError(f"{len(missing)} image(s) listed in {where} not found: {shown}")
    labels, class_names = labels_of(names)
    captions = None
    if spec.caption_column in columns:
        captions = [(row.get(spec.caption_column) or "").strip() or None for row in rows]
    images = LazyImages(lambda i: Image.open(files[i]), lambda i: repr(str(files[i])), range(len(files)),
                        spec.image_size)
    return ImageDataset(spec.name, images, labels, class_names, captions=captions, questions=questions,
                        answers=answers)
