"""Device and dtype decisions as functions of what the process can see (harness/accelerator.py)."""

from __future__ import annotations

import pytest
import torch

from harness.accelerator import Visible, gpus_hidden_problem, inference_dtype, process_device
from harness.errors import HarnessError

CPU_BOX = Visible(torch_cuda=False, device_count=0, bf16=False, nvidia_gpus=False, cuda_visible_devices=None)
GPU_BOX_BLIND_TORCH = Visible(torch_cuda=False, device_count=0, bf16=False, nvidia_gpus=True, cuda_visible_devices=None)
H100_X8 = Visible(torch_cuda=True, device_count=8, bf16=True, nvidia_gpus=True, cuda_visible_devices=None)
V100 = Visible(torch_cuda=True, device_count=1, bf16=False, nvidia_gpus=True, cuda_visible_devices=None)


def test_each_process_gets_its_local_rank_gpu_and_the_cpu_without_one():
    assert process_device(CPU_BOX) == torch.device("cpu")
    assert process_device(H100_X8, rank=0) == torch.device("cuda", 0)
    assert process_device(H100_X8, rank=5) == torch.device("cuda", 5)
    with pytest.raises(HarnessError, match="LOCAL_RANK 8 but only 8 GPU"):
        process_device(H100_X8, rank=8)


def test_passes_that_do_not_train_run_in_bf16_on_gpus_and_fp32_on_the_cpu():
    assert inference_dtype(torch.device("cpu"), CPU_BOX) == torch.float32
    assert inference_dtype(torch.device("cuda", 0), H100_X8) == torch.bfloat16
    assert inference_dtype(torch.device("cuda", 0), V100) == torch.float16  # no bf16 before Ampere


def test_a_gpu_box_whose_gpus_torch_cannot_see_is_refused_in_one_line():
    problem = gpus_hidden_problem(GPU_BOX_BLIND_TORCH, allow_cpu=False)
    assert problem is not None and "\n" not in problem
    assert "NVIDIA GPUs but torch sees none" in problem and "HARNESS_ALLOW_CPU=1" in problem
    # on purpose: the override, or every GPU hidden with CUDA_VISIBLE_DEVICES=""
    assert gpus_hidden_problem(GPU_BOX_BLIND_TORCH, allow_cpu=True) is None
    hidden = Visible(False, 0, False, True, "")
    assert gpus_hidden_problem(hidden, allow_cpu=False) is None
    assert gpus_hidden_problem(CPU_BOX, allow_cpu=False) is None
    assert gpus_hidden_problem(H100_X8, allow_cpu=False) is None


def test_harness_run_stops_before_any_work_where_torch_misses_the_gpus(tmp_path, monkeypatch, capsys):
    """The same check `harness run` uses, fed a GPU box whose torch cannot see its GPUs."""
    from harness import accelerator
    from tests.cli_helpers import run_cli

    monkeypatch.setattr(accelerator, "visible", lambda: GPU_BOX_BLIND_TORCH)  # what the machine would report
    monkeypatch.delenv("HARNESS_ALLOW_CPU", raising=False)
    code, _, err = run_cli(["run", "--recipe", "one-off", "--suite", "smoke", "--output", str(tmp_path / "runs")], capsys)
    assert code != 0 and "NVIDIA GPUs but torch sees none" in err and "Traceback" not in err
    assert not any((tmp_path / "runs").glob("*/record.json"))


def test_lora_keeps_its_frozen_base_in_bf16_on_a_gpu_and_nothing_changes_on_the_cpu():
    from harness.spec import TrainingSpec
    from harness.training import base_weight_dtype

    lora = TrainingSpec(precision="bf16-mixed", lora={"r": 16})
    assert base_weight_dtype(lora, "cuda") == torch.bfloat16
    assert base_weight_dtype(lora, "cpu") == torch.float32  # the CPU path as before
    assert base_weight_dtype(TrainingSpec(precision="bf16-mixed"), "cuda") == torch.float32  # full FT: fp32 weights
    assert base_weight_dtype(TrainingSpec(precision="bf16"), "cpu") == torch.bfloat16
