"""What ECoFLaP's global scores cost on SmolLM2-135M, beside one plain forward pass over the same data
and beside the prune stage that follows them.

Every mode runs in its own process (peak memory is per process) on the same scoring batches
(Wikipedia windows drawn from the training split), and the group scores of each mode are compared
with those of the reference-granularity-free baseline ``zeroth-order, full forwards`` by Spearman rank
correlation (1.0 = the same ranking of the 30 decoder layers).

    python -m benchmarks.scoring_cost                       # 16 windows x 256 tokens, batch 4
    python -m benchmarks.scoring_cost --samples 32 --seq-len 512 --batch-size 8   # the issue's default
    python -m benchmarks.scoring_cost --device cuda --model config:benchmarks/configs/smollm2_135m.json \
        --data random --samples 32 --seq-len 512 --batch-size 8 --modes forward first_order prune_wanda

``--device cuda`` runs on a GPU: peak memory is then ``torch.cuda.max_memory_allocated`` (the GPU's,
not the process's), and each process runs one forward pass before the measured one so that CUDA's
start-up (context, cuBLAS handles) stays out of the times. ``--model config:FILE.json`` builds the
architecture from a config with seeded random weights, and ``--data random`` draws uniform random
token ids: for measuring cost on a machine without the packaged model and corpus (a GPU worker);
the scores, and so the rank correlations, then mean nothing about the real model.

Modes:
    forward            one plain forward pass (loss only) over the batches: the inference reference
    first_order        backprop, per-weight gradients reduced at once by post-accumulate-grad hooks
    first_order_ckpt   the same with activation checkpointing
    zeroth_full        zeroth-order, central differences, every perturbed forward runs the whole model
    zeroth_cached      the same estimator, perturbed forwards start at the perturbed block
    zeroth_cached_fwd  cached, forward differences (1 perturbed forward per block instead of 2)
    zeroth_cached_linear, zeroth_cached_fwd_linear
                       the two above with the loss linearised at the LM head (``scoring.head: linear``):
                       perturbed forwards stop at the head
    prune_wanda        the prune stage after it: Wanda, block by block, 50% in every layer, on
                       ``--prune-samples`` calibration windows of the same length (the preset's 128)
    prune_sparsegpt    the same with SparseGPT

Every zeroth-order mode also reports its finite-difference error: the median and largest relative
difference of its group scores from sum_b |g_b . z_b|, the same sum over batches with the same
directions z_b but the true gradients g_b (by backprop, after the measured work): what the scores
would be without the finite difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

MODES = ("forward", "first_order", "first_order_ckpt", "zeroth_full", "zeroth_cached", "zeroth_cached_fwd",
         "zeroth_cached_linear", "zeroth_cached_fwd_linear")
PRUNE_MODES = ("prune_wanda", "prune_sparsegpt")
CONFIG_PREFIX = "config:"


def load_model(adapter, model: str, device: str):
    """The model on ``device``: loaded by id or directory, or ``config:FILE.json`` built from a config
    with random weights (seed 0)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlmprune.adapters.base import LoadedModel

    if not model.startswith(CONFIG_PREFIX):
        return adapter.load(model, torch.float32, device)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model[len(CONFIG_PREFIX):])
    return LoadedModel(AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).eval())


def make_windows(adapter, loaded, data: str, n: int, seq_len: int, seed: int) -> dict:
    """``n`` calibration windows: the adapter's (``data`` names a corpus), or uniform random token ids."""
    import torch

    from vlmprune.data.spec import DataSpec

    if data != "random":
        return adapter.make_calibration(loaded, DataSpec(name=data, seq_len=seq_len), n, seed)
    ids = torch.randint(loaded.model.config.vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def batches_of(windows: dict, batch_size: int, device: str) -> list[dict]:
    n = len(windows["input_ids"])
    return [{k: v[s:s + batch_size].to(device) for k, v in windows.items()} for s in range(0, n, batch_size)]


def run_mode(mode: str, samples: int, seq_len: int, batch_size: int, threads: int, model: str = "smollm2",
             data: str = "wikipedia", device: str = "cpu", prune_samples: int = 128) -> dict:
    import torch

    from vlmprune.adapters import ADAPTERS, detect_family
    from vlmprune.profiling import measure
    from vlmprune.pruners import PRUNERS
    from vlmprune.scorers import SCORERS
    from vlmprune.scorers.zeroth_order import directional_derivative_sums
    from vlmprune.sequential import prune_tower_sequential
    from vlmprune.sparsity import model_layout

    torch.set_num_threads(threads)
    adapter = ADAPTERS.get("causal_lm" if model.startswith(CONFIG_PREFIX) else detect_family(model))()
    loaded = load_model(adapter, model, device)
    n, seed = (prune_samples, 1) if mode in PRUNE_MODES else (samples, 0)  # the prune stage has its own sample
    batches = batches_of(make_windows(adapter, loaded, data, n, seq_len, seed), batch_size, device)
    towers = adapter.towers(loaded.model)
    layout = model_layout(loaded.model, towers)
    groups = {g.name: g.layers for g in layout}
    if device != "cpu":  # CUDA's start-up (context, cuBLAS) outside the measured work
        with torch.no_grad():
            adapter.loss(loaded.model, batches[0])
        torch.cuda.synchronize()
    head = adapter.loss_head(loaded.model)
    blocks = {"blocks": {n: m for t in towers for n, m in t.groups},
              "towers": {t.name: [n for n, _ in t.groups] for t in towers}}
    options = {
        "first_order": ("first_order", {}),
        "first_order_ckpt": ("first_order", {"checkpointing": True}),
        "zeroth_full": ("zeroth_order", {}),
        "zeroth_cached": ("zeroth_order", blocks),
        "zeroth_cached_fwd": ("zeroth_order", {**blocks, "difference": "forward"}),
        "zeroth_cached_linear": ("zeroth_order", {**blocks, "head": head}),
        "zeroth_cached_fwd_linear": ("zeroth_order", {**blocks, "difference": "forward", "head": head}),
    }
    scores, passes = {}, ""
    with measure() as usage:
        if mode == "forward":
            with torch.no_grad():
                for batch in batches:
                    adapter.loss(loaded.model, batch)
            passes = f"{len(batches)} fwd"
        elif mode in PRUNE_MODES:
            pruner = PRUNERS.get(mode.removeprefix("prune_"))()
            sparsity = {name: 0.5 for g in layout for name in g.layers}
            for tower in towers:
                members = [(g.name, g.module, g.layers) for g in layout if g.tower == tower.name]
                prune_tower_sequential(loaded.model, tower.run, batches, members, sparsity, pruner, None,
                                       keep_masks=False)
            passes = f"{len(batches)} batches of {batch_size}"
        else:
            method, extra = options[mode]
            result = SCORERS.get(method)(loaded.model, groups, adapter.loss, batches, progress=True, **extra)
            scores = result.group_scores
            passes = f"{result.forward_passes} fwd, {result.backward_passes} bwd"
    peak = usage.peak_cuda_mb if device != "cpu" else usage.peak_rss_mb
    errors = []
    if mode.startswith("zeroth"):
        truth = directional_derivative_sums(loaded.model, groups, adapter.loss, batches)
        errors = [abs(scores[name] / value - 1) for name, value in truth.items()]
    return {"mode": mode, "wall_s": usage.wall_s, "peak_mb": peak, "passes": passes, "scores": scores,
            "errors": errors}


def spearman(a: dict[str, float], b: dict[str, float]) -> float:
    from scipy.stats import spearmanr

    keys = sorted(a)
    return float(spearmanr([a[k] for k in keys], [b[k] for k in keys]).statistic)


def measure_modes(modes, samples: int, seq_len: int, batch_size: int, threads: int, model: str = "smollm2",
                  data: str = "wikipedia", isolate: bool = True, device: str = "cpu",
                  prune_samples: int = 128) -> dict[str, dict]:
    """:func:`run_mode` for every mode, each in a fresh process when ``isolate`` (peak memory is per
    process; in-process runs are for tests only, their peaks include what earlier modes left)."""
    results = {}
    for mode in modes:
        if isolate:
            cmd = [sys.executable, "-m", "benchmarks.scoring_cost", "--one", mode, "--samples", str(samples),
                   "--seq-len", str(seq_len), "--batch-size", str(batch_size), "--threads", str(threads),
                   "--model", model, "--data", data, "--device", device, "--prune-samples", str(prune_samples)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[mode] = json.loads(out.split("RESULT ", 1)[1])
        else:
            results[mode] = run_mode(mode, samples, seq_len, batch_size, threads, model, data, device, prune_samples)
        print(mode, f"{results[mode]['wall_s']:.1f} s", f"{results[mode]['peak_mb']:.0f} MB", flush=True)
    return results


COLUMNS = ["mode", "passes", "wall_s", "peak_mb", "x forward time", "x forward memory", "rank_corr", "median error",
           "max error"]


def rows_of(results: dict[str, dict]) -> list[dict]:
    """One row per mode: cost, cost relative to the plain forward pass (when measured), and the Spearman
    rank correlation of its group scores with those of ``zeroth_full`` (the reference estimator)."""
    forward = results.get("forward")
    reference = results.get("zeroth_full", {}).get("scores")
    rows = []
    for mode, r in results.items():
        row = {"mode": mode, "passes": r["passes"], "wall_s": r["wall_s"], "peak_mb": r["peak_mb"]}
        if forward:
            row["x forward time"] = r["wall_s"] / forward["wall_s"]
            row["x forward memory"] = r["peak_mb"] / forward["peak_mb"]
        if reference and r["scores"]:
            row["rank_corr"] = spearman(r["scores"], reference)
        if r.get("errors"):
            row["median error"], row["max error"] = statistics.median(r["errors"]), max(r["errors"])
        rows.append(row)
    return rows


def describe(samples: int, seq_len: int, batch_size: int, threads: int, model: str, n_groups: int | None,
             data: str = "wikipedia", device: str = "cpu", prune_samples: int | None = None) -> str:
    groups = f" ({n_groups} groups)" if n_groups else ""
    windows = "random-token" if data == "random" else "Wikipedia"
    peak = ("peak GPU memory (`torch.cuda.max_memory_allocated`) during the work only, after one warm-up forward"
            if device != "cpu" else "peak RSS sampled during the work only")
    prune = (f" The prune modes run Wanda or SparseGPT at 50% in every layer, block by block, on {prune_samples} "
             "windows of the same length." if prune_samples else "")
    return (f"Scoring cost, {model}{groups}, {samples} {windows} windows x {seq_len} tokens in batches of "
            f"{batch_size}, on {device}, {threads} torch thread(s); each mode in its own process, model loading "
            f"excluded; {peak} (the resident model included). `x forward`: relative to one plain loss-only forward "
            "pass over the scoring batches; `rank corr`: Spearman correlation of the group scores with those of "
            f"`zeroth_full` (1.0 = the same ranking); `median error`, `max error`: relative difference of a "
            "zeroth-order mode's group scores from sum_b |g_b . z_b|, its own directions z_b with the true gradients "
            f"g_b (what it estimates without the finite difference).{prune}")


def suite(profile: str, out: str, samples: int = 8, seq_len: int = 128, batch_size: int = 4, threads: int = 2,
          modes: list[str] = MODES, model: str = "smollm2", isolate: bool = True, prune_samples: int = 128):
    """Runner entry point (``kind: script``): the scoring-cost table at the given sizes."""
    from benchmarks.common import shell_command
    from benchmarks.report import SuiteResult

    results = measure_modes(modes, samples, seq_len, batch_size, threads, model, isolate=isolate,
                            prune_samples=prune_samples)
    rows = rows_of(results)
    n_groups = max((len(r["scores"]) for r in results.values()), default=0)
    command = shell_command("benchmarks.scoring_cost", {"samples": samples, "seq_len": seq_len,
                                                        "batch_size": batch_size, "threads": threads,
                                                        "modes": list(modes)})
    notes = [f"Equivalent stand-alone command: `{command}`."]
    if (samples, seq_len) != (8, 256):
        notes.append("Smaller than the hand-run table (8 x 256 tokens, `benchmarks/results/scoring_cost_8x256.md`) "
                     "to fit the `readme` profile; a rank correlation over so few windows is noisy.")
    return SuiteResult(
        name="scoring_cost", title="", rows=rows, metric="wall_s", higher_is_better=False,
        columns=[c for c in COLUMNS if any(c in r for r in rows)],
        methodology=describe(samples, seq_len, batch_size, threads, model, n_groups) + " One run per mode, no warm-up.",
        settings=[f"samples={samples}", f"seq_len={seq_len}", f"batch_size={batch_size}", f"threads={threads}"],
        notes=[describe(samples, seq_len, batch_size, threads, model, n_groups), "", *notes], x="", group="mode")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES + PRUNE_MODES)
    parser.add_argument("--model", default="smollm2",
                        help=f"a model id or directory (family detected; causal LMs and the image-to-text families: "
                             f"pass --data digits for those), or {CONFIG_PREFIX}FILE.json (a causal LM, random weights)")
    parser.add_argument("--data", default="wikipedia", help="a corpus or image set (data.name), or random (token ids)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--prune-samples", type=int, default=128, help="calibration windows of the prune modes")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_mode(args.one, args.samples, args.seq_len, args.batch_size, args.threads,
                                              args.model, args.data, args.device, args.prune_samples)))
        return

    import torch

    from benchmarks.common import machine, shell_command
    from benchmarks.report import table

    torch.set_num_threads(args.threads)  # as in the measured processes, so the header says so
    results = measure_modes(args.modes, args.samples, args.seq_len, args.batch_size, args.threads, args.model,
                            args.data, device=args.device, prune_samples=args.prune_samples)
    rows = rows_of(results)
    options = {k: v for k, v in vars(args).items() if k not in ("one", "out")}
    n_groups = max((len(r["scores"]) for r in results.values()), default=0)
    pruned = args.prune_samples if set(args.modes) & set(PRUNE_MODES) else None
    text = (f"{describe(args.samples, args.seq_len, args.batch_size, args.threads, args.model, n_groups, args.data, args.device, pruned)}\n"
            f"Machine: {machine()}.\nCommand: {shell_command('benchmarks.scoring_cost', options)}\n\n"
            f"{table(rows, [c for c in COLUMNS if any(c in r for r in rows)])}\n")
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = f"scoring_cost_{args.samples}x{args.seq_len}" + ("" if args.device == "cpu" else f"_{args.device}")
    (Path(args.out) / f"{name}.md").write_text(text)


if __name__ == "__main__":
    main()
