"""perf/train_throughput.py: its statistics, and one real end-to-end run of every configuration on the tiny model."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "perf" / "train_throughput.py"


def _module():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_is_total_tokens_over_total_time_with_a_ratio_standard_error():
    bench = _module()
    rate, stderr = bench.ratio_with_stderr([100, 100, 100], [1.0, 1.0, 1.0])
    assert rate == 100 and stderr == 0
    tokens, seconds = [100, 300, 200, 250], [1.0, 2.0, 2.0, 1.5]
    rate, stderr = bench.ratio_with_stderr(tokens, seconds)
    assert rate == pytest.approx(850 / 6.5)
    residuals = [t - rate * s for t, s in zip(tokens, seconds, strict=True)]
    expected = math.sqrt(sum(r * r for r in residuals) / 3 / 4) / (6.5 / 4)
    assert stderr == pytest.approx(expected)


ALL_CONFIGS = ["core-bf16", "core-fp32", "trl-packing", "trl-padding", "pad512"]


# CI runs the harness's two configurations against TRL's packing (the reference); the padded ones too in
# `make test-extended`.
@pytest.mark.e2e
@pytest.mark.parametrize("configs", [ALL_CONFIGS[:3], pytest.param(ALL_CONFIGS, marks=pytest.mark.extended)])
def test_every_configuration_runs_and_is_reported(tmp_path, harness_cache, configs):
    output = tmp_path / "result.json"
    command = [
        sys.executable, str(SCRIPT), "--model", "tiny", "--model-path", "", "--data", "alpaca-sample",
        "--records", "16", "--steps", "2", "--max-length", "128", "--batch-examples", "4", "--packed-rows", "1",
        "--learning-rate", "1e-3", "--configs", ",".join(configs), "--output", str(output),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(output.read_text())
    summary = result["summary"]
    assert list(summary["configs"]) == configs
    for run in result["runs"]:
        assert run["steps"] == 2 and len(run["loss_curve"]) == 2 and run["real_tokens"] > 0
        assert run["tokens_per_s"] > 0 and run["peak_rss_gib"] > 0
    if "pad512" in configs:  # padded configurations see 4 whole examples per step: the examples' lengths
        assert summary["configs"]["trl-padding"]["real_tokens_per_run"] == summary["configs"]["pad512"]["real_tokens_per_run"]
    assert summary["configs"]["trl-packing"]["vs_trl_packing"] == 1.0
    check = summary["loss_curve_check"]
    assert check["max_abs_difference"] < 0.05 and check["within_tolerance"]
    assert "| core-bf16 |" in completed.stdout and "load after" in completed.stdout


def test_unknown_configuration_is_a_one_line_error():
    completed = subprocess.run([sys.executable, str(SCRIPT), "--configs", "core-bf16,nope"], capture_output=True, text=True,
                               timeout=120, check=False)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1].startswith("error: --configs: unknown 'nope'")
