from pathlib import Path

import pytest
from pydantic import ValidationError

from harness.errors import HarnessError
from harness.spec import RunSpec, build_spec, parse_override, rerun_argv, write_spec_file


def test_defaults_and_overrides_layer_in_order(tmp_path: Path):
    config = tmp_path / "run.yaml"
    config.write_text("model: tiny\ntraining:\n  epochs: 2\n  learning_rate: 0.001\n")
    spec = build_spec(
        config_file=config, overrides=["training.epochs=3", "training.packing=false"], flags={"seed": 7, "eval.suite": None}
    )
    assert spec.training.epochs == 3.0
    assert spec.training.learning_rate == 1e-3
    assert spec.training.packing is False
    assert spec.seed == 7
    assert spec.eval.suite == "smoke"


def test_scientific_notation_and_type_checking():
    assert build_spec(config_file=None, overrides=["training.learning_rate=1e-4"], flags={}).training.learning_rate == 1e-4
    with pytest.raises(HarnessError, match=r"training.epochs.*valid number"):
        build_spec(config_file=None, overrides=["training.epochs=abc"], flags={})
    with pytest.raises(HarnessError, match=r"training.learning_rate.*greater than 0"):
        build_spec(config_file=None, overrides=["training.learning_rate=-1"], flags={})


def test_unknown_key_suggests_the_closest():
    with pytest.raises(HarnessError, match=r"unknown config key 'training.lerning_rate'; did you mean 'training.learning_rate'"):
        build_spec(config_file=None, overrides=["training.lerning_rate=1e-4"], flags={})


def test_config_file_errors_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [1, 2\n")
    with pytest.raises(HarnessError, match=r"bad.yaml: line \d+: invalid YAML"):
        build_spec(config_file=bad, overrides=[], flags={})
    with pytest.raises(HarnessError, match="config file not found"):
        build_spec(config_file=tmp_path / "missing.yaml", overrides=[], flags={})


def test_hash_is_stable_and_changes_with_any_value():
    first = RunSpec()
    assert first.content_hash() == RunSpec().content_hash()
    changed = build_spec(config_file=None, overrides=["training.epochs=2"], flags={})
    assert changed.run_id() != first.run_id()
    assert first.run_id().startswith("one-off-tiny-")


def test_spec_is_frozen():
    with pytest.raises(ValidationError):
        RunSpec().seed = 3  # type: ignore[misc]


def test_parse_override_requires_key_value():
    with pytest.raises(HarnessError, match="expected key=value"):
        parse_override("training.epochs")
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}


def test_a_written_spec_file_rebuilds_the_same_spec_and_run_id(tmp_path: Path):
    """Docker and --nproc re-run `harness run --config <spec file>`: the started processes must run the spec
    the host validated, with its run id, whatever flags, --set and config file built it."""
    config = tmp_path / "run.yaml"
    config.write_text("recipe: ifd\nparams:\n  select_fraction: 0.2\ntraining:\n  epochs: 2\n")
    spec = build_spec(
        config_file=config,
        overrides=["training.learning_rate=3e-5", "eval.limit=7"],
        flags={"model": "tiny", "seed": 4, "eval.online": True, "data.name": "alpaca-sample"},
    )
    path = write_spec_file(spec, tmp_path / "runs")
    assert path.parent == tmp_path / "runs" / ".specs"  # hidden: the leaderboard skips it
    rebuilt = build_spec(config_file=path, overrides=[], flags={})
    assert rebuilt == spec and rebuilt.run_id() == spec.run_id()
    assert rebuilt.params == {"select_fraction": 0.2} and rebuilt.seed == 4 and rebuilt.eval.online is True
    assert rerun_argv(str(path), "/runs") == ["run", "--config", str(path), "--output", "/runs"]
    assert write_spec_file(spec, tmp_path / "runs") == path  # equal specs share one file
