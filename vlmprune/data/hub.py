"""Hugging Face datasets (``data.name: hf``), through ``datasets.load_dataset`` / ``load_from_disk``.

``data.hf_id`` is a dataset id on the Hub (downloaded or read from the local cache), a local data
folder (``load_dataset`` picks the builder from its files, e.g. ``imagefolder`` for class
sub-folders of images) or a directory written by ``save_to_disk``; ``data.split`` picks the split.
The set is an image set when it has ``data.image_column`` (a ``datasets.Image`` feature) and a text
set when it has ``data.text_column`` instead:

- images: labels from ``data.label_column``; a ``ClassLabel`` column gives its names as the class
  names, any other column the distinct values (as strings, sorted). ``data.caption_column``, when
  present, gives the calibration captions. ``data.question_column`` and ``data.answer_column``, when
  present (together, one string per row), give per-example VQA questions and answers, as for image
  folders (:mod:`vlmprune.data.folder`); the label column is then optional (without it the class
  names are the distinct answers). Images are decoded when used, RGB, resized and centre-cropped to
  ``data.image_size`` (:mod:`vlmprune.data.decode`).
- text: the non-empty strings of ``data.text_column`` are the documents, split by document like
  the Wikipedia corpus (:mod:`vlmprune.data.text`).

Needs the ``datasets`` package (``pip install 'vlmprune[hub]'``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vlmprune.data.decode import LazyImages
from vlmprune.data.folder import has_questions, labels_of, question_values, require_columns
from vlmprune.data.spec import DataSpec
from vlmprune.errors import DataError, DataNotFoundError


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("data.name 'hf' needs the datasets package: pip install 'vlmprune[hub]' "
                          "(or pip install datasets)") from None
    return datasets


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _where(spec: DataSpec) -> str:
    return f"dataset {spec.hf_id!r} (split {spec.split!r})"


def open_hf(spec: DataSpec):
    """The ``datasets.Dataset`` of ``spec`` (one split)."""
    datasets = _datasets()
    if not spec.hf_id:
        raise DataError("data.name 'hf' needs data.hf_id: a Hugging Face dataset id or a local directory")
    path = Path(spec.hf_id).expanduser()
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if spec.split not in loaded:
                raise DataError(f"data.split {spec.split!r} is not a split of {spec.hf_id!r}; "
                                 f"splits: {', '.join(loaded)}")
            loaded = loaded[spec.split]
        return loaded
    if not path.exists() and spec.hf_id.startswith(("/", "./", "../", "~")):
        raise DataNotFoundError(f"data.hf_id: local path {spec.hf_id!r} not found (working directory {Path.cwd()})")
    not_found = (ConnectionError, FileNotFoundError, getattr(datasets.exceptions, "DatasetNotFoundError", OSError))
    try:
        return datasets.load_dataset(str(path) if path.exists() else spec.hf_id, split=spec.split)
    except ValueError as error:
        if "split" in str(error).lower():
            raise DataError(f"data.split {spec.split!r} of {spec.hf_id!r}: {error}") from None
        raise
    except not_found as error:
        if _offline():
            raise DataNotFoundError(f"data.hf_id {spec.hf_id!r} not found locally (HF_HUB_OFFLINE is set): set "
                                    "HF_HUB_OFFLINE=0 or give a local path (a data folder or a directory written "
                                    f"by save_to_disk) [{type(error).__name__}: {error}]") from None
        raise DataNotFoundError(f"could not load data.hf_id {spec.hf_id!r}: {type(error).__name__}: {error}; "
                                "check the id, or give a local path") from None


def hf_kind(spec: DataSpec, dataset=None) -> str:
    """``"image"`` or ``"text"``: which of ``data.image_column`` / ``data.text_column`` the set has."""
    dataset = open_hf(spec) if dataset is None else dataset
    if spec.image_column in dataset.column_names:
        return "image"
    if spec.text_column in dataset.column_names:
        return "text"
    raise DataError(f"{_where(spec)} has neither an image column {spec.image_column!r} (data.image_column) nor a "
                     f"text column {spec.text_column!r} (data.text_column); columns present: "
                     f"{', '.join(dataset.column_names) or 'none'}")


def _column(dataset, name: str) -> list:
    return dataset.data.column(name).to_pylist()


def hf_image_dataset(spec: DataSpec):
    """The :class:`~vlmprune.data.images.ImageDataset` of an image set (images decoded on access)."""
    datasets = _datasets()
    from vlmprune.data.images import ImageDataset

    dataset = open_hf(spec)
    where = _where(spec)
    vqa = has_questions(where, dataset.column_names, spec)
    with_labels = not vqa or spec.label_column in dataset.column_names
    require_columns(where, dataset.column_names, {"data.image_column": spec.image_column,
                                                  **({"data.label_column": spec.label_column} if with_labels else {})})
    if len(dataset) == 0:
        raise DataError(f"{where} is empty")
    feature = dataset.features[spec.image_column]
    if not isinstance(feature, datasets.Image):
        raise DataError(f"{where}: column {spec.image_column!r} (data.image_column) holds {feature}, not images "
                         "(datasets.Image); set data.image_column to the image column")
    questions = answers = None
    if vqa:
        questions = question_values(where, spec.question_column, "data.question_column",
                                    _column(dataset, spec.question_column), 0)
        answers = question_values(where, spec.answer_column, "data.answer_column",
                                  _column(dataset, spec.answer_column), 0)
    values = _column(dataset, spec.label_column) if with_labels else None
    label_feature = dataset.features[spec.label_column] if with_labels else None
    if not with_labels:
        labels, class_names = labels_of(answers)
    elif isinstance(label_feature, datasets.ClassLabel):
        class_names = list(label_feature.names)
        labels = np.asarray(values, dtype=np.int64)
        unlabelled = np.flatnonzero(labels < 0)
        if len(unlabelled):
            raise DataError(f"{where}: {len(unlabelled)} row(s) have no label (-1 in {spec.label_column!r}), "
                             f"the first is row {unlabelled[0]}; pick a labelled split with data.split")
    else:
        if any(v is None for v in values):
            raise DataError(f"{where}: column {spec.label_column!r} (data.label_column) has empty labels")
        labels, class_names = labels_of([str(v) for v in values])
    captions = None
    if spec.caption_column in dataset.column_names:
        captions = [(str(c).strip() if c is not None else "") or None for c in _column(dataset, spec.caption_column)]
    pictures = dataset.select_columns([spec.image_column])
    images = LazyImages(lambda i: pictures[i][spec.image_column], lambda i: f"row {i} of {where}",
                        range(len(dataset)), spec.image_size)
    return ImageDataset(spec.name, images, labels, class_names, captions=captions, questions=questions,
                        answers=answers)


def hf_text_documents(spec: DataSpec) -> list[str]:
    """The non-empty strings of ``data.text_column``, in dataset order."""
    dataset = open_hf(spec)
    where = _where(spec)
    require_columns(where, dataset.column_names, {"data.text_column": spec.text_column})
    documents = [t.strip() for t in _column(dataset, spec.text_column) if isinstance(t, str) and t.strip()]
    if not documents:
        raise DataError(f"{where} has no non-empty text in column {spec.text_column!r}: the dataset is empty")
    return documents
