"""Check a run's data before any model work: :func:`check_data` opens the source, validates it and
raises a clear error (naming the file, field or column, and what to change) when it cannot serve
the run."""

from __future__ import annotations

from vlmprune.data.decode import LazyImages
from vlmprune.data.spec import TEXT_SOURCES, DataSpec
from vlmprune.errors import DataError


def data_kind(spec: DataSpec) -> str:
    """``"image"`` or ``"text"``; a Hugging Face set is opened to see which columns it has."""
    if spec.name == "hf":
        from vlmprune.data.hub import hf_kind

        return hf_kind(spec)
    return "text" if spec.name in TEXT_SOURCES else "image"


def check_data(spec: DataSpec, n_samples: int | None = None) -> dict[str, int | str]:
    """Open the data of ``spec`` and check it, before the model is loaded.

    Image sets: the annotation file, its columns and the listed files (folders; every image is also
    opened and verified with Pillow, so an unreadable one is named now); the columns and the first
    image (Hugging Face sets); a non-empty training and held-out split; at least ``n_samples``
    (calibration.n_samples) training images. Text sets: the file or dataset opens and holds some
    text (whether each part fills a window of data.seq_len tokens is checked when it is tokenized,
    with a message naming data.seq_len).
    Returns a summary: kind, examples (images or documents), train, heldout, classes (images),
    questions (distinct questions, VQA-style image sets).
    """
    kind = data_kind(spec)
    if kind == "text":
        from vlmprune.data.text import load_text_corpus

        corpus = load_text_corpus(spec)
        n = len(corpus.calibration) + len(corpus.heldout)
        if n == 0:
            raise DataError(f"{corpus.name} holds no text: the dataset is empty")
        return {"kind": kind, "examples": n, "train": len(corpus.calibration), "heldout": len(corpus.heldout)}

    from vlmprune.data.images import image_split, too_few_images

    data, train, test = image_split(spec)
    if len(data) == 0:
        raise DataError(f"the {spec.name} dataset is empty")
    if isinstance(data.images, LazyImages):
        if spec.name == "image_folder":
            data.images.verify()
        else:
            data.images[0]  # decodes (a bad image names its row)
    if len(test) == 0 or len(train) == 0:
        empty = "held-out" if len(test) == 0 else "training"
        raise DataError(f"the {empty} split of {spec.name} ({len(data)} images, data.test_fraction="
                         f"{spec.test_fraction}) is empty: change data.test_fraction or add images")
    if n_samples is not None and n_samples > len(train):
        raise too_few_images(spec, n_samples, len(train))
    summary = {"kind": kind, "examples": len(data), "train": len(train), "heldout": len(test),
               "classes": len(data.class_names)}
    if data.has_questions:
        summary["questions"] = len(set(data.questions))
    return summary
