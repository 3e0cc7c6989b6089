"""Policy search vs uniform, OWL and ECoFLaP on the default dual encoder, at one overall sparsity.

Held-out accuracy (the evaluate stage's metric: held-out digits, evaluation-only prompt templates,
never seen by the search) of Wanda-pruned models whose allocation comes from uniform, OWL, ECoFLaP
(zeroth-order scores) and the policy search with 16 / 64 / 256 search samples, with and without
the SRM penalty. Search samples come from the training split (``allocation.search.sample_seed``);
the smaller sets are nested random subsets of the largest. Every pruned model here (baselines
included) is pruned with the same first ``--calibration-samples`` calibration samples, from the
dense weights, by :class:`vlmprune.search.CandidatePruner`.

To afford six searches on a small CPU, candidates are pruned once and their per-sample search
correctness cached: searches that meet the same policy (all share round 0) reuse it. ``cost s``
is what each search would have taken alone (the sum of its candidates' prune + score times, scoring
always on the largest sample set here);
``new`` how many candidates it pruned itself.

    python -m benchmarks.search [--sparsity 0.6] [--sizes 16 64 256] [--rounds 2] [--population 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, markdown_table
from flows.pipeline import TASKS
from params.schema import load_params
from tasks.common import calibration_batches
from tasks.io import data_spec, load_model, read_json, resolve_device
from tasks.prune import make_pruner
from vlmprune.adapters import LoadedModel
from vlmprune.allocators import ALLOCATORS, GroupInfo
from vlmprune.search import CandidatePruner, PolicySpace, SearchConfig, evolve
from vlmprune.search.objective import ACCURACY_HOOKS
from vlmprune.sparsity import model_layout


@dataclass
class Options:
    """What one search benchmark runs (the command-line options of :func:`main`)."""

    sparsity: float = 0.6
    sizes: list[int] = field(default_factory=lambda: [16, 64, 256])
    rounds: int = 2
    population: int = 6
    granularity: str = "4"
    calibration_samples: int = 32
    seed: int = 0
    objective: str = "accuracy"
    params: str = "params.yaml"
    overrides: list[str] = field(default_factory=list)
    reuse: str | None = "artifacts"
    out: str = "benchmarks/results"

    def command(self) -> str:
        return (f"python -m benchmarks.search --sparsity {self.sparsity} --sizes {' '.join(map(str, self.sizes))} "
                f"--rounds {self.rounds} --population {self.population} --granularity {self.granularity} "
                f"--calibration-samples {self.calibration_samples} --objective {self.objective}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.6)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--population", type=int, default=6)
    parser.add_argument("--granularity", default="4")
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objective", choices=["accuracy", "probability"], default="accuracy")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--reuse", default="artifacts", help="reuse calibrate/ and score/ from this artifacts "
                                                              "directory when present (same params.yaml)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    run(Options(**vars(args)))


def run(args: Options) -> list[dict]:
    """Baselines and searches as described in the module docstring; writes the Markdown table (and the
    candidates) under ``args.out`` and returns the rows (the first is the dense model)."""
    started = time.perf_counter()
    granularity = int(args.granularity) if args.granularity.isdigit() else args.granularity
    evaluations = args.rounds * args.population

    tmp = Path(tempfile.mkdtemp(prefix="search-bench-"))
    common = [f"artifacts={tmp}", f"pruning.sparsity={args.sparsity}", "scoring.method=zeroth_order",
              "tracking.enabled=false", f"allocation.search.n_samples={max(args.sizes)}"]
    params = load_params(args.params, [*args.overrides, *common, "allocation.method=search"])
    if not (Path(params.model.id) / "config.json").exists():
        TASKS["prepare"].fn(params)
    reuse = Path(args.reuse) if args.reuse else None
    if reuse is not None and (reuse / "calibrate").exists() and (reuse / "score" / "scores.json").exists():
        # the repository's own calibrate and (zeroth-order) score outputs for the same params.yaml
        shutil.copytree(reuse / "calibrate", tmp / "calibrate")
        shutil.copytree(reuse / "score", tmp / "zeroth")
    else:
        TASKS["calibrate"].fn(params)
        TASKS["score"].fn(params)
        shutil.move(tmp / "score", tmp / "zeroth")
    TASKS["score"].fn(load_params(args.params, [*args.overrides, *common, "scoring.method=none",
                                                "allocation.method=owl"]))
    ratios = {g["name"]: g["outlier_ratio"] for g in read_json(tmp / "score" / "scores.json")["groups"]}
    scores = read_json(tmp / "zeroth" / "scores.json")
    groups = [GroupInfo(g["name"], g["tower"], g["n_params"], g["score"], ratios[g["name"]]) for g in scores["groups"]]
    layers = {g["name"]: list(g["layers"]) for g in scores["groups"]}

    device = resolve_device(params.model.device)
    spec = data_spec(params)
    adapter, loaded = load_model(params)
    dense_held = adapter.evaluate(loaded, spec, params.evaluation.batch_size, None, device)[0]["zero_shot_accuracy"]
    samples = adapter.make_calibration(loaded, spec, max(args.sizes), params.allocation.search.sample_seed)
    correct = ACCURACY_HOOKS["dual_encoder"](loaded, spec, samples, 64, device,
                                             probability=args.objective == "probability")
    towers = adapter.towers(loaded.model)
    worker = CandidatePruner(loaded.model, towers, model_layout(loaded.model, towers),
                             calibration_batches(params, params.calibration.batch_size, args.calibration_samples),
                             make_pruner(params), None)
    order = np.random.default_rng(args.seed).permutation(max(args.sizes))
    subsets = {n: torch.from_numpy(order[:n]) for n in args.sizes}
    space = PolicySpace(groups, args.sparsity, granularity, tuple(params.allocation.search.bases),
                        params.allocation.search.step, params.allocation.s_max)

    cache: dict[tuple, tuple[torch.Tensor, float]] = {}
    held_cache: dict[tuple, float] = {}

    def key(sparsity):
        return tuple(round(g.n_params * sparsity[g.name]) for g in groups)

    def prune(sparsity):
        worker.prune({layer: sparsity[g] for g, names in layers.items() for layer in names})

    def per_sample(sparsity):
        k = key(sparsity)
        if k not in cache:
            t = time.perf_counter()
            prune(sparsity)
            cache[k] = (correct(loaded.model), time.perf_counter() - t)
            worker.restore()
        return cache[k]

    def held_out(sparsity):
        k = key(sparsity)
        if k not in held_cache:
            prune(sparsity)
            held_cache[k] = adapter.evaluate(LoadedModel(loaded.model, loaded.processor), spec,
                                             params.evaluation.batch_size, None, device)[0]["zero_shot_accuracy"]
            worker.restore()
        return held_cache[k]

    def towers_of(sparsity):
        out = {}
        for tower in ("vision", "text"):
            members = [g for g in groups if g.tower == tower]
            out[tower] = sum(g.n_params * sparsity[g.name] for g in members) / sum(g.n_params for g in members)
        out["overall"] = sum(g.n_params * sparsity[g.name] for g in groups) / sum(g.n_params for g in groups)
        return out

    rows = [{"method": "dense", "held-out acc": dense_held}]
    log = []
    baselines = {
        "uniform": ALLOCATORS.get("uniform")(groups, args.sparsity),
        "owl": ALLOCATORS.get("owl")(groups, args.sparsity, lam=params.allocation.owl.lam,
                                     weighted=params.allocation.owl.weighted),
        "ecoflap (zeroth)": ALLOCATORS.get("ecoflap")(groups, args.sparsity, s_max=params.allocation.s_max),
    }
    ref = 64 if 64 in args.sizes else max(args.sizes)
    for name, sparsity in baselines.items():
        search_acc = float(per_sample(sparsity)[0][subsets[ref]].mean())
        held = held_out(sparsity)
        rows.append({"method": name, "n": ref, **towers_of(sparsity), "search acc": search_acc,
                     "held-out acc": held, "gap": search_acc - held})
        print(json.dumps(rows[-1]), flush=True)

    text_path = Path(args.out) / f"search{'' if args.objective == 'accuracy' else '_' + args.objective}.md"
    for n in args.sizes:
        for penalty in (True, False):
            before, t = len(cache), time.perf_counter()
            cost = 0.0

            def evaluate_many(policies, n=n):
                nonlocal cost
                out = []
                for p in policies:
                    values, seconds = per_sample(p)
                    cost += seconds
                    out.append(float(values[subsets[n]].mean()))
                return out

            config = SearchConfig(rounds=args.rounds, population=args.population, max_evaluations=evaluations,
                                  penalty=penalty, seed=args.seed)
            result = evolve(space, evaluate_many, n, config, 1.0, progress=True)
            best = result.best
            held = held_out(best.sparsity)
            rows.append({"method": f"search ({'penalty' if penalty else 'no penalty'})", "n": n,
                         **towers_of(best.sparsity), "search acc": best.objective, "held-out acc": held,
                         "gap": best.objective - held, "penalty": best.penalty,
                         "chosen": f"{best.policy.base} {list(best.policy.q)}", "new": len(cache) - before,
                         "cost s": cost, "wall s": time.perf_counter() - t})
            log.append([{"index": c.index, "round": c.round, "policy": c.policy.label(), "objective": c.objective,
                         "penalty": c.penalty} for c in result.candidates])
            print(json.dumps(rows[-1]), flush=True)
            write(text_path, args, rows, space, evaluations, started)
    write(text_path, args, rows, space, evaluations, started)
    (Path(args.out) / "search_candidates.json").write_text(json.dumps(log, indent=1) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


def write(path: Path, args, rows, space, evaluations, started) -> None:
    columns = ["method", "n", "vision", "text", "overall", "search acc", "held-out acc", "gap", "penalty",
               "chosen", "new", "cost s", "wall s"]
    text = (f"{describe(args, space, evaluations)}\n"
            f"Machine: {machine()} (shared with other jobs during the run: wall times are noisy upper bounds).\n"
            f"Command: {args.command()}\n"
            f"Total wall time so far: {time.perf_counter() - started:.0f} s.\n\n"
            f"{markdown_table(rows, columns)}\n")
    print(text, flush=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def describe(args: Options, space, evaluations: int) -> str:
    return (f"Policy search on the default dual encoder at {args.sparsity:.0%} overall sparsity, Wanda, both towers.\n"
            f"`search acc`: the search objective ({args.objective}) on the search samples (training split, training "
            f"prompt templates);\n"
            f"`held-out acc`: the evaluate stage's zero-shot accuracy (held-out digits, evaluation-only templates);\n"
            f"`gap` = search acc - held-out acc (the template change is part of it, equally for every row).\n"
            f"Search: {len(space.names)} components ({', '.join(space.names)}), step {space.step}, "
            f"bases uniform + ECoFLaP, {args.rounds} rounds x {args.population} = {evaluations} evaluations, "
            f"SRM penalty delta 0.05. Every model pruned with the first {args.calibration_samples} calibration "
            "samples.")


COLUMNS = ["method", "n", "vision", "text", "overall", "search acc", "held-out acc", "gap", "penalty", "chosen", "new",
           "cost s"]


def verdicts(rows: list[dict]) -> list[str]:
    """Each search's held-out accuracy and gap against ECoFLaP's (the allocation it starts from)."""
    base = next((r for r in rows if r["method"].startswith("ecoflap")), None)
    if base is None:
        return []
    lines = []
    for r in rows:
        if r["method"].startswith("search"):
            d, g = r["held-out acc"] - base["held-out acc"], r["gap"] - base["gap"]
            word = "beats" if d > 0 else ("ties" if d == 0 else "loses to")
            lines.append(f"- {r['method']}, n = {r['n']}: held-out {r['held-out acc']:.3f}, {word} ECoFLaP "
                         f"({base['held-out acc']:.3f}, {d:+.3f}); gap {r['gap']:.3f} vs {base['gap']:.3f} ({g:+.3f})")
    return lines


def suite(profile: str, out: str, model: str | None = None, params: str | None = None, artifacts: str = "artifacts",
          sparsity: float = 0.6, sizes: list[int] = (16, 64, 256), rounds: int = 2, population: int = 6,
          granularity: str = "4", calibration_samples: int = 32, seed: int = 0, objective: str = "probability"):
    """Runner entry point (``kind: script``): baselines and searches from scratch (calibrate and score run
    in a temporary directory; nothing is reused). ``model``: a dual encoder directory (default: the
    offline default model, built by the prepare stage under ``artifacts`` when missing); ``params``: the
    params file (default params/presets/default.yaml)."""
    from benchmarks.common import REPO, default_dual_encoder
    from benchmarks.report import SuiteResult

    options = Options(sparsity=sparsity, sizes=list(sizes), rounds=rounds, population=population,
                      granularity=str(granularity), calibration_samples=calibration_samples, seed=seed,
                      objective=objective, params=params or str(REPO / "params/presets/default.yaml"),
                      overrides=[f"model.id={model or default_dual_encoder(artifacts)}"], reuse=None,
                      out=str(Path(out) / "search"))
    rows = run(options)
    dense, rows = rows[0], rows[1:]
    notes = [(f"`search acc`: the search objective ({objective}) on the search samples (training split, training "
             "prompt templates); `held-out acc`: the evaluate stage's zero-shot accuracy (held-out digits, "
             "evaluation-only templates); `gap` = search acc - held-out acc; `penalty`: the SRM penalty; `new`: "
             "candidates a search pruned itself (the others were cached from an earlier search); `cost s`: what the "
             f"search would have taken alone. {rounds} rounds x {population} candidates, components of "
             f"{granularity} blocks, every model pruned with {calibration_samples} calibration samples. "
             f"Equivalent stand-alone command: `{options.command()}`."), "",
             "Searches against ECoFLaP, their starting allocation:", "", *verdicts(rows)]
    return SuiteResult(name="search", title="", rows=rows, metric="held-out acc", higher_is_better=True,
                       columns=COLUMNS, dense={"method": "dense", "held-out acc": dense["held-out acc"]},
                       methodology="Held-out accuracies from one pruning each; `cost s` sums each candidate's prune "
                                   "and search-set scoring times (one run each, no warm-up).",
                       notes=notes, x="", settings=[f"sparsity={sparsity}", f"sizes={','.join(map(str, sizes))}",
                                                    f"rounds={rounds}", f"population={population}",
                                                    f"objective={objective}"])


if __name__ == "__main__":
    main()
