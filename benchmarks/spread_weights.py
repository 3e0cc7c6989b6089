"""Accuracy of the router's keep-sets with the spatial-spread prior at several weights
(:mod:`vlmprune.par.spread`), to pick ``par.spread`` on images the evaluation never sees.

    python -m benchmarks.spread_weights MODEL_DIR ROUTER_DIR [--weights 0 0.5 1 2] [--ratios 0.5 0.25]
        [--split train --n 100 --seed 1]

Weight 0 is the router alone; "dither" is the prior alone. ``--split train`` draws ``--n`` training-split
images with ``--seed`` (the router's own training images are drawn with ``par.seed``, 0 by default, so
seed 1 gives mostly other images); ``--split test`` takes the first ``--n`` held-out images, which the
pipeline's evaluate_tokens reports on. Token pruning only, all layers run, ``--k`` as the router's.
"""

from __future__ import annotations

import argparse

import torch

from vlmprune.adapters import ADAPTERS, detect_family
from vlmprune.data.spec import DataSpec
from vlmprune.par.decoder import decoder_of
from vlmprune.par.engine import Plan
from vlmprune.par.evaluate import accuracy, agreement, answers, vqa_set
from vlmprune.par.policies import RouterPolicy
from vlmprune.par.router import load_router
from vlmprune.par.spread import DitherPolicy, SpreadPolicy


def sweep(decoder, data, router, weights: list[float], ratios: list[float], k: int, batch_size: int = 20):
    """Yields one row per (policy, token ratio), as soon as it is measured: accuracy and agreement with
    the dense answers (the dense row first)."""
    dense = answers(decoder, data, Plan(1.0, 1.0, k), None, batch_size)
    yield {"policy": "dense", "tokens": 1.0, "accuracy": accuracy(dense, data), "agreement": 1.0}
    policies = [("dither", DitherPolicy())] + [
        ("router" if w == 0 else f"router+spread {w:g}", RouterPolicy(router) if w == 0 else
         SpreadPolicy(RouterPolicy(router), w)) for w in weights]
    for ratio in ratios:
        for name, policy in policies:
            text = answers(decoder, data, Plan(ratio, 1.0, k), policy, batch_size)
            yield {"policy": name, "tokens": ratio, "accuracy": accuracy(text, data), "agreement": agreement(text, dense)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("router")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    adapter = ADAPTERS.get(detect_family(args.model))()
    loaded = adapter.load(args.model, torch.float32, "cpu")
    decoder = decoder_of(adapter.for_inference(loaded.model))  # as the PAR stages run it
    router = load_router(args.router)
    data = vqa_set(adapter, loaded, DataSpec(name="digits"), args.split, args.n, seed=args.seed)
    n = len(data.labels)
    print(f"{args.model}: {int(decoder.visual_mask(data.input_ids).sum())} visual tokens, k = {router.config.k}, "
          f"{n} {args.split}-split images (seed {args.seed})")
    print("| policy | tokens | accuracy (right/images) | agreement with dense |")
    print("|---|---|---|---|")
    for row in sweep(decoder, data, router, args.weights, args.ratios, router.config.k):
        print(f"| {row['policy']} | {row['tokens']:.0%} | {row['accuracy']:.3f} ({round(row['accuracy'] * n)}/{n}) "
              f"| {row['agreement']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
