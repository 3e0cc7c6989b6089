"""Images decoded with Pillow on access, so a large folder or dataset is never held in memory at once.

Every image becomes RGB uint8 (size, size, 3): the shorter side is resized to ``size`` (bicubic)
and the centre ``size`` x ``size`` square is kept, the resize-then-centre-crop of CLIP's image
processor (Radford et al., 2021, "Learning Transferable Visual Models From Natural Language
Supervision"). For a w x h image the resized size is (round(w * s), round(h * s)), s = size / min(w, h),
and the crop's left/top corner is ((W - size) // 2, (H - size) // 2).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from vlmprune.errors import DataError


def fit_rgb(image: Image.Image, size: int) -> np.ndarray:
    """A PIL image -> (size, size, 3) uint8: RGB, shorter side resized to ``size``, centre crop."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    width, height = max(size, round(w * scale)), max(size, round(h * scale))
    if (width, height) != (w, h):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


class LazyImages:
    """A sequence of images decoded on access.

    ``opener(position)`` returns a PIL image, ``describe(position)`` names it in errors (a file path,
    a dataset row). ``x[i]`` is one (size, size, 3) uint8 array; ``x[index array or slice]`` stacks
    them into (k, size, size, 3); :meth:`take` selects without decoding.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, opener: Callable[[int], Image.Image], describe: Callable[[int], str],
                 positions, size: int):
        self._open, self._describe = opener, describe
        self.positions = np.asarray(positions, dtype=np.int64)
        self.size = size

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.size, self.size, 3)

    def describe(self, i: int) -> str:
        return self._describe(int(self.positions[i]))

    def take(self, index) -> LazyImages:
        return LazyImages(self._open, self._describe, self.positions[index], self.size)

    def decode(self, position: int) -> np.ndarray:
        try:
            with self._open(int(position)) as image:
                return fit_rgb(image, self.size)
        except (OSError, ValueError, SyntaxError) as error:  # Pillow's errors for a bad or truncated file
            raise DataError(f"unreadable image {self._describe(int(position))}: {error}") from None

    def verify(self) -> None:
        """Open every image and check it is a complete image file (Pillow's ``verify``, no decoding)."""
        for position in self.positions:
            try:
                with self._open(int(position)) as image:
                    image.verify()
            except (OSError, ValueError, SyntaxError) as error:
                raise DataError(f"unreadable image {self._describe(int(position))}: {error}") from None

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self.decode(self.positions[key])
        positions = self.positions[key]
        if len(positions) == 0:
            return np.zeros((0, self.size, self.size, 3), dtype=np.uint8)
        return np.stack([self.decode(p) for p in positions])

    def __array__(self, dtype=None, copy=None):
        array = self[:]
        return array if dtype is None else array.astype(dtype)
