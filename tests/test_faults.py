"""Faults: a killed prune resumes bit for bit, writes are atomic, concurrent runs keep apart, bad inputs
fail with one clear message and a non-zero exit code, NaN/inf stops the run naming the layer."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from flows.cli import main
from flows.pipeline import TASKS
from tasks.io import atomic_dir, run_lock
from tasks.resume import TEST_EXIT_CODE, TEST_EXIT_ENV, ResumeStore
from tests.tiny import interrupt_prune_after, tiny_params
from vlmprune.errors import EXIT_CODE, NonFiniteError

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = ("prepare", "calibrate", "baseline", "score", "allocate")


def write_params(params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path


@pytest.fixture(scope="module")
def upstream(tiny_dual_encoder_dir, tmp_path_factory):
    """The stages before prune, once, on the tiny dual encoder (Wanda 50%, uniform)."""
    artifacts = tmp_path_factory.mktemp("upstream") / "artifacts"
    params = tiny_params(tiny_dual_encoder_dir, artifacts, pruning={"method": "wanda", "sparsity": 0.5},
                         tracking={"enabled": False})
    for name in UPSTREAM:
        TASKS[name].fn(params)
    return params


def copy_run(params, artifacts: Path, **sections):
    """A copy of the upstream artifacts under ``artifacts``, and its params (sections updated)."""
    shutil.copytree(params.artifacts, artifacts)
    data = params.model_dump(mode="json")
    data["artifacts"] = str(artifacts)
    for key, value in sections.items():
        data[key].update(value)
    return type(params).model_validate(data)


def n_groups(params) -> int:
    scores = json.loads((Path(params.artifacts) / "score" / "scores.json").read_text())
    return len(scores["groups"])


def assert_same_prune_outputs(a: Path, b: Path):
    for name in ("model/model.safetensors", "masks.safetensors"):
        first, second = load_file(str(a / "prune" / name)), load_file(str(b / "prune" / name))
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), f"{name}: {key} differs"


@pytest.fixture(scope="module")
def reference(upstream, tmp_path_factory):
    """An uninterrupted prune of the upstream artifacts."""
    params = copy_run(upstream, tmp_path_factory.mktemp("reference") / "artifacts")
    TASKS["prune"].fn(params)
    return params


# ---- resume ------------------------------------------------------------------------------------

def test_killed_prune_resumes_from_the_last_group_bit_identical(upstream, reference, tmp_path, caplog):
    params = copy_run(upstream, tmp_path / "artifacts")
    path = write_params(params, tmp_path / "params.yaml")
    total = n_groups(params)
    vision = sum(1 for g in json.loads((tmp_path / "artifacts/score/scores.json").read_text())["groups"]
                 if g["tower"] == "vision")
    kill_at = vision + 1  # the whole vision tower and the first text layer, then a kill
    env = {**os.environ, TEST_EXIT_ENV: str(kill_at)}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "prune", "-p", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == TEST_EXIT_CODE, proc.stderr
    resume = tmp_path / "artifacts" / ".resume" / "prune"
    assert len(list(resume.glob("*.safetensors"))) == kill_at
    assert not (tmp_path / "artifacts" / "prune").exists()  # nothing that looks like a finished stage

    caplog.set_level(logging.INFO, logger="vlmprune")
    TASKS["prune"].fn(params)
    assert f"resuming from group {kill_at + 1} of {total}" in caplog.text
    assert_same_prune_outputs(Path(reference.artifacts), tmp_path / "artifacts")
    assert not resume.exists()  # checkpoints are removed once the artifact is complete


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])
def test_interrupted_prune_resumes_bit_identical_other_pruners(upstream, tmp_path, monkeypatch, method):
    reference = copy_run(upstream, tmp_path / "reference", pruning={"method": method})
    TASKS["prune"].fn(reference)
    params = copy_run(upstream, tmp_path / "artifacts", pruning={"method": method})
    resume_saving = interrupt_prune_after(monkeypatch, 3, _Interrupt)
    with pytest.raises(_Interrupt):
        TASKS["prune"].fn(params)
    resume_saving()
    TASKS["prune"].fn(params)
    meta = json.loads((tmp_path / "artifacts" / "prune" / "meta.json").read_text())
    assert meta["resumed_groups"] == 3
    assert_same_prune_outputs(tmp_path / "reference", tmp_path / "artifacts")


def test_checkpoints_of_other_params_are_discarded(upstream, tmp_path, monkeypatch, caplog):
    params = copy_run(upstream, tmp_path / "artifacts")
    resume_saving = interrupt_prune_after(monkeypatch, 1, _Interrupt)
    with pytest.raises(_Interrupt):
        TASKS["prune"].fn(params)
    resume_saving()
    caplog.set_level(logging.INFO, logger="vlmprune")
    other = params.model_copy(update={"pruning": params.pruning.model_copy(update={"method": "magnitude"})})
    TASKS["prune"].fn(other)
    assert "discarding prune checkpoints" in caplog.text
    assert json.loads((tmp_path / "artifacts" / "prune" / "meta.json").read_text())["resumed_groups"] == 0


def test_run_digest_changes_with_the_thread_count():
    """Float rounding depends on the CPU thread count: a run resumed under another count would not be
    bit-identical to an uninterrupted one, so its checkpoints must not be reused."""
    from tasks.resume import run_digest

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_digest({"pruning": {"method": "wanda"}}, [], None)
        assert run_digest({"pruning": {"method": "wanda"}}, [], None) == one
        torch.set_num_threads(2)
        assert run_digest({"pruning": {"method": "wanda"}}, [], None) != one
    finally:
        torch.set_num_threads(threads)


def test_checkpoint_with_another_digest_or_half_written_is_not_used(tmp_path):
    store = ResumeStore(tmp_path / "resume", "a" * 64)
    assert store.open() == 0
    state = {"layer.weight": torch.ones(2, 2), "layer.mask": torch.zeros(2, 2, dtype=torch.bool)}
    save_file(state, str(tmp_path / "resume" / "g0.safetensors"), metadata={"digest": "b" * 64})
    (tmp_path / "resume" / ".g1.safetensors.123.tmp").write_bytes(b"half")  # a write killed midway
    assert store.load("g0") is None and store.load("g1") is None
    store.save("g1", state)
    loaded = store.load("g1")
    assert all(torch.equal(loaded[k], state[k]) for k in state)


# ---- atomic writes -----------------------------------------------------------------------------

def test_atomic_dir_recovers_from_a_kill_between_its_renames_and_drops_dead_temporaries(tmp_path):
    target = tmp_path / "prune"
    with atomic_dir(target) as tmp:
        (tmp / "model.bin").write_text("good")
    target.rename(tmp_path / ".prune.old")  # killed after moving the old artifact aside
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=False)
    stale = tmp_path / f".prune.tmp-{dead.stdout.strip()}-abc"  # a killed writer's half-written directory
    stale.mkdir()
    (stale / "model.bin").write_text("half")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            raise RuntimeError("fails before finishing")
    assert (target / "model.bin").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prune"]


# ---- NaN / inf ---------------------------------------------------------------------------------

def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlmprune.adapters.base import Tower
    from vlmprune.sparsity import model_layout

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    tower = Tower("language", [(f"model.layers.{i}", l) for i, l in enumerate(model.model.layers)],
                  lambda m, b: m(**b, use_cache=False))
    groups = model_layout(model, [tower])
    members = [(g.name, g.module, g.layers) for g in groups]
    batches = [{"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))}]
    sparsity = {name: 0.5 for g in groups for name in g.layers}
    return model, tower, members, batches, sparsity


@pytest.mark.parametrize("method,poison,expected", [
    # wanda: inf in up_proj's weight makes its output inf; down_proj's input statistics show it
    ("wanda", "model.layers.1.mlp.up_proj", ("NaN or inf in group model.layers.1 (dense weights, before pruning): "
                                             "first in the output of model.layers.1.mlp.up_proj")),
    ("sparsegpt", "model.layers.2.mlp.up_proj", "first in the output of model.layers.2.mlp.up_proj"),
    # the embeddings before the first group
    ("wanda", "model.embed_tokens", "NaN or inf in the input of group model.layers.0"),
    # magnitude reads no activations: the NaN weight survives pruning (NaN sorts above every number)
    ("magnitude", "model.layers.0.self_attn.k_proj", "NaN or inf in the pruned weight of model.layers.0.self_attn.k_proj"),
])
def test_nonfinite_values_stop_pruning_naming_the_group_and_layer(method, poison, expected):
    from vlmprune.pruners import PRUNERS
    from vlmprune.sequential import prune_tower_sequential

    model, tower, members, batches, sparsity = _tiny_llama()
    with torch.no_grad():
        model.get_submodule(poison).weight[0, 0] = float("inf") if method != "magnitude" else float("nan")
    done = []
    with pytest.raises(NonFiniteError) as error:
        prune_tower_sequential(model, tower.run, batches, members, sparsity, PRUNERS.get(method)(), None,
                               progress=False, on_group_done=lambda name, state: done.append(name))
    assert expected in str(error.value)
    assert "use float32 or bfloat16" in str(error.value)
    # groups before the faulty one finished (and were checkpointed); none after it
    assert done == [name for name, _, _ in members][:int(poison.split(".")[2]) if "layers" in poison else 0]


def test_nan_in_the_model_exits_3_and_keeps_the_earlier_prune_artifact(reference, tmp_path, capsys):
    params = copy_run(reference, tmp_path / "artifacts")  # with its finished prune artifact
    before = (tmp_path / "artifacts" / "prune" / "masks.safetensors").read_bytes()
    bad_model = tmp_path / "nan_model"
    shutil.copytree(params.model.id, bad_model)
    weights = load_file(str(bad_model / "model.safetensors"))
    weights["vision._blocks.1._expand_conv.weight"][0, 0] = float("nan")
    save_file(weights, str(bad_model / "model.safetensors"), metadata={"format": "pt"})
    path = write_params(params, tmp_path / "params.yaml")
    code = main(["stage", "prune", "-p", str(path), "-S", f"model.id={bad_model}"])
    err = capsys.readouterr().err
    assert code == EXIT_CODE
    assert "error: NaN or inf in group vision._blocks.1 (dense weights, before pruning)" in err
    assert "first in the output of vision._blocks.1._expand_conv" in err and "Traceback" not in err
    assert (tmp_path / "artifacts" / "prune" / "masks.safetensors").read_bytes() == before


# ---- bad inputs at the command line ------------------------------------------------------------

def run_cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_unknown_model_offline_says_what_to_change(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for family in ([], ["-S", "model.family=causal_lm"]):
        code, err = run_cli(capsys, "stage", "calibrate", "-p", str(ROOT / "params.yaml"), "-S", f"artifacts={tmp_path}",
                            "-S", "model.id=no-such-org/no-such-model", *family)
        assert code == EXIT_CODE
        assert err.startswith("error: model.id 'no-such-org/no-such-model' not found locally")
        assert "set HF_HUB_OFFLINE=0" in err and "give a local path" in err
        assert err.count("\n") == 1  # one line, no traceback


def test_missing_default_model_points_at_the_prepare_stage(tmp_path, capsys):
    code, err = run_cli(capsys, "stage", "calibrate", "-p", str(ROOT / "params.yaml"), "-S", f"artifacts={tmp_path}",
                        "-S", f"model.id={tmp_path}/prepare/model")
    assert code == EXIT_CODE and "vlmprune stage prepare" in err


def test_missing_upstream_artifact_names_the_stage_to_run(tiny_dual_encoder_dir, tmp_path, capsys):
    params = tiny_params(tiny_dual_encoder_dir, tmp_path / "artifacts")
    code, err = run_cli(capsys, "stage", "prune", "-p", str(write_params(params, tmp_path / "p.yaml")))
    assert code == EXIT_CODE
    assert "allocation.json not found: run the allocate stage first" in err


def test_calibration_file_of_other_size_is_refused(upstream, tmp_path, capsys):
    params = copy_run(upstream, tmp_path / "artifacts")
    code, err = run_cli(capsys, "stage", "prune", "-p", str(write_params(params, tmp_path / "p.yaml")),
                        "-S", "calibration.n_samples=8", "-S", "scoring.n_samples=8")
    assert code == EXIT_CODE
    assert "holds 16 samples but calibration.n_samples is 8: rerun the calibrate stage" in err
    assert not (tmp_path / "artifacts" / "prune").exists()


def test_fewer_samples_than_calibration_asks(tiny_dual_encoder_dir, tmp_path, capsys):
    params = tiny_params(tiny_dual_encoder_dir, tmp_path / "artifacts")
    code, err = run_cli(capsys, "stage", "calibrate", "-p", str(write_params(params, tmp_path / "p.yaml")),
                        "-S", "calibration.n_samples=5000")
    assert code == EXIT_CODE and err.count("\n") == 1  # one line, no traceback
    assert "calibration.n_samples=5000" in err and "lower calibration.n_samples" in err
    assert not (tmp_path / "artifacts" / "calibrate").exists()


def test_corpus_shorter_than_one_window(tmp_path, capsys):
    from tests.tiny import build_tiny_causal_lm, save_tiny

    model_dir = save_tiny(*build_tiny_causal_lm("llama"), tmp_path / "llama")
    text = tmp_path / "short.txt"
    text.write_text("A short corpus. " * 20)
    params = tiny_params(model_dir, tmp_path / "artifacts", model={"family": "causal_lm"},
                         data={"name": "text_file", "path": str(text), "seq_len": 512})
    code, err = run_cli(capsys, "stage", "calibrate", "-p", str(write_params(params, tmp_path / "p.yaml")))
    assert code == EXIT_CODE and "Traceback" not in err and err.splitlines()[-1].startswith("error: ")
    assert "fewer than one window of data.seq_len=512" in err and "lower data.seq_len" in err


def test_target_above_s_max_exits_2_naming_the_field(tmp_path, capsys):
    code, err = run_cli(capsys, "stage", "allocate", "-p", str(ROOT / "params.yaml"), "-S", f"artifacts={tmp_path}",
                        "-S", "pruning.sparsity=0.6", "-S", "allocation.s_max=0.5")
    assert code == 2 and "raise allocation.s_max" in err
    assert not any(tmp_path.iterdir())


def test_second_run_on_the_same_artifacts_fails_fast_naming_the_first(upstream, tmp_path, capsys):
    params = copy_run(upstream, tmp_path / "artifacts")
    path = write_params(params, tmp_path / "p.yaml")
    with run_lock(params.artifacts, "vlmprune run (the first)"):
        code, err = run_cli(capsys, "stage", "prune", "-p", str(path))
    assert code == EXIT_CODE
    assert f"is in use by another run (pid {os.getpid()}" in err and "vlmprune run (the first)" in err
    assert not (tmp_path / "artifacts" / "prune").exists()
    with run_lock(params.artifacts):  # free again once the first run is done
        pass


# ---- concurrent runs ---------------------------------------------------------------------------

@pytest.mark.slow  # no real model, but two fresh Python processes and two MLflow store set-ups: ~60 s on 2 cores
def test_two_concurrent_runs_keep_their_artifacts_and_registered_versions(upstream, tmp_path):
    """Two processes run allocate -> prune -> evaluate -> register at once, with different params and
    artifacts directories, into one fresh SQLite MLflow store (whose creation they race for)."""
    store = f"sqlite:///{tmp_path}/mlflow.db"  # one fresh store for both runs
    runs = []
    for sparsity in (0.3, 0.6):
        params = copy_run(upstream, tmp_path / f"run{sparsity}", pruning={"sparsity": sparsity},
                          tracking={"enabled": True, "uri": store, "model_name": "tiny-concurrent"})
        shutil.rmtree(Path(params.artifacts) / "allocate")
        runs.append((params, write_params(params, tmp_path / f"p{sparsity}.yaml")))
    script = textwrap.dedent("""
        import sys
        from flows.pipeline import TASKS
        from params import load_params
        params = load_params(sys.argv[1])
        for name in ("allocate", "prune", "evaluate", "register"):
            TASKS[name].fn(params)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for _, path in runs]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    records = []
    for params, _ in runs:
        artifacts = Path(params.artifacts)
        metrics = json.loads((artifacts / "evaluate" / "metrics.json").read_text())
        assert metrics["sparsity"]["overall"] == pytest.approx(params.pruning.sparsity, abs=0.01)
        record = json.loads((artifacts / "register" / "registration.json").read_text())
        version = client.get_model_version("tiny-concurrent", str(record["version"]))
        assert version.run_id == record["run_id"]
        assert version.tags["mask_sha256"] == metrics["mask_sha256"]
        run = client.get_run(record["run_id"])
        assert run.data.params["pruning.sparsity"] == str(params.pruning.sparsity)
        records.append(record)
    assert sorted(r["version"] for r in records) == [1, 2]
    assert records[0]["run_id"] != records[1]["run_id"]
    alias = client.get_model_version_by_alias("tiny-concurrent", "candidate")
    assert alias.run_id in {r["run_id"] for r in records}


def test_a_device_this_machine_lacks_is_one_clear_error_naming_the_field():
    from tasks.io import resolve_device
    from vlmprune.errors import ModelError

    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: never there
    with pytest.raises(ModelError, match=r"model.device is 'cuda:\d+' but torch sees .*; use cpu or auto"):
        resolve_device(missing)
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
