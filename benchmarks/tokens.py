"""PAR token and layer pruning: accuracy and measured CPU latency per operating point and policy.

    python -m benchmarks.tokens --model artifacts/prepare/model            # a VisionLM (or LLaVA) directory
    python -m benchmarks.tokens --tiny-llava                               # plumbing only: random tiny LLaVA

Trains the meta-router on unlabelled training-split images (or loads it from ``--router``), then
measures every (token ratio x layer ratio) point for the router, the attention-score baseline
(FastV tokens + Block-Influence layers) and random, on held-out images. Latency: batch size 1,
medians of ``--repeats`` runs, ``torch.set_num_threads(--threads)``. Prints a Markdown table and
writes it to benchmarks/results/tokens.md (or ``--out``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import machine, markdown_table
from vlmprune.adapters import ADAPTERS, LoadedModel, detect_family
from vlmprune.data.spec import DataSpec
from vlmprune.par.decoder import decoder_of
from vlmprune.par.evaluate import evaluate_grid, vqa_set
from vlmprune.par.policies import AttentionPolicy, RandomPolicy, RouterPolicy, block_influence
from vlmprune.par.router import MetaRouter, RouterConfig, has_router, load_router, save_router
from vlmprune.par.train import make_examples, operating_points, train_router

COLUMNS = ["method", "tokens", "layers", "accuracy", "agreement", "prefill_ms", "lm_prefill_ms", "decode_ms",
           "prefill_x", "lm_prefill_x", "decode_x"]


def load(args):
    if args.tiny_llava:
        from tests.tiny import build_tiny_llava

        model, tokenizer = build_tiny_llava(text_layers=4)
        return ADAPTERS.get("llava")(), LoadedModel(model, tokenizer)
    adapter = ADAPTERS.get(detect_family(args.model))()
    return adapter, adapter.load(args.model, torch.float32, "cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="artifacts/prepare/model")
    parser.add_argument("--tiny-llava", action="store_true")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--router", default=None, help="router directory: loaded if it holds one, else written")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--token-ratios", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--layer-ratios", type=float, nargs="+", default=[1.0, 0.75, 0.5])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-samples", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/tokens.md")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    adapter, loaded = load(args)
    dec = decoder_of(loaded.model)
    spec = DataSpec(name=args.data)
    started = time.perf_counter()
    train = vqa_set(adapter, loaded, spec, "train", args.train_samples, args.seed)
    influence = block_influence(dec, [dec.embed_inputs(train.input_ids.expand(len(x), -1), x)
                                      for x in train.pixel_values[:64].split(args.batch_size)])
    if args.router and has_router(args.router):
        router, losses = load_router(args.router), []
    else:
        examples = make_examples(dec, train.input_ids, train.pixel_values, args.k, train.max_new_tokens,
                                 args.batch_size, progress=True)
        torch.manual_seed(args.seed)
        router = MetaRouter(RouterConfig(dec.hidden_size, dec.n_layers, args.k, args.width,
                                         args.token_ratios, args.layer_ratios))
        losses = train_router(dec, router, examples, args.steps, args.lr, args.batch_size, args.seed, progress=True)
        if args.router:
            save_router(router, args.router, block_influence=influence, losses=losses)
    train_s = time.perf_counter() - started
    test = vqa_set(adapter, loaded, spec, "test", args.eval_samples)
    policies = {"router": RouterPolicy(router), "attention": AttentionPolicy(influence),
                "random": RandomPolicy(args.seed)}
    rows = evaluate_grid(dec, test, policies, operating_points(args.token_ratios, args.layer_ratios), args.k,
                         batch_size=32, repeats=args.repeats, progress=True)
    n_visual = int(dec.visual_mask(test.input_ids).sum())
    for r in rows:
        r["tokens"] = f"{r['token_ratio']:.0%}"
        r["layers"] = f"{r['layer_ratio']:.0%}"
        r["prefill_x"], r["lm_prefill_x"], r["decode_x"] = (r["prefill_speedup"], r["lm_prefill_speedup"],
                                                            r["decode_speedup"])
    table = markdown_table(rows, COLUMNS)
    name = "tiny random LLaVA (plumbing only)" if args.tiny_llava else args.model
    loss_line = (f"router loss (KL, nats) first/last 10%: {sum(losses[:max(1, len(losses) // 10)]) / max(1, len(losses) // 10):.4f}"
                 f" / {sum(losses[-max(1, len(losses) // 10):]) / max(1, len(losses) // 10):.4f}" if losses else
                 f"router loaded from {args.router}")
    text = "\n".join([
        f"PAR on {name}: {n_visual} visual tokens, prompt of {test.input_ids.shape[1]} tokens, "
        f"{dec.n_layers} decoder layers, k = {args.k}; {len(test.labels)} held-out {args.data} images.",
        f"Router: {args.train_samples} unlabelled training images, {args.steps} steps; {loss_line}; "
        f"data + router training {train_s:.0f} s.",
        f"Latency: batch 1, median of {args.repeats} runs, {args.threads} threads; prefill = pixels to first-token "
        "logits (vision tower included), lm_prefill = the language model only; x = speed-up over dense. "
        "Shared machine: other jobs ran at the same time, so timings are noisy.",
        f"Machine: {machine()}",
        f"Command: python -m benchmarks.tokens {shlex.join(sys.argv[1:] if argv is None else argv)}",
        "",
        table,
        "",
    ])
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
