"""The CLI end to end on the tiny model: a real run, determinism, listings, and one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_helpers import run_cli

FAST = ["--set", "data.limit=160", "--limit", "40"]


@pytest.mark.e2e
def test_run_writes_a_complete_record_and_is_deterministic(tmp_path: Path, capsys):
    records = []
    for output in (tmp_path / "first", tmp_path / "second"):
        code, out, err = run_cli(["run", "--recipe", "one-off", "--output", str(output), *FAST], capsys)
        assert code == 0, err
        assert "local_arc_easy" in out and "acc" in out
        (run_dir,) = output.iterdir()
        assert (run_dir / "spec.yaml").is_file() and (run_dir / "eval" / "samples_local_arc_easy.jsonl").is_file()
        records.append(json.loads((run_dir / "record.json").read_text()))
    first, second = records
    assert first["run_id"] == second["run_id"]
    assert first["metrics"] == {**second["metrics"], **{k: {**v, "seconds": first["metrics"][k]["seconds"]} for k, v in second["metrics"].items()}}  # noqa: E501
    assert first["training"]["sft"]["loss_curve"] == second["training"]["sft"]["loss_curve"]
    accuracy = first["metrics"]["local_arc_easy"]["acc"]
    assert 0.0 <= accuracy["value"] <= 1.0 and accuracy["stderr"] > 0
    for key in ("spec", "timings", "cost", "memory", "versions", "git_commit", "seed", "data", "model"):
        assert key in first, key
    assert first["cost"]["train_tokens"] > 0 and first["memory"]["peak_rss_gib"] > 0
    assert first["spec"]["training"]["learning_rate"] == 2e-3  # resolved from the model set
    # A finished run is not redone.
    code, _, err = run_cli(["run", "--output", str(tmp_path / "first"), *FAST], capsys)
    assert code == 0 and "already complete" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--recipe", "one-of"], "unknown recipe 'one-of'; did you mean 'one-off'?"),
        (["run", "--model", "tiniy"], "unknown model 'tiniy'; did you mean 'tiny'?"),
        (["run", "--suite", "smok"], "unknown suite 'smok'; did you mean 'smoke'?"),
        (["run", "--set", "training.epoch=2"], "unknown config key 'training.epoch'; did you mean 'training.epochs'?"),
        (["run", "--set", "training.batch_size=big"], "config key 'training.batch_size' = \"big\""),
        (["run", "--data", "/nonexistent/data.json"], "data file not found: /nonexistent/data.json"),
        (["run", "--config", "/nonexistent/run.yaml"], "config file not found"),
        (["run", "--set", "params.foo=1"], "unknown config key 'params.foo'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, capsys, args, message):
    output = tmp_path / "runs"
    code, _, err = run_cli([*args, "--output", str(output)] if args[0] == "run" else args, capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("error: ")
    assert message in err
    assert "Traceback" not in err
    assert not output.exists() or not any(output.iterdir())


def test_malformed_data_file_is_rejected_before_any_run_dir(tmp_path: Path, capsys):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": 5, "output": "b"}\n')
    output = tmp_path / "runs"
    code, _, err = run_cli(["run", "--data", str(data), "--output", str(output)], capsys)
    assert code == 2
    assert f"data file {data}: line 2: field 'instruction' must be a string, got int" in err
    assert not output.exists()


def test_listings_and_version(capsys):
    for command, expected in (["models"], "smollm2-135m-instruct"), (["recipes"], "one-off"), (["suites"], "smoke"):
        code, out, _ = run_cli(command, capsys)
        assert code == 0 and expected in out
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and "0.1.0" in out


def test_console_script_reports_errors_without_traceback(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", "--set", "training.learning_rate=-1", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --set training.learning_rate=-1: config key 'training.learning_rate' = -1: input should be greater than 0"
    )


def test_alpaca_eval_metrics_reproduces_the_official_win_rate():
    """`harness alpaca-eval metrics` on an official annotations file (README table in ../shared)."""
    from click.testing import CliRunner

    from harness.cli import cli
    from tests.conftest import SHARED

    path = SHARED / "data/alpaca_eval/annotated/alpaca-7b/weighted_alpaca_eval_gpt4_turbo_annotations.json"
    result = CliRunner().invoke(cli, ["alpaca-eval", "metrics", str(path), "--json", "--bootstrap", "0"])
    if not path.is_file():
        pytest.skip("../shared is absent")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert abs(summary["win_rate"] - 2.5915) < 1e-3 and abs(summary["standard_error"] - 0.4871) < 1e-3
    assert summary["n_total"] == 805 and summary["length_controlled_winrate"] is not None
    assert set(summary) >= {"win_rate", "standard_error", "discrete_win_rate", "length_controlled_winrate", "n_total"}


def test_alpaca_eval_metrics_bad_file_is_one_line(tmp_path):
    bad = tmp_path / "annotations.json"
    bad.write_text('[{"instruction": "x"}]')
    for path, expected in [(bad, "entry 0 has no 'preference'"), (tmp_path / "missing.json", "no such file")]:
        result = subprocess.run([sys.executable, "-m", "harness.cli", "alpaca-eval", "metrics", str(path)],
                                capture_output=True, text=True)
        assert result.returncode == 2
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_dry_run_prints_the_resolved_spec_and_writes_nothing(tmp_path: Path, capsys):
    """--dry-run: the spec with the model set's defaults and the recipe's params filled in, as YAML."""
    import yaml

    output = tmp_path / "runs"
    code, out, err = run_cli(["run", "--recipe", "phased", "--set", "training.epochs=2", "--dry-run", "--output", str(output)], capsys)
    assert code == 0, err
    spec = yaml.safe_load(out)
    assert spec["training"]["learning_rate"] == 2e-3 and spec["training"]["template"] == "chat"  # the tiny model's
    assert spec["training"]["epochs"] == 2.0 and spec["params"]["thresholds"] == [1.5, 3.5]  # recipe defaults filled in
    assert not output.exists()
    code, out, _ = run_cli(["run", "--recipe", "all", "--dry-run"], capsys)
    assert code == 0 and [doc["recipe"] for doc in yaml.safe_load_all(out)] == ["one-off", "phased", "ifd", "sftmix", "unifit"]
    code, _, err = run_cli(["run", "--recipe", "phased", "--set", "params.thresholds=[4, 2]", "--dry-run"], capsys)
    assert code == 2 and "params.thresholds" in err and "Traceback" not in err
