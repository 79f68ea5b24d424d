"""Several training processes (one per GPU; gloo processes on CPU) under `accelerate launch` or torchrun.

The launcher sets RANK / WORLD_SIZE / LOCAL_RANK. Every process runs the recipe (training needs all
of them); only the main process (rank 0) writes the run directory, saves the model, evaluates and
writes the record, and the others wait for it and return the same record. With one process every
helper here is a no-op, so the single-process path is unchanged.

Two ways to train: DDP (every process holds the whole model) and FSDP2 (accelerate's FSDP plugin:
parameters, gradients and optimizer state sharded over the processes; accelerate launch --use_fsdp, or
docker/accelerate/fsdp.yaml, sets ACCELERATE_USE_FSDP and the FSDP_* settings in every process). After
a sharded stage every process gets the whole trained model back (unsharded_model), since the runner
saves and evaluates it and recipes score or train further with it.

Waiting ranks block in a collective while rank 0 evaluates, which can take long on big suites: the
process group's timeout is HARNESS_DIST_TIMEOUT seconds (default 6 h; torch's default is 30 min).
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from harness.compat import model_from_config
from harness.errors import HarnessError

T = TypeVar("T")
DEFAULT_TIMEOUT_SECONDS = 6 * 3600
UNSUPPORTED_BACKENDS = {"ACCELERATE_USE_DEEPSPEED": "zero3"}  # set by accelerate launch
# `harness run --nproc N --distributed fsdp`: accelerate launch's FSDP settings, the same as
# docker/accelerate/fsdp.yaml's fsdp_config (a test keeps them equal). Each decoder layer is one FSDP unit.
FSDP_LAUNCH_SETTINGS = {
    "fsdp_version": "2",
    "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "fsdp_reshard_after_forward": "true",
    "fsdp_cpu_ram_efficient_loading": "false",
    "fsdp_offload_params": "false",
    "fsdp_activation_checkpointing": "true",
    "fsdp_state_dict_type": "FULL_STATE_DICT",
}


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


FSDP_LORA_UNSUPPORTED = (
    "training.lora with --distributed fsdp is not supported yet (gathering a sharded adapter model is not "
    "written): LoRA trains few parameters, so use --distributed ddp (the frozen base is replicated), or full "
    "fine-tuning with fsdp"
)


def unsupported_message(name: str) -> str:
    """ZeRO-3 shards the parameters through DeepSpeed's engine, which the training core does not drive
    (saving, gathering for evaluation, the bf16 master weights): refused in one line rather than run
    wrong. FSDP2 shards the same way and is supported."""
    return (
        f"--distributed {name}: DeepSpeed ZeRO-3 is not supported by the training core; for sharded training "
        "use --distributed fsdp (FSDP2: parameters, gradients and optimizer state sharded), or --distributed ddp"
    )


def _flag(variable: str, default: str = "false") -> bool:
    return os.environ.get(variable, default).strip().lower() in ("true", "1", "yes")


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (accelerate launch --use_fsdp / a config with distributed_type FSDP)."""
    return _flag("ACCELERATE_USE_FSDP")


def backend() -> str:
    """How this job trains: "fsdp" (sharded), "ddp" (replicated), or "single" (one process). Recorded."""
    if world_size() <= 1:
        return "single"
    return "fsdp" if fsdp_requested() else "ddp"


def check_supported() -> None:
    """Refuse, in one line, launch settings the training core cannot run correctly."""
    for variable, name in UNSUPPORTED_BACKENDS.items():
        if _flag(variable):
            raise HarnessError(unsupported_message(name))
    if not fsdp_requested():
        return
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise HarnessError(
            f"FSDP_VERSION={version} (accelerate's fsdp_version): the training core runs FSDP2 only; "
            "set fsdp_version: 2 in the accelerate config (as docker/accelerate/fsdp.yaml) or pass --fsdp_version 2"
        )
    if _flag("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        # transformers then loads real weights on the first process only (the others get empty tensors),
        # but recipes run scoring passes and load finished stages on every process
        raise HarnessError(
            "FSDP_CPU_RAM_EFFICIENT_LOADING=true (accelerate's fsdp_cpu_ram_efficient_loading): every process needs "
            "the whole base model (recipes score with it on each process); set fsdp_cpu_ram_efficient_loading: false"
        )


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


@contextlib.contextmanager
def forward_replaced(module: torch.nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """Inside the block `module.forward` is `forward`, so calling the module (or a wrapper around it: DDP,
    FSDP's root) runs the wrapper's and the module's hooks around code that calls the decoder and the
    head itself. The module's own forward (or one set on the instance, e.g. by accelerate) comes back after."""
    previous = module.__dict__.get("forward")
    module.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous  # type: ignore[method-assign]


def inside_forward(model: torch.nn.Module, compute: Callable[[], T]) -> T:
    """`compute()` run as the model's forward: FSDP2's hooks on the root module gather the root's own
    parameters (embeddings, final norm, tied LM head) before it and reshard them after. Code that calls a
    sharded model's decoder and head itself (the scorers) goes through here."""
    with forward_replaced(model, compute):
        return model()


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model is sharded by FSDP2 (fully_shard, directly or through accelerate)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_parameter_share(model: torch.nn.Module) -> float:
    """Elements of the parameters this process holds over the model's elements: 1 when replicated (DDP,
    one process), about 1/processes when sharded (FSDP2 splits each tensor along its first dimension)."""
    from torch.distributed.tensor import DTensor

    total = held = 0
    for parameter in model.parameters():
        total += parameter.numel()
        held += parameter.to_local().numel() if isinstance(parameter, DTensor) else parameter.numel()
    return held / total if total else 1.0


def _replicated_parameters(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the parameters every process holds whole: all of them under DDP; under FSDP2
    only those left unsharded (a sharded parameter is a DTensor whose local shard differs per process)."""
    from torch.distributed.tensor import DTensor, Replicate

    kept = []
    for name, parameter in model.named_parameters():
        if isinstance(parameter, DTensor):
            if not all(isinstance(placement, Replicate) for placement in parameter.placements):
                continue
            parameter = parameter.to_local()
        kept.append((name, parameter))
    return kept


def parameter_fingerprints(model: torch.nn.Module) -> torch.Tensor:
    """One exact integer checksum per parameter: the int64 sum of its elements' raw bits (as integers of
    the element's width), so changing any element changes it. No overflow below 2^32 elements."""
    sums = []
    for _, parameter in _replicated_parameters(model):
        flat = parameter.detach().contiguous().view(-1)
        bits = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
        sums.append(bits.sum(dtype=torch.int64))
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.int64)


def parameters_out_of_sync(model: torch.nn.Module) -> list[str]:
    """Names of the parameters whose bits differ between processes (empty with one process).

    Data-parallel replicas must stay bit-identical; a difference means gradients were not synchronised.
    Sharded (FSDP) parameters differ by design and are skipped: after a sharded stage the check runs on
    the unsharded model every process got back (unsharded_model), which must then be identical."""
    if not active():
        return []
    local = parameter_fingerprints(model).to(_device())
    highest, lowest = local.clone(), local.clone()
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    names = [name for name, _ in _replicated_parameters(model)]
    return [names[index] for index in (highest != lowest).nonzero().flatten().tolist()]


def unsharded_model(model: Any, dtype: torch.dtype) -> Any:
    """A plain (unsharded) copy of an FSDP2-sharded transformers model on every process, with weights in
    `dtype`, for saving, evaluation and the recipe's next steps. Every process must call it.

    The sharded parameters are all-gathered one tensor at a time and cast to `dtype` at once, so the
    device holds the whole model in `dtype` plus one full tensor, never the whole model in fp32 (bf16
    training keeps fp32 shards: gathering everything first would need three times the bf16 size). The
    tensors become the parameters of a model of the same class and config built on the meta device (no
    second, randomly initialised copy); buffers, which FSDP does not shard, are copied."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    full: dict[str, torch.Tensor] = {}
    gathered: dict[int, torch.Tensor] = {}  # tied parameters (embedding and LM head) are gathered once
    for name, tensor in model.state_dict().items():
        if id(tensor) not in gathered:
            whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            gathered[id(tensor)] = whole.detach().to(dtype) if whole.is_floating_point() else whole.detach()
            del whole
        full[name] = gathered[id(tensor)]
    plain_class = next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))
    with torch.device("meta"):
        fresh = model_from_config(plain_class, copy.deepcopy(model.config), dtype=dtype)
    missing, unexpected = fresh.load_state_dict(full, strict=False, assign=True)
    for name, buffer in model.named_buffers():  # e.g. RoPE's inv_freq (not in the state dict)
        if name not in full:
            owner, _, leaf = name.rpartition(".")
            setattr(fresh.get_submodule(owner), leaf, buffer.detach().clone())
    fresh.tie_weights()  # a tied LM head shares the embedding again
    left = [name for name, tensor in [*fresh.named_parameters(), *fresh.named_buffers()] if tensor.is_meta]
    if unexpected or left:
        raise HarnessError(
            f"gathering the sharded model: unexpected {sorted(unexpected)[:3]}, not loaded {left[:3]} (missing {missing[:3]}); "
            "this is a harness bug, please report it"
        )
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh
