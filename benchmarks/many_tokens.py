"""Build the offline LLaVA-style model with many visual tokens, warm-started from a 16-token one.

    python -m benchmarks.many_tokens BASE OUT [--image-size 448] [--train-images 512] [--steps 60 200]

``BASE`` is a trained :class:`~vlmprune.models.vision_lm.VisionLM` (the prepare stage's output with
``params/presets/vision_lm.yaml``: 128 px, 4x4 = 16 visual tokens). The same towers and projector
then read ``--image-size`` pixels (448 px: 14x14 = 196 visual tokens; LLaVA-1.5 has 576), and the
projector goes on training from its
16-token weights (:func:`~vlmprune.models.train_projector.train_projector` with ``reinit=False``)
for each entry of ``--steps`` in turn, each a warm-up + cosine cycle with the same batch seed, on a
seeded subset of ``--train-images`` digits training images. One step of 8 sequences of ~205 tokens
takes about 8 s on 2 CPU cores; training from scratch at 448 px was not tried. Writes the model to
``OUT`` (loadable by ``model.id``) and prints the training losses.

Why: token pruning can only pay off where visual tokens dominate the prompt. With 16 visual tokens
in a 25-token prompt, dropping half of them after 2 of 30 layers saves at most 1.43x of the
language model's prefill (README, PAR); with 196 in 205 it can save up to 1.8x.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.tokens import digits_training_subset
from vlmprune.adapters.base import LoadedModel
from vlmprune.adapters.vision_lm import VisionLMAdapter
from vlmprune.models.train_projector import train_projector


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="a trained VisionLM directory (e.g. the prepare stage's output)")
    parser.add_argument("out")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--train-images", type=int, default=512)
    parser.add_argument("--steps", type=int, nargs="+", default=[60, 200], help="one warm-up + cosine cycle each")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    adapter = VisionLMAdapter()
    base = adapter.load(args.base, torch.float32, "cpu")
    model = base.model.resized(args.image_size)
    data, train = digits_training_subset(args.train_images, args.seed)
    print(f"{args.base} at {args.image_size} px: {model.n_image_tokens} visual tokens; "
          f"{len(train)} training images", flush=True)
    for steps in args.steps:
        started = time.perf_counter()
        result = train_projector(model, base.processor, data.subset(train), steps=steps, batch_size=args.batch_size,
                                 lr=args.lr, seed=args.seed, reinit=False)
        print(f"{steps} steps in {time.perf_counter() - started:.0f} s: loss of the first 5 "
              f"{np.mean(result.losses[:5]):.3f}, of the last tenth {result.final_loss:.3f}", flush=True)
    adapter.save(LoadedModel(model.eval(), base.processor), Path(args.out))
    print(f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
