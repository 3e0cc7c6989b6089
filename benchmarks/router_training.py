"""How the meta-router's token head is trained, measured on held-out images against an oracle.

    python -m benchmarks.router_training --model DIR                   # a VisionLM (or LLaVA) directory
    python -m benchmarks.router_training --model DIR --build 256       # build the LLaVA-style model there first

``DIR`` is, for instance, the prepare stage's output under ``params/presets/vision_lm.yaml``; with
``--build IMAGE_SIZE`` and no ``DIR`` yet, the offline LLaVA-style model is built there first
(:func:`benchmarks.tokens.build_vision_lm`: projector 150 steps of 8 on the 1,258 digits training
images; 128 px gives 16 visual tokens, 256 px gives 64). Every row
prunes visual tokens only (all layers run, ``--k`` layers before the cut) on the same ``--test``
held-out images, and reports ``D`` = mean over answer tokens of KL(dense || pruned) in nats (the
training distance of :mod:`vlmprune.par.train`) and the VQA accuracy of the greedy answers at each
token keep ratio:

- ``random``: uniformly random keep-sets (seeded);
- ``untrained router``: the token head at its random initialisation;
- ``straight-through`` (the default, ``par.token_loss: straight_through``): the token head trained on
  ``D`` through straight-through masks ``1[top_k] + sigmoid(s) - stopgrad(sigmoid(s))``;
- ``ListNet on contributions`` (``par.token_loss: contributions``): the token head trained to rank
  tokens like their measured contributions on the training images (:mod:`vlmprune.par.contributions`,
  ``--subsets`` keep-sets per image) with the ListNet loss (Cao et al., ICML 2007);
- ``oracle``: each held-out image ranked by its own measured contributions. Not available at
  inference (it runs ``--subsets`` pruned forwards of that image); it shows how much accuracy a
  ranking of the tokens can keep at all.

Prints a Markdown table and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import machine, markdown_table
from vlmprune.adapters import ADAPTERS, detect_family
from vlmprune.data.spec import DataSpec
from vlmprune.par.contributions import token_contributions
from vlmprune.par.decoder import decoder_of
from vlmprune.par.engine import Plan, check_batch
from vlmprune.par.evaluate import accuracy, answers, vqa_set
from vlmprune.par.policies import RandomPolicy, RouterPolicy
from vlmprune.par.router import MetaRouter, RouterConfig
from vlmprune.par.train import make_examples, router_loss, train_router


HEADS = ["random", "untrained", "straight-through", "contributions", "oracle"]


class Scores:
    """Fixed token scores, one row per held-out image, for the router's interface (``hidden``,
    ``visual_mask``) and the decoder loop's (a prefix of the whole held-out batch)."""

    needs_attention = False

    def __init__(self, scores: torch.Tensor):
        self.scores = scores

    def token_scores(self, *_):
        return self.scores


class RandomScores(Scores):
    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def token_scores(self, hidden, visual_mask):
        return torch.rand(hidden.shape[0], int(visual_mask[0].sum()), generator=self.generator)


def held_out_distance(dec, scorer, examples, ratios, k: int) -> dict[float, float]:
    with torch.no_grad():
        return {r: float(router_loss(dec, scorer, examples, Plan(r, 1.0, k))) for r in ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--build", type=int, metavar="IMAGE_SIZE", default=None,
                        help="build the offline LLaVA-style model at --model first when it does not exist")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--train", type=int, default=128, help="unlabelled training images")
    parser.add_argument("--test", type=int, default=64, help="held-out images")
    parser.add_argument("--subsets", type=int, default=32)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=HEADS,
                        help="rows to measure besides dense (the trained ones and the oracle cost the most)")
    parser.add_argument("--out", default="benchmarks/results/router_training.md")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.build and not Path(args.model).exists():
        from benchmarks.tokens import build_vision_lm

        adapter, loaded, _ = build_vision_lm(150, 1258, image_size=args.build, seed=args.seed)
        adapter.save(loaded, Path(args.model))
    adapter = ADAPTERS.get(detect_family(args.model))()
    loaded = adapter.load(args.model, torch.float32, "cpu")
    dec, spec, k = decoder_of(loaded.model), DataSpec(name=args.data), args.k
    train, test = vqa_set(adapter, loaded, spec, "train", args.train, args.seed), vqa_set(adapter, loaded, spec,
                                                                                          "test", args.test)
    train_x = make_examples(dec, train.input_ids, train.pixel_values, k, train.max_new_tokens, 16, progress=True)
    test_x = make_examples(dec, test.input_ids, test.pixel_values, k, test.max_new_tokens, 16, progress=True)

    def fresh_router():
        torch.manual_seed(args.seed)
        return MetaRouter(RouterConfig(dec.hidden_size, dec.n_layers, k, args.width, [1.0, *args.ratios], [1.0]))

    rows, seconds = [], {}

    dense_answers = answers(dec, test, Plan(1.0, 1.0, k), None, batch_size=len(test.labels))
    rows.append({"token head": "dense (all tokens)", **{f"D @ {r:.0%}": "0" for r in args.ratios},
                 **{f"acc @ {r:.0%}": f"{accuracy(dense_answers, test):.3f}" for r in args.ratios}})

    def add(name, scorer, policy, note=""):
        distances = held_out_distance(dec, scorer, test_x, args.ratios, k)
        row = {"token head": name, **{f"D @ {r:.0%}": f"{d:.4f}" for r, d in distances.items()}}
        for r in args.ratios:  # the whole held-out set in one batch, so fixed scores line up with the images
            text = answers(dec, test, Plan(r, 1.0, k), policy, batch_size=len(test.labels))
            row[f"acc @ {r:.0%}"] = f"{accuracy(text, test):.3f}"
        rows.append({**row, "train s": seconds.get(name, ""), "note": note})
        print(rows[-1], flush=True)

    if "random" in args.heads:
        add("random", RandomScores(args.seed), RandomPolicy(args.seed))
    if "untrained" in args.heads:
        router = fresh_router().eval()
        add("untrained router", router, RouterPolicy(router))

    def trained(name, fit):
        router, started = fresh_router(), time.perf_counter()
        fit(router)
        seconds[name] = round(time.perf_counter() - started)
        return router.eval()

    if "straight-through" in args.heads:
        router = trained("straight-through", lambda r: train_router(
            dec, r, train_x, args.steps, args.lr, args.batch_size, args.seed, points=[(t, 1.0) for t in args.ratios],
            progress=True))
        add("straight-through", router, RouterPolicy(router), "the default")
    if "contributions" in args.heads:
        router = trained("ListNet on contributions", lambda r: train_router(
            dec, r, train_x, args.steps, args.lr, args.batch_size, args.seed, points=[(t, 1.0) for t in args.ratios],
            progress=True, token_loss="contributions", n_subsets=args.subsets))
        add("ListNet on contributions", router, RouterPolicy(router), "measuring the training contributions included")
    if "oracle" in args.heads:
        oracle = token_contributions(dec, test_x, k, args.ratios, args.subsets, seed=args.seed + 1, progress=True)
        add("oracle", Scores(oracle), Scores(oracle), f"{args.subsets} pruned forwards of each held-out image")

    columns = ["token head", *[f"D @ {r:.0%}" for r in args.ratios], *[f"acc @ {r:.0%}" for r in args.ratios],
               "train s", "note"]
    text = "\n".join([
        f"Token-head training of the PAR meta-router on {args.model}: {check_batch(test_x.visual_mask)} visual "
        f"tokens, k = {k}, all layers run. D = mean KL(dense || pruned) over the dense answer's tokens (nats), lower "
        f"is better; acc = VQA accuracy of the greedy answers; both on {args.test} held-out {args.data} images. "
        f"Routers trained on {args.train} unlabelled training images, {args.steps} steps of {args.batch_size}, "
        f"lr {args.lr}.",
        f"Machine: {machine()}",
        f"Command: python -m benchmarks.router_training {shlex.join(sys.argv[1:] if argv is None else argv)}",
        "",
        markdown_table(rows, columns),
        "",
    ])
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
