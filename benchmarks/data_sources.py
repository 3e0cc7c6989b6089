"""The default dual encoder on the same images read three ways: the packaged digits, and the digits
written out as an RGB PNG image folder with a labels.csv (``data.name: image_folder``).

Same rows in the same order, so the seeded held-out split is the same 539 images. What differs:
the folder path decodes each 8x8 PNG with Pillow and resizes it to ``data.image_size`` (bicubic,
centre crop; none at ``data.image_size=8``) before the model's own bilinear resize, and its prompts are the generic templates
("an image of a {}.") instead of the digit ones ("an image of the number {}."). Also times
check_data (every image verified) and decoding.

    python -m benchmarks.data_sources [--model artifacts/prepare/model] [--out benchmarks/results/data_sources.md]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from vlmprune.adapters import ADAPTERS
from vlmprune.data.check import check_data
from vlmprune.data.images import image_split, load_image_dataset
from vlmprune.data.spec import DataSpec


def export_digits(root: Path) -> None:
    data = load_image_dataset("digits")
    lines = ["image,label"]
    for i, (image, label) in enumerate(zip(data.images, data.labels)):
        name = f"{i:04d}.png"
        Image.fromarray(image).convert("RGB").save(root / name)
        lines.append(f"{name},{data.class_names[label]}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="artifacts/prepare/model")
    parser.add_argument("--out", default="benchmarks/results/data_sources.md")
    parser.add_argument("--image-size", type=int, default=96)
    args = parser.parse_args()
    adapter = ADAPTERS.get("dual_encoder")()
    loaded = adapter.load(args.model, torch.float32, "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        export_digits(Path(tmp))
        folder = DataSpec(name="image_folder", path=tmp, image_size=args.image_size)
        start = time.perf_counter()
        summary = check_data(folder, 128)
        check_s = time.perf_counter() - start
        data, _, test = image_split(folder)
        start = time.perf_counter()
        data.images[test]
        decode_s = time.perf_counter() - start
        native = DataSpec(name="image_folder", path=tmp, image_size=8)  # no resize at load: same pixels as digits
        for label, spec in (("digits (packaged arrays)", DataSpec(name="digits")),
                            ("image_folder, data.image_size=8 (pixels as digits)", native),
                            (f"image_folder, data.image_size={args.image_size}", folder)):
            start = time.perf_counter()
            metrics, _ = adapter.evaluate(loaded, spec, batch_size=64, max_samples=None, device="cpu")
            rows.append((label, metrics["zero_shot_accuracy"], time.perf_counter() - start))
    text = [f"Default dual encoder ({args.model}), zero-shot accuracy on the 539 held-out digits, read three ways (the folder at two data.image_size values).",
            (f"Folder: {summary['examples']} RGB PNGs + labels.csv, data.image_size={args.image_size}; "
             f"check_data (every image verified) {check_s:.2f} s; decoding the {len(test)} held-out images "
             f"{decode_s:.2f} s. Timings on a shared 2-core CPU (noisy)."), "",
            "| source | zero-shot accuracy | evaluate (s) |", "|---|---|---|"]
    text += [f"| {label} | {acc:.3f} | {secs:.1f} |" for label, acc, secs in rows]
    Path(args.out).write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
