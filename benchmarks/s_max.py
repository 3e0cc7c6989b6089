"""ECoFLaP's cap s_max on SmolLM2-135M: one score stage, then ECoFLaP + Wanda (or SparseGPT) at several caps.

The allocation (METHODS.md section 2) starts every group at k_g = ceil(N_g (1 - s_max)) kept weights
and shares the rest of the budget by score, so s_max bounds how far the scores may push a group: the
reference sets s_max = p + 0.1, and with it a group can never be pruned more than 10 points above the
target. This script scores once (``scoring.method=zeroth_order`` or ``first_order`` with the
``-S`` overrides given), prunes with Wanda (``--pruning sparsegpt``: SparseGPT) at each
``SPARSITY:S_MAX`` pair (``d`` = the default p + 0.1), and divides each perplexity by that of the same
pruner with a uniform allocation at the same sparsity, measured in the same run (``--owl``: OWL's
allocation at each sparsity too, as a baseline beside). Sizes:
``benchmarks.llm``'s profiles (default ``quick``).

    python -m benchmarks.s_max --runs 0.6:d 0.6:0.8 0.7:d 0.7:0.9 [-S scoring.n_directions=7] \
        [--scoring zeroth_order] [--profile quick] [--pruning wanda] [--owl]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from benchmarks.common import machine, markdown_table
from benchmarks.grid import Config, run_config, run_score, run_shared
from benchmarks.llm import PROFILES


def parse_run(text: str) -> tuple[float, float | None]:
    """``"0.7:0.9"`` -> (0.7, 0.9); ``"0.7:d"`` -> (0.7, None), the default cap."""
    sparsity, _, cap = text.partition(":")
    return float(sparsity), None if cap in ("", "d") else float(cap)


def sweep(params_path: str, runs: list[tuple[float, float | None]], scoring: str, overrides: list[str],
          pruning: str = "wanda", owl: bool = False) -> dict:
    """Dense, one score stage, uniform ``pruning`` at each sparsity of ``runs`` and ECoFLaP + ``pruning`` at
    each (sparsity, s_max) pair (None: the default cap); with ``owl``, OWL + ``pruning`` at each sparsity
    too (its own score stage: the outlier ratios). Every stage gets ``overrides``."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        first = Config("ecoflap", scoring, pruning, runs[0][0])
        dense = run_shared(params_path, [*overrides, *first.overrides()], str(tmp / "shared"))
        score = run_score(params_path, overrides, first, str(tmp / "shared"), str(tmp / "score"))
        run_score(params_path, overrides, Config(), str(tmp / "shared"), str(tmp / "none"))
        uniform = {}

        def add_row(allocation: str, s: float, r: dict, s_max: str = "") -> None:
            perplexity = r["pruned"]["perplexity"]
            if allocation == "uniform":  # the uniform rows come first: each is its own baseline
                uniform[s] = perplexity
            ratio = 1.0 if allocation == "uniform" else perplexity / uniform[s]
            rows.append({"allocation": allocation, "sparsity": s, "overall": r["sparsity"]["overall"], "s_max": s_max,
                         "perplexity": perplexity, "x uniform": ratio, "prune s": r["prune"]["wall_s"]})
            print(rows[-1], flush=True)

        sparsities = sorted({s for s, _ in runs})
        for s in sparsities:
            add_row("uniform", s, run_config(params_path, overrides, Config("uniform", "none", pruning, s),
                                             str(tmp / "none"), str(tmp / f"uniform-{s}")))
        if owl:
            run_score(params_path, overrides, Config("owl", "none", pruning), str(tmp / "shared"), str(tmp / "owl"))
            for s in sparsities:
                add_row("owl", s, run_config(params_path, overrides, Config("owl", "none", pruning, s),
                                             str(tmp / "owl"), str(tmp / f"owl-{s}")))
        for i, (s, cap) in enumerate(runs):
            r = run_config(params_path, [*overrides, *([f"allocation.s_max={cap}"] if cap is not None else [])],
                           Config("ecoflap", scoring, pruning, s), str(tmp / "score"), str(tmp / f"ecoflap-{i}"))
            add_row(f"ecoflap ({scoring.split('_')[0]})", s, r,
                    f"{s + 0.1:.2f} (default)" if cap is None else f"{cap:.2f}")
    return {"dense": dense["metrics"]["perplexity"], "score s": score["wall_s"], "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["0.6:d", "0.6:0.8", "0.7:d", "0.7:0.9"],
                        help="SPARSITY:S_MAX pairs (d: the default s_max = sparsity + 0.1)")
    parser.add_argument("--scoring", choices=["zeroth_order", "first_order"], default="zeroth_order")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--pruning", choices=["wanda", "sparsegpt"], default="wanda")
    parser.add_argument("--owl", action="store_true", help="also OWL + the pruner at each sparsity")
    parser.add_argument("--params", default="params/presets/smollm2.yaml")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="params override for every stage, e.g. scoring.n_directions=7 (repeatable)")
    parser.add_argument("--out", default="benchmarks/results/s_max.md")
    args = parser.parse_args()
    result = sweep(args.params, [parse_run(r) for r in args.runs], args.scoring,
                   [*PROFILES[args.profile], "model.device=cpu", *args.overrides], args.pruning, args.owl)
    columns = ["allocation", "sparsity", "overall", "s_max", "perplexity", "x uniform", "prune s"]
    text = (f"SmolLM2-135M-Instruct, Wikipedia summaries, {args.pruning}, profile {args.profile}: "
            f"{' '.join(PROFILES[args.profile])}; "
            f"overrides: {' '.join(args.overrides) or 'none'}.\nDense perplexity {result['dense']:.3f}; score stage "
            f"({args.scoring}) {result['score s']:.0f} s, shared by every ECoFLaP row.\n"
            f"Machine: {machine()}; 1-minute load average when written: {os.getloadavg()[0]:.1f} (other jobs on "
            f"the machine inflate the stage times).\nCommand: python -m benchmarks.s_max --runs {' '.join(args.runs)} "
            f"--scoring {args.scoring} --profile {args.profile}"
            f"{'' if args.pruning == 'wanda' else ' --pruning ' + args.pruning}{' --owl' if args.owl else ''}"
            f"{''.join(' -S ' + o for o in args.overrides)}\n\n"
            f"{markdown_table(result['rows'], columns)}\n")
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
