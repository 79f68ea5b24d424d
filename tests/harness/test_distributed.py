"""Data-parallel training in several processes: `harness run --nproc 2` (accelerate launch, DDP over gloo
on CPU) must train like one process with the same global batch, and write one record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import distributed
from harness.errors import HarnessError
from tests.cli_helpers import run_cli

REPO_ROOT = Path(__file__).resolve().parents[2]
# The only difference between the runs is the order in which the two halves of each global batch are
# summed (and gloo's all-reduce), i.e. rounding. Measured on this test's 8 steps (lr 2e-3):
# - fp32: max |loss difference| 1e-6; weights differ by < 1e-7 almost everywhere, up to ~1e-5 at the
#   few elements whose gradient is near zero (Adam divides by its magnitude), so weights are compared
#   by the size of the difference relative to the size of the update: 2.4e-6.
# - bf16 (pure bf16 weights, fp32 master weights in MasterWeightAdamW, bf16 gradients all-reduced):
#   max |loss difference| 1.4e-4, relative weight difference 1.1e-2 (a quarter of the weights one bf16
#   step apart after the stochastic rounding of slightly different masters).
# Processes that do not synchronise gradients train on half the batch each: the replica check fails
# the run, and rank 0's update differs from the full-batch one by tens of percent.
TOLERANCES = {"fp32": (1e-5, 1e-4), "bf16": (2e-3, 5e-2)}  # (max |loss difference|, relative weight difference)
COMMON = [
    "--recipe", "one-off", "--set", "data.limit=32", "--set", "training.packing=false", "--set", "training.epochs=2",
    "--set", "training.logging_steps=1", "--set", "training.save_steps=0", "--limit", "8",
]  # fmt: skip


def harness_run(args: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    """`harness run ...` in a fresh process on the CPU (both runs alike, also on a machine with a GPU)."""
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", *args], env=environment, capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == expect, done.stderr[-4000:]
    return done


def only_run_dir(output: Path) -> Path:
    records = list(output.rglob("record.json"))
    assert len(records) == 1, records
    return records[0].parent


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "model" / "model.safetensors")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_processes_train_like_one_process_with_the_same_global_batch(tmp_path: Path, precision: str):
    loss_tolerance, weight_tolerance = TOLERANCES[precision]
    common = [*COMMON, "--set", f"training.precision={precision}"]
    one, two = tmp_path / "one", tmp_path / "two"
    harness_run([*common, "--set", "training.batch_size=8", "--output", str(one)])
    launched = harness_run([*common, "--set", "training.batch_size=4", "--nproc", "2", "--output", str(two)])
    assert launched.stdout.count("one-off on tiny") == 1  # one results table: the other process stays quiet

    single_dir, double_dir = only_run_dir(one), only_run_dir(two)  # exactly one record per run
    assert sorted(path.name for path in two.iterdir()) == [double_dir.name]
    single = json.loads((single_dir / "record.json").read_text())
    double = json.loads((double_dir / "record.json").read_text())

    # token counters are summed over the processes: together they saw each row once per epoch
    first, second = single["training"]["sft"], double["training"]["sft"]
    assert (first["processes"], second["processes"]) == (1, 2)
    assert first["precision"] == second["precision"] == precision
    assert second["steps"] == first["steps"] == 8  # 32 rows, 8 per global step, 2 epochs
    assert second["real_tokens"] == first["real_tokens"] == 2 * first["epoch_tokens"]
    assert second["response_tokens"] == first["response_tokens"]
    assert double["cost"]["train_tokens"] == second["real_tokens"]
    assert double["cost"]["device_count"] == 2 and single["cost"]["device_count"] == 1

    # (a) the same loss curve and the same final weights, to float rounding
    steps = [step for step, _ in first["loss_curve"]]
    assert steps == [step for step, _ in second["loss_curve"]] == list(range(1, 9))
    loss_gap = max(abs(a - b) for (_, a), (_, b) in zip(first["loss_curve"], second["loss_curve"], strict=True))
    assert loss_gap < loss_tolerance, loss_gap
    single_weights, double_weights = weights(single_dir), weights(double_dir)
    assert single_weights.keys() == double_weights.keys()
    names = sorted(single_weights)
    difference = torch.cat([(single_weights[name].float() - double_weights[name].float()).flatten() for name in names])
    update = torch.cat(
        [(single_weights[name].float() - weights_of_base(name).to(single_weights[name].dtype).float()).flatten() for name in names]
    )
    relative = float(difference.norm() / update.norm())
    print(f"{precision}: max |loss difference| {loss_gap:.2e}; weights: relative difference {relative:.2e}, "
          f"max |difference| {float(difference.abs().max()):.2e}, max |update| {float(update.abs().max()):.2e}")
    assert relative < weight_tolerance, relative
    # (c) the processes' replicas were bit-identical at the end: the runner checks it after every
    # training stage and fails the run otherwise (test_replicas_that_differ_are_named shows it can)
    assert double["metrics"].keys() == single["metrics"].keys()


def test_an_error_found_by_the_main_process_stops_every_process_in_one_line(tmp_path: Path):
    from harness.runner import prepare_run
    from harness.spec import build_spec

    args = ["--set", "data.limit=16", "--limit", "4", "--output", str(tmp_path)]
    run_dir = tmp_path / prepare_run(build_spec(config_file=None, overrides=["data.limit=16"], flags={"eval.limit": 4})).run_id
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"git_commit": "0" * 40}))  # started by other code: refused
    done = harness_run([*args, "--nproc", "2"], expect=2)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error") or "Error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: run directory {run_dir} was started by harness commit 0000")
    assert "Traceback" not in done.stderr and "terminate called" not in done.stderr
    assert sorted(path.name for path in run_dir.iterdir()) == [".lock", "run.json"]  # nothing written by either


def weights_of_base(name: str) -> torch.Tensor:
    from harness.models import load_model_and_tokenizer, resolve_model

    if not hasattr(weights_of_base, "state"):
        model, _ = load_model_and_tokenizer(resolve_model("tiny"))
        weights_of_base.state = {key: value.detach() for key, value in model.state_dict().items()}  # type: ignore[attr-defined]
    return weights_of_base.state[name]  # type: ignore[attr-defined]


def _replica_check(rank: int, port: int, out: Path, perturb: bool) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2"})
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        if perturb and rank == 1:
            with torch.no_grad():  # one element, one unit in the last place
                model[1].bias[0] = torch.nextafter(model[1].bias[0], torch.tensor(float("inf")))
        counts = distributed.sum_over_processes([rank + 1, 10])
        (out / f"rank{rank}.json").write_text(json.dumps({"out_of_sync": distributed.parameters_out_of_sync(model),
                                                           "counts": counts}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("perturb", [False, True])
def test_replicas_that_differ_are_named(tmp_path: Path, perturb: bool):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_replica_check, args=(port, tmp_path, perturb), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    expected = ["1.bias"] if perturb else []
    assert [result["out_of_sync"] for result in results] == [expected, expected]
    assert [result["counts"] for result in results] == [[3, 20], [3, 20]]


def test_one_process_helpers_are_no_ops():
    assert distributed.from_main({"a": 1}) == {"a": 1}
    assert distributed.sum_over_processes([4, 5]) == [4, 5]
    assert distributed.parameters_out_of_sync(torch.nn.Linear(2, 2)) == []
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(distributed.parameter_fingerprints(a), distributed.parameter_fingerprints(b))
    with torch.no_grad():
        b.weight[2, 1] = torch.nextafter(b.weight[2, 1], torch.tensor(0.0))
    assert not torch.equal(distributed.parameter_fingerprints(a), distributed.parameter_fingerprints(b))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nproc", "2", "--distributed", "fsdp"], "--distributed fsdp: the training core supports DDP only so far"),
        (["--distributed", "zero3"], "--distributed zero3 needs several processes: --nproc N, or --docker"),
        (["--nproc", "2", "--docker"], "--nproc is for runs on this machine; with --docker, --gpus sets"),
    ],
)
def test_unsupported_launches_are_one_line_errors(tmp_path: Path, capsys, args: list[str], message: str):
    code, _, err = run_cli(["run", *args, "--output", str(tmp_path / "runs")], capsys)
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_a_sharded_launch_is_refused_inside_the_job(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(HarnessError, match="--distributed fsdp: the training core supports DDP only"):
        distributed.check_supported()
    monkeypatch.setenv("HARNESS_DIST_TIMEOUT", "soon")
    with pytest.raises(HarnessError, match="HARNESS_DIST_TIMEOUT='soon' is not a whole number"):
        distributed.timeout_seconds()
