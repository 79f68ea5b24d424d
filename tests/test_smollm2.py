"""The real small model: SmolLM2-135M-Instruct from the GGUF in ../shared trains a few steps and evaluates."""

import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.cpu_kernels import native_bf16
from tests.conftest import require_smollm2


@pytest.mark.slow
def test_one_off_on_smollm2_from_gguf(tmp_path: Path, capsys):
    """bf16 training where the CPU has bf16 units; fp32 where it would only emulate bf16 (a step of this run
    took 217 s in emulated bf16 on a 2-core AVX2 machine: the test would outlast CI)."""
    gguf = require_smollm2()
    precision = "bf16" if native_bf16() else "fp32"
    output = tmp_path / "runs"
    args = [
        "run", "--recipe", "one-off", "--model", "smollm2-135m-instruct", "--output", str(output), "--limit", "20",
        "--set", f"model_path={gguf}", "--set", "data.limit=48", "--set", "training.max_steps=4",
        "--set", "training.batch_size=2", "--set", f"training.precision={precision}", "--set", "training.logging_steps=1",
        "--set", "training.learning_rate=1e-4",
    ]
    with pytest.raises(SystemExit) as exited:
        main(args)
        raise SystemExit(0)
    assert (exited.value.code or 0) == 0, capsys.readouterr().err
    (run_dir,) = output.iterdir()
    record = json.loads((run_dir / "record.json").read_text())
    assert record["model"]["name"] == "smollm2-135m-instruct" and record["model"]["weights"] == str(gguf)
    training = record["training"]["sft"]
    assert training["steps"] == 4 and training["precision"] == precision
    assert all(loss == loss and 0 < loss < 10 for _, loss in training["loss_curve"])  # finite, sane
    accuracy = record["metrics"]["local_arc_easy"]["acc"]
    assert accuracy["stderr"] > 0 and record["metrics"]["local_arc_easy"]["n"] == 20
