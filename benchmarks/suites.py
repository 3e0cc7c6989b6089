"""Benchmark profiles and suites: what ``python -m benchmarks.runner`` runs.

A profile (``benchmarks/profiles.yaml``) names suites and, for each, its settings. A suite is either

- ``kind: grid``: a params file, overrides and a grid of allocation x scoring x pruner x sparsity
  (x N:M pattern), run stage by stage through benchmarks/grid.py, with the stages that several
  configurations share run once; or
- ``kind: script``: a function named ``module:function``, called as
  ``function(profile=<profile name>, out=<output directory>, **kwargs)``, that returns a
  :class:`benchmarks.report.SuiteResult` (or a dict of its fields other than ``name`` and
  ``title``): rows, the columns to show, the main metric and its direction, and how its figures
  were measured. This is how a stand-alone benchmark script joins the runner.

A profile may ``extends:`` another: it inherits that profile's suites (a suite named again
replaces the inherited one) and its ``overrides``, which are added to every grid suite's.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
from dataclasses import asdict, fields
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from benchmarks.grid import Config
from benchmarks.report import SuiteResult
from params.schema import ParamsError, load_params

PROFILES = Path(__file__).with_name("profiles.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _as_list(value):
    return value if isinstance(value, list) else [value]


class GridBlock(_Strict):
    """Every combination of the listed values (a single value counts as a list of one)."""

    allocation: str | list[str] = "uniform"
    scoring: str | list[str] = "none"
    pruner: str | list[str] = "wanda"
    sparsity: float | list[float] = 0.5
    pattern: str | list[str] = "unstructured"

    def configs(self) -> list[Config]:
        names = ("allocation", "scoring", "pruner", "sparsity", "pattern")
        return [Config(**dict(zip(names, values)))
                for values in itertools.product(*(_as_list(getattr(self, n)) for n in names))]


class GridSuite(_Strict):
    kind: Literal["grid"] = "grid"
    title: str
    params: str = Field(description="params file (a preset), relative to the repository root")
    overrides: list[str] = []
    metric: str = Field(description="the pruned metric plotted against sparsity")
    higher_is_better: bool
    metrics: list[str] = Field(description="pruned metrics shown in the table, the main one included")
    grid: list[GridBlock]

    @field_validator("grid")
    @classmethod
    def _not_empty(cls, v):
        if not v:
            raise ValueError("a grid suite needs at least one grid block")
        return v

    def configs(self) -> list[Config]:
        """The grid's configurations in order, each once."""
        return list(dict.fromkeys(c for block in self.grid for c in block.configs()))


class ScriptSuite(_Strict):
    kind: Literal["script"]
    title: str
    function: str = Field(description="module:function returning a SuiteResult")
    kwargs: dict = {}

    @field_validator("function")
    @classmethod
    def _form(cls, v: str) -> str:
        if v.count(":") != 1:
            raise ValueError(f"function {v!r} must look like package.module:function")
        return v


Suite = Annotated[GridSuite | ScriptSuite, Field(discriminator="kind")]


class Profile(_Strict):
    description: str
    extends: str | None = None
    overrides: list[str] = []
    suites: dict[str, Suite] = {}


class ProfileError(ValueError):
    pass


def load_profiles(path: str | Path = PROFILES) -> dict[str, dict]:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: the top level must map profile names to profiles")
    return data


def resolve_profile(name: str, path: str | Path = PROFILES, suites: list[str] | None = None) -> Profile:
    """The profile ``name`` with what it extends merged in, its overrides added to every grid suite,
    restricted to ``suites`` when given."""
    raw = load_profiles(path)
    chain, current = [], name
    while current is not None:
        if current not in raw:
            raise ProfileError(f"profile {current!r} not in {path}; profiles: {', '.join(raw)}")
        if current in chain:
            raise ProfileError(f"profile {name!r}: 'extends' makes a cycle through {current!r}")
        chain.append(current)
        current = (raw[current] or {}).get("extends")
    merged: dict = {"suites": {}, "overrides": []}
    for item in reversed(chain):
        data = raw[item] or {}
        merged["suites"].update(data.get("suites") or {})
        merged["overrides"] += data.get("overrides") or []
        merged["description"] = data.get("description", merged.get("description"))
    try:
        profile = Profile.model_validate({**merged, "extends": raw[name].get("extends")})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ProfileError(f"profile {name!r} in {path}: {problems}") from None
    for suite in profile.suites.values():
        if isinstance(suite, GridSuite):
            suite.overrides = [*suite.overrides, *profile.overrides]
    if suites:
        unknown = sorted(set(suites) - set(profile.suites))
        if unknown:
            raise ProfileError(f"suite(s) {', '.join(unknown)} not in profile {name!r}; "
                               f"its suites: {', '.join(profile.suites)}")
        profile.suites = {k: v for k, v in profile.suites.items() if k in suites}
    return profile


def check_profile(profile: Profile) -> int:
    """Validate every grid configuration's params (the suite's params file, its overrides and the
    configuration's) and that every script suite's function can be imported and takes its kwargs; raise one
    :class:`ProfileError` listing every problem. Returns the number of configurations checked."""
    problems, n = [], 0
    for name, suite in profile.suites.items():
        if isinstance(suite, ScriptSuite):
            try:
                inspect.signature(script_function(suite.function)).bind(profile="", out="", **suite.kwargs)
            except (ImportError, AttributeError) as error:
                problems.append(f"{name}: {suite.function}: {error}")
            except TypeError as error:
                problems.append(f"{name}: {suite.function} does not take kwargs {sorted(suite.kwargs)}: {error}")
            continue
        if suite.metric not in suite.metrics:
            problems.append(f"{name}: metric {suite.metric!r} is not among metrics {suite.metrics}")
        for config in suite.configs():
            n += 1
            try:
                load_params(suite.params, [*suite.overrides, *config.overrides()])
            except ParamsError as error:
                problems.append(f"{name}: {config.label}: {error}")
    if problems:
        raise ProfileError("invalid benchmark configuration(s):\n  " + "\n  ".join(problems))
    return n


def script_function(spec: str):
    module, function = spec.split(":")
    return getattr(importlib.import_module(module), function)


def run_script(spec: str, profile: str, out: str, kwargs: dict) -> dict:
    """Call a script suite's function; its result as a plain dict (it may cross a process boundary)."""
    result = script_function(spec)(profile=profile, out=out, **kwargs)
    data = asdict(result) if isinstance(result, SuiteResult) else dict(result)
    allowed = {f.name for f in fields(SuiteResult)}
    missing = {"rows", "columns", "metric", "higher_is_better", "methodology"} - set(data)
    if missing or set(data) - allowed:
        raise ProfileError(f"{spec} returned keys {sorted(data)}: missing {sorted(missing)}, "
                           f"unknown {sorted(set(data) - allowed)}; see benchmarks.report.SuiteResult")
    return data


# ---- rows of a grid suite: flat dicts, one per configuration, for the report, the CSV and MLflow ----

def _costs(prefix: str, usage: dict) -> dict:
    out = {f"{prefix}_s": usage.get("wall_s"), f"{prefix}_mb": usage.get("peak_rss_mb")}
    if usage.get("peak_cuda_mb") is not None:
        out[f"{prefix}_cuda_mb"] = usage["peak_cuda_mb"]
    return out


def target_of(config: Config) -> float:
    """The target sparsity: ``sparsity``, or N/M for an N:M pattern."""
    if config.pattern == "unstructured":
        return config.sparsity
    n, m = map(int, config.pattern.split(":"))
    return n / m


def grid_row(suite: str, config: Config, raw: dict) -> dict:
    """One configuration's row from :func:`benchmarks.grid.run_config`'s result."""
    row = {"suite": suite, "method": config.method, "label": config.label, "allocation": config.allocation,
           "scoring": config.scoring, "pruner": config.pruner, "pattern": config.pattern,
           "target": target_of(config), "sparsity": raw["sparsity"]["overall"]}
    row.update({f"sparsity_{k}": v for k, v in raw["sparsity"].items() if k not in ("target", "overall")})
    row.update({k: v for k, v in raw["pruned"].items() if isinstance(v, (int, float))})
    if config.scoring != "none" or config.allocation == "owl":  # otherwise the score stage only lists groups
        row.update(_costs("score", raw["score"]))
    for stage in ("allocate", "prune", "evaluate"):
        row.update(_costs(stage, raw[stage]))
    return row


def dense_row(suite: str, shared: dict) -> dict:
    row = {"suite": suite, "method": "dense", "label": "dense", "target": 0.0, "sparsity": 0.0}
    row.update({k: v for k, v in shared["metrics"].items() if isinstance(v, (int, float))})
    row.update(_costs("calibrate", shared["calibrate"]))
    row.update(_costs("baseline", shared["baseline"]))
    return row


def grid_result(name: str, suite: GridSuite, dense: dict | None, rows: list[dict]) -> SuiteResult:
    towers = list(dict.fromkeys(k for r in rows for k in r if k.startswith("sparsity_")))
    costs = [c for stage in ("score", "prune", "evaluate") for c in (f"{stage}_s", f"{stage}_mb", f"{stage}_cuda_mb")
             if any(c in r for r in rows)]
    settings = [suite.params, *suite.overrides]
    return SuiteResult(
        name=name, title=suite.title, rows=rows, metric=suite.metric, higher_is_better=suite.higher_is_better,
        columns=["method", "target", "sparsity", *towers, *suite.metrics], cost_columns=["method", "target", *costs],
        dense=dense, compare_uniform=True, settings=settings,
        methodology="Stage costs: one run of each stage per configuration (see the methodology above).")
