"""Training in several processes: `harness run --nproc 2` (accelerate launch over gloo on CPU), replicated
(DDP) or sharded (`--distributed fsdp`: FSDP2 through accelerate's plugin), must train like one process
with the same global batch, and write one record; a killed sharded run resumes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import distributed
from harness.errors import HarnessError
from harness.runner import prepare_run
from harness.spec import build_spec
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
# FSDP (2 processes, fully sharded, activation checkpointing as in docker/accelerate/fsdp.yaml, so the
# padded attention path) against one process, measured on the same 8 steps:
# - fp32: max |loss difference| 9.5e-7, relative weight difference 1.0e-5 (rounding: the padded attention
#   path and the reduce-scatter sum in other orders than one process does).
# - bf16: one process keeps pure bf16 weights (fp32 masters in MasterWeightAdamW, stochastic rounding);
#   FSDP keeps fp32 sharded weights and casts them to bf16 for compute (MixedPrecisionPolicy, gradients
#   reduced in fp32): two rounding schemes, max |loss difference| 5.3e-4, relative weight difference 3.2e-2.
FSDP_TOLERANCES = {"fp32": (1e-5, 1e-4), "bf16": (2e-3, 6e-2)}
COMMON = [
    "--recipe", "one-off", "--set", "data.limit=32", "--set", "training.packing=false", "--set", "training.epochs=2",
    "--set", "training.logging_steps=1", "--set", "training.save_steps=0", "--limit", "8",
]  # fmt: skip


def harness_run(args: list[str], expect: int = 0, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """`harness run ...` in a fresh process on the CPU (both runs alike, also on a machine with a GPU);
    with `kill_at`, every process SIGKILLs itself there (harness.interrupts.kill_point_for_tests)."""
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    environment.pop("HARNESS_TEST_KILL_AT", None)
    if kill_at is not None:
        environment["HARNESS_TEST_KILL_AT"] = kill_at
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", *args], env=environment, capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == expect, done.stderr[-4000:]
    return done


def visible_entries(output: Path) -> list[str]:
    """What a run left in its output folder, less the hidden `.specs/` (the spec file the processes ran)."""
    return sorted(path.name for path in output.iterdir() if not path.name.startswith("."))


def only_run_dir(output: Path) -> Path:
    records = list(output.rglob("record.json"))
    assert len(records) == 1, records
    return records[0].parent


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    """The one-process reference run for a precision (computed once per module, shared by DDP and FSDP)."""
    done: dict[str, Path] = {}

    def run(precision: str) -> Path:
        if precision not in done:
            output = tmp_path_factory.mktemp(f"one-{precision}")
            harness_run([*COMMON, "--set", f"training.precision={precision}", "--set", "training.batch_size=8",
                         "--output", str(output)])  # fmt: skip
            done[precision] = only_run_dir(output)
        return done[precision]

    return run


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """`--nproc 2 --distributed fsdp` with the global batch of the one-process run (once per precision)."""
    done: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}

    def run(precision: str) -> tuple[Path, subprocess.CompletedProcess]:
        if precision not in done:
            output = tmp_path_factory.mktemp(f"fsdp-{precision}")
            launched = harness_run([*COMMON, "--set", f"training.precision={precision}", "--set", "training.batch_size=4",
                                    "--nproc", "2", "--distributed", "fsdp", "--output", str(output)])  # fmt: skip
            assert visible_entries(output) == [only_run_dir(output).name]  # exactly one record
            done[precision] = only_run_dir(output), launched
        return done[precision]

    return run


def compare_with_one_process(single_dir: Path, double_dir: Path, precision: str, tolerances: tuple[float, float]) -> None:
    """The two-process run trained like the one-process run: same token counts, steps, loss curve and
    final weights up to `tolerances` (max |loss difference|, weight difference relative to the update)."""
    loss_tolerance, weight_tolerance = tolerances
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

    # the same loss curve and the same final weights, to float rounding
    steps = [step for step, _ in first["loss_curve"]]
    assert steps == [step for step, _ in second["loss_curve"]] == list(range(1, 9))
    loss_gap = max(abs(a - b) for (_, a), (_, b) in zip(first["loss_curve"], second["loss_curve"], strict=True))
    assert loss_gap < loss_tolerance, loss_gap
    single_weights, double_weights = weights(single_dir), weights(double_dir)
    assert single_weights.keys() == double_weights.keys()
    names = sorted(single_weights)
    assert all(single_weights[name].dtype == double_weights[name].dtype for name in names)  # the run's weight dtype
    difference = torch.cat([(single_weights[name].float() - double_weights[name].float()).flatten() for name in names])
    update = torch.cat(
        [(single_weights[name].float() - weights_of_base(name).to(single_weights[name].dtype).float()).flatten() for name in names]
    )
    relative = float(difference.norm() / update.norm())
    print(f"{second['distributed']} {precision}: max |loss difference| {loss_gap:.2e}; weights: relative difference "
          f"{relative:.2e}, max |difference| {float(difference.abs().max()):.2e}, max |update| {float(update.abs().max()):.2e}")
    assert relative < weight_tolerance, relative
    assert double["metrics"].keys() == single["metrics"].keys()


@pytest.mark.e2e
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.extended)])
def test_two_processes_train_like_one_process_with_the_same_global_batch(tmp_path: Path, precision: str, single_process_run):
    two = tmp_path / "two"
    launched = harness_run([*COMMON, "--set", f"training.precision={precision}", "--set", "training.batch_size=4",
                            "--nproc", "2", "--output", str(two)])  # fmt: skip
    assert launched.stdout.count("one-off on tiny") == 1  # one results table: the other process stays quiet
    double_dir = only_run_dir(two)  # exactly one record
    assert visible_entries(two) == [double_dir.name]
    (spec_file,) = (two / ".specs").iterdir()  # what each process ran: `harness run --config <spec file>`
    assert prepare_run(build_spec(config_file=spec_file, overrides=[], flags={})).run_id == double_dir.name
    compare_with_one_process(single_process_run(precision), double_dir, precision, TOLERANCES[precision])
    second = json.loads((double_dir / "record.json").read_text())["training"]["sft"]
    assert (second["distributed"], second["parameter_share"]) == ("ddp", 1.0)  # every process held the whole model
    # the processes' replicas were bit-identical at the end: the runner checks it after every
    # training stage and fails the run otherwise (test_replicas_that_differ_are_named shows it can)


@pytest.mark.e2e
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.extended)])
def test_sharded_training_trains_like_one_process_with_the_same_global_batch(precision: str, single_process_run, fsdp_run):
    double_dir, launched = fsdp_run(precision)
    assert launched.stdout.count("one-off on tiny") == 1
    assert "2 processes (fsdp)" in launched.stderr
    compare_with_one_process(single_process_run(precision), double_dir, precision, FSDP_TOLERANCES[precision])
    second = json.loads((double_dir / "record.json").read_text())["training"]["sft"]
    # the sharding happened: while training, the main process held half of the parameters' elements
    # (every tensor of the tiny model splits evenly over 2 processes)
    assert second["distributed"] == "fsdp" and second["parameter_share"] == 0.5


@pytest.mark.e2e
def test_a_killed_sharded_run_resumes_from_its_checkpoint(tmp_path: Path, fsdp_run):
    """SIGKILL right after the FSDP checkpoint at step 3 (accelerate saves the full weights and optimizer
    state), then the same command: training resumes at step 3 and ends with the uninterrupted run's weights."""
    args = [*COMMON, "--set", "training.precision=fp32", "--set", "training.batch_size=4", "--nproc", "2",
            "--distributed", "fsdp", "--set", "training.save_steps=3", "--output", str(tmp_path)]  # fmt: skip
    killed = harness_run(args, expect=137, kill_at="train/sft:3")
    assert "exited with 137" in killed.stderr
    (run_name,) = visible_entries(tmp_path)
    run_dir = tmp_path / run_name
    assert not (run_dir / "record.json").exists()
    checkpoint = run_dir / "checkpoints" / "sft" / "checkpoint-3"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file() and (checkpoint / "optimizer.bin").is_file()
    assert not list(checkpoint.glob("*.safetensors"))  # the weights once, not again as model.safetensors

    harness_run(args)
    record = json.loads((run_dir / "record.json").read_text())
    reference_dir, _ = fsdp_run("fp32")  # the same training without checkpoints or a kill
    reference = json.loads((reference_dir / "record.json").read_text())
    resumed, fresh = record["training"]["sft"], reference["training"]["sft"]
    assert record["resume"]["attempts"] == 2
    assert (resumed["resumed_from_step"], resumed["steps_run"], resumed["steps"]) == (3, 5, 8)
    assert resumed["loss_curve"] == fresh["loss_curve"] and resumed["mean_loss"] == pytest.approx(fresh["mean_loss"], rel=1e-9)
    # the token counters of both processes survive the kill (the checkpoint keeps their sums)
    assert (resumed["real_tokens"], resumed["response_tokens"]) == (fresh["real_tokens"], fresh["response_tokens"])
    resumed_weights, fresh_weights = weights(run_dir), weights(reference_dir)
    assert all(torch.equal(resumed_weights[name], fresh_weights[name]) for name in fresh_weights)


@pytest.mark.e2e
def test_an_error_found_by_the_main_process_stops_every_process_in_one_line(tmp_path: Path):
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


@pytest.mark.e2e
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


def _sharded_check(rank: int, port: int, out: Path) -> None:
    """fully_shard the tiny model over 2 gloo processes (per decoder layer, then the root) and report what
    the helpers see."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2"})
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.distributed.fsdp import fully_shard

        from harness.models import load_model_and_tokenizer, resolve_model

        model, _ = load_model_and_tokenizer(resolve_model("tiny"))
        original = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        result = {
            "sharded": distributed.is_sharded(model),
            "share": distributed.local_parameter_share(model),
            "out_of_sync": distributed.parameters_out_of_sync(model),  # shards differ by design: not reported
        }
        for dtype in (torch.float32, torch.bfloat16):
            plain = distributed.unsharded_model(model, dtype)
            state = plain.state_dict()
            result[str(dtype)] = {
                "sharded": distributed.is_sharded(plain),
                "class": type(plain).__name__,
                "exact": all(torch.equal(state[name], original[name].to(dtype) if original[name].is_floating_point()
                                         else original[name]) for name in original),  # fmt: skip
                "dtypes": sorted({str(parameter.dtype) for parameter in plain.parameters()}),
                "tied": plain.lm_head.weight is plain.model.embed_tokens.weight,
                "trainable": all(parameter.requires_grad for parameter in plain.parameters()),  # a next stage trains it
                "inv_freq": torch.equal(plain.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq),
                "out_of_sync": distributed.parameters_out_of_sync(plain),
            }
        (out / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.e2e
def test_a_sharded_model_is_seen_as_sharded_and_gathered_whole_on_every_process(tmp_path: Path):
    import socket

    from harness.models import build_tiny_model

    build_tiny_model()  # once, before two processes would race to build it
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_sharded_check, args=(port, tmp_path), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["sharded"] and result["out_of_sync"] == []
        assert result["share"] == pytest.approx(0.5, abs=1e-9)  # each process holds half of every tensor
        for dtype in ("torch.float32", "torch.bfloat16"):
            plain = result[dtype]
            assert plain == {"sharded": False, "class": "LlamaForCausalLM", "exact": True, "dtypes": [dtype],
                             "tied": True, "trainable": True, "inv_freq": True, "out_of_sync": []}, (rank, dtype)  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (["--distributed", "fsdp"], "--distributed fsdp needs several processes: --nproc N, or --docker"),
        (["--nproc", "2", "--distributed", "zero3"], "--distributed zero3: DeepSpeed ZeRO-3 is not supported by the training core; for sharded training use --distributed fsdp"),  # noqa: E501
        (["--distributed", "zero3"], "--distributed zero3 needs several processes: --nproc N, or --docker"),
        (["--nproc", "2", "--docker"], "--nproc is for runs on this machine; with --docker, --gpus sets"),
        (["--nproc", "2", "--distributed", "fsdp", "--set", "training.lora={r: 4}"], "training.lora with --distributed fsdp is not supported yet"),  # noqa: E501
    ],
)
def test_unsupported_launches_are_one_line_errors(tmp_path: Path, capsys, args: list[str], message: str):
    code, _, err = run_cli(["run", *args, "--output", str(tmp_path / "runs")], capsys)
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "--distributed zero3: DeepSpeed ZeRO-3 is not supported"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP_VERSION=1 (accelerate's fsdp_version): the training core runs FSDP2 only"),  # noqa: E501
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"},
         "FSDP_CPU_RAM_EFFICIENT_LOADING=true (accelerate's fsdp_cpu_ram_efficient_loading): every process needs"),
    ],
)
def test_launch_settings_the_core_cannot_run_are_refused_inside_the_job(monkeypatch, variables: dict[str, str], message: str):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(HarnessError) as refused:
        distributed.check_supported()
    assert str(refused.value).startswith(message)


def test_fsdp_launch_settings_are_accepted_inside_the_job_and_recorded(monkeypatch):
    for key, value in distributed.FSDP_LAUNCH_SETTINGS.items():  # what accelerate launch sets from them
        monkeypatch.setenv(key.upper(), value)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    distributed.check_supported()
    assert distributed.backend() == "single"  # one process: nothing to shard
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.backend() == "fsdp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert distributed.backend() == "ddp"
    monkeypatch.setenv("HARNESS_DIST_TIMEOUT", "soon")
    with pytest.raises(HarnessError, match="HARNESS_DIST_TIMEOUT='soon' is not a whole number"):
        distributed.timeout_seconds()


def test_a_checkpoint_of_the_other_backend_is_a_one_line_error(tmp_path: Path):
    from harness.training import check_checkpoint_backend

    sharded, replicated = tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3"
    sharded.mkdir(parents=True)
    replicated.mkdir(parents=True)
    (sharded / "pytorch_model_fsdp.bin").write_bytes(b"")
    (replicated / "model.safetensors").write_bytes(b"")
    check_checkpoint_backend(sharded, sharded=True)
    check_checkpoint_backend(replicated, sharded=False)
    check_checkpoint_backend(None, sharded=True)
    with pytest.raises(HarnessError, match=f"checkpoint {sharded} was saved by a run --distributed fsdp; this run is without it"):
        check_checkpoint_backend(sharded, sharded=False)
    with pytest.raises(HarnessError, match=f"or delete {replicated.parent} to train that stage again"):
        check_checkpoint_backend(replicated, sharded=True)


@pytest.mark.e2e
def test_sftmix_scores_its_sharded_reference_on_every_process(tmp_path: Path, monkeypatch):
    """SFTMix's confidence passes run during the reference's FSDP training: every process must join every
    forward of the sharded model (before, the passes were dealt out and the run crashed on 2 processes)."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))  # the reference trains here, not from a cache
    harness_run(["--recipe", "sftmix", "--set", "data.limit=24", "--set", "training.batch_size=2", "--limit", "4",
                 "--nproc", "2", "--distributed", "fsdp", "--output", str(tmp_path / "runs")])  # fmt: skip
    record = json.loads((only_run_dir(tmp_path / "runs") / "record.json").read_text())
    assert record["training"]["reference"]["distributed"] == "fsdp"
    dynamics = record["recipe"]["dynamics"]  # 2 reference steps: confidences at both, computed (not cached)
    assert dynamics["checkpoint_steps"] == [1, 2] and dynamics["cached"] is False and dynamics["scoring_forward_tokens"] > 0
    confidences = json.loads((only_run_dir(tmp_path / "runs") / "artifacts" / "sftmix_confidence.json").read_text())
    assert len(confidences) == 24 and all(math.isfinite(c["confidence"]) for c in confidences)
