"""The process's device and compute dtype, decided in one place.

On a GPU box every model the harness loads for a pass that does not train (IFD and difficulty scoring,
SFTMix's confidence pass, judges, the pairwise base model) goes to this process's GPU (`cuda:LOCAL_RANK`)
in bf16: IFD over 52k Alpaca records with an 8B model is about 4e17 FLOP, days on a host CPU and minutes
on one H100. A GPU box whose GPUs torch cannot see (a CPU-only torch wheel, a container started without
`--gpus`, a driver/runtime mismatch) would otherwise train on the host for days without a word: `harness
run` stops there with one line (`HARNESS_ALLOW_CPU=1` runs on the CPU on purpose).

The decisions are plain functions of what is visible (`Visible`), so CPU tests cover them.
"""

from __future__ import annotations

import glob
import os
import shutil
from dataclasses import dataclass

import torch

from harness.errors import HarnessError


@dataclass(frozen=True)
class Visible:
    """What this process can see: torch's view of CUDA, and whether the machine has NVIDIA GPUs at all."""

    torch_cuda: bool  # torch.cuda.is_available()
    device_count: int
    bf16: bool  # the visible GPUs compute in bf16 (Ampere or newer)
    nvidia_gpus: bool  # device nodes or the driver's GPU list say the machine has NVIDIA GPUs
    cuda_visible_devices: str | None  # the environment's CUDA_VISIBLE_DEVICES ("" hides every GPU)


def visible() -> Visible:
    """Look once: torch's CUDA state and the machine's NVIDIA devices (/dev/nvidia0, the driver's list)."""
    cuda = torch.cuda.is_available()
    nvidia = bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/proc/driver/nvidia/gpus/*"))
    return Visible(
        torch_cuda=cuda,
        device_count=torch.cuda.device_count() if cuda else 0,
        bf16=bool(cuda and torch.cuda.is_bf16_supported()),
        nvidia_gpus=nvidia or (shutil.which("nvidia-smi") is not None and not cuda and _driver_lists_gpus()),
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )


def _driver_lists_gpus() -> bool:
    import subprocess

    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return listed.returncode == 0 and "GPU " in listed.stdout


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def process_device(seen: Visible | None = None, rank: int | None = None) -> torch.device:
    """`cuda:LOCAL_RANK` when torch sees a GPU (one GPU per process, as torchrun/accelerate assign them),
    else the CPU."""
    seen = seen or visible()
    if not seen.torch_cuda or seen.device_count == 0:
        return torch.device("cpu")
    index = local_rank() if rank is None else rank
    if index >= seen.device_count:
        raise HarnessError(
            f"LOCAL_RANK {index} but only {seen.device_count} GPU(s) are visible: start at most one process per GPU"
        )
    return torch.device("cuda", index)


def inference_dtype(device: torch.device, seen: Visible | None = None) -> torch.dtype:
    """The dtype of passes that do not train (scoring, judging, generation): bf16 on a GPU that has it
    (fp16 on older ones), fp32 on the CPU, where the harness keeps its fp32 reference numbers."""
    if device.type != "cuda":
        return torch.float32
    seen = seen or visible()
    return torch.bfloat16 if seen.bf16 else torch.float16


def gpus_hidden_problem(seen: Visible, allow_cpu: bool) -> str | None:
    """Why running here would silently fall back to the CPU on a GPU machine, or None.

    Hiding every GPU on purpose (CUDA_VISIBLE_DEVICES="") or HARNESS_ALLOW_CPU=1 are fine."""
    if seen.torch_cuda or not seen.nvidia_gpus or allow_cpu or seen.cuda_visible_devices == "":
        return None
    build = torch.version.cuda
    why = (
        "this torch is a CPU-only build (install the CUDA wheel: pip install torch without the CPU index)"
        if build is None
        else f"torch was built for CUDA {build} but cannot reach a GPU (driver too old, or the container lacks --gpus)"
    )
    return (
        f"this machine has NVIDIA GPUs but torch sees none: {why}; "
        "set HARNESS_ALLOW_CPU=1 to run on the CPU on purpose"
    )


def check_gpus_visible(seen: Visible | None = None) -> None:
    """Stop with one line where a GPU box would train on its host CPU (see `gpus_hidden_problem`)."""
    problem = gpus_hidden_problem(seen or visible(), allow_cpu=os.environ.get("HARNESS_ALLOW_CPU", "") not in ("", "0"))
    if problem:
        raise HarnessError(problem)


def to_process_device(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Move a model that does not train to this process's device (and dtype, when given). On the CPU this
    is the identity, so CPU numbers do not change."""
    device = process_device()
    if device.type == "cpu" and dtype is None:
        return model
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def process_inference_dtype() -> torch.dtype:
    """The dtype of models this process loads only to score, judge or generate (see `inference_dtype`)."""
    return inference_dtype(process_device())
