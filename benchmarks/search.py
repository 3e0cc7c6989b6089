"""Policy search vs uniform, OWL and ECoFLaP at one overall sparsity (dual encoder or vision LM).

Held-out accuracy (the evaluate stage's metric, on held-out images never seen by the search) of
Wanda-pruned models whose allocation comes from uniform, OWL, ECoFLaP (zeroth-order scores) and the
policy search with 16 / 64 / 256 search samples, with and without the SRM penalty.

Models: the default dual encoder (``--params params.yaml``; held-out metric ``zero_shot_accuracy``,
evaluation-only prompt templates) or an image-to-text model such as the offline LLaVA-style
``vision_lm`` (``--params params/presets/vision_lm.yaml -S model.id=...``; held-out metrics
``vqa_accuracy`` and ``answer_loss``), which needs ``--objective loss``.

Per-sample values (what the cache below keeps, so that any subset of the search samples can be
scored without pruning again):

- dual encoder, ``accuracy`` / ``probability``: :data:`vlmprune.search.objective.ACCURACY_HOOKS`.
- image-to-text, ``loss``: sample i's answer loss l_i = mean over its answer tokens (+ EOS) of the
  next-token cross-entropy (teacher forcing), objective = -mean_i l_i over the subset, as
  ``make_objective(..., "loss")`` (``adapter.sample_losses``). The SRM value range R is the dense
  model's -objective on the subset, as in ``make_objective``; ``--bound bernstein`` uses the l_i.
  ``search acc`` is then the teacher-forced exact match: 1 when every answer token (EOS included)
  is the argmax; such an answer is exactly what greedy decoding produces, so it is a lower bound of
  the evaluate stage's ``vqa_accuracy`` on the same images (which also accepts e.g. "3." for "3").

Search samples come from the training split (``allocation.search.sample_seed``); the smaller sets
are nested random subsets of the largest. Every pruned model here (baselines included) is pruned
with the same first ``--calibration-samples`` calibration samples, from the dense weights, by
:class:`vlmprune.search.CandidatePruner`.

To afford six searches on a small CPU, candidates are pruned once and their per-sample values
cached: searches that meet the same policy (all share round 0) reuse it; the candidates log
(``*_candidates.json``) keeps each candidate's per-sample values on its search subset. ``cost s``
is what each search would have taken alone (the sum of its candidates' prune + score times, scoring
always on the largest sample set here);
``new`` how many candidates it pruned itself.

    python -m benchmarks.search [--sparsity 0.6] [--sizes 16 64 256] [--rounds 2] [--population 6]
    python -m benchmarks.search --params params/presets/vision_lm.yaml -S model.id=DIR -S artifacts=DIR \
        --objective loss --sparsity 0.4 --reuse DIR [--trial]

``--penalties 1 bernstein:0.25 0``: one search per entry; a bare number is the weight lambda of the
``--bound`` penalty (Hoeffding by default), ``BOUND:WEIGHT`` names its own bound.

``--trial``: the uniform and ECoFLaP allocations on the search samples only (no held-out
evaluation, no search): a cheap way to pick the sparsity.
"""

from __future__ import annotations

import argparse
import json
import os
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
from vlmprune.adapters.causal_lm import lm_loss
from vlmprune.allocators import ALLOCATORS, GroupInfo
from vlmprune.search import CandidatePruner, PolicySpace, SearchConfig, evolve
from vlmprune.search.evolution import BOUNDS
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
    trial: bool = False
    penalties: list[float | tuple[str, float]] = field(default_factory=lambda: [1.0, 0.0])  # see penalty_arg
    bound: str = "hoeffding"

    def searches(self) -> list[tuple[str, float]]:
        """(bound, weight lambda) of each search: a bare weight takes ``bound``."""
        return [p if isinstance(p, tuple) else (self.bound, float(p)) for p in self.penalties]

    def command(self, with_params: bool = True) -> str:
        """The stand-alone command; ``with_params=False`` leaves out ``--params`` and the ``-S`` overrides."""
        extra = "" if self.params == "params.yaml" or not with_params else f" --params {self.params}"
        extra += "".join(f" -S {o}" for o in self.overrides) if with_params else ""
        penalties = "" if self.penalties == [1.0, 0.0] else " --penalties " + " ".join(
            f"{p[0]}:{p[1]:g}" if isinstance(p, tuple) else f"{p:g}" for p in self.penalties)
        return (f"python -m benchmarks.search --sparsity {self.sparsity} --sizes {' '.join(map(str, self.sizes))} "
                f"--rounds {self.rounds} --population {self.population} --granularity {self.granularity} "
                f"--calibration-samples {self.calibration_samples} --objective {self.objective}{penalties}"
                f"{'' if self.bound == 'hoeffding' else f' --bound {self.bound}'}"
                f"{f' --seed {self.seed}' if self.seed else ''}"
                f"{extra}{' --trial' if self.trial else ''}")


def main() -> None:
    run(options_from())


def options_from(argv: list[str] | None = None) -> Options:
    """:class:`Options` from a command line (``sys.argv`` when None); ``--reuse`` defaults to
    ``artifacts`` with ``--params params.yaml`` only."""
    args = arguments().parse_args(argv)
    if args.reuse is None and args.params == "params.yaml":
        args.reuse = "artifacts"
    return Options(**vars(args))


def arguments() -> argparse.ArgumentParser:
    """The command line of :func:`main` (its options are the fields of :class:`Options`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.6)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--population", type=int, default=6)
    parser.add_argument("--granularity", default="4")
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objective", choices=["accuracy", "probability", "loss"], default="accuracy")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="params override, as for vlmprune (repeatable)")
    parser.add_argument("--reuse", default=None, help="reuse calibrate/ (and score/ when it holds zeroth-order "
                                                      "scores) from this artifacts directory, made with the same "
                                                      "params (default: artifacts, with --params params.yaml only)")
    parser.add_argument("--trial", action="store_true", help="uniform and ECoFLaP on the search samples only")
    parser.add_argument("--penalties", type=penalty_arg, nargs="+", default=[1.0, 0.0],
                        help="weights lambda of the SRM bound, one search each (1: the bound, 0: no penalty); "
                             "BOUND:WEIGHT (e.g. bernstein:0.25) names the bound of that search")
    parser.add_argument("--bound", choices=BOUNDS, default="hoeffding",
                        help="the SRM penalty (allocation.search.bound) of the searches given a bare weight")
    parser.add_argument("--out", default="benchmarks/results")
    return parser


def per_sample_values(adapter, loaded, spec, samples: dict, objective: str, batch_size: int, device: str):
    """``values(model) -> {"objective": (n,), "accuracy": (n,)}`` on the search samples (see the module
    docstring): the objective per sample (higher is better) and the per-sample accuracy reported as
    ``search acc`` (the 0/1 accuracy also with the ``probability`` objective, so that ``gap`` compares
    accuracy with accuracy)."""
    if objective in ("accuracy", "probability"):
        hook = ACCURACY_HOOKS.get(adapter.family)
        if hook is None:
            raise ValueError(f"objective {objective!r} is built for: {', '.join(ACCURACY_HOOKS)} (model family "
                             f"{adapter.family!r}); use --objective loss")
        per_sample = hook(loaded, spec, samples, 64, device)

        def values(model):
            v = per_sample(model)
            return {"objective": v[objective], "accuracy": v["accuracy"]}

        return values
    if "labels" not in samples or not hasattr(adapter, "run_full"):
        raise NotImplementedError(f"--objective loss needs per-sample answer losses; built for the image-to-text "
                                  f"families only (model family {adapter.family!r})")
    n = len(samples["labels"])

    @torch.no_grad()
    def answer_values(model):
        losses, exact = [], []
        for s in range(0, n, batch_size):
            batch = {k: v[s:s + batch_size].to(device) for k, v in samples.items()}
            logits = adapter.run_full(model, batch).logits
            scored = batch["labels"][:, 1:] != -100
            losses.append(lm_loss(logits, batch["labels"], reduction="sample").cpu())
            hit = (logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]) | ~scored
            exact.append(hit.all(1).float().cpu())
        return {"objective": -torch.cat(losses), "accuracy": torch.cat(exact)}

    return answer_values


def held_out_images(loaded, spec, max_samples: int | None) -> dict[str, torch.Tensor]:
    """The evaluate stage's held-out images (dual encoder: the first ``max_samples`` of the test split)
    with their labels, in the form of search samples, so that the search's own per-sample hook (training
    templates) can score them."""
    from vlmprune.data.images import image_split, to_pixel_values

    data, _, test = image_split(spec)
    test = test[:max_samples] if max_samples else test
    return {"pixel_values": to_pixel_values(data.images[test], loaded.model.config.image_size),
            "labels": torch.from_numpy(data.labels[test])}


class Bench:
    """What every run of this benchmark sets up once: params, groups with their ECoFLaP and OWL scores,
    the model, the search samples, the candidate pruner, and caches of what each allocation measures
    (keyed by its kept counts per group).

    ``held_out(sparsity)`` gives the evaluate stage's metrics of the pruned model and, for families with
    an accuracy hook (the dual encoder), ``iid acc``: zero-shot accuracy on the same held-out images with
    the *training* templates, as the search samples are scored. ``iid gap`` = search acc - iid acc has no
    template change in it, which the evaluate stage's accuracy has. It still holds the model's own fit
    to its training split (the search samples come from it; the default model's heads were trained on
    it), alike for every allocation; a search's iid gap minus its base's is its selection effect, what
    an SRM bound speaks about.
    """

    def __init__(self, args: Options):
        self.args = args
        self.tmp = tmp = Path(tempfile.mkdtemp(prefix="search-bench-"))
        common = [f"artifacts={tmp}", f"pruning.sparsity={args.sparsity}", "scoring.method=zeroth_order",
                  "tracking.enabled=false", f"allocation.search.n_samples={max(args.sizes)}"]
        self.params = params = load_params(args.params, [*args.overrides, *common, "allocation.method=search"])
        if not (Path(params.model.id) / "config.json").exists():
            TASKS["prepare"].fn(params)
        reuse = Path(args.reuse) if args.reuse else None
        if reuse is not None and (reuse / "calibrate").exists():  # made with the same params
            shutil.copytree(reuse / "calibrate", tmp / "calibrate")
        else:
            TASKS["calibrate"].fn(params)
        if reuse is not None and (reuse / "score" / "scores.json").exists() \
                and read_json(reuse / "score" / "meta.json").get("method") == "zeroth_order":
            shutil.copytree(reuse / "score", tmp / "zeroth")
        else:
            TASKS["score"].fn(params)
            shutil.move(tmp / "score", tmp / "zeroth")
        TASKS["score"].fn(load_params(args.params, [*args.overrides, *common, "scoring.method=none",
                                                    "allocation.method=owl"]))
        ratios = {g["name"]: g["outlier_ratio"] for g in read_json(tmp / "score" / "scores.json")["groups"]}
        scores = read_json(tmp / "zeroth" / "scores.json")
        self.groups = [GroupInfo(g["name"], g["tower"], g["n_params"], g["score"], ratios[g["name"]])
                       for g in scores["groups"]]
        self.layers = {g["name"]: list(g["layers"]) for g in scores["groups"]}
        self.tower_names = list(dict.fromkeys(g.tower for g in self.groups))

        self.device = device = resolve_device(params.model.device)
        self.spec = spec = data_spec(params)
        self.adapter, self.loaded = adapter, loaded = load_model(params)
        self.held_metric = "zero_shot_accuracy" if adapter.family == "dual_encoder" else "vqa_accuracy"
        self.draw_samples(params.allocation.search.sample_seed, args.seed)
        hook = ACCURACY_HOOKS.get(adapter.family)
        self.iid_values = None if hook is None else hook(
            loaded, spec, held_out_images(loaded, spec, params.evaluation.max_samples),
            params.evaluation.batch_size, device)
        towers = adapter.towers(loaded.model)
        self.worker = CandidatePruner(loaded.model, towers, model_layout(loaded.model, towers),
                                      calibration_batches(params, params.calibration.batch_size,
                                                          args.calibration_samples),
                                      make_pruner(params), None)
        granularity = int(args.granularity) if args.granularity.isdigit() else args.granularity
        self.space = PolicySpace(self.groups, args.sparsity, granularity, tuple(params.allocation.search.bases),
                                 params.allocation.search.step, params.allocation.s_max)
        self.held_cache: dict[tuple | None, dict[str, float]] = {}

    def draw_samples(self, sample_seed: int, seed: int) -> None:
        """Draw the search samples (``allocation.search.sample_seed``) and their nested subsets (``seed``),
        and forget the per-sample values measured on earlier ones (held-out metrics stay)."""
        args, params = self.args, self.params
        samples = self.adapter.make_calibration(self.loaded, self.spec, max(args.sizes), sample_seed)
        self.values_of = per_sample_values(self.adapter, self.loaded, self.spec, samples, args.objective,
                                           params.allocation.search.batch_size, self.device)
        order = np.random.default_rng(seed).permutation(max(args.sizes))
        self.subsets = {n: torch.from_numpy(order[:n]) for n in args.sizes}
        self.cache: dict[tuple, tuple[dict[str, torch.Tensor], float]] = {}

    def baselines(self) -> dict[str, dict[str, float]]:
        """Group sparsities of uniform, OWL and ECoFLaP (zeroth-order scores) at the target."""
        params, target = self.params, self.args.sparsity
        return {
            "uniform": ALLOCATORS.get("uniform")(self.groups, target),
            "owl": ALLOCATORS.get("owl")(self.groups, target, lam=params.allocation.owl.lam,
                                         weighted=params.allocation.owl.weighted),
            "ecoflap (zeroth)": ALLOCATORS.get("ecoflap")(self.groups, target, s_max=params.allocation.s_max),
        }

    def key(self, sparsity: dict[str, float]) -> tuple:
        return tuple(round(g.n_params * sparsity[g.name]) for g in self.groups)

    def prune(self, sparsity: dict[str, float]) -> None:
        self.worker.prune({layer: sparsity[g] for g, names in self.layers.items() for layer in names})

    def per_sample(self, sparsity: dict[str, float]) -> tuple[dict[str, torch.Tensor], float]:
        """The per-sample values of the pruned model on the search samples, and the seconds it took."""
        k = self.key(sparsity)
        if k not in self.cache:
            t = time.perf_counter()
            self.prune(sparsity)
            self.cache[k] = (self.values_of(self.loaded.model), time.perf_counter() - t)
            self.worker.restore()
        return self.cache[k]

    def held_out(self, sparsity: dict[str, float] | None = None) -> dict[str, float]:
        """The evaluate stage's metrics (and ``iid acc``, see the class) of the pruned model; None: dense."""
        k = self.key(sparsity) if sparsity is not None else None
        if k not in self.held_cache:
            if sparsity is not None:
                self.prune(sparsity)
            params, model = self.params, self.loaded.model
            metrics = self.adapter.evaluate(LoadedModel(model, self.loaded.processor), self.spec,
                                            params.evaluation.batch_size, params.evaluation.max_samples,
                                            self.device)[0]
            if self.iid_values is not None:
                iid = self.iid_values(model)
                metrics.update({"iid acc": float(iid["accuracy"].double().mean()),
                                "iid prob": float(iid["probability"].double().mean())})
            self.held_cache[k] = metrics
            self.worker.restore()
        return self.held_cache[k]

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def run(args: Options, bench: Bench | None = None) -> list[dict]:
    """Baselines and searches as described in the module docstring; writes the Markdown table (and the
    candidates) under ``args.out`` and returns the rows (the first is the dense model).

    ``bench``: one set up earlier (and closed by its owner), whose search samples are those of these
    ``args`` (:meth:`Bench.draw_samples`); its held-out metrics, measured once per allocation, serve
    every run that shares it (:mod:`benchmarks.search_draws`). Without it, one is set up for this run
    and closed after it, also on failure."""
    started = time.perf_counter()
    if bench is not None:
        return run_on(bench, args, started)
    bench = Bench(args)
    try:
        return run_on(bench, args, started)
    finally:
        bench.close()


def run_on(bench: Bench, args: Options, started: float) -> list[dict]:
    """:func:`run` on a set-up ``bench``; ``started``: the clock the tables' total wall time counts from."""
    evaluations = args.rounds * args.population
    adapter, groups, tower_names, space = bench.adapter, bench.groups, bench.tower_names, bench.space
    subsets, per_sample, held_out = bench.subsets, bench.per_sample, bench.held_out
    label = "the default dual encoder" if adapter.family == "dual_encoder" else f"the {adapter.family} model"
    loss_objective = args.objective == "loss"

    def measures(values, held, n):
        """The row's search-set and held-out columns; ``values``: per-sample values of the allocation."""
        subset = subsets[n]
        out = search_columns(values, subset, args.objective)
        if held is not None:
            out.update(held_out_columns(out["search acc"], held, bench.held_metric, out.get("search prob")))
        if loss_objective:
            out["search loss"] = -float(values["objective"][subset].mean())
            if held is not None:
                out.update({"held-out loss": held["answer_loss"],
                            "loss gap": held["answer_loss"] - out["search loss"]})
        return out

    def towers_of(sparsity):
        out = {}
        for tower in tower_names:
            members = [g for g in groups if g.tower == tower]
            out[tower] = sum(g.n_params * sparsity[g.name] for g in members) / sum(g.n_params for g in members)
        out["overall"] = sum(g.n_params * sparsity[g.name] for g in groups) / sum(g.n_params for g in groups)
        return out

    ref = 64 if 64 in args.sizes else max(args.sizes)
    dense_values = bench.values_of(bench.loaded.model)
    dense_held = None if args.trial else held_out()
    rows = [{"method": "dense", "n": ref, **measures(dense_values, dense_held, ref)}]
    print(json.dumps(rows[-1]), flush=True)
    log = []
    baselines = bench.baselines()
    if args.trial:
        baselines.pop("owl")
    stem = "search" if adapter.family == "dual_encoder" else f"search_{adapter.family}"
    suffix = "" if args.objective in ("accuracy", "loss") else "_" + args.objective
    text_path = Path(args.out) / f"{stem}{'_trial' if args.trial else ''}{suffix}.md"
    context = (args, label, tower_names, space, evaluations, started)
    for name, sparsity in baselines.items():
        values, seconds = per_sample(sparsity)
        rows.append({"method": name, "n": ref, **towers_of(sparsity),
                     **measures(values, None if args.trial else held_out(sparsity), ref)})
        if args.trial:
            rows[-1]["cost s"] = seconds
        print(json.dumps(rows[-1]), flush=True)
    if args.trial:
        write(text_path, *context, rows)
        return rows

    for n in args.sizes:
        # SRM value range R: 1 for accuracies/probabilities; the dense loss on the subset for the loss
        value_range = -float(dense_values["objective"][subsets[n]].mean()) if loss_objective else 1.0
        for bound, weight in args.searches():
            before, t = len(bench.cache), time.perf_counter()
            cost = 0.0

            def evaluate_many(policies, n=n):
                nonlocal cost
                out = []
                for p in policies:
                    values, seconds = per_sample(p)
                    cost += seconds
                    out.append(np.asarray(values["objective"][subsets[n]], dtype=float))
                return out

            config = SearchConfig(rounds=args.rounds, population=args.population, max_evaluations=evaluations,
                                  penalty=weight, bound=bound, seed=args.seed)
            result = evolve(space, evaluate_many, n, config, max(value_range, 1e-6), progress=True)
            best = result.best
            rows.append({"method": f"search ({penalty_label(weight, bound)})", "n": n,
                         **towers_of(best.sparsity), **measures(per_sample(best.sparsity)[0], held_out(best.sparsity), n),
                         "penalty": best.penalty, "chosen": f"{best.policy.base} {list(best.policy.q)}",
                         "new": len(bench.cache) - before, "cost s": cost, "wall s": time.perf_counter() - t})
            log.append([{"index": c.index, "round": c.round, "policy": c.policy.label(), "objective": c.objective,
                         "penalty": c.penalty, **sample_values(per_sample(c.sparsity)[0], subsets[n])}
                        for c in result.candidates])
            print(json.dumps(rows[-1]), flush=True)
            write(text_path, *context, rows)
    write(text_path, *context, rows)
    candidates = "search_candidates.json" if stem == "search" else f"{stem}_candidates.json"
    (Path(args.out) / candidates).write_text(json.dumps(log, indent=1) + "\n")
    return rows


def sample_values(values: dict[str, torch.Tensor], subset: torch.Tensor) -> dict[str, list[float]]:
    """A candidate's per-sample ``objective`` and ``accuracy`` values on the search subset, in the
    candidates log (rounded to 6 digits), so that another penalty can be computed from a finished
    search's candidates without pruning them again."""
    return {f"{name} values": [round(float(v), 6) for v in values[name][subset]] for name in ("objective", "accuracy")}


def search_columns(values: dict[str, torch.Tensor], subset: torch.Tensor, objective: str) -> dict[str, float]:
    """``search acc`` (and with the ``probability`` objective ``search prob``) of per-sample ``values``
    on a subset of the search samples."""
    out = {"search acc": float(values["accuracy"][subset].mean())}
    if objective == "probability":
        out["search prob"] = float(values["objective"][subset].mean())
    return out


def held_out_columns(search_acc: float, held: dict[str, float], held_metric: str,
                     search_prob: float | None = None) -> dict[str, float]:
    """``held-out acc`` and ``gap`` = search acc - held-out acc; with ``iid acc`` in ``held`` (see
    :class:`Bench`) also ``iid acc`` and ``iid gap`` = search acc - iid acc, and given the search
    samples' mean correct-class probability, ``iid prob gap`` = search prob - iid prob (the same gap in
    the ``probability`` objective, continuous where accuracy moves in steps of one sample)."""
    out = {"held-out acc": held[held_metric], "gap": search_acc - held[held_metric]}
    if "iid acc" in held:
        out.update({"iid acc": held["iid acc"], "iid gap": search_acc - held["iid acc"]})
        if search_prob is not None:
            out.update({"iid prob": held["iid prob"], "iid prob gap": search_prob - held["iid prob"]})
    return out


def penalty_arg(text: str) -> float | tuple[str, float]:
    """A ``--penalties`` entry: a weight lambda (``0.25``), or a bound and its weight (``bernstein:0.25``)."""
    bound, _, weight = text.rpartition(":")
    if bound and bound not in BOUNDS:
        raise argparse.ArgumentTypeError(f"unknown bound {bound!r} in {text!r}; known: {', '.join(BOUNDS)}")
    try:
        value = float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a weight or BOUND:WEIGHT (e.g. 0.25, "
                                         "bernstein:0.25)") from None
    return (bound, value) if bound else value


def penalty_label(weight: float, bound: str = "hoeffding") -> str:
    """How a search row names its penalty: its weight lambda, and its bound when not the Hoeffding one."""
    if weight == 0:
        return "no penalty"
    if bound != "hoeffding":
        return f"{bound} x{weight:g}"
    return "penalty" if weight == 1 else f"penalty x{weight:g}"


def write(path: Path, args, label, tower_names, space, evaluations, started, rows) -> None:
    columns = ["method", "n", *tower_names, "overall", "search acc", "held-out acc", "gap"]
    if "iid acc" in rows[0]:
        columns += ["iid acc", "iid gap"]
    if args.objective == "probability":
        columns.insert(columns.index("search acc") + 1, "search prob")
    if args.objective == "loss":
        columns += ["search loss", "held-out loss", "loss gap"]
    columns += ["penalty", "chosen", "new", "cost s", "wall s"]
    text = (f"{describe(args, label, space, evaluations)}\n"
            f"Machine: {machine()}; 1-minute load average when written: {os.getloadavg()[0]:.1f} (other jobs "
            f"on the machine inflate the wall times).\n"
            f"Command: {args.command()}\n"
            f"Total wall time so far: {time.perf_counter() - started:.0f} s.\n\n"
            f"{markdown_table(rows, columns)}\n")
    print(text, flush=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def describe(args: Options, label: str, space, evaluations: int) -> str:
    if args.objective == "loss":
        search = ("`search acc`: teacher-forced exact match on the search samples (training split), `search loss` "
                  "their answer loss (the objective is minus it);\n`held-out acc` / `held-out loss`: the evaluate "
                  "stage's vqa_accuracy (greedy answers) / answer_loss on held-out images;\n`gap` = search acc - "
                  "held-out acc, `loss gap` = held-out loss - search loss.\n")
    else:
        search = ("`search acc`: zero-shot accuracy on the search samples (training split, training prompt "
                  "templates)" + (", `search prob`: the search objective there (mean probability of the correct "
                                  "class)" if args.objective == "probability" else " (the search objective)")
                  + ";\n`held-out acc`: the evaluate stage's zero-shot accuracy (held-out digits, evaluation-only "
                  "templates);\n`gap` = search acc - held-out acc (the template change is part of it, equally for "
                  "every row);\n`iid acc`: zero-shot accuracy on the same held-out digits with the training templates "
                  "(no template change), `iid gap` = search acc - iid acc.\n")
    return (f"Policy search on {label} at {args.sparsity:.0%} overall sparsity, Wanda, every tower.\n{search}"
            f"Search: {len(space.names)} components ({', '.join(space.names)}), step {space.step}, "
            f"bases uniform + ECoFLaP, {args.rounds} rounds x {args.population} = {evaluations} evaluations, "
            f"SRM penalties (delta 0.05) {', '.join(f'{b} x{w:g}' if w else 'none' for b, w in args.searches())} "
            f"(`penalty`: lambda x the bound). Every model pruned with the first {args.calibration_samples} "
            "calibration samples.")


COLUMNS = ["method", "n", "vision", "text", "overall", "search acc", "held-out acc", "gap", "iid acc", "iid gap",
           "penalty", "chosen", "new", "cost s"]


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
            if "iid gap" in r:
                i = r["iid gap"] - base["iid gap"]
                lines[-1] += f"; iid gap {r['iid gap']:.3f} vs {base['iid gap']:.3f} ({i:+.3f})"
    return lines


def suite(profile: str, out: str, model: str | None = None, params: str | None = None, artifacts: str = "artifacts",
          sparsity: float = 0.6, sizes: list[int] = (16, 64, 256), rounds: int = 2, population: int = 6,
          granularity: str = "4", calibration_samples: int = 32, seed: int = 0, objective: str = "probability",
          penalties: list = (1.0, 0.0)):
    """Runner entry point (``kind: script``): baselines and searches from scratch (calibrate and score run
    in a temporary directory; nothing is reused). ``model``: a dual encoder directory (default: the
    offline default model, built by the prepare stage under ``artifacts`` when missing); ``params``: the
    params file (default params/presets/default.yaml); ``penalties``: as ``--penalties`` (weights, or
    ``"bernstein:0.25"``)."""
    from benchmarks.common import REPO, default_dual_encoder
    from benchmarks.report import SuiteResult

    options = Options(sparsity=sparsity, sizes=list(sizes), rounds=rounds, population=population,
                      granularity=str(granularity), calibration_samples=calibration_samples, seed=seed,
                      objective=objective, params=params or str(REPO / "params/presets/default.yaml"),
                      penalties=[penalty_arg(str(p)) for p in penalties],
                      overrides=[f"model.id={model or default_dual_encoder(artifacts)}"], reuse=None,
                      out=str(Path(out) / "search"))
    rows = run(options)
    dense, rows = rows[0], rows[1:]
    notes = [(f"`search acc`: zero-shot accuracy on the search samples (training split, training prompt templates; "
             f"the search maximises {objective} there); `held-out acc`: the evaluate stage's zero-shot accuracy "
             "(held-out digits, evaluation-only templates); `gap` = search acc - held-out acc; `iid acc`: the same "
             "held-out digits with the training templates (the search samples' distribution), `iid gap` = search acc "
             "- iid acc (without the template change); `penalty`: the SRM "
             "penalty; `new`: "
             "candidates a search pruned itself (the others were cached from an earlier search); `cost s`: what the "
             f"search would have taken alone. {rounds} rounds x {population} candidates, components of "
             f"{granularity} blocks, every model pruned with {calibration_samples} calibration samples. "
             f"Equivalent stand-alone command: `{options.command(with_params=False)}`."), "",
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
