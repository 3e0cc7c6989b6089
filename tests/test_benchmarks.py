"""The benchmark runner (benchmarks/): report tables and files from synthetic rows, README sections
between markers, the profiles file, and one tiny end-to-end run of the Prefect flow with MLflow."""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys

import pytest
import yaml

from benchmarks.grid import Config
from benchmarks.report import (
    MarkerError,
    SuiteResult,
    line_styles,
    losses,
    plot_metric,
    published_table,
    replace_section,
    update_readme,
    with_ratios,
    write_report,
)
from benchmarks.suites import (
    GridBlock,
    ProfileError,
    check_profile,
    load_profiles,
    resolve_profile,
    run_script,
    target_of,
)
from tests.tiny import tiny_params


def grid_rows(metric: str, values: dict[str, float]) -> list[dict]:
    """Rows as the runner makes them: allocation x pruner at 50%, with a metric value each."""
    rows = []
    for key, value in values.items():
        allocation, pruner = key.split("+")
        config = Config(allocation, "zeroth_order" if allocation == "ecoflap" else "none", pruner, 0.5)
        rows.append({"suite": "s", "method": config.method, "label": config.label, "allocation": allocation,
                     "scoring": config.scoring, "pruner": pruner, "pattern": "unstructured", "target": 0.5,
                     "sparsity": 0.5, metric: value, "prune_s": 2.0, "prune_mb": 900.0, "evaluate_s": 1.0,
                     "evaluate_mb": 950.0})
    return rows


def accuracy_result() -> SuiteResult:
    rows = grid_rows("zero_shot_accuracy", {"uniform+wanda": 0.5, "owl+wanda": 0.4, "ecoflap+wanda": 0.8,
                                            "uniform+sparsegpt": 0.7})
    rows.append({**rows[0], "target": 0.6, "label": "uniform + wanda @ 60%", "zero_shot_accuracy": 0.2})
    return SuiteResult(name="de", title="tiny accuracy", rows=rows, metric="zero_shot_accuracy",
                       higher_is_better=True, columns=["method", "target", "sparsity", "zero_shot_accuracy"],
                       cost_columns=["method", "target", "prune_s", "prune_mb", "evaluate_s", "evaluate_mb"],
                       dense={"method": "dense", "target": 0.0, "sparsity": 0.0, "zero_shot_accuracy": 1.0,
                              "baseline_s": 3.0, "baseline_mb": 800.0},
                       compare_uniform=True, methodology="one run each", settings=["p.yaml", "a.b=1"])


def test_ratios_to_uniform_and_dense():
    rows = {r["label"]: r for r in with_ratios(accuracy_result())}
    assert rows["ecoflap-zeroth + wanda @ 50%"]["x uniform"] == pytest.approx(0.8 / 0.5)
    assert rows["owl + wanda @ 50%"]["x uniform"] == pytest.approx(0.4 / 0.5)
    assert rows["owl + wanda @ 50%"]["x dense"] == pytest.approx(0.4)
    assert rows["uniform + wanda @ 50%"]["x uniform"] is None  # a uniform row is its own baseline


def test_every_line_of_a_metric_plot_has_its_own_colour_and_marker(tmp_path, monkeypatch):
    for n in (1, 10, 11, 20, 21, 45):
        assert len(set(line_styles(n))) == n
    result = accuracy_result()  # 4 methods; 14 more make 18, past the 10 colours of matplotlib's own cycle
    result.rows += [{**result.rows[0], "method": f"m{i}", "zero_shot_accuracy": i / 20} for i in range(14)]
    figures = []
    monkeypatch.setattr("vlmprune.plots.save_png", lambda fig, path: figures.append(fig))
    plot_metric(result, tmp_path / "a.png")
    lines = [ln for ln in figures[0].axes[0].get_lines() if ln.get_label() != "dense"]
    assert len(lines) == 18
    assert len({(ln.get_color(), ln.get_marker()) for ln in lines}) == 18


def test_losses_follow_the_metric_direction():
    lost = losses(accuracy_result())
    assert len(lost) == 1 and lost[0].startswith("owl + wanda @ 50%") and "uniform + wanda @ 50%" in lost[0]
    ppl = SuiteResult(name="lm", title="t", metric="perplexity", higher_is_better=False, columns=["method"],
                      rows=grid_rows("perplexity", {"uniform+wanda": 40.0, "owl+wanda": 50.0, "ecoflap+wanda": 20.0}),
                      compare_uniform=True, methodology="")
    lost = losses(ppl)
    assert len(lost) == 1 and lost[0].startswith("owl + wanda @ 50%") and "ratio 1.25" in lost[0]


def test_write_report_tables_csv_and_plots(tmp_path):
    result = accuracy_result()
    result.rows.append({"suite": "s", "method": "uniform + magnitude", "label": "uniform + magnitude @ 50%",
                        "error": "RuntimeError: boom"})
    written = write_report([result], tmp_path, "tiny", "python -m benchmarks.runner --profile tiny", "sequential",
                           published=None)
    report = (tmp_path / "report.md").read_text()
    for expected in ("python -m benchmarks.runner --profile tiny", "Machine:", "torch ", "transformers ",
                     "prefect ", "mlflow ", "dvc ", "perf_counter", "psutil",
                     "| ecoflap-zeroth + wanda | 50% | 0.500 | 0.800 | 1.60x | 0.80x |",
                     "| dense | 0% | 0.000 | 1.000 |  |  |", "FAILED uniform + magnitude @ 50%: RuntimeError: boom",
                     "Settings: `p.yaml a.b=1`"):
        assert expected in report, expected
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 + 6  # dense + five configurations + the failed one
    assert {"suite", "method", "target", "zero_shot_accuracy", "prune_s", "error"} <= set(rows[0])
    assert rows[0]["method"] == "dense" and rows[0]["suite"] == "de"
    for name in ("de_zero_shot_accuracy.png", "de_costs.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 1000
    assert set(written["sections"]) == {"de"} and "1.60x" in written["sections"]["de"]


def test_published_numbers_beside_ours():
    rows = grid_rows("perplexity", {"uniform+wanda": 36.32, "uniform+sparsegpt": 29.6})
    result = SuiteResult(name="smollm2", title="t", rows=rows, metric="perplexity", higher_is_better=False,
                         columns=["method"], dense={"perplexity": 14.651}, compare_uniform=True, methodology="")
    text = published_table({"smollm2": result})
    wanda = next(line for line in text.splitlines() if line.startswith("|  |  | Wanda | 50% |"))
    cells = [c.strip() for c in wanda.split("|")]
    assert cells[5:11] == ["6.42", "dense", f"{6.42 / 5.12:.2f}x", "uniform + wanda @ 50%", "36.320",
                           f"{36.32 / 14.651:.2f}x"]
    assert "not in this profile's grid" in text  # magnitude, 2:4, OWL at 70% are not in these rows
    assert "suite dual_encoder not in this run" in text


def test_replace_section_changes_only_the_marked_region(tmp_path):
    text = ("# Title\n\nintro\n<!-- benchmark:lm:start -->\nold table\n<!-- benchmark:lm:end -->\nafter\n"
            "<!-- benchmark:de:start -->\n<!-- benchmark:de:end -->\n")
    new = replace_section(text, "lm", "| new |\n")
    assert new == text.replace("old table", "| new |")
    assert replace_section(new, "lm", "| new |") == new  # idempotent
    path = tmp_path / "README.md"
    path.write_text(text)
    assert update_readme(path, {"lm": "A", "de": "B"}) == ["lm", "de"]
    assert path.read_text() == text.replace("old table", "A").replace(
        "<!-- benchmark:de:start -->\n", "<!-- benchmark:de:start -->\nB\n")


def test_missing_or_repeated_marker_is_an_error_and_nothing_is_written(tmp_path):
    text = "a\n<!-- benchmark:lm:start -->\nx\n<!-- benchmark:lm:end -->\n"
    with pytest.raises(MarkerError, match=r"benchmark:de:start.*found 0 start"):
        replace_section(text, "de", "y")
    with pytest.raises(MarkerError, match="found 2 start"):
        replace_section(text + "<!-- benchmark:lm:start -->\n", "lm", "y")
    with pytest.raises(MarkerError):
        replace_section("<!-- benchmark:lm:end -->\n<!-- benchmark:lm:start -->\n", "lm", "y")
    path = tmp_path / "README.md"
    path.write_text(text)
    with pytest.raises(MarkerError, match="'de'"):
        update_readme(path, {"lm": "new", "de": "new"})
    assert path.read_text() == text


def test_every_profile_validates_against_the_params_schema():
    names = load_profiles()
    assert {"quick", "full", "gpu"} <= set(names)
    counts = {name: check_profile(resolve_profile(name)) for name in names}
    assert counts["quick"] > 0 and counts["full"] > counts["quick"] and counts["gpu"] == counts["full"]
    from params.schema import load_params

    gpu = resolve_profile("gpu")
    for suite in gpu.suites.values():
        if suite.kind != "grid":  # script suites take no params file
            continue
        assert load_params(suite.params, [*suite.overrides, *suite.configs()[0].overrides()]).model.device == "cuda"
    quick = resolve_profile("quick")
    lm = load_params(quick.suites["smollm2"].params, quick.suites["smollm2"].overrides)
    assert (lm.calibration.n_samples, lm.data.seq_len, lm.model.device) == (16, 128, "cpu")


def test_profile_errors_name_what_to_change(tmp_path):
    with pytest.raises(ProfileError, match="profiles: quick"):
        resolve_profile("nope")
    with pytest.raises(ProfileError, match="its suites: dual_encoder, smollm2"):
        resolve_profile("quick", suites=["nope"])
    bad = {"p": {"description": "d", "suites": {"s": {
        "kind": "grid", "title": "t", "params": "params/presets/default.yaml", "overrides": ["pruning.sparsty=0.5"],
        "metric": "m", "higher_is_better": True, "metrics": ["m"], "grid": [{"pruner": "wanda"}]}}}}
    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ProfileError, match="pruning.sparsty: unknown key"):
        check_profile(resolve_profile("p", path))
    bad["p"]["suites"]["s"]["grid"] = [{"pruner": "wanda", "sparsityy": 0.5}]
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ProfileError, match="sparsityy"):
        resolve_profile("p", path)


def test_grid_block_expands_every_combination():
    block = GridBlock(allocation=["uniform", "owl"], pruner=["wanda", "sparsegpt"], sparsity=[0.5, 0.6, 0.7])
    configs = block.configs()
    assert len(configs) == 12 and len(set(configs)) == 12
    assert Config("owl", "none", "sparsegpt", 0.7) in configs
    assert target_of(Config(pattern="2:4")) == 0.5 and target_of(Config(pattern="4:8", sparsity=0.9)) == 0.5
    assert Config("ecoflap", "first_order", "wanda", 0.7).method == "ecoflap-first + wanda"


def script_suite(profile: str, out: str, scale: float = 1.0) -> dict:
    """A script suite for the test below: two rows with a latency column."""
    return {"rows": [{"method": "a", "target": 0.5, "latency_ms": 2.0 * scale}], "columns": ["method", "latency_ms"],
            "metric": "latency_ms", "higher_is_better": False, "methodology": "median of 5 after 2 warm-up runs"}


def failing_suite(profile: str, out: str) -> dict:
    raise RuntimeError("no model here")


def incomplete_script_suite(profile: str, out: str) -> dict:
    return {"rows": [], "colums": []}


def test_script_suite_interface(tmp_path):
    data = run_script("tests.test_benchmarks:script_suite", "quick", str(tmp_path), {"scale": 3.0})
    assert data["rows"][0]["latency_ms"] == 6.0
    with pytest.raises(ProfileError, match=r"missing \['columns', 'higher_is_better'.*unknown \['colums'\]"):
        run_script("tests.test_benchmarks:incomplete_script_suite", "quick", str(tmp_path), {})


def test_dask_flag_without_prefect_dask_names_the_install_command(monkeypatch):
    from benchmarks.runner import task_runner

    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # import fails as if not installed
    with pytest.raises(SystemExit, match=r"pip install -e \"\.\[dask\]\""):
        task_runner(True)
    assert type(task_runner(False)).__name__ == "ThreadPoolTaskRunner"


@pytest.fixture(scope="module")
def tiny_profile(tiny_dual_encoder_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    params = tiny_params(tiny_dual_encoder_dir, root / "unused", tracking={"enabled": False})
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    suite = {"kind": "grid", "title": "tiny dual encoder", "params": str(root / "params.yaml"), "overrides": [],
             "metric": "zero_shot_accuracy", "higher_is_better": True,
             "metrics": ["zero_shot_accuracy", "image_cosine"],
             "grid": [{"allocation": ["uniform", "owl"], "pruner": "wanda", "sparsity": 0.5}]}
    scripts = {"good": {"kind": "script", "title": "a script suite", "function": "tests.test_benchmarks:script_suite",
                        "kwargs": {"scale": 2.0}},
               "broken": {"kind": "script", "title": "a failing one", "function": "tests.test_benchmarks:failing_suite"}}
    (root / "profiles.yaml").write_text(yaml.safe_dump({"tiny": {"description": "tiny", "suites": {"tiny": suite}},
                                                        "scripts": {"description": "scripts", "suites": scripts}}))
    return root


@pytest.fixture(scope="module")
def bench_harness():
    """A temporary Prefect server with a startup timeout that survives a loaded 2-core machine."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_flow_end_to_end_with_mlflow(tiny_profile, bench_harness, tmp_path):
    from mlflow import MlflowClient

    from benchmarks.runner import benchmark

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = benchmark(profile="tiny", profiles_path=str(tiny_profile / "profiles.yaml"), out=str(tmp_path / "out"),
                       mlflow_uri=uri, experiment="bench-test", command="test run")
    assert result["failed"] == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| uniform + wanda | 50% | 0.500 |" in report and "| owl + wanda | 50% |" in report
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["dense", "uniform + wanda", "owl + wanda"]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("bench-test").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_id == result["parent_run_id"] and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {result["parent_run_id"]}
    assert {r.data.params["allocation"] for r in children} == {"uniform", "owl"}
    assert all(0 <= r.data.metrics["zero_shot_accuracy"] <= 1 and r.data.metrics["prune_s"] > 0 for r in children)
    assert parents[0].data.params["profile"] == "tiny" and "tiny.dense.zero_shot_accuracy" in parents[0].data.metrics
    files = {f.path for f in client.list_artifacts(result["parent_run_id"], "report")}
    assert {"report/report.md", "report/results.csv", "report/tiny_zero_shot_accuracy.png"} <= files


# ---- the script suites behind the README's other tables (issue #9): tiny settings, plumbing only ----

SCRIPT_SUITES = {"scoring_cost": "benchmarks.scoring_cost:suite", "structured": "benchmarks.structured:suite",
                 "structured_clip": "benchmarks.structured_clip:suite", "search": "benchmarks.search:suite",
                 "tokens": "benchmarks.tokens:suite", "offload": "benchmarks.offload:suite"}


def test_readme_profile_adds_the_script_suites_to_quick():
    readme, quick = resolve_profile("readme"), resolve_profile("quick")
    assert list(readme.suites) == [*quick.suites, *SCRIPT_SUITES]
    assert {name: readme.suites[name].function for name in SCRIPT_SUITES} == SCRIPT_SUITES
    assert readme.suites["smollm2"].overrides == quick.suites["smollm2"].overrides  # the grid suites unchanged
    assert check_profile(readme) == check_profile(quick)  # and every script function takes its kwargs
    assert all(name not in quick.suites for name in SCRIPT_SUITES)


def test_script_suite_kwargs_are_checked_against_the_function(tmp_path):
    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump({"p": {"description": "d", "suites": {"s": {
        "kind": "script", "title": "t", "function": "benchmarks.search:suite", "kwargs": {"sparsty": 0.5}}}}}))
    with pytest.raises(ProfileError, match=r"s: benchmarks.search:suite does not take kwargs \['sparsty'\]"):
        check_profile(resolve_profile("p", path))


@pytest.fixture
def small_threads():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def as_result(name: str, data: dict) -> SuiteResult:
    return SuiteResult(**{**data, "name": name, "title": f"tiny {name}"})


def test_scoring_cost_suite_on_a_tiny_lm(tmp_path, small_threads):
    from tests.tiny import build_tiny_causal_lm, save_tiny

    model = save_tiny(*build_tiny_causal_lm(), tmp_path / "lm")
    modes = ["forward", "first_order", "zeroth_full", "zeroth_cached", "zeroth_cached_linear", "prune_wanda"]
    data = run_script(SCRIPT_SUITES["scoring_cost"], "tiny", str(tmp_path), {
        "samples": 4, "seq_len": 16, "batch_size": 2, "threads": 1, "model": str(model), "isolate": False,
        "modes": modes, "prune_samples": 6})
    rows = {r["mode"]: r for r in data["rows"]}
    assert list(rows) == modes
    assert rows["prune_wanda"]["passes"] == "3 batches of 2"  # the prune stage's own 6 windows
    assert data["columns"] == ["mode", "passes", "wall_s", "peak_mb", "x forward time", "x forward memory", "rank_corr",
                               "median error", "max error"]
    assert rows["forward"]["x forward time"] == 1.0 and rows["forward"]["passes"] == "2 fwd"
    assert all(r["wall_s"] > 0 and r["peak_mb"] > 0 for r in rows.values())
    # central differences over 2 blocks x 2 batches = 8 perturbed forwards; from the perturbed block, the
    # same estimator: the same ranking of the blocks
    assert rows["zeroth_full"]["passes"].startswith("8 fwd") and rows["zeroth_cached"]["rank_corr"] == pytest.approx(1.0)
    assert rows["zeroth_cached_linear"]["passes"] == rows["zeroth_cached"]["passes"]
    assert "rank_corr" not in rows["forward"] and "median error" not in rows["first_order"]  # no zeroth-order scores
    # against sum_b |g_b . z_b| by backprop: central differences of a smooth loss are close, not exact
    for mode in ("zeroth_full", "zeroth_cached", "zeroth_cached_linear"):
        assert 0 < rows[mode]["median error"] <= rows[mode]["max error"] < 0.05, mode


def test_scoring_cost_builds_a_model_from_a_config_and_prunes_it_on_random_tokens(tmp_path, small_threads):
    """What a bare GPU worker runs (no packaged model or corpus): random weights and token ids."""
    from transformers import LlamaConfig

    from benchmarks.scoring_cost import run_mode

    LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path)
    pruned = run_mode("prune_sparsegpt", 4, 16, 2, 1, f"config:{tmp_path / 'config.json'}", "random", prune_samples=6)
    assert pruned["passes"] == "3 batches of 2" and pruned["peak_mb"] > 0 and pruned["scores"] == {}
    scores = [run_mode("zeroth_cached_fwd", 4, 16, 2, 1, f"config:{tmp_path / 'config.json'}", "random")["scores"]
              for _ in range(2)]
    assert len(scores[0]) == 2 and scores[0] == scores[1]  # seeded weights, tokens and directions


def test_l1_estimate_benchmark_scores_follow_their_formulas(tmp_path, small_threads):
    """benchmarks.l1_estimate on a tiny LM: the noise-free estimate is sqrt(2/pi) sqrt(n) sum_b ||g_b||_2, and
    its sampled zeroth-order draws, sqrt(n) sum_b mean_k |N(0, ||g_b||^2)|, average to it (relative std of one
    layer's draw with K = 4 and 2 batches at most 0.76 / sqrt(4 * 2) ~ 0.27; 400 draws: ~0.013, 5 allowed)."""
    from transformers import LlamaConfig

    from benchmarks.l1_estimate import allocate, gradient_norms, layer_units, score_sets
    from vlmprune.allocators import kept_counts

    LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path)
    norms = gradient_norms(f"config:{tmp_path / 'config.json'}", 4, 16, 2, 0, "random")
    assert len(norms) == 14 and all(len(v["l1"]) == len(v["l2"]) == 2 for v in norms.values())
    for v in norms.values():  # ||g||_2 <= ||g||_1 <= sqrt(n) ||g||_2 on every batch
        assert all(b <= a <= math.sqrt(v["n"]) * b * (1 + 1e-12) for a, b in zip(v["l1"], v["l2"]))
    sets = score_sets(norms, draws=400, directions=[4], seed=0)
    noise_free = sets["L1 estimate, noise-free"]
    for name, v in norms.items():
        assert noise_free[name] == pytest.approx(math.sqrt(2 / math.pi * v["n"]) * sum(v["l2"]), rel=1e-12)
        mean = sum(sets[f"zeroth K=4 draw {d}"][name] for d in range(400)) / 400
        assert mean == pytest.approx(noise_free[name], rel=0.07)
    allocation = allocate(norms, sets["first-order L1"], 0.7)
    total = sum(v["n"] for v in norms.values())
    kept = sum(kept_counts(layer_units(norms, sets["first-order L1"]), allocation).values())
    assert kept == round(0.3 * total)  # ECoFLaP's exact budget of kept weights


def test_structured_suite_on_the_tiny_dual_encoder(tiny_dual_encoder_dir, tmp_path, small_threads):
    data = run_script(SCRIPT_SUITES["structured"], "tiny", str(tmp_path), {
        "model": str(tiny_dual_encoder_dir), "towers": ["text"], "repeats": 2, "distill_steps": 2,
        "mope_samples": 16, "distill_samples": 32, "configs": {"text": ["mope:0.5:1", "layer_drop:1:0.5"]}})
    rows = {r["config"]: r for r in data["rows"]}
    assert list(rows) == ["dense", "mope w0.5 d1", "layer_drop w1 d0.5"]
    assert {"accuracy", "distilled", "x speed b1", "x speed b32", "removed"} <= set(data["columns"])
    assert rows["layer_drop w1 d0.5"]["removed"] == pytest.approx(0.5)  # 1 of the 2 BERT layers
    assert rows["mope w0.5 d1"]["tower_params_M"] < rows["dense"]["tower_params_M"]
    for r in list(rows.values())[1:]:
        assert r["d_acc_pts"] == pytest.approx(100 * (r["distilled"] - rows["dense"]["accuracy"]))
        assert r["x speed b1"] == pytest.approx(rows["dense"]["ms_b1"] / r["ms_b1"])
    assert sum(n.startswith("- text,") for n in data["notes"]) == 2  # a target verdict per configuration


TINY_CLIP = {"layers": 2, "hidden": 32, "heads": 4, "image_size": 16, "patch": 8, "embed_dim": 16}


def test_structured_clip_suite_trains_and_prunes_a_tiny_clip(tmp_path, small_threads):
    from benchmarks.structured_clip import tiny_clip
    from benchmarks.structured_clip_model import TinyClipSize

    data = run_script(SCRIPT_SUITES["structured_clip"], "tiny", str(tmp_path), {
        "towers": ["vision", "text"], "repeats": 2, "distill_steps": 2, "mope_samples": 16, "distill_samples": 32,
        "train_steps": 3, "artifacts": str(tmp_path / "artifacts"), **TINY_CLIP,
        "configs": {"vision": ["mope:0.5:1", "layer_drop:1:0.5"], "text": ["magnitude_structured:0.5:1"]}})
    rows = {(r["tower"], r["config"]): r for r in data["rows"]}
    assert list(rows) == [("vision", "dense"), ("vision", "mope w0.5 d1"), ("vision", "layer_drop w1 d0.5"),
                          ("text", "dense"), ("text", "magnitude_structured w0.5 d1")]
    assert {"accuracy", "distilled", "i2t_r1", "t2i_r1", "wanda_same_budget", "x speed b1"} <= set(data["columns"])
    # 2 of 4 heads and 8 of 16 FFN groups per layer: half of every Linear of the layers; 1 of 2 layers
    assert rows["vision", "mope w0.5 d1"]["removed"] == pytest.approx(0.5)
    assert rows["text", "magnitude_structured w0.5 d1"]["removed"] == pytest.approx(0.5)
    assert rows["vision", "layer_drop w1 d0.5"]["removed"] == pytest.approx(0.5)
    for tower in ("vision", "text"):
        dense = rows[tower, "dense"]
        for (t, config), r in rows.items():
            if t == tower and config != "dense":
                assert r["tower_params_M"] < dense["tower_params_M"]
                assert r["d_acc_pts"] == pytest.approx(100 * (r["distilled"] - dense["accuracy"]))
                assert r["x speed b1"] == pytest.approx(dense["ms_b1"] / r["ms_b1"])
                assert 0 <= r["i2t_r1"] <= 1 and 0 <= r["t2i_r1"] <= 1
    assert sum(n.startswith(("- vision,", "- text,")) for n in data["notes"]) == 3  # a verdict per configuration
    assert any("trained from scratch on the digits training split (3 steps" in n for n in data["notes"])
    # the trained model is kept and reused while its settings are the same, retrained when they change
    size = TinyClipSize(**TINY_CLIP)
    directory, record = tiny_clip(tmp_path / "artifacts", 3, size, progress=False)
    assert record.get("reused") and record["steps"] == 3 and (tmp_path / "artifacts/tiny_clip/config.json").exists()
    assert directory == str(tmp_path / "artifacts" / "tiny_clip")
    assert "reused" not in tiny_clip(tmp_path / "artifacts", 2, size, progress=False)[1]


def test_random_shift_moves_each_image_within_the_bound():
    import torch

    from benchmarks.structured_clip_model import random_shift

    x = torch.zeros(64, 1, 7, 7)
    x[:, 0, 3, 3] = 1.0  # one bright pixel in the middle of each image
    out = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)
    positions = [tuple((img[0] == 1).nonzero()[0].tolist()) for img in out]
    assert all((img == 1).sum() == 1 for img in out)  # moved, not smeared (edges replicate the zeros)
    assert {abs(r - 3) for r, _ in positions} | {abs(c - 3) for _, c in positions} == {0, 1, 2}


def test_search_benchmark_penalties_name_their_bound():
    from benchmarks.search import Options, penalty_arg

    options = Options(penalties=[penalty_arg("1"), penalty_arg("bernstein:0.25"), penalty_arg("0")], bound="hoeffding")
    assert options.searches() == [("hoeffding", 1.0), ("bernstein", 0.25), ("hoeffding", 0.0)]
    assert options.command().endswith("--penalties 1 bernstein:0.25 0")
    assert Options(penalties=[0.5, 0.0], bound="bernstein").command().endswith("--penalties 0.5 0 --bound bernstein")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown bound 'chernoff' in 'chernoff:1'; known: hoeffding"):
        penalty_arg("chernoff:1")
    with pytest.raises(argparse.ArgumentTypeError, match="'strong' is not a weight or BOUND:WEIGHT"):
        penalty_arg("strong")


def test_search_verdicts_compare_each_search_with_ecoflap():
    from benchmarks.search import verdicts

    rows = [{"method": "ecoflap (zeroth)", "held-out acc": 0.9, "gap": 0.02, "iid gap": 0.04},
            {"method": "search (no penalty)", "n": 64, "held-out acc": 0.93, "gap": 0.035, "iid gap": 0.045}]
    assert verdicts(rows) == ["- search (no penalty), n = 64: held-out 0.930, beats ECoFLaP (0.900, +0.030); gap 0.035 "
                              "vs 0.020 (+0.015); iid gap 0.045 vs 0.040 (+0.005)"]
    older = [{k: v for k, v in r.items() if k != "iid gap"} for r in rows]  # a table from before the iid columns
    assert verdicts(older)[0].endswith("gap 0.035 vs 0.020 (+0.015)")


def test_search_suite_on_the_tiny_dual_encoder(tiny_dual_encoder_dir, tmp_path, small_threads):
    params = tiny_params(tiny_dual_encoder_dir, tmp_path / "unused", tracking={"enabled": False})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    data = run_script(SCRIPT_SUITES["search"], "tiny", str(tmp_path), {
        "model": str(tiny_dual_encoder_dir), "params": str(tmp_path / "params.yaml"), "sizes": [8, 16],
        "rounds": 1, "population": 2, "calibration_samples": 8, "granularity": "2",
        "penalties": [1, "bernstein:0.25", 0]})
    methods = [(r["method"], r["n"]) for r in data["rows"]]
    assert methods == [("uniform", 16), ("owl", 16), ("ecoflap (zeroth)", 16)] + [
        (f"search ({label})", n) for n in (8, 16) for label in ("penalty", "bernstein x0.25", "no penalty")]
    assert all(r["overall"] == pytest.approx(0.6, abs=0.01) for r in data["rows"])  # every allocation keeps 60%
    assert all(r["gap"] == pytest.approx(r["search acc"] - r["held-out acc"]) for r in data["rows"])
    assert all(r["iid gap"] == pytest.approx(r["search acc"] - r["iid acc"]) for r in data["rows"])
    assert data["dense"]["method"] == "dense" and 0 <= data["dense"]["held-out acc"] <= 1
    assert (tmp_path / "search" / "search_probability.md").exists()



def test_search_draws_measures_the_iid_gap_of_earlier_draws_again(tiny_dual_encoder_dir, tmp_path, small_threads):
    import torch

    from benchmarks.search import Options, run
    from benchmarks.search_draws import earlier_draws, measure_iid, reproduction
    from tasks.io import data_spec
    from vlmprune.adapters.dual_encoder import DualEncoderAdapter
    from vlmprune.data.images import image_split
    from vlmprune.evaluators.zero_shot import class_embeddings, embed_images, zero_shot_accuracy

    params = tiny_params(tiny_dual_encoder_dir, tmp_path / "unused", tracking={"enabled": False})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    folder = tmp_path / "draw_3"
    rows = run(Options(sparsity=0.6, sizes=[16], rounds=1, population=3, granularity="2", calibration_samples=8,
                       seed=3, objective="probability", params=str(tmp_path / "params.yaml"), reuse=None,
                       out=str(folder), penalties=[0.5, 0.0], overrides=["allocation.search.sample_seed=3"]))
    assert all(r["iid gap"] == pytest.approx(r["search acc"] - r["iid acc"]) for r in rows)
    assert all(r["iid prob gap"] == pytest.approx(r["search prob"] - r["iid prob"]) for r in rows)
    # iid acc: the evaluate stage's zero-shot accuracy, computed here with the training templates instead
    adapter = DualEncoderAdapter()
    loaded = adapter.load(str(tiny_dual_encoder_dir), torch.float32, "cpu")
    data, _, test = image_split(data_spec(params))
    test = test[:params.evaluation.max_samples] if params.evaluation.max_samples else test
    with torch.no_grad():
        images = embed_images(loaded.model.encode_image, data.images[test], loaded.model.config.image_size,
                              batch_size=16, device="cpu")
        classes = class_embeddings(loaded.model.encode_text, loaded.processor, data.class_names, data.train_templates,
                                   device="cpu")
    assert rows[0]["iid acc"] == pytest.approx(zero_shot_accuracy(images, classes, data.labels[test]))

    # a draw that ran before the iid columns: prune each row's allocation again, same values
    measured = {r["method"]: {**{k: r.pop(k) for k in ("iid acc", "iid gap", "iid prob", "iid prob gap")},
                              "search acc again": r["search acc"], "held-out acc again": r["held-out acc"]}
                for r in rows}
    (folder / "rows.json").write_text(json.dumps(rows))
    measure_iid([folder])
    assert json.loads((folder / "iid.json").read_text()) == measured  # the same computations, so exactly
    draws, _ = earlier_draws([folder])
    assert [r["iid gap"] for r in draws[3]] == [measured[r["method"]]["iid gap"] for r in rows]
    assert reproduction(draws).startswith(f"Rows measured again for the iid gap (`--iid`, each allocation pruned "
                                          f"again): {len(rows)} of {len(rows)} give")

    draws[3][-1]["held-out acc"] += 0.01
    assert "the largest difference of the others is 0.0100" in reproduction(draws)


def test_search_benchmark_on_a_tiny_vision_lm_scores_the_answer_loss(tmp_path, small_threads):
    import torch

    from benchmarks.search import Options, run
    from tasks.io import data_spec
    from tests.tiny import build_tiny_vision_lm, family_params
    from vlmprune.adapters.base import LoadedModel
    from vlmprune.adapters.vision_lm import VisionLMAdapter
    from vlmprune.search.objective import make_objective

    model, tokenizer = build_tiny_vision_lm()
    VisionLMAdapter().save(LoadedModel(model, tokenizer), tmp_path / "vlm")
    params = family_params(tmp_path / "vlm", tmp_path / "unused", {"name": "digits"}, evaluation={"max_samples": 8})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    rows = run(Options(sparsity=0.4, sizes=[4, 8], rounds=1, population=2, granularity="tower",
                       calibration_samples=4, objective="loss", params=str(tmp_path / "params.yaml"),
                       reuse=None, out=str(tmp_path / "out"), penalties=[1.0, ("bernstein", 0.5), 0.0]))
    assert [(r["method"], r["n"]) for r in rows] == [("dense", 8), ("uniform", 8), ("owl", 8), ("ecoflap (zeroth)", 8)] + [
        (f"search ({label})", n) for n in (4, 8) for label in ("penalty", "bernstein x0.5", "no penalty")]
    assert all(r["overall"] == pytest.approx(0.4, abs=0.01) for r in rows[1:])
    assert all(r["gap"] == pytest.approx(r["search acc"] - r["held-out acc"]) for r in rows)
    assert all(r["loss gap"] == pytest.approx(r["held-out loss"] - r["search loss"]) for r in rows)
    assert all(0 <= r["search acc"] <= 1 and r["search loss"] > 0 for r in rows)
    # the benchmark's cached per-sample answer losses average to make_objective's loss objective, which
    # gives one value per search sample (adapter.sample_losses) and, every digit answer being one token
    # + EOS, averages to the token-weighted adapter.loss
    adapter, loaded = VisionLMAdapter(), VisionLMAdapter().load(str(tmp_path / "vlm"), torch.float32, "cpu")
    spec = data_spec(params)
    samples = adapter.make_calibration(loaded, spec, 8, params.allocation.search.sample_seed)
    values, value_range = make_objective(adapter, loaded, spec, samples, "loss", 3, "cpu")
    dense = values(loaded.model)
    assert dense.shape == (8,) and len(set(dense.round(6))) > 1
    assert rows[0]["search loss"] == pytest.approx(-float(dense.mean()), rel=1e-5) == pytest.approx(value_range)
    with torch.no_grad():
        assert float(adapter.loss(loaded.model, samples)) == pytest.approx(-float(dense.mean()), rel=1e-5)
    assert (tmp_path / "out" / "search_vision_lm.md").exists()
    # the candidates log keeps each candidate's per-sample values on its own search subset: their mean is
    # the objective the search saw
    log = json.loads((tmp_path / "out" / "search_vision_lm_candidates.json").read_text())
    assert [len(search) for search in log] == [2] * 6
    for search, n in zip(log, (4, 4, 4, 8, 8, 8)):
        for c in search:
            assert len(c["objective values"]) == len(c["accuracy values"]) == n
            assert statistics.fmean(c["objective values"]) == pytest.approx(c["objective"], abs=1e-6)
            assert set(c["accuracy values"]) <= {0.0, 1.0}


def test_search_draws_on_a_tiny_vision_lm_share_one_bench_and_match_separate_runs(tmp_path, small_threads, monkeypatch):
    import sys

    from benchmarks import search_draws
    from benchmarks.search import Options, run
    from tests.tiny import build_tiny_vision_lm, family_params
    from vlmprune.adapters.base import LoadedModel
    from vlmprune.adapters.vision_lm import VisionLMAdapter

    model, tokenizer = build_tiny_vision_lm()
    VisionLMAdapter().save(LoadedModel(model, tokenizer), tmp_path / "vlm")
    params = family_params(tmp_path / "vlm", tmp_path / "unused", {"name": "digits"}, evaluation={"max_samples": 8})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    search = ["--sparsity", "0.4", "--size", "8", "--rounds", "1", "--population", "2", "--granularity", "tower",
              "--calibration-samples", "4", "--objective", "loss", "--params", str(tmp_path / "params.yaml"),
              "--penalties", "bernstein:0.5", "0"]
    monkeypatch.setattr(sys, "argv", ["search_draws", *search, "--draws", "2", "3", "--out", str(tmp_path / "draws")])
    search_draws.main()
    summary = (tmp_path / "draws" / "search_draws.md").read_text()
    assert "| loss gap mean | loss gap sd |" in summary and "iid gap" not in summary  # no iid gap on this family
    assert "The same for the loss gap:" in summary
    assert "Per draw (search (bernstein x0.5) / search (no penalty);" in summary and "\n| 3 | " in summary
    assert summary.startswith("Policy search at 40% with 8 search samples over 2 draws")
    folders = [str(tmp_path / "draws" / "search_draws" / f"draw_{d}") for d in (2, 3)]
    monkeypatch.setattr(sys, "argv", ["search_draws", "--draws", "--add", *folders, "--out", str(tmp_path / "sum")])
    search_draws.main()  # a summary of earlier draws only: the title says what they ran, not the defaults (70%)
    assert (tmp_path / "sum" / "search_draws.md").read_text().startswith("Policy search at 40% with 8 search samples")
    # a new draw that runs another search than the --add ones stops after that draw, with both commands
    monkeypatch.setattr(sys, "argv", ["search_draws", *search[2:], "--sparsity", "0.5", "--draws", "4", "--add",
                                      *folders, "--out", str(tmp_path / "more")])
    with pytest.raises(SystemExit, match=r"draw 4 ran another search than the --add draws:\n.*--sparsity 0\.5"):
        search_draws.main()
    assert not (tmp_path / "more" / "search_draws.md").exists()

    # draw 3 shared the bench (model, calibration, scores, held-out metrics) of draw 2: the same rows as alone
    shared = json.loads((tmp_path / "draws" / "search_draws" / "draw_3" / "rows.json").read_text())
    alone = run(Options(sparsity=0.4, sizes=[8], rounds=1, population=2, granularity="tower", calibration_samples=4,
                        seed=3, objective="loss", params=str(tmp_path / "params.yaml"), reuse=None,
                        out=str(tmp_path / "alone"), penalties=[("bernstein", 0.5), 0.0],
                        overrides=["allocation.search.sample_seed=3"]))
    timing = ("cost s", "wall s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in shared] == [
        {k: v for k, v in r.items() if k not in timing} for r in json.loads(json.dumps(alone))]
    draw_2 = json.loads((tmp_path / "draws" / "search_draws" / "draw_2" / "rows.json").read_text())
    assert draw_2[0]["search loss"] != shared[0]["search loss"]  # other search samples, same dense model


def test_tokens_suite_on_a_tiny_llava(tmp_path, small_threads):
    data = run_script(SCRIPT_SUITES["tokens"], "tiny", str(tmp_path), {
        "tiny_llava": True, "router_steps": 3, "train_samples": 8, "eval_samples": 8, "token_ratios": [1.0, 0.5],
        "layer_ratios": [1.0, 0.5], "repeats": 1, "pairs": 1, "batch_size": 4})
    assert [(r["tokens"], r["layers"]) for r in data["rows"]] == [("100%", "50%"), ("50%", "100%"), ("50%", "50%")]
    assert data["columns"][:5] == ["tokens", "layers", "router", "attention", "random"]
    assert all(r["x prefill router"] > 0 and r["x prefill attention"] > 0 for r in data["rows"])
    assert data["dense"]["tokens"] == "100%" and data["metric"] == "router"
    assert any("50% tokens / 100% layers" in n and "target" in n for n in data["notes"])


def test_readme_region_of_a_script_suite_is_rewritten(tmp_path):
    rows = [{"mode": "forward", "passes": "2 fwd", "wall_s": 2.0, "peak_mb": 900.0, "x forward time": 1.0},
            {"mode": "first_order", "passes": "2 fwd, 2 bwd", "wall_s": 5.0, "peak_mb": 1800.0, "x forward time": 2.5}]
    result = as_result("scoring_cost", {"rows": rows, "columns": ["mode", "passes", "wall_s", "peak_mb",
                                                                  "x forward time"],
                                        "metric": "wall_s", "higher_is_better": False, "methodology": "one run",
                                        "notes": ["a note"], "x": ""})
    readme = tmp_path / "README.md"
    readme.write_text("# R\n\n<!-- benchmark:scoring_cost:start -->\nhand-pasted\n<!-- benchmark:scoring_cost:end -->\n"
                      "after\n")
    written = write_report([result], tmp_path / "out", "readme", "python -m benchmarks.runner --profile readme",
                           "sequential", published=None, readme=readme)
    assert update_readme(readme, {"scoring_cost": written["sections"]["scoring_cost"]}) == ["scoring_cost"]
    text = readme.read_text()
    assert "hand-pasted" not in text and text.endswith("<!-- benchmark:scoring_cost:end -->\nafter\n")
    assert "| mode | passes | wall s | peak MB | x forward time |" in text  # no empty `x dense` column
    assert "| first_order | 2 fwd, 2 bwd | 5.0 | 1800 | 2.50x |" in text and "a note" in text
    assert "python -m benchmarks.runner --profile readme" in text


def test_a_run_of_some_suites_merges_into_the_report(tmp_path):
    """Re-running one suite (``--suites``) replaces only its section and CSV rows; the other suites and the
    published table stay, and the header says what was updated."""
    def result(name, value):
        return as_result(name, {"rows": [{"mode": "a", "wall_s": value}], "columns": ["mode", "wall_s"],
                                "metric": "wall_s", "higher_is_better": False, "methodology": f"{name} method",
                                "notes": [], "x": ""})

    out = tmp_path / "out"
    write_report([result("one", 1.0), result("two", 2.0)], out, "readme", "full run", "sequential", published=None)
    (out / "report.md").write_text((out / "report.md").read_text() + "\n## Published numbers beside ours\n\nkept\n")
    write_report([result("two", 5.0), result("three", 7.0)], out, "readme", "partial run", "sequential",
                 published=None, merge=True)
    report = (out / "report.md").read_text()
    headings = [line for line in report.splitlines() if line.startswith("## ")]
    assert headings == ["## Timing methodology", "## Suite `one`", "## Suite `two`", "## Suite `three`",
                        "## Published numbers beside ours"]
    assert "- Command: `full run`" in report and "- Updated: " in report and "suites two, three by `partial run`" in report
    two = report.split("## Suite `two`")[1].split("## Suite `three`")[0]
    assert "Generated by `partial run`" in two and "| a | 5.0 |" in two and "| a | 2.0 |" not in two
    assert "| a | 1.0 |" in report.split("## Suite `two`")[0] and report.endswith("kept\n")
    with open(out / "results.csv") as f:
        rows = [(r["suite"], r["wall_s"]) for r in csv.DictReader(f)]
    assert rows == [("one", "1.0"), ("two", "5.0"), ("three", "7.0")]


def test_flow_runs_script_suites_and_reports_a_failed_one(tiny_profile, bench_harness, tmp_path):
    from benchmarks.runner import benchmark

    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- benchmark:good:start -->\n<!-- benchmark:good:end -->\n")
    result = benchmark(profile="scripts", profiles_path=str(tiny_profile / "profiles.yaml"), out=str(tmp_path / "out"),
                       tracking=False, command="test run", readme=str(readme), published=False)
    assert result["failed"] == 1 and set(result["sections"]) == {"good", "broken"}
    assert "| a | 4.0 |" in result["sections"]["good"]  # latency_ms 2.0 x scale 2.0
    assert "FAILED broken: RuntimeError: no model here" in result["sections"]["broken"]
    assert "FAILED broken" in (tmp_path / "out" / "report.md").read_text()
    update_readme(readme, {"good": result["sections"]["good"]})
    assert "| a | 4.0 |" in readme.read_text()


def test_offload_extrapolation_counts_llama_parameters_like_transformers():
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.offload import llama_sizes

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    total, resident, block = llama_sizes(64, 176, 3, 300, 2 / 8)
    assert total == sum(p.numel() for p in model.parameters())
    assert block == sum(p.numel() for p in model.model.layers[0].parameters())
    assert resident == total - 3 * block


def test_router_training_table_on_a_tiny_llava(tmp_path, small_threads):
    """benchmarks/router_training.py end to end on a random tiny LLaVA: every row, both ratios, written out."""
    from benchmarks.router_training import main
    from tests.tiny import build_tiny_llava, save_tiny

    model = save_tiny(*build_tiny_llava(text_layers=4), tmp_path / "llava")
    out = tmp_path / "router_training.md"
    assert main(["--model", str(model), "--train", "8", "--test", "4", "--subsets", "4", "--steps", "2", "--k", "1",
                 "--threads", "1", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "token head" not in line]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == ["dense (all tokens)", "random", "untrained router", "straight-through",
                     "ListNet on contributions", "oracle"]
    assert all(len(row.split("|")) == 9 for row in rows)  # 7 columns: head, D and acc at 50% and 25%, train s, note


def test_router_training_measures_only_the_heads_asked_for(tmp_path, small_threads):
    """--heads leaves out the expensive rows (straight-through training, the oracle) on many-token models."""
    from benchmarks.router_training import main
    from tests.tiny import build_tiny_llava, save_tiny

    model = save_tiny(*build_tiny_llava(text_layers=2), tmp_path / "llava")
    out = tmp_path / "router_training.md"
    assert main(["--model", str(model), "--train", "4", "--test", "4", "--subsets", "4", "--steps", "1", "--k", "1",
                 "--threads", "1", "--heads", "random", "contributions", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "token head" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["dense (all tokens)", "random", "ListNet on contributions"]


def test_paired_prefill_without_a_router_times_random_keep_sets(tmp_path, capsys, small_threads):
    """benchmarks/tokens_paired.py with only a model: one row per token ratio, random keep-sets, speed-ups > 0,
    the vision part of the dense prefill between 0 and the whole."""
    from benchmarks.tokens_paired import main
    from tests.tiny import build_tiny_llava, save_tiny

    model = save_tiny(*build_tiny_llava(text_layers=2), tmp_path / "llava")
    main([str(model), "--repeats", "1", "--k", "1"])
    lines = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0]]
    rows = [dict(zip(header, r)) for r in lines[1:]]
    assert header[:6] == ["policy", "tokens", "layers", "dense prefill ms", "of which vision ms", "pruned prefill ms"]
    assert [(r["policy"].strip(), r["tokens"].strip(), r["layers"].strip()) for r in rows] == [
        ("random", "50%", "100%"), ("random", "25%", "100%")]
    assert all(float(r["prefill x (median of pairs)"]) > 0 for r in rows)
    assert all(0 <= float(r["of which vision ms"]) <= float(r["dense prefill ms"]) for r in rows)


def test_spread_weight_sweep_rows(tmp_path, capsys, small_threads):
    """benchmarks/spread_weights.py on a tiny LLaVA with an untrained router: dense, then dither, the router
    and the router with each weight at each token ratio; accuracies and agreements are fractions."""
    from benchmarks.spread_weights import main
    from tests.tiny import build_tiny_llava, save_tiny
    from vlmprune.par.decoder import decoder_of
    from vlmprune.par.router import MetaRouter, RouterConfig, save_router

    model, tokenizer = build_tiny_llava(text_layers=2)
    path = save_tiny(model, tokenizer, tmp_path / "llava")
    dec = decoder_of(model)
    save_router(MetaRouter(RouterConfig(dec.hidden_size, dec.n_layers, 1, width=8)), tmp_path / "router")
    main([str(path), str(tmp_path / "router"), "--weights", "0", "1", "--ratios", "0.5", "--n", "4"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "policy" not in line]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [
        ("dense", "100%"), ("dither", "50%"), ("router", "50%"), ("router+spread 1", "50%")]
    for r in rows:  # accuracy "0.750 (3/4)": the fraction and the count agree
        accuracy, count = r[3].split()
        right, n = map(int, count.strip("()").split("/"))
        assert n == 4 and float(accuracy) == pytest.approx(right / n, abs=5e-4) and 0 <= float(r[4]) <= 1


S_MAX_TINY_SIZES = ["calibration.n_samples=4", "calibration.batch_size=2", "scoring.n_samples=2",
                    "scoring.batch_size=1"]


def tiny_lm_params_file(tmp_path) -> str:
    """A params file for a tiny LLaMA-style causal LM on Wikipedia windows, as the s_max sweeps read."""
    from tests.tiny import build_tiny_causal_lm, save_tiny

    model = save_tiny(*build_tiny_causal_lm("llama"), tmp_path / "lm")
    params = tiny_params(model, tmp_path / "unused", model={"family": "causal_lm"},
                         data={"name": "wikipedia", "seq_len": 32, "eval_windows": 2}, tracking={"enabled": False})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return str(tmp_path / "params.yaml")


def test_s_max_sweep_on_a_tiny_lm(tmp_path, small_threads):
    from benchmarks.s_max import parse_run, sweep

    assert parse_run("0.7:d") == (0.7, None) and parse_run("0.6:0.85") == (0.6, 0.85)
    result = sweep(tiny_lm_params_file(tmp_path), [(0.5, None), (0.5, 0.9)], "zeroth_order", S_MAX_TINY_SIZES)
    rows = result["rows"]
    assert [(r["allocation"], r["s_max"]) for r in rows] == [("uniform", ""), ("ecoflap (zeroth)", "0.60 (default)"),
                                                             ("ecoflap (zeroth)", "0.90")]
    # every cap keeps the target, up to per-row rounding in the tiny model's 32- and 64-wide rows (1/32 a layer)
    assert all(r["overall"] == pytest.approx(0.5, abs=0.02) for r in rows)
    assert rows[0]["x uniform"] == 1.0
    assert all(r["x uniform"] == pytest.approx(r["perplexity"] / rows[0]["perplexity"]) for r in rows)
    assert result["score s"] > 0 and result["dense"] > 0


def test_s_max_sweep_passes_its_pruner_to_every_row(tmp_path, small_threads, monkeypatch):
    import benchmarks.s_max as s_max

    params_file = tiny_lm_params_file(tmp_path)
    pruned_with = []
    real = s_max.run_config

    def spy(params_path, overrides, config, *args, **kwargs):
        result = real(params_path, overrides, config, *args, **kwargs)
        pruned_with.append(config.pruner)
        return result

    monkeypatch.setattr(s_max, "run_config", spy)
    result = s_max.sweep(params_file, [(0.5, None)], "first_order", S_MAX_TINY_SIZES, pruning="sparsegpt", owl=True)
    assert pruned_with == ["sparsegpt"] * 3  # uniform, OWL and ECoFLaP
    uniform, owl, ecoflap = result["rows"]
    assert (owl["allocation"], owl["sparsity"]) == ("owl", 0.5)
    assert owl["x uniform"] == pytest.approx(owl["perplexity"] / uniform["perplexity"])


def test_search_draws_summarises_each_method_over_the_draws():
    from benchmarks.search_draws import summarize

    def rows(ecoflap, search, search_gap, chosen, iid_gap=None):
        iid = {} if iid_gap is None else {"iid gap": iid_gap}
        return [{"method": "dense", "held-out acc": 0.97, "gap": 0.03, **iid},
                {"method": "ecoflap (zeroth)", "held-out acc": ecoflap, "gap": 0.05, **iid},
                {"method": "search (no penalty)", "held-out acc": search, "gap": search_gap, "chosen": chosen, **iid}]

    summary = {r["method"]: r for r in summarize({1: rows(0.9, 0.95, 0.02, "ecoflap [2, -3, 0, 10]"),
                                                  2: rows(0.9, 0.85, 0.06, "uniform [0, 0, 0, 0]")})}
    assert list(summary) == ["ecoflap (zeroth)", "search (no penalty)"]  # dense left out
    search = summary["search (no penalty)"]
    assert search["held-out mean"] == pytest.approx(0.90) and search["held-out sd"] == pytest.approx(0.1 / 2 ** 0.5)
    assert search["gap mean"] == pytest.approx(0.04) and search["beats ECoFLaP"] == "1/2"
    assert search["chosen steps"] == pytest.approx((15 + 0) / 2) and search["keeps its base"] == "1/2"
    assert summary["ecoflap (zeroth)"]["beats ECoFLaP"] == "0/2" and summary["ecoflap (zeroth)"]["gap sd"] == 0
    assert summary["ecoflap (zeroth)"]["chosen steps"] == ""  # not a search
    assert "iid gap mean" not in search  # no draw measured it

    with_iid = summarize({1: rows(0.9, 0.95, 0.02, "ecoflap [1]", iid_gap=0.01),
                          2: rows(0.9, 0.85, 0.06, "ecoflap [0]", iid_gap=0.04)})
    assert with_iid[1]["iid gap mean"] == pytest.approx(0.025) and with_iid[1]["iid gap sd"] == pytest.approx(
        0.03 / 2 ** 0.5)
    partly = summarize({1: rows(0.9, 0.95, 0.02, "ecoflap [1]", iid_gap=0.01), 2: rows(0.9, 0.85, 0.06, "ecoflap [0]")})
    assert "iid gap mean" not in partly[1]  # not every draw has it: no mean of a subset


def test_search_draws_summarises_the_loss_gap_and_shows_only_the_gaps_every_draw_has():
    from benchmarks.search_draws import measured_gaps, paired_gaps, summarize, summary_columns

    def rows(penalised, unpenalised, iid=None):  # loss gaps; an iid gap in one draw only
        extra = {} if iid is None else {"iid gap": iid}
        return [{"method": "ecoflap (zeroth)", "held-out acc": 0.6, "gap": 0.05, "loss gap": 0.03, **extra},
                {"method": "search (bernstein x0.25)", "held-out acc": 0.7, "gap": 0.1, "loss gap": penalised,
                 "chosen": "ecoflap [1]", **extra},
                {"method": "search (no penalty)", "held-out acc": 0.7, "gap": 0.1, "loss gap": unpenalised,
                 "chosen": "ecoflap [2]", **extra}]

    draws = {1: rows(0.04, 0.07, iid=0.01), 2: rows(0.06, 0.05)}
    assert measured_gaps(draws) == ["loss gap"]
    columns = summary_columns(["loss gap"])
    assert "loss gap mean" in columns and "loss gap sd" in columns and "gap mean" in columns
    assert not any(c.startswith(("iid gap", "iid prob gap")) for c in columns)
    search = summarize(draws)[1]
    assert search["loss gap mean"] == pytest.approx(0.05) and search["loss gap sd"] == pytest.approx(0.01 * 2 ** 0.5)
    (paired,) = paired_gaps(draws, "loss gap")
    assert paired["gap diff mean"] == pytest.approx((-0.03 + 0.01) / 2) and (paired["smaller"], paired["larger"]) == (1, 1)


def test_search_draws_pairs_each_penalised_gap_with_the_unpenalised_one_of_its_draw():
    from benchmarks.search_draws import paired_gaps

    def rows(penalised_gap, unpenalised_gap, penalised_held=0.9, unpenalised_held=0.9):
        return [{"method": "ecoflap (zeroth)", "gap": 0.05, "held-out acc": 0.8},
                {"method": "search (penalty x0.1)", "gap": penalised_gap, "held-out acc": penalised_held},
                {"method": "search (no penalty)", "gap": unpenalised_gap, "held-out acc": unpenalised_held}]

    (row,) = paired_gaps({1: rows(0.02, 0.05, 0.92), 2: rows(0.04, 0.04), 3: rows(0.06, 0.05, 0.87, 0.91)})
    assert row["method"] == "search (penalty x0.1)" and row["draws"] == 3
    assert row["gap diff mean"] == pytest.approx((-0.03 + 0 + 0.01) / 3)
    assert row["gap diff se"] == pytest.approx(statistics.stdev([-0.03, 0.0, 0.01]) / 3 ** 0.5)
    assert (row["smaller"], row["equal"], row["larger"]) == (1, 1, 1)
    assert row["held-out diff mean"] == pytest.approx((0.02 + 0 - 0.04) / 3)
    assert row["held-out diff se"] == pytest.approx(statistics.stdev([0.02, 0.0, -0.04]) / 3 ** 0.5)
    assert row["gap diff t"] == pytest.approx(-0.5547, abs=1e-4)  # (-0.02 / 3) / (0.020817 / sqrt(3)), by hand
    # Student's t with 2 df has the closed-form cdf 1/2 + t / (2 sqrt(2 + t^2)): two-sided p = 1 - |t| / sqrt(2 + t^2)
    assert row["gap diff p"] == pytest.approx(1 - 0.5547 / (2 + 0.5547 ** 2) ** 0.5, abs=1e-4)
    assert row["held-out diff t"] == pytest.approx((-0.02 / 3) / (statistics.stdev([0.02, 0.0, -0.04]) / 3 ** 0.5))

    draws = {d: [{**r, "iid gap": 2 * r["gap"]} for r in rs] for d, rs in {1: rows(0.02, 0.05), 2: rows(0.04, 0.03)}.items()}
    (iid,) = paired_gaps(draws, "iid gap")
    assert iid["gap diff mean"] == pytest.approx((-0.06 + 0.02) / 2) and (iid["smaller"], iid["larger"]) == (1, 1)

    (single,) = paired_gaps({1: rows(0.02, 0.05)})
    assert single["gap diff se"] == 0.0 and single["gap diff t"] == single["gap diff p"] == ""  # one draw: no spread


def test_search_draws_puts_the_searches_of_each_draw_side_by_side():
    from benchmarks.search_draws import per_draw

    def rows(held, gaps, losses, chosen):  # (penalised, unpenalised) each
        return [{"method": "ecoflap (zeroth)", "held-out acc": 0.5, "gap": 0.0, "held-out loss": 0.9},
                *({"method": m, "held-out acc": h, "gap": g, "loss gap": lg, "held-out loss": 0.7, "chosen": c}
                  for m, h, g, lg, c in zip(["search (bernstein x0.25)", "search (no penalty)"], held, gaps, losses,
                                            chosen))]

    searches, table = per_draw({3: rows((0.6, 0.55), (-0.01, 0.02), (0.03, 0.06), ("ecoflap [1, -2]", "uniform [0, 0]")),
                                1: rows((0.62, 0.58), (0.002, 0.011), (0.034, 0.061), ("ecoflap [3]", "ecoflap [-4]"))})
    assert searches == ["search (bernstein x0.25)", "search (no penalty)"]  # the baselines left out
    assert [r["draw"] for r in table] == [1, 3]
    assert table[0] == {"draw": 1, "held-out acc": "0.620 / 0.580", "gap": "0.002 / 0.011", "loss gap": "0.034 / 0.061",
                        "held-out loss": "0.700 / 0.700", "base, steps": "ecoflap 3 / ecoflap 4"}
    assert table[1]["base, steps"] == "ecoflap 3 / uniform 0"
    no_loss = {1: [{k: v for k, v in r.items() if k not in ("loss gap", "held-out loss")}
                   for r in rows((0.6, 0.5), (0.0, 0.1), (0, 0), ("ecoflap [1]", "ecoflap [2]"))]}
    assert list(per_draw(no_loss)[1][0]) == ["draw", "held-out acc", "gap", "base, steps"]  # only what every row has


def test_search_draws_adds_earlier_draws_that_ran_the_same_search(tmp_path):
    from benchmarks.search_draws import earlier_draws

    command = "Command: python -m benchmarks.search --sparsity 0.7 --sizes 64 --penalties 0.1 0"

    def draw_folder(root, draw, line):
        folder = tmp_path / root / f"draw_{draw}"
        folder.mkdir(parents=True)
        (folder / "rows.json").write_text(json.dumps([{"method": "ecoflap (zeroth)", "gap": draw / 100}]))
        (folder / "search_probability.md").write_text(f"table\n\n{line}\n")
        return folder

    old = draw_folder("old", 1, f"{command} -S allocation.search.sample_seed=1")
    new = draw_folder("new", 2, f"{command} --seed 2 -S allocation.search.sample_seed=2")
    draws, ran = earlier_draws([old, new])
    assert sorted(draws) == [1, 2] and draws[2][0]["gap"] == 0.02
    assert ran == command[len("Command: "):]

    other = draw_folder("other", 3, f"{command.replace('0.7', '0.6')} -S allocation.search.sample_seed=3")
    with pytest.raises(SystemExit, match=r"different searches(.|\n)*draws \[3\]"):
        earlier_draws([old, other])
    with pytest.raises(SystemExit, match="draw 1 comes twice"):
        earlier_draws([old, draw_folder("again", 1, command)])
    with pytest.raises(SystemExit, match="not a draw folder"):
        earlier_draws([tmp_path / "old"])


def test_llm_allocations_grid_and_ratios_to_the_same_pruners_uniform_row():
    from benchmarks.llm import allocations_grid, report, x_uniform

    grid = allocations_grid([0.6, 0.7])
    assert len(grid) == 16 and len(set(grid)) == 16
    assert {(c.allocation, c.scoring) for c in grid} == {
        ("uniform", "none"), ("owl", "none"), ("ecoflap", "zeroth_order"), ("ecoflap", "first_order")}
    assert {c.pruner for c in grid} == {"wanda", "sparsegpt"} and {c.sparsity for c in grid} == {0.6, 0.7}

    def row(config, perplexity):
        usage = {"wall_s": 1.0, "peak_rss_mb": 1.0}
        return {"config": config, "label": config.label, "pruned": {"perplexity": perplexity},
                "sparsity": {"overall": config.sparsity}, "score": usage, "prune": usage}

    rows = [row(Config("uniform", "none", "wanda", 0.6), 100.0), row(Config("uniform", "none", "sparsegpt", 0.6), 50.0),
            row(Config("ecoflap", "first_order", "wanda", 0.6), 80.0),
            row(Config("ecoflap", "first_order", "sparsegpt", 0.6), 60.0),
            row(Config("owl", "none", "wanda", 0.7), 700.0)]  # no uniform row at 70%: no ratio
    assert x_uniform(rows) == [1.0, 1.0, 0.8, 1.2, ""]
    dense = {"metrics": {"perplexity": 15.0}, "baseline": {"wall_s": 1.0}, "calibrate": {"wall_s": 2.0}}
    partial = report(dense, rows, 16, "quick", "cmd", gpu=False)
    assert "Partial: 5 of 16 configurations ran." in partial and "GPU MB" not in partial
    assert "| ecoflap-first + sparsegpt @ 60% | 0.600 | 60.000 | 1.200 |" in partial
    assert "Partial" not in report(dense, rows, 5, "quick", "cmd", gpu=True)


def test_llm_allocations_run_on_a_tiny_llama_writes_every_row(tmp_path, monkeypatch, small_threads):
    from benchmarks import llm
    from tests.tiny import build_tiny_causal_lm

    model, tokenizer = build_tiny_causal_lm("llama")
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": {"id": str(tmp_path / "lm"), "device": "cpu"},
                                      "data": {"name": "wikipedia", "seq_len": 64}}))
    monkeypatch.setitem(llm.PROFILES, "quick", ["calibration.n_samples=8", "calibration.batch_size=4",
                                                "data.eval_windows=4", "scoring.n_samples=4", "scoring.batch_size=4"])
    monkeypatch.setattr(sys, "argv", ["llm", "--params", str(params), "--allocations", "--sparsities", "0.5",
                                      "--out", str(tmp_path / "out")])
    llm.main()
    text = (tmp_path / "out" / "llm_quick_allocations_0.5.md").read_text()
    assert "Partial" not in text and "--allocations --sparsities 0.5" in text
    lines = [line for line in text.splitlines() if line.startswith("| ") and "@ 50%" in line]
    assert len(lines) == 8
    assert all(line.split(" | ")[3] == "1.000" for line in lines if line.startswith("| uniform"))
