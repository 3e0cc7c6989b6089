"""PAR prefill latency, paired: dense and pruned prefill alternate on the same image (batch 1, 1 thread),
so load drift on a shared machine cancels; prints the median of the per-pair speed-ups.

    python -m benchmarks.tokens_paired MODEL_DIR ROUTER_DIR [--repeats 15] [--spread 1.0]
    python -m benchmarks.tokens_paired MODEL_DIR [--repeats 15]     # no router: random keep-sets only

``prefill`` is pixels to first-token logits (vision tower and projector included); ``lm_prefill`` is
the language model only. Two warm-up pairs per operating point are not counted. ``--spread W`` adds
the router with the spatial-spread prior of weight ``W`` (:mod:`vlmprune.par.spread`) at 50% and 25% tokens.
The model runs as the PAR stages run it (``adapter.for_inference``: the offline model's vision tower with
BatchNorm folded into its convolutions, channels-last); ``--no-fold`` times it as saved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vlmprune.adapters import ADAPTERS, detect_family
from vlmprune.data.spec import DataSpec
from vlmprune.par.decoder import decoder_of
from vlmprune.par.engine import Plan, prefill
from vlmprune.par.evaluate import vqa_set
from vlmprune.par.policies import AttentionPolicy, RandomPolicy, RouterPolicy
from vlmprune.par.router import load_router
from vlmprune.par.spread import SpreadPolicy

# (policy, token keep ratio, layer keep ratio)
POINTS = [("router", 0.5, 1.0), ("attention", 0.5, 1.0), ("router", 0.25, 1.0), ("router", 0.5, 0.75),
          ("router", 1.0, 0.75)]
# without a router: token pruning only, random keep-sets (the cost of a prefill does not depend on which tokens)
RANDOM_POINTS = [("random", 0.5, 1.0), ("random", 0.25, 1.0)]
WARMUP = 2
N_IMAGES = 32


def timed_prefill(decoder, ids, mask, pixels, plan: Plan, policy) -> tuple[float, float]:
    """(seconds from pixels, seconds of the language model alone) of one prefill."""
    start = time.perf_counter()
    embeds = decoder.embed_inputs(ids, pixels)
    middle = time.perf_counter()
    prefill(decoder, embeds, mask, plan, policy)
    end = time.perf_counter()
    return end - start, end - middle


def paired(decoder, data, policies: dict, points, repeats: int, k: int = 2) -> list[dict]:
    """For each (policy name, token ratio, layer ratio): dense and pruned prefill alternating on the same
    image (cycling over the images of ``data``), ``WARMUP`` pairs first, then ``repeats`` counted pairs;
    medians of the dense and pruned times, of the dense prefill's vision part (pixels to ``inputs_embeds``:
    vision tower and projector) and of the per-pair speed-ups."""
    ids = data.input_ids
    mask = decoder.visual_mask(ids)
    dense_plan = Plan(1.0, 1.0, k)
    n_images = len(data.pixel_values)
    rows = []
    with torch.no_grad():
        for name, tokens, layers in points:
            dense, pruned = [], []
            for r in range(repeats + WARMUP):
                pixels = data.pixel_values[r % n_images][None]
                d = timed_prefill(decoder, ids, mask, pixels, dense_plan, None)
                p = timed_prefill(decoder, ids, mask, pixels, Plan(tokens, layers, k), policies[name])
                if r >= WARMUP:
                    dense.append(d)
                    pruned.append(p)
            rows.append({"policy": name, "tokens": tokens, "layers": layers,
                         "dense_ms": 1000 * statistics.median(d[0] for d in dense),
                         "vision_ms": 1000 * statistics.median(d[0] - d[1] for d in dense),
                         "pruned_ms": 1000 * statistics.median(p[0] for p in pruned),
                         "prefill_x": statistics.median(d[0] / p[0] for d, p in zip(dense, pruned)),
                         "lm_prefill_x": statistics.median(d[1] / p[1] for d, p in zip(dense, pruned))})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("router", nargs="?", help="a router directory (router.json, router.safetensors)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--spread", type=float, default=0.0, help="with a router: also time router+spread (this weight)")
    parser.add_argument("--no-fold", action="store_true",
                        help="time the vision tower as saved, not folded for inference as the PAR stages run it")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    adapter = ADAPTERS.get(detect_family(args.model))()
    loaded = adapter.load(args.model, torch.float32, "cpu")
    if not args.no_fold:
        adapter.for_inference(loaded.model)
    decoder = decoder_of(loaded.model)
    data = vqa_set(adapter, loaded, DataSpec(name="digits"), "test", N_IMAGES)
    if args.router:
        influence = json.loads((Path(args.router) / "router.json").read_text())["block_influence"]
        policies = {"router": RouterPolicy(load_router(args.router)), "attention": AttentionPolicy(influence)}
        points = POINTS
        if args.spread > 0:
            policies["router+spread"] = SpreadPolicy(policies["router"], args.spread)
            points = POINTS + [("router+spread", 0.5, 1.0), ("router+spread", 0.25, 1.0)]
    else:
        policies, points = {"random": RandomPolicy(0)}, RANDOM_POINTS

    print(f"{args.model}: {int(decoder.visual_mask(data.input_ids).sum())} visual tokens in a prompt of "
          f"{data.input_ids.shape[1]}, k = {args.k}, 1 thread, vision tower {'folded' if getattr(loaded.model, 'folded', False) else 'as saved'}")

    print("| policy | tokens | layers | dense prefill ms | of which vision ms | pruned prefill ms "
          "| prefill x (median of pairs) | lm_prefill x |")
    print("|---|---|---|---|---|---|---|---|")
    for row in paired(decoder, data, policies, points, args.repeats, args.k):
        print(f"| {row['policy']} | {row['tokens']:.0%} | {row['layers']:.0%} | {row['dense_ms']:.0f} | "
              f"{row['vision_ms']:.0f} | {row['pruned_ms']:.0f} | {row['prefill_x']:.2f} | {row['lm_prefill_x']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
