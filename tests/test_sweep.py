"""`harness sweep`: a grid validated up front (one bad point: one line, nothing started); on a real two-node
Ray cluster on this machine the grid's runs give the records `harness run` gives, a worker node killed
(SIGKILL, every process of it) while a run trains there costs a retry that resumes from the run's
checkpoint, and rerunning the finished sweep starts nothing; the runs' trackers (TensorBoard) hold the loss
curve and the final metrics under the run's tags.

Sizes are the smallest that still train and checkpoint several times: 16 records, 4 epochs of batches of 2
(32 optimizer steps, a checkpoint every 4), 4 ARC-Easy items."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.cli_helpers import run_cli, without

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--set", "data.limit=16", "--set", "training.packing=false", "--set", "training.batch_size=2",
    "--set", "training.epochs=4", "--set", "training.save_steps=4", "--set", "training.logging_steps=1",
    "--limit", "4",
]  # fmt: skip
GRID = ["--recipe", "one-off", "--recipe", "ifd", "--seeds", "0,1"]
TRACKED = importlib.util.find_spec("tensorboard") is not None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def processes_of(*marks: str) -> list[psutil.Process]:
    """Every process of the Ray node(s) whose command line holds one of the marks (a node's temp dir), and
    their children (the raylet's workers, and the `harness run` each task started)."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if any(mark in cmdline for mark in marks):
            found[process.pid] = process
            try:
                found |= {child.pid: child for child in process.children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
    return list(found.values())


def kill_all(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)


class Cluster:
    """A Ray head and one worker node on this machine, each with one CPU and a temp dir of its own."""

    def __init__(self) -> None:
        self.ray = Path(sys.executable).with_name("ray")
        self.root = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths must stay short
        self.head_dir, self.worker_dir = self.root / "head", self.root / "worker"
        self.replacement_dir = self.root / "replacement"
        self.address = f"127.0.0.1:{free_port()}"
        self.client_port = free_port()  # the head's Ray client server, known by this port
        # the head notices a lost node after ~3 s instead of the default ~30 s
        self.env = {**os.environ, "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                    "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip

    def start(self, *args: str) -> str | None:
        """`ray start ARGS`; None, or the reason it failed."""
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--object-store-memory=80000000", "--disable-usage-stats",
                  f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]  # fmt: skip
        try:
            started = subprocess.run([str(self.ray), "start", *args, *common], capture_output=True, text=True,
                                     env=self.env, timeout=180)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as error:
            return str(error)
        lines = [line for line in (started.stdout + started.stderr).splitlines() if line.strip()]
        return None if started.returncode == 0 else (lines[-1] if lines else f"exit {started.returncode}")

    def start_head(self) -> str | None:
        return self.start("--head", f"--port={self.address.split(':')[1]}", "--include-dashboard=false",
                          f"--ray-client-server-port={self.client_port}", f"--temp-dir={self.head_dir}")  # fmt: skip

    def start_worker(self, temp_dir: Path | None = None) -> str | None:
        return self.start(f"--address={self.address}", f"--temp-dir={temp_dir or self.worker_dir}")

    def kill_worker(self) -> None:
        kill_all(processes_of(str(self.worker_dir)))

    def stop(self) -> None:
        """Only this cluster's processes (not `ray stop`, which stops every Ray on the machine); the head's
        client server names its port instead of the temp dir."""
        client_server = f"--port={self.client_port} --mode=proxy"
        kill_all(processes_of(str(self.worker_dir), str(self.replacement_dir), str(self.head_dir), client_server))
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def ray_cluster() -> Iterator[Cluster]:
    if importlib.util.find_spec("ray") is None:
        pytest.skip('Ray is not installed (pip install "sft-recipe-harness[ray]")')
    cluster = Cluster()
    try:
        problem = cluster.start_head() or cluster.start_worker()
        if problem:
            pytest.skip(f"Ray cannot start a local cluster here: {problem}")
        yield cluster
    finally:
        cluster.stop()


def records(output: Path) -> dict[str, dict]:
    return {path.parent.name: json.loads(path.read_text()) for path in output.glob("*/record.json")}


def sweep_process(output: Path, address: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "sweep", "--engine", "ray", "--address", address, *GRID, *SMALL,
         *(["--set", "training.report_to=tensorboard"] if TRACKED else []), "--output", str(output), "--max-retries", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO_ROOT,
    )  # fmt: skip


def run_training_on(worker_dir: Path) -> tuple[str, Path] | None:
    """The run id and config of the `harness run` a task started on the worker node, if one runs there."""
    for process in processes_of(str(worker_dir)):
        try:
            cmdline = process.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "harness.cli" in cmdline and "--config" in cmdline:
            config = Path(cmdline[cmdline.index("--config") + 1])
            return config.stem, config
    return None


@pytest.mark.e2e
def test_sweep_on_two_ray_nodes_matches_harness_run_and_survives_a_killed_node(ray_cluster: Cluster, tmp_path: Path, capsys):
    output = tmp_path / "sweep"
    sweep = sweep_process(output, ray_cluster.address)
    # Kill the worker node (every process of it) once the run it trains has saved its first checkpoint.
    killed_run, deadline = None, time.monotonic() + 240
    while killed_run is None and sweep.poll() is None and time.monotonic() < deadline:
        found = run_training_on(ray_cluster.worker_dir)
        stage = output / found[0] / "checkpoints" / "sft" if found else None
        if stage and any(stage.glob("checkpoint-*/trainer_state.json")) and not (stage / "done.json").exists():
            ray_cluster.kill_worker()
            killed_run = found[0]
        time.sleep(0.05)
    assert killed_run is not None, "no run trained on the worker node"
    killed_at = time.monotonic()
    assert ray_cluster.start_worker(ray_cluster.replacement_dir) is None  # a new node replaces it (a spot instance)
    out, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, out[-4000:]
    progress = [line for line in out.splitlines() if line.startswith(("sweep ", "one-off-", "ifd-"))]
    with capsys.disabled():
        print(f"\nkilled the worker node while {killed_run} trained there; the sweep finished "
              f"{time.monotonic() - killed_at:.0f} s later\n" + "\n".join(progress))

    # Four records, each with the metrics `harness run` gives for the same point on this machine.
    swept = records(output)
    assert len(swept) == 4
    assert {(record["recipe"]["name"], record["seed"]) for record in swept.values()} == {
        ("one-off", 0), ("one-off", 1), ("ifd", 0), ("ifd", 1)
    }
    reference_dir = tmp_path / "reference"
    for record in swept.values():
        code, _, err = run_cli(["run", "--recipe", record["recipe"]["name"], "--seed", str(record["seed"]), *SMALL,
                                "--output", str(reference_dir)], capsys)  # fmt: skip
        assert code == 0, err[-2000:]
    reference = records(reference_dir)
    assert set(reference) == set(swept)  # the same run ids
    for run_id, record in swept.items():
        for task, metrics in reference[run_id]["metrics"].items():
            assert without(record["metrics"][task], "seconds") == without(metrics, "seconds"), run_id
        # the same steps and losses up to float rounding: a Ray task has one CPU thread (OMP_NUM_THREADS=1)
        curve, expected = record["training"]["sft"]["loss_curve"], reference[run_id]["training"]["sft"]["loss_curve"]
        assert [step for step, _ in curve] == [step for step, _ in expected], run_id
        assert [loss for _, loss in curve] == pytest.approx([loss for _, loss in expected], rel=1e-5), run_id

    # The killed run: a second attempt resumed from the checkpoint, the others ran once.
    resumed = swept[killed_run]["resume"]
    assert resumed["attempts"] == 2, resumed
    assert resumed["training"]["sft"]["resumed_from_step"] >= 4 and not resumed["training"]["sft"]["reused"]
    assert all(record["resume"]["attempts"] == 1 for run_id, record in swept.items() if run_id != killed_run)
    assert f"{killed_run}: running on" in out and "(retried: attempt 2)" in out
    assert "4 done, 0 failed, 0 skipped (already done), 1 retried" in out
    (sweep_dir,) = (output / ".sweeps").iterdir()  # every run is tagged with the sweep in its tracker
    assert not TRACKED or {tensorboard_tags(output / run_id / "tensorboard" / "sft")["sweep"] for run_id in swept} == {sweep_dir.name}

    # Rerunning the finished sweep starts no task: with the cluster gone it never needs it.
    ray_cluster.stop()
    logs = {path: path.read_text() for path in output.glob(".sweeps/*/*.log")}
    code, stdout, err = run_cli(["sweep", "--engine", "ray", "--address", ray_cluster.address, *GRID, *SMALL,
                                 "--output", str(output)], capsys)  # fmt: skip
    assert code == 0, err
    assert "every run is done (4 runs" in err and "no task started" in err
    assert {path: path.read_text() for path in output.glob(".sweeps/*/*.log")} == logs
    assert killed_run.split("-tiny-")[0] in stdout  # the sweep's leaderboard


def test_a_bad_grid_point_stops_the_sweep_before_anything_starts(tmp_path: Path, capsys):
    output = tmp_path / "sweep"
    code, out, err = run_cli(["sweep", "--recipe", "one-off", "--recipe", "one-of", "--output", str(output)], capsys)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == ["error: grid point (recipe one-of): unknown recipe 'one-of'; did you mean 'one-off'?"]
    if importlib.util.find_spec("ray") is not None:  # the grid is checked before Ray is contacted (no cluster here)
        code, _, err = run_cli(["sweep", "--engine", "ray", "--address", f"127.0.0.1:{free_port()}", "--recipe",
                                "one-of", "--output", str(output)], capsys)  # fmt: skip
        assert code == 2 and err.strip().splitlines() == ["error: grid point (recipe one-of): unknown recipe 'one-of'; did you mean 'one-off'?"]  # noqa: E501
    grid = tmp_path / "grid.yaml"
    grid.write_text("- training.learning_rate: 1.0e-4\n- training.learning_rat: 1.0e-3\n")
    code, out, err = run_cli(["sweep", "--grid", str(grid), "--seeds", "2", "--output", str(output)], capsys)
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("error: grid point (seed 0 grid training.learning_rat=0.001): ")
    assert "unknown config key 'training.learning_rat'; did you mean 'training.learning_rate'?" in line
    assert not output.exists()
    code, _, err = run_cli(["sweep", "--grid", str(tmp_path / "none.yaml"), "--seeds", "0,x"], capsys)
    assert code == 2 and err.strip() == "error: --seeds '0,x': expected a count (3 -> 0,1,2) or a list like 0,1,2"


def tensorboard_tags(log_dir: Path) -> dict[str, str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return json.loads(EventAccumulator(str(log_dir)).Reload().Tensors("tags/text_summary")[0].tensor_proto.string_val[0])


@pytest.mark.e2e
def test_tracking_with_tensorboard_holds_the_loss_curve_and_metrics_under_the_run_tags(tmp_path: Path, capsys, monkeypatch):
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("HARNESS_SWEEP_ID", "sweep-test")  # what a sweep's task sets for its run
    output = tmp_path / "runs"
    code, _, err = run_cli(["run", "--seed", "1", *SMALL, "--set", "training.report_to=tensorboard",
                            "--output", str(output)], capsys)  # fmt: skip
    assert code == 0, err[-3000:]
    (record_path,) = output.glob("*/record.json")
    record, run_dir = json.loads(record_path.read_text()), record_path.parent
    assert "report_to" not in record["spec"]["training"]  # an observer: not part of the run id

    train = EventAccumulator(str(run_dir / "tensorboard" / "sft")).Reload()
    curve = [(event.step, event.value) for event in train.Scalars("train/loss")]
    assert [step for step, _ in curve] == [step for step, _ in record["training"]["sft"]["loss_curve"]]
    assert [value for _, value in curve] == pytest.approx([loss for _, loss in record["training"]["sft"]["loss_curve"]])
    tags = {"run_id": record["run_id"], "recipe": "one-off", "model": "tiny", "seed": "1", "sweep": "sweep-test"}
    assert tensorboard_tags(run_dir / "tensorboard" / "sft") == tags
    assert tensorboard_tags(run_dir / "tensorboard" / "eval") == tags

    final = EventAccumulator(str(run_dir / "tensorboard" / "eval")).Reload()
    for metric in ("acc", "acc_norm"):
        (event,) = final.Scalars(f"eval/local_arc_easy/{metric}")
        assert event.value == pytest.approx(record["metrics"]["local_arc_easy"][metric]["value"])
    hparams = EventAccumulator(str(run_dir / "tensorboard" / "eval" / "hparams")).Reload()
    assert hparams.Scalars("eval/local_arc_easy/acc")[0].value == pytest.approx(record["metrics"]["local_arc_easy"]["acc"]["value"])

    code, _, err = run_cli(["run", "--seed", "1", *SMALL, "--set", "training.report_to=wandb", "--output", str(output)], capsys)
    if importlib.util.find_spec("wandb") is None:  # a tracker that is not installed: one line, before any work
        assert code == 2 and err.strip() == (
            "error: training.report_to wandb: the wandb package is not installed; pip install wandb, "
            "or set training.report_to=none"
        )
