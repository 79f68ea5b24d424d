"""SIGTERM during training saves a checkpoint and exits with a distinct code; rerunning resumes there."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARGS = ["run", "--set", "data.limit=300", "--set", "training.max_steps=400", "--set", "training.batch_size=2",
        "--set", "training.save_steps=0", "--limit", "10"]


@pytest.mark.e2e
def test_sigterm_in_training_checkpoints_and_the_rerun_resumes(tmp_path: Path):
    output = tmp_path / "runs"
    command = [sys.executable, "-m", "harness.cli", *ARGS, "--output", str(output)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    deadline = time.time() + 240
    # The Trainer creates its output folder just before training; give it some steps after that.
    while time.time() < deadline and not (output.exists() and list(output.glob("*/checkpoints/sft"))):
        time.sleep(0.2)
    time.sleep(10)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=240)
    assert process.returncode == 75, err[-2000:]
    assert "stopped by SIGTERM after step" in err
    (run_dir,) = output.iterdir()
    checkpoints = list((run_dir / "checkpoints" / "sft").glob("checkpoint-*"))
    assert len(checkpoints) == 1
    saved_step = int(checkpoints[0].name.split("-")[1])
    assert 0 < saved_step < 400
    assert not (run_dir / "record.json").exists()
    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    record = json.loads((run_dir / "record.json").read_text())
    assert record["training"]["sft"]["resumed_from_step"] == saved_step
    assert record["training"]["sft"]["steps"] == 400
