"""What ECoFLaP's global scores cost on SmolLM2-135M, beside one plain forward pass over the same data.

Every mode runs in its own process (peak resident memory is per process) on the same scoring batches
(Wikipedia windows drawn from the training split), and the group scores of each mode are compared
with those of the reference-granularity-free baseline ``zeroth-order, full forwards`` by Spearman rank
correlation (1.0 = the same ranking of the 30 decoder layers).

    python -m benchmarks.scoring_cost                       # 16 windows x 256 tokens, batch 4
    python -m benchmarks.scoring_cost --samples 32 --seq-len 512 --batch-size 8   # the issue's default

Modes:
    forward            one plain forward pass (loss only) over the batches: the inference reference
    first_order        backprop, per-weight gradients reduced at once by post-accumulate-grad hooks
    first_order_ckpt   the same with activation checkpointing
    zeroth_full        zeroth-order, central differences, every perturbed forward runs the whole model
    zeroth_cached      the same estimator, perturbed forwards start at the perturbed block
    zeroth_cached_fwd  cached, forward differences (1 perturbed forward per block instead of 2)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MODES = ("forward", "first_order", "first_order_ckpt", "zeroth_full", "zeroth_cached", "zeroth_cached_fwd")


def run_mode(mode: str, samples: int, seq_len: int, batch_size: int, threads: int) -> dict:
    import torch

    from vlmprune.adapters import ADAPTERS
    from vlmprune.data.spec import DataSpec
    from vlmprune.profiling import measure
    from vlmprune.scorers import SCORERS
    from vlmprune.sparsity import model_layout

    torch.set_num_threads(threads)
    adapter = ADAPTERS.get("causal_lm")()
    loaded = adapter.load("smollm2", torch.float32, "cpu")
    data = adapter.make_calibration(loaded, DataSpec(name="wikipedia", seq_len=seq_len), samples, 0)
    batches = [{k: v[s:s + batch_size] for k, v in data.items()} for s in range(0, samples, batch_size)]
    towers = adapter.towers(loaded.model)
    groups = {g.name: g.layers for g in model_layout(loaded.model, towers)}
    blocks = {"blocks": {n: m for t in towers for n, m in t.groups},
              "towers": {t.name: [n for n, _ in t.groups] for t in towers}}
    options = {
        "first_order": ("first_order", {}),
        "first_order_ckpt": ("first_order", {"checkpointing": True}),
        "zeroth_full": ("zeroth_order", {}),
        "zeroth_cached": ("zeroth_order", blocks),
        "zeroth_cached_fwd": ("zeroth_order", {**blocks, "difference": "forward"}),
    }
    scores, passes = {}, ""
    with measure() as usage:
        if mode == "forward":
            with torch.no_grad():
                for batch in batches:
                    adapter.loss(loaded.model, batch)
            passes = f"{len(batches)} fwd"
        else:
            method, extra = options[mode]
            result = SCORERS.get(method)(loaded.model, groups, adapter.loss, batches, progress=True, **extra)
            scores = result.group_scores
            passes = f"{result.forward_passes} fwd, {result.backward_passes} bwd"
    return {"mode": mode, "wall_s": usage.wall_s, "peak_rss_mb": usage.peak_rss_mb, "passes": passes,
            "scores": scores}


def spearman(a: dict[str, float], b: dict[str, float]) -> float:
    from scipy.stats import spearmanr

    keys = sorted(a)
    return float(spearmanr([a[k] for k in keys], [b[k] for k in keys]).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_mode(args.one, args.samples, args.seq_len, args.batch_size, args.threads)))
        return

    import torch

    from benchmarks.common import machine, markdown_table

    torch.set_num_threads(args.threads)  # as in the measured processes, so the header says so
    results = {}
    for mode in args.modes:
        cmd = [sys.executable, "-m", "benchmarks.scoring_cost", "--one", mode, "--samples", str(args.samples),
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.split("RESULT ", 1)[1])
        print(mode, f"{results[mode]['wall_s']:.1f} s", f"{results[mode]['peak_rss_mb']:.0f} MB", flush=True)

    forward = results.get("forward")
    reference = results.get("zeroth_full", {}).get("scores")
    rows = []
    for mode, r in results.items():
        row = {"mode": mode, "passes": r["passes"], "wall s": r["wall_s"], "peak RSS MB": r["peak_rss_mb"]}
        if forward:
            row["x forward time"] = r["wall_s"] / forward["wall_s"]
            row["x forward memory"] = r["peak_rss_mb"] / forward["peak_rss_mb"]
        if reference and r["scores"]:
            row["rank corr. vs zeroth_full"] = spearman(r["scores"], reference)
        rows.append(row)
    columns = ["mode", "passes", "wall s", "peak RSS MB", "x forward time", "x forward memory",
               "rank corr. vs zeroth_full"]
    command = (f"python -m benchmarks.scoring_cost --samples {args.samples} --seq-len {args.seq_len} "
               f"--batch-size {args.batch_size} --threads {args.threads}")
    text = (f"Scoring cost, SmolLM2-135M (30 decoder layers = 30 groups), {args.samples} Wikipedia windows x "
            f"{args.seq_len} tokens in batches of {args.batch_size}; each mode in its own process, model loading "
            f"excluded; peak RSS sampled during the scoring only (the resident model included).\nMachine: {machine()}.\nCommand: {command}\n\n"
            f"{markdown_table(rows, columns)}\n")
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"scoring_cost_{args.samples}x{args.seq_len}.md").write_text(text)


if __name__ == "__main__":
    main()
