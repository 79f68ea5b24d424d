"""Several training processes (one per GPU; gloo processes on CPU) under `accelerate launch` or torchrun.

The launcher sets RANK / WORLD_SIZE / LOCAL_RANK. Every process runs the recipe (training needs all
of them); only the main process (rank 0) writes the run directory, saves the model, evaluates and
writes the record, and the others wait for it and return the same record. With one process every
helper here is a no-op, so the single-process path is unchanged.

Waiting ranks block in a collective while rank 0 evaluates, which can take long on big suites: the
process group's timeout is HARNESS_DIST_TIMEOUT seconds (default 6 h; torch's default is 30 min).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

from harness.errors import HarnessError

T = TypeVar("T")
DEFAULT_TIMEOUT_SECONDS = 6 * 3600
UNSUPPORTED_BACKENDS = {"ACCELERATE_USE_FSDP": "fsdp", "ACCELERATE_USE_DEEPSPEED": "zero3"}  # set by accelerate launch


def world_size() -> int:
    """Processes in the job: the process group's size once it exists, else the launcher's WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    """True in a job of several processes (after init())."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def timeout_seconds() -> int:
    value = os.environ.get("HARNESS_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_SECONDS))
    try:
        seconds = int(value)
    except ValueError:
        raise HarnessError(f"HARNESS_DIST_TIMEOUT={value!r} is not a whole number of seconds") from None
    if seconds <= 0:
        raise HarnessError(f"HARNESS_DIST_TIMEOUT={value!r} must be positive")
    return seconds


def unsupported_message(name: str) -> str:
    """FSDP and ZeRO-3 shard the parameters: saving, evaluating and the bf16 master-weight optimizer
    (MasterWeightAdamW keeps a full fp32 copy of every parameter) would all need sharding-aware code
    that the core does not have yet, so they are refused in one line rather than run wrong."""
    return (
        f"--distributed {name}: the training core supports DDP only so far (sharded parameters would need "
        "sharding-aware saving, evaluation and master weights); use --distributed ddp"
    )


def check_supported() -> None:
    for variable, name in UNSUPPORTED_BACKENDS.items():
        if os.environ.get(variable, "false").lower() == "true":
            raise HarnessError(unsupported_message(name))


def init() -> None:
    """Join the launcher's process group (accelerate's PartialState, so that Trainer reuses it) with the
    harness's timeout. No-op for one process or when the group exists already."""
    if world_size() <= 1 or dist.is_initialized():
        return
    check_supported()
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available(), timeout=dt.timedelta(seconds=timeout_seconds()))


def _device() -> torch.device:
    """Where collective tensors live: NCCL needs them on this process's GPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def from_main(value: T) -> T:
    """Rank 0's `value` on every process (picklable objects); returns `value` itself with one process."""
    if not active():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0, device=_device())
    return box[0]  # type: ignore[return-value]


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first, then the others: shared caches (the tiny model's build,
    a GGUF conversion, hub downloads) are filled once instead of by every process at the same time.
    Every process must enter it."""
    if active() and not is_main():
        dist.barrier()
    yield
    if active() and is_main():
        dist.barrier()


def gather(value: T) -> list[T]:
    """Every process's `value` (picklable), in rank order; `[value]` with one process."""
    if not active():
        return [value]
    gathered: list[T | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered  # type: ignore[return-value]


def sum_over_processes(values: list[int]) -> list[int]:
    """Element-wise sum of integer counters over all processes (exact: int64)."""
    if not active():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [int(value) for value in tensor.tolist()]


def parameter_fingerprints(model: torch.nn.Module) -> torch.Tensor:
    """One exact integer checksum per parameter: the int64 sum of its elements' raw bits (as integers of
    the element's width), so changing any element changes it. No overflow below 2^32 elements."""
    sums = []
    for parameter in model.parameters():
        flat = parameter.detach().contiguous().view(-1)
        bits = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
        sums.append(bits.sum(dtype=torch.int64))
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.int64)


def parameters_out_of_sync(model: torch.nn.Module) -> list[str]:
    """Names of the parameters whose bits differ between processes (empty with one process).

    Data-parallel replicas must stay bit-identical; a difference means gradients were not synchronised."""
    if not active():
        return []
    local = parameter_fingerprints(model).to(_device())
    highest, lowest = local.clone(), local.clone()
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    names = [name for name, _ in model.named_parameters()]
    return [names[index] for index in (highest != lowest).nonzero().flatten().tolist()]

