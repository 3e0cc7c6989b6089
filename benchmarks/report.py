"""The benchmark report: Markdown tables, a CSV file, PNG plots, published numbers beside ours, and
the README's generated sections.

Input is one :class:`SuiteResult` per suite (flat row dicts). Output, under one directory:

- ``report.md``: a header (date, machine, package versions, the exact command, the timing
  methodology), then per suite the metric table with the dense row, each configuration's metric as
  a ratio to the uniform allocation with the same pruner and target (``x uniform``) and to the
  dense model (``x dense``), the configurations that lose to that baseline, listed by name, and the
  stage costs; then the published reference numbers (``benchmarks/published.yaml``) beside ours.
- ``results.csv``: every row of every suite (dense rows included), one column per key.
- ``<suite>_<metric>.png``: the metric against target sparsity, one line per method;
  ``<suite>_costs.png``: wall time and peak memory of each stage per configuration.

Nothing is bolded; a ratio is a plain number, and "worse" means worse for the metric's direction.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import re
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import yaml

from benchmarks.common import machine, markdown_table

PUBLISHED = Path(__file__).with_name("published.yaml")
VERSIONS = ("torch", "transformers", "prefect", "mlflow", "dvc", "prefect-dask")
DISPLAY = {
    "target": "target", "sparsity": "sparsity", "zero_shot_accuracy": "accuracy", "image_cosine": "image cos",
    "text_cosine": "text cos", "next_token_top1_agreement": "top-1 agree", "next_token_kl": "KL",
    "perplexity": "perplexity",
}
METHODOLOGY = (
    "Stage costs are one run of each stage per configuration, no warm-up and no repeats: wall time from "
    "`time.perf_counter` around the stage, peak resident memory of the process sampled every 20 ms by psutil "
    "(`vlmprune/profiling.py`), and `torch.cuda.max_memory_allocated` on CUDA. Every stage loads its model from "
    "disk, so times include loading. `calibrate` and `baseline` run once per suite, `score` once per scoring "
    "method (OWL's outlier ratios count as one), and the score cost is repeated on every configuration that uses "
    "it. A process runs many stages in turn (the flow's process, or a Dask worker), so a peak can include "
    "memory that an earlier stage left allocated: read it as an upper bound. Timings on a shared machine are "
    "noisy. A suite that measures latency states its warm-up and the number of repeats of its medians below."
)


@dataclass
class SuiteResult:
    """What a suite hands to the report. ``rows`` are flat dicts; a row with an ``error`` key is a
    configuration that failed (listed, not tabulated). ``x`` and ``group`` are the row keys of the
    plot's horizontal axis and of its lines."""

    name: str
    title: str
    rows: list[dict]
    metric: str
    higher_is_better: bool
    columns: list[str]
    methodology: str
    cost_columns: list[str] = field(default_factory=list)
    dense: dict | None = None
    compare_uniform: bool = False
    settings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    x: str = "target"
    group: str = "method"


def header_of(column: str) -> str:
    if column in DISPLAY:
        return DISPLAY[column]
    if column.startswith("sparsity_"):
        return column.removeprefix("sparsity_")
    for suffix, unit in (("_cuda_mb", " CUDA MB"), ("_mb", " MB"), ("_ms", " ms"), ("_s", " s")):
        if column.endswith(suffix):
            return column.removesuffix(suffix) + unit
    return column.replace("_", " ")


def fmt(column: str, value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if column.endswith("_mb"):
        return f"{value:.0f}"
    if column.endswith(("_s", "_ms", " s")):
        return f"{value:.1f}"
    if column.startswith("x "):
        return f"{value:.2f}x"
    if column == "target":
        return f"{value:.0%}"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}"


def table(rows: list[dict], columns: list[str]) -> str:
    headers = [header_of(c) if not c.startswith("x ") else c for c in columns]
    return markdown_table([{h: fmt(c, r.get(c)) for h, c in zip(headers, columns)} for r in rows], headers)


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "error" not in r]


def uniform_baseline(row: dict, rows: list[dict]) -> dict | None:
    """The uniform-allocation row with the same pruner, pattern and target (None for a uniform row)."""
    if row.get("allocation", "uniform") == "uniform":
        return None
    for other in rows:
        if (other.get("allocation") == "uniform" and other.get("pruner") == row.get("pruner")
                and other.get("pattern") == row.get("pattern") and other.get("target") == row.get("target")):
            return other
    return None


def _ratio(a, b):
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or b == 0:
        return None
    return a / b


def with_ratios(result: SuiteResult) -> list[dict]:
    """Rows with ``x uniform`` (metric / the uniform baseline's) and ``x dense`` (metric / dense)."""
    rows, m = _ok(result.rows), result.metric
    dense = (result.dense or {}).get(m)
    out = []
    for row in rows:
        extra = {"x dense": _ratio(row.get(m), dense)}
        if result.compare_uniform:
            base = uniform_baseline(row, rows)
            extra["x uniform"] = _ratio(row.get(m), base.get(m)) if base else None
        out.append({**row, **extra})
    return out


def worse(a: float, b: float, higher_is_better: bool) -> bool:
    return a < b if higher_is_better else a > b


def losses(result: SuiteResult) -> list[str]:
    """One line per configuration whose metric is worse than its uniform baseline's, and per failure."""
    rows, m, lines, compared = _ok(result.rows), result.metric, [], 0
    for row in rows:
        base = uniform_baseline(row, rows) if result.compare_uniform else None
        if base is None or row.get(m) is None or base.get(m) is None:
            continue
        compared += 1
        if worse(row[m], base[m], result.higher_is_better):
            lines.append(f"{row.get('label', row.get('method'))}: {header_of(m)} {row[m]:.4g}, worse than "
                         f"{base.get('label', base.get('method'))} ({base[m]:.4g}; ratio {row[m] / base[m]:.2f})")
    if result.compare_uniform and compared and not lines:
        lines.append(f"none of the {compared} non-uniform configurations is worse than uniform allocation with "
                     "the same pruner and target")
    if result.compare_uniform and not compared:
        lines.append("no non-uniform configuration has a uniform baseline in this grid")
    lines += [f"FAILED {r.get('label', r.get('method'))}: {r['error']}" for r in result.rows if "error" in r]
    return lines


def suite_markdown(result: SuiteResult, images: list[str] = ()) -> str:
    has_dense = (result.dense or {}).get(result.metric) is not None
    ratios = ["x uniform", "x dense"] if result.compare_uniform else (["x dense"] if has_dense else [])
    rows = with_ratios(result)
    dense = [{**result.dense, "method": "dense"}] if result.dense else []
    better = "higher" if result.higher_is_better else "lower"
    parts = [f"### {result.title}", ""]
    if result.settings:
        parts += [f"Settings: `{' '.join(result.settings)}`.", ""]
    parts += [f"{header_of(result.metric)}: {better} is better. `x uniform`: the metric divided by that of uniform "
              "allocation with the same pruner and target; `x dense`: divided by the dense model's."
              if result.compare_uniform else f"{header_of(result.metric)}: {better} is better.", "",
              table(dense + rows, [*result.columns, *ratios]), ""]
    lost = losses(result)
    if lost:
        parts += ["Where we lose (or fail):" if result.compare_uniform else "Failures:", "",
                  *[f"- {line}" for line in lost], ""]
    if result.cost_columns:
        parts += ["Stage costs (wall seconds, peak resident MB):", "", table(rows, result.cost_columns), ""]
        if result.dense:
            shared = ", ".join(f"{header_of(k)} {fmt(k, v)}" for k, v in result.dense.items()
                               if k.endswith(("_s", "_mb")))
            parts += [f"Shared stages, once per suite: {shared}.", ""]
    parts += [*(f"{n}" for n in result.notes), *(f"![{Path(i).stem}]({i})" for i in images)]
    return "\n".join(parts).rstrip() + "\n"


# ---- plots ----

def line_styles(n: int) -> list[tuple[tuple[float, ...], str]]:
    """A (colour, marker) pair for each of ``n`` lines, no two alike: tab10's colours for up to 10 lines,
    tab20's beyond, then the next marker once the colours run out (matplotlib's default cycle repeats its
    10 colours, so a grid suite's 11th line looked like its 1st)."""
    from matplotlib import colormaps

    colours = colormaps["tab10" if n <= 10 else "tab20"].colors
    markers = "os^Dv<>p*h"
    return [(colours[i % len(colours)], markers[i // len(colours) % len(markers)]) for i in range(n)]


def plot_metric(result: SuiteResult, path: Path) -> Path | None:
    rows = [r for r in _ok(result.rows) if r.get(result.metric) is not None and r.get(result.x) is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from vlmprune.plots import save_png

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(r[result.group] for r in rows))
    for method, (colour, marker) in zip(methods, line_styles(len(methods))):
        points = sorted((r[result.x], r[result.metric]) for r in rows if r[result.group] == method)
        ax.plot(*zip(*points), color=colour, marker=marker, label=method)
    dense = (result.dense or {}).get(result.metric)
    if dense is not None:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
    values = [r[result.metric] for r in rows] + ([dense] if dense is not None else [])
    if not result.higher_is_better and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel(f"{header_of(result.x)} sparsity" if result.x == "target" else header_of(result.x))
    ax.set_ylabel(f"{header_of(result.metric)} ({'higher' if result.higher_is_better else 'lower'} is better)")
    ax.set_title(result.title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_png(fig, path)
    return path


def plot_costs(result: SuiteResult, path: Path) -> Path | None:
    rows = _ok(result.rows)
    times = [c for c in result.cost_columns if c.endswith("_s")]
    memory = [c for c in result.cost_columns if c.endswith("_mb") and not c.endswith("_cuda_mb")]
    if not rows or not (times or memory):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from vlmprune.plots import save_png

    labels = [r.get("label", r.get("method")) for r in rows]
    y = list(range(len(rows)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 1.2 + 0.32 * len(rows)), sharey=True)
    start = [0.0] * len(rows)
    for column in times:  # stacked: the time each configuration spent in each stage
        values = [r.get(column) or 0.0 for r in rows]
        left.barh(y, values, left=start, label=header_of(column).removesuffix(" s"))
        start = [a + b for a, b in zip(start, values)]
    left.set_xlabel("wall seconds per stage (stacked)")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 1.5 / (4 + len(rows))), ncol=4)
    height = 0.8 / max(1, len(memory))
    for i, column in enumerate(memory):  # grouped: each stage's peak
        right.barh([v - 0.4 + (i + 0.5) * height for v in y], [r.get(column) or 0.0 for r in rows], height=height,
                   label=header_of(column).removesuffix(" MB"))
    right.set_xlabel("peak resident MB per stage")
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 1.5 / (4 + len(rows))), ncol=4)
    left.set_yticks(y, labels, fontsize=7)
    left.invert_yaxis()
    fig.suptitle(f"{result.title}: stage costs", fontsize=9)
    save_png(fig, path, bbox_inches="tight")
    return path


# ---- CSV ----

def write_csv(results: list[SuiteResult], path: Path, earlier: list[dict] = ()) -> Path:
    """Every row of ``results`` (dense rows included) after the ``earlier`` rows kept from a previous file."""
    rows = list(earlier)
    for result in results:
        if result.dense:
            rows.append({"suite": result.name, **result.dense})
        rows += [{"suite": result.name, **r} for r in result.rows]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


# ---- published numbers beside ours ----

def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b)
    return a == b


def _match(spec: dict, rows: list[dict], target: float) -> dict | None:
    """Our first row with the fields of ``spec`` (allocation uniform, unstructured and the entry's target
    unless ``spec`` says otherwise)."""
    want = {"allocation": "uniform", "pattern": "unstructured", "target": target, **spec}
    return next((r for r in _ok(rows) if all(_same(r.get(k), v) for k, v in want.items())), None)


def published_table(results: dict[str, SuiteResult], path: Path = PUBLISHED) -> str:
    """The reference numbers of ``published.yaml`` beside the matching configuration of ours, each as a
    ratio to its own reference (the dense model, or the entry named in ``relative_to``): ratios, not raw
    values, are what can be compared across models and data sets."""
    groups = yaml.safe_load(Path(path).read_text())
    out = []
    for group in groups:
        result = results.get(group["suite"])
        entries = {e["method"]: e for e in group["entries"]}
        ours: dict[str, dict | None] = {}
        for e in group["entries"]:
            ours[e["method"]] = _match(e["ours"], result.rows, e["target"]) if result and "ours" in e else None
        for i, e in enumerate(group["entries"]):
            ref_name = e.get("relative_to")
            published_ref = entries[ref_name]["value"] if ref_name else group.get("dense")
            mine = ours[e["method"]]
            metric = result.metric if result else None
            # our reference is the counterpart of theirs: none when they give none
            our_ref_row = ours.get(ref_name) if ref_name else (result.dense if result and published_ref is not None
                                                               else None)
            our_value = mine.get(metric) if mine else None
            our_ref = (our_ref_row or {}).get(metric) if metric else None
            if "ours" not in e:
                status = e.get("why_not", "not measured by this runner")
            elif result is None:
                status = f"suite {group['suite']} not in this run"
            elif mine is None:
                status = "not in this profile's grid"
            else:
                status = mine.get("label", mine.get("method"))
            out.append({
                "source": group["source"] if i == 0 else "",
                "model, data": f"{group['model']}; {group['data']}" if i == 0 else "",
                "method": e["method"], "target": fmt("target", e["target"]),
                "published": f"{e['value']:g}",
                "relative to": ref_name or ("dense" if group.get("dense") is not None else ""),
                "published ratio": fmt("x ratio", _ratio(e["value"], published_ref)),
                "ours": status, "our value": fmt(metric or "", our_value),
                "our ratio": fmt("x ratio", _ratio(our_value, our_ref)),
                "differences": group["differences"] if i == 0 else "as above",
            })
    columns = ["source", "model, data", "method", "target", "published", "relative to", "published ratio", "ours",
               "our value", "our ratio", "differences"]
    intro = ("Published numbers (docs/METHODS.md) beside ours. Raw values are on different models and data, so "
             "compare the ratios: each value divided by its reference in the same row's `relative to` (the dense "
             "model, or another method of the same source). Our ratios come from this run; a ratio of ours far from "
             "the published one is a difference to explain, not a result to hide.")
    return intro + "\n\n" + markdown_table(out, columns) + "\n"


# ---- the whole report ----

def versions() -> str:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return ", ".join([f"python {platform.python_version()}", *(f"{n} {version(n)}" for n in VERSIONS)])


def header(profile: str, command: str, runner: str, description: str = "") -> str:
    return "\n".join([
        f"# Benchmark report: profile `{profile}`", "",
        *([description, ""] if description else []),
        f"- Generated: {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        f"- Command: `{command}`",
        f"- Machine: {machine()}",
        f"- Versions: {versions()}",
        f"- Task runner: {runner}", "",
        "## Timing methodology", "", METHODOLOGY, "",
    ])


def write_report(results: list[SuiteResult], out: str | Path, profile: str, command: str, runner: str,
                 description: str = "", published: Path | None = PUBLISHED,
                 readme: str | Path | None = None, merge: bool = False) -> dict:
    """Write report.md, results.csv and the plots under ``out``. Returns their paths and the README
    sections (suite name -> Markdown, and ``published``), with image links relative to ``readme``.

    ``merge`` (a run of some of a profile's suites): an existing report keeps its other suites'
    sections, its published table and their CSV rows; the suites run here replace theirs (or are
    added), each headed by the run that made it, and the header gains an ``Updated`` line."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts, sections, files = [], {}, []
    provenance = (f"Generated by `{command}` ({time.strftime('%Y-%m-%d')}; {machine()}; {versions()}). "
                  f"Full report, CSV and plots: `{out.as_posix()}/`.")
    for result in results:
        metric_file = re.sub(r"\W+", "_", result.metric).strip("_")  # a column name may hold spaces
        images = [p for p in (plot_metric(result, out / f"{result.name}_{metric_file}.png"),
                              plot_costs(result, out / f"{result.name}_costs.png")) if p is not None]
        files += images
        parts += [f"## Suite `{result.name}`", "", *([provenance, ""] if merge else []), result.methodology, "",
                  suite_markdown(result, [p.name for p in images])]
        base = Path(readme).resolve().parent if readme else out.resolve()
        links = [Path(os.path.relpath(p.resolve(), base)).as_posix() for p in images]
        sections[result.name] = provenance + "\n\n" + suite_markdown(result, links)
    if published is not None:
        text = published_table({r.name: r for r in results}, published)
        parts += ["## Published numbers beside ours", "", text]
        sections["published"] = provenance + "\n\n" + text
    report = out / "report.md"
    text = "\n".join(parts).rstrip() + "\n"
    if merge and report.exists():
        update = (f"- Updated: {time.strftime('%Y-%m-%d %H:%M:%S %z')}, suites {', '.join(r.name for r in results)} "
                  f"by `{command}`")
        text = merged_report(report.read_text(), text, update)
    else:
        text = header(profile, command, runner, description) + "\n" + text
    report.write_text(text)
    csv_path = out / "results.csv"
    rerun = {r.name for r in results}
    old_rows = read_csv_rows(csv_path, keep=lambda row: row["suite"] not in rerun) if merge else []
    files = [report, write_csv(results, csv_path, old_rows), *files]
    return {"files": [str(f) for f in files], "sections": sections}


def _report_sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(header, [(heading, section text)]) of a report, split at its level-2 headings."""
    pieces = re.split(r"(?m)^(?=## )", text)
    return pieces[0], [(p.splitlines()[0], p) for p in pieces[1:]]


def merged_report(old: str, new: str, update: str) -> str:
    """``old`` report with the suite sections of ``new`` in place of its sections of the same heading
    (new suites go before the published table) and ``update`` added to its header list."""
    head, old_sections = _report_sections(old)
    _, new_sections = _report_sections(new)
    replaced = dict(new_sections)
    body = [replaced.pop(h, section) for h, section in old_sections]
    at = max((i + 1 for i, (h, _) in enumerate(old_sections) if h.startswith("## Suite ")), default=len(body))
    body[at:at] = [section for h, section in new_sections if h in replaced]
    lines = head.rstrip("\n").split("\n")
    last_item = max((i for i, line in enumerate(lines) if line.startswith("- ")), default=len(lines) - 1)
    lines.insert(last_item + 1, update)
    return "\n".join(lines) + "\n\n" + "".join(s if s.endswith("\n") else s + "\n" for s in body)


def read_csv_rows(path: Path, keep) -> list[dict]:
    """The rows of an earlier ``results.csv`` that ``keep(row)`` accepts (none if there is no file)."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if keep(row)]


# ---- README sections between markers ----

class MarkerError(ValueError):
    pass


def markers(name: str) -> tuple[str, str]:
    return f"<!-- benchmark:{name}:start -->", f"<!-- benchmark:{name}:end -->"


def replace_section(text: str, name: str, content: str) -> str:
    """``text`` with what lies between the ``name`` markers replaced by ``content``; everything else,
    the markers included, unchanged. A missing, repeated or misordered marker raises :class:`MarkerError`."""
    start, end = markers(name)
    counts = (text.count(start), text.count(end))
    if counts != (1, 1) or text.index(start) > text.index(end):
        raise MarkerError(f"section {name!r}: expected one {start} followed by one {end}, found {counts[0]} start "
                          f"and {counts[1]} end marker(s); add them on their own lines where the table belongs")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{content.strip()}\n{end}{tail}"


def update_readme(path: str | Path, sections: dict[str, str]) -> list[str]:
    """Replace every section's marked region in the file at ``path``; checks all markers before writing."""
    path = Path(path)
    text = original = path.read_text()
    problems = []
    for name, content in sections.items():
        try:
            text = replace_section(text, name, content)
        except MarkerError as error:
            problems.append(str(error))
    if problems:
        raise MarkerError(f"{path}: not updated:\n  " + "\n  ".join(problems))
    if text != original:
        path.write_text(text)
    return list(sections)


def section_names(text: str) -> list[str]:
    return re.findall(r"<!-- benchmark:([\w.-]+):start -->", text)
