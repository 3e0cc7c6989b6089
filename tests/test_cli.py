"""The ``vlmprune`` command line: validation errors, exit codes, the scheduled deployment."""

from __future__ import annotations

from pathlib import Path

from flows.cli import deployment, main

ROOT = Path(__file__).resolve().parents[1]


def test_validate_ok(capsys):
    assert main(["validate", "-p", str(ROOT / "params.yaml")]) == 0
    assert "pruning:" in capsys.readouterr().out


def test_validate_bad_value_exits_2_naming_the_field(capsys):
    code = main(["validate", "-p", str(ROOT / "params.yaml"), "-S", "pruning.sparsity=1.5"])
    assert code == 2
    assert "pruning.sparsity = 1.5" in capsys.readouterr().err


def test_stage_refuses_bad_params_before_work(tmp_path, capsys):
    code = main(["stage", "prune", "-p", str(ROOT / "params.yaml"), "-S", "pruning.method=obs",
                 "-S", f"artifacts={tmp_path}"])
    assert code == 2
    assert "pruning.method 'obs' is not one of: magnitude, sparsegpt, wanda" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_deployment_has_the_cron_schedule():
    d = deployment("nightly", "0 3 * * *", "params.yaml", ["pruning.sparsity=0.6"])
    assert d.name == "nightly"
    assert d.schedules[0].schedule.cron == "0 3 * * *"
    assert d.parameters == {"params_path": "params.yaml", "overrides": ["pruning.sparsity=0.6"]}


def test_every_pipeline_stage_is_a_cli_stage():
    from flows.cli import STAGE_NAMES
    from flows.pipeline import STAGES

    assert STAGE_NAMES == STAGES
