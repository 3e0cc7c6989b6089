"""Offline labelled image datasets that ship with packages, as CLIP-style classification sets.

- ``digits``: scikit-learn's ``load_digits`` (1,797 8x8 greyscale digits, bundled with scikit-learn).
- ``fashion_mnist``: the Debian package ``dataset-fashion-mnist`` (70,000 28x28 images), read from
  ``/usr/share/datasets/fashion-mnist/`` when that package is installed.

Images are returned as uint8 greyscale arrays; :func:`to_pixel_values` turns them into the RGB tensor
EfficientNet-lite expects: resized to ``size`` x ``size`` and normalised as x = (pixel - 127) / 128.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlmprune.data.spec import DataSpec

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
DATASETS = ("digits", "fashion_mnist")


@dataclass
class ImageDataset:
    """Greyscale images (n, h, w) uint8, integer labels (n,), class names, caption templates."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    @property
    def train_templates(self) -> list[str]:
        return TRAIN_TEMPLATES[self.name]

    @property
    def eval_templates(self) -> list[str]:
        return EVAL_TEMPLATES[self.name]

    def subset(self, index: np.ndarray) -> "ImageDataset":
        return ImageDataset(self.name, self.images[index], self.labels[index], self.class_names)

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
    raise FileNotFoundError(
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
        raise ValueError(f"unknown image dataset {name!r}; known: {', '.join(DATASETS)}")
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


def to_pixel_values(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 greyscale (n, h, w) -> float (n, 3, size, size), x = (pixel - 127) / 128 (EfficientNet-lite)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 127.0) / 128.0
    return x.expand(-1, 3, -1, -1).contiguous()


def image_split(spec: DataSpec) -> tuple[ImageDataset, np.ndarray, np.ndarray]:
    """The dataset of ``spec`` and its seeded (train, held-out) indices."""
    data = load_image_dataset(spec.name)
    train, test = split_indices(len(data), spec.test_fraction, spec.seed)
    return data, train, test


def draw_calibration_images(spec: DataSpec, n_samples: int, seed: int):
    """``n_samples`` training-split images and one training-template caption each, drawn with ``seed``:
    (dataset, sorted indices, labels, captions, rng)."""
    data, train, _ = image_split(spec)
    if n_samples > len(train):
        raise ValueError(
            f"calibration.n_samples={n_samples} but the {spec.name} training split has only {len(train)} "
            "images: lower calibration.n_samples or data.test_fraction"
        )
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(train, size=n_samples, replace=False))
    labels = data.labels[index]
    templates = rng.integers(len(data.train_templates), size=n_samples)
    captions = [data.train_templates[t].format(data.class_names[y]) for t, y in zip(templates, labels)]
    return data, index, labels, captions, rng
