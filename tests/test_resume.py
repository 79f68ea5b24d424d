"""Kill -9 during scoring, during training (after a checkpoint) and during evaluation; rerunning the same
command finishes the run with the metrics and weights of an uninterrupted run, and the record's
`resume` counters show the rerun did less work than starting over. Also: another config value into the
same output directory is a new run, and a directory of another run is never reused.

The kills come from the process itself (HARNESS_TEST_KILL_AT=<stage>:<unit>, harness.interrupts),
right after a given unit of work is saved: polling from outside races a loaded 2-core machine. Each
scenario gets a private HARNESS_CACHE (sharing only the built tiny model), so scores cached by other
tests or scenarios cannot hide the work.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_helpers import load_run, run_cli, without

REPO_ROOT = Path(__file__).resolve().parents[1]
# Phased IFT with the IFD scorer: 300 records -> up to 600 scored sequences in 2 chunks of the scoring
# engine (512 + the rest), then three training stages (a checkpoint every 3 steps), then ARC-Easy on 30
# items (about 120 log-likelihood requests). The uninterrupted run and the reruns run in this process.
ARGS = [
    "run", "--recipe", "phased", "--set", "params.scorer=ifd", "--set", "data.limit=300",
    "--set", "training.batch_size=4", "--set", "training.save_steps=3", "--set", "training.logging_steps=1",
    "--limit", "30",
]  # fmt: skip
KILLS = {"scoring": "scoring:1", "training": "train/stage2:3", "evaluation": "eval/local_arc_easy:60"}


def private_cache(tmp_path: Path, name: str) -> Path:
    """An empty artifact cache that shares the session's built tiny model."""
    from harness.models import build_tiny_model

    models = build_tiny_model().parent
    cache = tmp_path / f"cache-{name}"
    cache.mkdir()
    (cache / "models").symlink_to(models, target_is_directory=True)
    return cache


def killed_run(output: Path, cache: Path, kill_at: str) -> subprocess.CompletedProcess:
    """`harness run` in a process of its own that SIGKILLs itself at `kill_at`."""
    env = {**os.environ, "HARNESS_CACHE": str(cache), "PYTHONPATH": str(REPO_ROOT), "OMP_WAIT_POLICY": "PASSIVE",
           "HARNESS_TEST_KILL_AT": kill_at}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *ARGS, "--output", str(output)],
        capture_output=True, text=True, env=env, timeout=600, cwd=REPO_ROOT,
    )  # fmt: skip


def run_in_process(output: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> tuple[int, str]:
    """The same command in this process (saves a process start per run; the kills need their own)."""
    monkeypatch.setenv("HARNESS_CACHE", str(cache))
    monkeypatch.delenv("HARNESS_TEST_KILL_AT", raising=False)
    code, _, err = run_cli([*ARGS, "--output", str(output)], capsys)
    return code, err


def weights_digest(run_dir: Path) -> str:
    from harness.artifacts import file_digest

    return file_digest(run_dir / "model" / "model.safetensors")


@pytest.mark.e2e
def test_sigkill_at_each_stage_then_rerun_matches_an_uninterrupted_run_with_less_work(tmp_path: Path, monkeypatch, capsys):
    code, err = run_in_process(tmp_path / "fresh", private_cache(tmp_path, "fresh"), monkeypatch, capsys)
    assert code == 0, err[-3000:]
    fresh_dir, reference = load_run(tmp_path / "fresh")
    work = reference["resume"]
    with capsys.disabled():
        print("\nfresh run:", json.dumps(work))
    assert work["attempts"] == 1
    sequences = work["scoring"]["sequences_computed"]
    assert sequences > 512 and work["scoring"]["sequences_cached"] == 0  # two chunks: the kill lands after the first
    assert all(not stage["reused"] and stage["resumed_from_step"] == 0 for stage in work["training"].values())
    assert work["training"]["stage2"]["steps_run"] > 3  # the training kill below lands mid-stage
    requests = work["evaluation"]["requests_computed"]
    assert requests > 60 and work["evaluation"] == {"tasks_computed": 1, "tasks_reused": 0, "requests_computed": requests, "requests_cached": 0}  # noqa: E501
    fresh_steps = sum(stage["steps_run"] for stage in work["training"].values())

    for scenario, kill_at in KILLS.items():
        output, cache = tmp_path / scenario, private_cache(tmp_path, scenario)
        killed = killed_run(output, cache, kill_at)
        assert killed.returncode == -signal.SIGKILL, f"{scenario}: not killed at {kill_at}: {killed.stderr[-2000:]}"
        (run_dir,) = output.iterdir()
        assert not (run_dir / "record.json").exists()
        code, err = run_in_process(output, cache, monkeypatch, capsys)
        assert code == 0, err[-3000:]
        run_dir, record = load_run(output)
        assert run_dir.name == fresh_dir.name
        # The same results as the uninterrupted run: metrics, weights, per-example results, training.
        for task, metrics in reference["metrics"].items():
            assert without(record["metrics"][task], "seconds") == without(metrics, "seconds"), scenario
        assert weights_digest(run_dir) == weights_digest(fresh_dir), scenario
        assert (run_dir / "eval" / "samples_local_arc_easy.jsonl").read_text() == (
            fresh_dir / "eval" / "samples_local_arc_easy.jsonl"
        ).read_text()
        for stage, result in reference["training"].items():
            resumed = record["training"][stage]
            assert without(resumed, "wall_seconds", "resumed_from_step", "steps_run", "mean_loss") == without(
                result, "wall_seconds", "resumed_from_step", "steps_run", "mean_loss"
            ), (scenario, stage)
            assert resumed["mean_loss"] == pytest.approx(result["mean_loss"], rel=1e-9)
        assert record["cost"]["train_tokens"] == reference["cost"]["train_tokens"]
        assert record["recipe"]["stages"] == reference["recipe"]["stages"]

        # Less work than starting over, by the counters of the attempt that finished the run.
        counters = record["resume"]
        with capsys.disabled():
            print(f"{scenario} rerun:", json.dumps(counters))
        assert counters["attempts"] == 2
        steps = sum(stage["steps_run"] for stage in counters["training"].values())
        evaluation = counters["evaluation"]
        if scenario == "scoring":  # the first chunk (512 sequences) came from its partial cache
            assert counters["scoring"] == {"sequences_computed": sequences - 512, "sequences_cached": 512}
            assert steps == fresh_steps
        elif scenario == "training":  # stage 1 finished: loaded; stage 2 resumed at its checkpoint
            assert counters["scoring"] == {"sequences_computed": 0, "sequences_cached": sequences}
            assert counters["training"]["stage1"] == {"reused": True, "steps_run": 0, "resumed_from_step": work["training"]["stage1"]["steps_run"]}  # noqa: E501
            assert counters["training"]["stage2"]["resumed_from_step"] == 3 and not counters["training"]["stage2"]["reused"]
            assert counters["training"]["stage3"]["resumed_from_step"] == 0
            assert steps == fresh_steps - work["training"]["stage1"]["steps_run"] - 3
        else:  # every stage loaded; ARC-Easy replayed the 60 requests done before the kill
            assert counters["scoring"]["sequences_computed"] == 0
            assert all(stage["reused"] for stage in counters["training"].values()) and steps == 0
            assert evaluation["tasks_computed"] == 1 and evaluation["requests_cached"] >= 60
            assert evaluation["requests_computed"] + evaluation["requests_cached"] == requests
        # lm-eval's request cache is per run directory; every finished task's result is kept.
        assert (run_dir / "eval" / "result_local_arc_easy.json").is_file()


@pytest.mark.e2e
def test_a_changed_config_value_is_a_new_run_and_a_foreign_directory_is_refused(tmp_path: Path, capsys):
    output = tmp_path / "runs"
    args = ["run", "--set", "data.limit=40", "--limit", "10", "--output", str(output)]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    (first_dir,) = output.iterdir()
    first = json.loads((first_dir / "record.json").read_text())
    code, _, err = run_cli([*args, "--set", "training.learning_rate=1e-3"], capsys)
    assert code == 0, err
    second_dir = next(path for path in output.iterdir() if path != first_dir)
    second = json.loads((second_dir / "record.json").read_text())
    assert second["run_id"] != first["run_id"] and second["resume"]["attempts"] == 1
    assert json.loads((first_dir / "record.json").read_text()) == first  # the first run is untouched
    assert second["spec"]["training"]["learning_rate"] == 1e-3 and first["spec"]["training"]["learning_rate"] == 2e-3

    # A damaged record is not trusted: its content hash fails, and the run is finished again from its
    # saved stages (no retraining) with the same results.
    (second_dir / "record.json").write_text(json.dumps({**second, "metrics": {}}))
    code, _, err = run_cli([*args, "--set", "training.learning_rate=1e-3"], capsys)
    assert code == 0 and "damaged" in err
    healed = json.loads((second_dir / "record.json").read_text())
    assert healed["metrics"] == {k: {**v, "seconds": healed["metrics"][k]["seconds"]} for k, v in second["metrics"].items()}
    assert healed["resume"]["attempts"] == 2 and healed["resume"]["training"]["sft"]["reused"]

    # A run directory copied under another run's name is refused, not silently reused.
    shutil.rmtree(second_dir)
    shutil.copytree(first_dir, second_dir)
    (second_dir / "record.json").unlink()
    code, _, err = run_cli([*args, "--set", "training.learning_rate=1e-3"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"was started for run {first['run_id']}, not {second_dir.name}" in err
