"""Policy search over several draws of its search samples: are its held-out gain and its gap a property
of the method or of one draw?

Runs :mod:`benchmarks.search` once per draw at one sample count. Draw ``d`` sets
``allocation.search.sample_seed = d``, which picks the search samples from the training split, and
uses ``d`` as the search's own seed. The held-out set, the calibration samples and ECoFLaP's scores
stay the same in every draw: the draws of one command share one :class:`benchmarks.search.Bench`
(model, calibration, scores, and the held-out metrics of each allocation, measured once), which gives
the rows a separate run per draw would give. The script then summarises each method over the draws:

- the held-out accuracy: mean and standard deviation;
- the gap (search-set accuracy minus held-out accuracy): mean and standard deviation;
- how many draws beat ECoFLaP held out;
- for each penalised search, its gap minus the unpenalised search's gap on the same draw (paired), with
  the paired t statistic and its two-sided p-value;
- the same for the ``loss gap`` (held-out answer loss minus search-set answer loss) with
  ``--objective loss``, the objective of the image-to-text models such as ``vision_lm``;
- each draw's searches side by side (held-out accuracy, gaps, held-out loss, base and distance from it).

    python -m benchmarks.search_draws --sparsity 0.7 --size 64 --draws 1 2 3 4 5 --penalties 1 0.1 0 \
        --rounds 5 --population 8 --objective probability

Each draw's full table (and its rows, ``rows.json``) goes to ``<out>/search_draws/draw_<d>/``; the summary to
``<out>/search_draws.md``. A draw must differ from ``calibration.seed`` (the params refuse it otherwise).

``--add DIR ...`` puts the draws of earlier runs (their ``draw_<d>`` folders) into the summary beside the
new ones, so that more draws can be added later without running the old ones again; ``--draws`` may then
be empty. Every draw must have run the same search: the ``Command:`` lines of the draws' tables must be
equal once the draw's own seeds are taken out, and no draw number may come twice.

The ``iid gap`` (search-set accuracy minus accuracy on the held-out digits with the *training* templates,
as the search samples are scored: the gap without the template change, see
:class:`benchmarks.search.Bench`) is measured by
:mod:`benchmarks.search` since 2026-11-23. ``--iid`` measures it for ``--add`` draws that ran before:
each row's allocation is rebuilt (the baselines, or the search's ``chosen`` policy), pruned again and
measured on the draw's search samples and on the held-out digits; ``iid acc`` / ``iid gap`` go to the
folder's ``iid.json``, which the summary reads beside ``rows.json``, with the search and held-out
accuracies measured again; the summary says in how many rows they equal the draw's own (the same
model; on another machine a few pruned weights may differ).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
from pathlib import Path

from tqdm import tqdm

from vlmprune.search import Policy
from vlmprune.search.evolution import BOUNDS

IID_GAPS = ["iid gap", "iid prob gap"]  # measured since 2026-11-23 (module docstring)
OTHER_GAPS = [*IID_GAPS, "loss gap"]  # summarised where every draw has them; "loss gap": --objective loss
SUMMARY_COLUMNS = ["method", "draws", "held-out mean", "held-out sd", "gap mean", "gap sd",
                   *(f"{g} {s}" for g in OTHER_GAPS for s in ("mean", "sd")), "beats ECoFLaP", "chosen steps",
                   "keeps its base"]
PAIRED_COLUMNS = ["method", "draws", "gap diff mean", "gap diff se", "gap diff t", "gap diff p", "smaller", "equal",
                  "larger", "held-out diff mean", "held-out diff se", "held-out diff t", "held-out diff p"]
UNPENALISED = "search (no penalty)"
GAP_NOTES = {
    "iid gap": "`iid gap` = search-set accuracy - accuracy on the held-out digits with the training templates (the "
               "gap without the template change)",
    "iid prob gap": "`iid prob gap`: the same for the mean probability of the correct class (the search's objective; "
                    "continuous, where accuracy moves by one sample)",
    "loss gap": "`loss gap` = held-out answer loss - search-set answer loss (the search's objective is minus the "
                "answer loss; continuous, where accuracy moves by one sample)",
}


def chosen_policy(chosen: str) -> Policy:
    """The policy a search row names in its ``chosen`` column, e.g. ``"ecoflap [1, -2, 0]"``."""
    base, _, offsets = chosen.partition(" [")
    return Policy(base, tuple(int(v) for v in re.findall(r"-?\d+", offsets)))


def summarize(draws: dict[int, list[dict]]) -> list[dict]:
    """One row per method (dense left out) over the draws' result rows (as :func:`benchmarks.search.run`
    returns them): held-out accuracy and gap, mean and sample standard deviation, in how many draws
    the held-out accuracy is above ECoFLaP's of the same draw, and for the searches the mean distance
    of the chosen policy from its base (grid steps) and in how many draws it is the base itself. The
    ``iid gap``, ``iid prob gap`` and ``loss gap`` columns only where every draw has them (module docstring)."""
    per_method: dict[str, list[dict]] = {}
    for rows in draws.values():
        ecoflap = next(r for r in rows if r["method"].startswith("ecoflap"))
        for r in rows:
            if r["method"] != "dense":
                per_method.setdefault(r["method"], []).append(
                    {**r, "beats": r["held-out acc"] > ecoflap["held-out acc"],
                     "distance": chosen_policy(r["chosen"]).complexity if r.get("chosen") else None})
    summary = []
    for method, rows in per_method.items():
        spread = statistics.stdev if len(rows) > 1 else (lambda _: 0.0)
        distances = [r["distance"] for r in rows]
        searched = None not in distances
        summary.append({"method": method, "draws": len(rows),
                        "beats ECoFLaP": f"{sum(r['beats'] for r in rows)}/{len(rows)}",
                        "chosen steps": statistics.mean(distances) if searched else "",
                        "keeps its base": f"{distances.count(0)}/{len(rows)}" if searched else ""})
        for column, name in [("held-out acc", "held-out"), ("gap", "gap"), *((g, g) for g in OTHER_GAPS)]:
            if all(column in r for r in rows):
                values = [r[column] for r in rows]
                summary[-1].update({f"{name} mean": statistics.mean(values), f"{name} sd": spread(values)})
    return summary


def measured_gaps(draws: dict[int, list[dict]]) -> list[str]:
    """The columns of :data:`OTHER_GAPS` that every row of every draw has."""
    return [gap for gap in OTHER_GAPS if all(gap in r for rows in draws.values() for r in rows)]


def summary_columns(measured: list[str]) -> list[str]:
    """:data:`SUMMARY_COLUMNS` without the mean and sd of the other gaps not ``measured``."""
    unmeasured = [g for g in OTHER_GAPS if g not in measured]
    return [c for c in SUMMARY_COLUMNS if c.removesuffix(" mean").removesuffix(" sd") not in unmeasured]


def paired_gaps(draws: dict[int, list[dict]], gap: str = "gap") -> list[dict]:
    """Each penalised search against the unpenalised one of the same draw (same search samples): the
    difference of their gaps (penalised - unpenalised; ``gap``: the column, ``gap`` or one of :data:`OTHER_GAPS`), its
    mean and standard error over the draws (sample sd / sqrt(draws)), in how many draws the penalised
    gap is smaller, equal or larger, and the same mean and standard error for the difference of their
    held-out accuracies. ``t`` is the paired t statistic, mean / se (how many standard errors the mean
    is from zero), and ``p`` its two-sided p-value under Student's t with draws - 1 degrees of freedom
    (the paired t-test: the chance of a mean at least this far from zero if the penalty changed nothing,
    the differences taken as independent and normal); both empty where se is 0."""
    from scipy.stats import t as student
    differences: dict[str, list[tuple[float, float]]] = {}
    for rows in draws.values():
        by_method = {r["method"]: r for r in rows}
        if UNPENALISED not in by_method:
            continue
        base = by_method[UNPENALISED]
        for method, r in by_method.items():
            if method.startswith("search (") and method != UNPENALISED:
                differences.setdefault(method, []).append((r[gap] - base[gap],
                                                           r["held-out acc"] - base["held-out acc"]))
    out = []
    for method, pairs in differences.items():
        gaps, held = [g for g, _ in pairs], [h for _, h in pairs]
        row = {"method": method, "draws": len(pairs), "smaller": sum(v < 0 for v in gaps),
               "equal": sum(v == 0 for v in gaps), "larger": sum(v > 0 for v in gaps)}
        for name, values in (("gap diff", gaps), ("held-out diff", held)):
            mean = statistics.mean(values)
            error = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
            t = mean / error if error else ""
            p = 2 * student.sf(abs(t), len(values) - 1) if error else ""
            row |= {f"{name} mean": mean, f"{name} se": error, f"{name} t": t, f"{name} p": p}
        out.append(row)
    return out


def per_draw(draws: dict[int, list[dict]]) -> tuple[list[str], list[dict]]:
    """The searches of each draw side by side: their names (in the order of the draws' rows) and one row per
    draw whose cells join the searches' values with " / " in that order: held-out accuracy, gap, the other
    gaps and the held-out loss where every search row has them, and the chosen policy's base with its
    distance from it in grid steps (:attr:`Policy.complexity`)."""
    searches = [r["method"] for r in next(iter(draws.values())) if r.get("chosen")] if draws else []
    rows = [r for d in draws.values() for r in d if r["method"] in searches]
    columns = [c for c in ("held-out acc", "gap", *OTHER_GAPS, "held-out loss") if all(c in r for r in rows)]
    table = []
    for draw in sorted(draws):
        by_method = {r["method"]: r for r in draws[draw]}
        policies = [chosen_policy(by_method[m]["chosen"]) for m in searches]
        table.append({"draw": draw, **{c: " / ".join(f"{by_method[m][c]:.3f}" for m in searches) for c in columns},
                      "base, steps": " / ".join(f"{p.base} {p.complexity}" for p in policies)})
    return searches, table


def ran_command(folder: Path) -> str:
    """The command a ``draw_<d>`` folder's search ran: the ``Command:`` line of its one ``search_*.md`` table,
    without the draw's seeds (``-S allocation.search.sample_seed=d``, ``--seed d``)."""
    tables = sorted(folder.glob("search_*.md"))
    if not re.fullmatch(r"draw_(\d+)", folder.name) or not (folder / "rows.json").exists() or len(tables) != 1:
        raise SystemExit(f"--add {folder}: not a draw folder (draw_<d> with rows.json and one search_*.md table)")
    line = next((ln for ln in tables[0].read_text().splitlines() if ln.startswith("Command: ")), "")
    return re.sub(r" -S allocation\.search\.sample_seed=\d+| --seed \d+", "", line)[len("Command: "):]


def earlier_draws(folders: list[Path]) -> tuple[dict[int, list[dict]], str]:
    """The rows of earlier draws, by draw number, from their ``draw_<d>`` folders, and the command they ran
    (:func:`ran_command`). Refuses a folder that is not a draw folder, a draw number that comes twice, and
    draws that ran different searches (their commands must be equal)."""
    draws: dict[int, list[dict]] = {}
    commands: dict[str, list[int]] = {}
    for folder in folders:
        command = ran_command(folder)
        draw = int(folder.name.removeprefix("draw_"))
        if draw in draws:
            raise SystemExit(f"--add: draw {draw} comes twice")
        commands.setdefault(command, []).append(draw)
        draws[draw] = json.loads((folder / "rows.json").read_text())
        if (folder / "iid.json").exists():
            iid = json.loads((folder / "iid.json").read_text())
            for row in draws[draw]:
                row.update(iid[row["method"]])
    if len(commands) > 1:
        listed = "\n".join(f"  draws {sorted(d)}: {c}" for c, d in commands.items())
        raise SystemExit(f"--add: the draws ran different searches:\n{listed}")
    return draws, next(iter(commands), "")


def ran_options(ran: str):
    """The :class:`benchmarks.search.Options` of a draws' command without its seeds (:func:`earlier_draws`)."""
    from benchmarks.search import options_from

    return options_from(shlex.split(ran)[3:])  # after "python -m benchmarks.search"


def measure_iid(folders: list[Path]) -> None:
    """``iid.json`` for each draw folder that has neither it nor the ``iid gap`` column (module docstring).

    Each row's allocation is pruned again and measured on the draw's own search samples and on the
    held-out digits, so that ``iid gap`` = search acc - iid acc compares two accuracies of one model;
    the search and held-out accuracies measured again are kept beside (``search acc again``,
    ``held-out acc again``) to show whether the models are those of the draw (:func:`reproduction`)."""
    from benchmarks.search import Bench, held_out_columns, search_columns

    todo = [f for f in folders if not (f / "iid.json").exists()
            and "iid gap" not in json.loads((f / "rows.json").read_text())[0]]
    if not todo:
        return
    _, ran = earlier_draws(todo)
    bench = Bench(ran_options(ran))
    baselines = bench.baselines()
    try:
        for folder in tqdm(todo, desc="iid gaps"):
            draw = int(folder.name.removeprefix("draw_"))
            bench.draw_samples(draw, draw)  # as the draw ran: sample_seed = seed = d
            iid = {}
            for row in json.loads((folder / "rows.json").read_text()):
                method = row["method"]
                if row.get("chosen"):
                    sparsity = bench.space.sparsity(chosen_policy(row["chosen"]))
                else:  # the dense model, or a baseline (an unknown name stops here, not measured as dense)
                    sparsity = None if method == "dense" else baselines[method]
                values = bench.values_of(bench.loaded.model) if sparsity is None else bench.per_sample(sparsity)[0]
                search = search_columns(values, bench.subsets[row["n"]], bench.args.objective)
                held = bench.held_out(sparsity)
                columns = held_out_columns(search["search acc"], held, bench.held_metric, search.get("search prob"))
                iid[method] = {**{k: v for k, v in columns.items() if k.startswith("iid")},
                               "search acc again": search["search acc"], "held-out acc again": held[bench.held_metric]}
            (folder / "iid.json").write_text(json.dumps(iid, indent=1) + "\n")
    finally:
        bench.close()


def reproduction(draws: dict[int, list[dict]]) -> str:
    """How many rows measured again (``--iid``) gave the draw's own search and held-out accuracies, and
    the largest difference otherwise."""
    again = [r for rows in draws.values() for r in rows if "held-out acc again" in r]
    if not again:
        return ""
    differences = [max(abs(r["search acc again"] - r["search acc"]), abs(r["held-out acc again"] - r["held-out acc"]))
                   for r in again]
    return (f"Rows measured again for the iid gap (`--iid`, each allocation pruned again): {differences.count(0)} of "
            f"{len(again)} give the draw's own search and held-out accuracies exactly; the largest difference of the "
            f"others is {max(differences):.4f}. The iid gap compares accuracies of the model pruned again.\n")


def main() -> None:
    from benchmarks.common import machine, markdown_table, shell_command
    from benchmarks.search import Bench, Options, penalty_arg, run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--size", type=int, default=64, help="search samples")
    parser.add_argument("--draws", type=int, nargs="*", default=[1, 2, 3, 4, 5])
    parser.add_argument("--penalties", type=penalty_arg, nargs="+", default=[1.0, 0.1, 0.0],
                        help="as benchmarks.search: weights lambda, or BOUND:WEIGHT (e.g. bernstein:0.25)")
    parser.add_argument("--bound", choices=BOUNDS, default="hoeffding",
                        help="the SRM penalty of the searches given a bare weight (allocation.search.bound)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--granularity", default="4")
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--objective", choices=["accuracy", "probability", "loss"], default="probability",
                        help="as benchmarks.search; loss for the image-to-text models (e.g. vision_lm)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--add", type=Path, nargs="+", default=[], metavar="DIR",
                        help="draw_<d> folders of earlier runs to summarise with the new draws")
    parser.add_argument("--iid", action="store_true",
                        help="measure the iid gap of --add draws that ran without it (module docstring)")
    args = parser.parse_args()

    if not args.draws and not args.add:
        raise SystemExit("nothing to summarise: give --draws, --add or both")
    if args.iid:
        measure_iid(args.add)
    draws, ran = earlier_draws(args.add)
    if overlap := sorted(set(draws) & set(args.draws)):
        raise SystemExit(f"--draws {overlap} are already in the --add folders")
    bench = None
    try:
        for draw in args.draws:
            options = Options(sparsity=args.sparsity, sizes=[args.size], rounds=args.rounds,
                              population=args.population, granularity=args.granularity,
                              calibration_samples=args.calibration_samples, seed=draw, objective=args.objective,
                              params=args.params, overrides=[*args.overrides, f"allocation.search.sample_seed={draw}"],
                              reuse="artifacts" if args.params == "params.yaml" else None,
                              out=str(Path(args.out) / "search_draws" / f"draw_{draw}"), penalties=args.penalties,
                              bound=args.bound)
            if bench is None:  # set up once (model, calibration, scores, held-out metrics), with this draw's samples
                bench = Bench(options)
            else:
                bench.draw_samples(draw, draw)
            draws[draw] = run(options, bench)
            (Path(options.out) / "rows.json").write_text(json.dumps(draws[draw], indent=1) + "\n")
            command = ran_command(Path(options.out))
            if ran and command != ran:  # stop at the first draw that differs, not after all of them
                raise SystemExit(f"draw {draw} ran another search than the --add draws:\n  {command}\n  {ran}")
            ran = command
    finally:
        if bench is not None:
            bench.close()
    if args.draws:
        options = {k: v for k, v in vars(args).items() if k not in ("overrides", "out", "add", "iid")}
        command = shell_command("benchmarks.search_draws", options) + "".join(f" -S {o}" for o in args.overrides)
    else:  # a summary of earlier draws only: the search options above would not be what ran
        command = "python -m benchmarks.search_draws --draws"
    command += f" --add {' '.join(map(str, args.add))}" if args.add else ""
    command += " --iid" if args.iid else ""
    measured = measured_gaps(draws)
    numbers = sorted(draws)
    searched = ran_options(ran)  # what the draws ran (the options above when they ran here)
    text = (f"Policy search at {searched.sparsity:.0%} with {max(searched.sizes)} search samples over {len(numbers)} "
            f"draws of them (allocation.search.sample_seed = {', '.join(map(str, numbers))}); held-out set, calibration "
            f"and ECoFLaP's scores fixed. `gap` = search-set accuracy - held-out accuracy; `beats ECoFLaP`: draws "
            f"whose held-out accuracy is above ECoFLaP's"
            f"{''.join('; ' + GAP_NOTES[g] for g in measured)}. "
            f"Per-draw tables: `search_draws/draw_<d>/`"
            f"{' and the --add folders' if args.add else ''}.\n"
            f"Machine: {machine()}.\nCommand: {command}\n"
            f"Each draw d ran: {ran} --seed d -S allocation.search.sample_seed=d\n{reproduction(draws)}\n"
            f"{markdown_table(summarize(draws), summary_columns(measured))}\n\n"
            f"Gap of each penalised search minus that of the unpenalised search on the same draw:\n\n"
            f"{markdown_table(paired_gaps(draws), PAIRED_COLUMNS)}\n"
            + "".join(f"\nThe same for the {gap}:\n\n{markdown_table(paired_gaps(draws, gap), PAIRED_COLUMNS)}\n"
                      for gap in measured))
    searches, table = per_draw(draws)
    if searches:
        text += (f"\nPer draw ({' / '.join(searches)}; `base, steps`: the chosen policy's base and its distance from "
                 f"it, in grid steps):\n\n{markdown_table(table, list(table[0]))}\n")
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "search_draws.md").write_text(text)


if __name__ == "__main__":
    main()
