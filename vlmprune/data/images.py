"""Labelled image datasets as CLIP-style classification sets.

- ``digits``: scikit-learn's ``load_digits`` (1,797 8x8 greyscale digits, bundled with scikit-learn).
- ``fashion_mnist``: the Debian package ``dataset-fashion-mnist`` (70,000 28x28 images), read from
  ``/usr/share/datasets/fashion-mnist/`` when that package is installed.
- ``image_folder``: a local folder with a CSV/JSONL annotation file (:mod:`vlmprune.data.folder`).
- ``hf``: a Hugging Face image dataset (:mod:`vlmprune.data.hub`).

Images are uint8 arrays, greyscale (n, h, w) for the two offline sets, RGB (n, size, size, 3) for
folders and Hugging Face sets (decoded on access, :class:`vlmprune.data.decode.LazyImages`).
:func:`to_pixel_values` turns either into the RGB tensor EfficientNet-lite expects: resized to
``size`` x ``size`` and normalised as x = (pixel - 127) / 128.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlmprune.data.decode import LazyImages
from vlmprune.data.spec import DataSpec
from vlmprune.errors import DataError, DataNotFoundError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FASHION_NAMES = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]

# Caption templates. Training and evaluation use disjoint sets, so zero-shot accuracy measures
# generalisation to prompts the projection heads never saw.
TRAIN_TEMPLATES = {
    "digits": [
        "a photo of the digit {}.",
        "a handwritten {}.",
        "the number {}, written by hand.",
        "a scanned image of the numeral {}.",
        "a low resolution picture of a {}.",
        "a small greyscale digit: {}.",
    ],
    "fashion_mnist": [
        "a photo of a {}.",
        "a greyscale picture of a {}.",
        "a product photo of a {}.",
        "a low resolution image of a {}.",
        "a {} on a plain background.",
        "a small picture of a {}.",
    ],
}
EVAL_TEMPLATES = {
    "digits": ["an image of the number {}.", "a blurry {}.", "this is a {}."],
    "fashion_mnist": ["an image of a {}.", "a blurry photo of a {}.", "this is a {}."],
}
# folders and Hugging Face sets: generic photo templates, again disjoint between training and evaluation
GENERIC_TRAIN_TEMPLATES = [
    "a photo of a {}.",
    "a picture of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a bright photo of a {}.",
    "a {} in the picture.",
]
GENERIC_EVAL_TEMPLATES = ["an image of a {}.", "a blurry photo of a {}.", "this is a {}."]
DATASETS = ("digits", "fashion_mnist")


@dataclass
class ImageDataset:
    """uint8 images, greyscale (n, h, w) or RGB (n, h, w, 3) (an array or :class:`LazyImages`), integer
    labels (n,), class names, caption templates; ``captions``: one free-text caption or None per
    image (folders and Hugging Face sets with a caption column), used by calibration instead of a
    template caption; ``questions`` and ``answers``: one VQA question and its reference answer per
    image (folders and Hugging Face sets with question and answer columns), both None or both set.
    With them the image-to-text families calibrate on each image's question and answer and score
    each generated answer against that image's answer instead of the class name."""

    name: str
    images: np.ndarray | LazyImages
    labels: np.ndarray
    class_names: list[str]
    captions: list[str | None] | None = None
    questions: list[str] | None = None
    answers: list[str] | None = None

    def __post_init__(self):
        if (self.questions is None) != (self.answers is None):
            raise DataError(f"{self.name}: questions and answers come together (got only "
                            f"{'questions' if self.answers is None else 'answers'})")
        for field in ("captions", "questions", "answers"):
            values = getattr(self, field)
            if values is not None and len(values) != len(self.labels):
                raise DataError(f"{self.name}: {len(values)} {field} for {len(self.labels)} images")

    @property
    def has_questions(self) -> bool:
        return self.questions is not None

    @property
    def train_templates(self) -> list[str]:
        return TRAIN_TEMPLATES.get(self.name, GENERIC_TRAIN_TEMPLATES)

    @property
    def eval_templates(self) -> list[str]:
        return EVAL_TEMPLATES.get(self.name, GENERIC_EVAL_TEMPLATES)

    def subset(self, index: np.ndarray) -> "ImageDataset":
        images = self.images.take(index) if isinstance(self.images, LazyImages) else self.images[index]
        rows = np.asarray(index).tolist()
        pick = lambda values: None if values is None else [values[i] for i in rows]
        return ImageDataset(self.name, images, self.labels[index], self.class_names, pick(self.captions),
                            pick(self.questions), pick(self.answers))

    def __len__(self) -> int:
        return len(self.labels)


def _load_digits() -> ImageDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return ImageDataset("digits", images, bunch.target.astype(np.int64), DIGIT_NAMES)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise DataNotFoundError(
        f"{directory / stem}(.gz) not found: install the Debian package dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist) or set data.name: digits"
    )


def _load_fashion_mnist(directory: Path = FASHION_MNIST_DIR) -> ImageDataset:
    images = np.concatenate([
        _read_idx(_find(directory, "train-images-idx3-ubyte")),
        _read_idx(_find(directory, "t10k-images-idx3-ubyte")),
    ])
    labels = np.concatenate([
        _read_idx(_find(directory, "train-labels-idx1-ubyte")),
        _read_idx(_find(directory, "t10k-labels-idx1-ubyte")),
    ]).astype(np.int64)
    return ImageDataset("fashion_mnist", images, labels, FASHION_NAMES)


def load_image_dataset(name: str, max_samples: int | None = None, seed: int = 0) -> ImageDataset:
    """Load an offline dataset by name; ``max_samples`` keeps a seeded random subset."""
    loaders = {"digits": _load_digits, "fashion_mnist": _load_fashion_mnist}
    if name not in loaders:
        raise DataError(f"unknown image dataset {name!r}; known: {', '.join(DATASETS)}")
    dataset = loaders[name]()
    if max_samples is not None and max_samples < len(dataset):
        index = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:max_samples])
        dataset = dataset.subset(index)
    return dataset


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded train/test split of ``range(n)``: (train indices, test indices), each sorted."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def channels_first(images) -> torch.Tensor:
    """uint8 greyscale (n, h, w) or RGB (n, h, w, 3) -> float (n, 3, h, w), pixel values unchanged
    (greyscale is replicated to the three channels)."""
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(images))).float()
    if x.ndim == 3:
        return x.unsqueeze(1).expand(-1, 3, -1, -1)
    if x.ndim == 4 and x.shape[-1] == 3:
        return x.permute(0, 3, 1, 2)
    raise DataError(f"images of shape {tuple(x.shape)}: expected greyscale (n, h, w) or RGB (n, h, w, 3)")


def to_pixel_values(images, size: int) -> torch.Tensor:
    """uint8 greyscale (n, h, w) or RGB (n, h, w, 3) -> float (n, 3, size, size): bilinear resize,
    x = (pixel - 127) / 128 (EfficientNet-lite)."""
    x = F.interpolate(channels_first(images), size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 127.0) / 128.0).contiguous()


def open_image_dataset(spec: DataSpec) -> ImageDataset:
    """The whole image dataset of ``spec``, whatever its source."""
    if spec.name == "image_folder":
        from vlmprune.data.folder import load_folder

        return load_folder(spec)
    if spec.name == "hf":
        from vlmprune.data.hub import hf_image_dataset

        return hf_image_dataset(spec)
    return load_image_dataset(spec.name)


def image_split(spec: DataSpec) -> tuple[ImageDataset, np.ndarray, np.ndarray]:
    """The dataset of ``spec`` and its seeded (train, held-out) indices."""
    data = open_image_dataset(spec)
    train, test = split_indices(len(data), spec.test_fraction, spec.seed)
    return data, train, test


def too_few_images(spec: DataSpec, n_samples: int, n_train: int) -> DataError:
    return DataError(
        f"calibration.n_samples={n_samples} but the {spec.name} training split has only {n_train} "
        "images: lower calibration.n_samples or data.test_fraction"
        + (", or add images" if spec.name in ("image_folder", "hf") else "")
    )


def draw_calibration_images(spec: DataSpec, n_samples: int, seed: int):
    """``n_samples`` training-split images and one training-template caption each, drawn with ``seed``:
    (dataset, sorted indices, labels, captions, rng). An image with its own caption (``data.captions``)
    keeps it instead of the template caption (the template is still drawn, so the draws of the other
    images do not change)."""
    data, train, _ = image_split(spec)
    if n_samples > len(train):
        raise too_few_images(spec, n_samples, len(train))
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(train, size=n_samples, replace=False))
    labels = data.labels[index]
    templates = rng.integers(len(data.train_templates), size=n_samples)
    captions = [data.train_templates[t].format(data.class_names[y]) for t, y in zip(templates, labels)]
    if data.captions is not None:
        captions = [data.captions[i] or caption for i, caption in zip(index.tolist(), captions)]
    return data, index, labels, captions, rng
