"""A pre-flight memory estimate: will this training configuration fit, before any weight is loaded?

Full fine-tuning of a 7-8B model needs about 16 bytes per parameter before activations (weights,
gradients, two AdamW moments, and an fp32 master copy where the weights are bf16): about 120 GiB for 8B,
more than one 80 GB GPU, and the harness would find out only after loading the weights and failing
minutes later. The estimate counts, per process:

- weights: parameters x bytes of the weight dtype (LoRA: the frozen base at that dtype too);
- gradients, optimizer and master weights over the *trainable* parameters (all of them, or LoRA's);
  divided across processes under FSDP (FULL_SHARD shards all three and the weights);
- activations saved for the backward pass, per token and layer, counted tensor by tensor as Korthikanti
  et al. 2022 do for GPT blocks ("Reducing Activation Recomputation in Large Transformer Models", sec. 4.1:
  34 s b h bytes in 16-bit) but for a Llama block: the two RMSNorms' inputs and outputs (4 h), q and k
  before and after the rotary embedding and v (2 h + 3 kv), the attention output (h), the residual (h),
  and the gated MLP's gate, up, activation and product (4 i): (8 h + 3 kv + 4 i) elements; with gradient
  checkpointing only each layer's input (h per token) is kept plus one layer's full activations;
- attention scores: the CPU path materialises [heads, L, L] per packed row and layer during the forward
  (one layer at a time, so one row's worth counts); flash/varlen kernels on GPU keep none;
- the LM head's logits at response tokens (the fused chunked cross entropy keeps them and their gradient
  in the model dtype, harness/losses.py);
- on the CPU, the process itself (Python, torch, transformers, lm-eval imported): a measured constant.

It is an estimate, checked against measured peak memory of real runs (tests/harness/test_memory.py states
the factor); its job is to say "this cannot fit" before loading, with what to change.
"""

from __future__ import annotations

import json
import re
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

GIB = 2**30
# Python with torch, transformers and the harness's training core imported: the peak RSS of training the
# 0.9M-parameter tiny model (perf/training_memory.py --model tiny: 0.57 GiB on this project's CPU machine).
CPU_PROCESS_BYTES = int(0.55 * GIB)
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a decoder: sizes from its config.json."""

    parameters: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        intermediate = int(config.get("intermediate_size") or 4 * hidden)
        heads = int(config.get("num_attention_heads") or 1)
        kv_heads = int(config.get("num_key_value_heads") or heads)
        vocab = int(config["vocab_size"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        per_layer = (
            hidden * heads * head_dim  # q
            + 2 * hidden * kv_heads * head_dim  # k, v
            + heads * head_dim * hidden  # o
            + 3 * hidden * intermediate  # gate, up, down
            + 2 * hidden  # two RMSNorms
        )
        embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", False) else 2)
        return cls(layers * per_layer + embeddings + hidden, hidden, intermediate, layers, heads, kv_heads, vocab)


def shape_from_directory(directory: Path) -> ModelShape:
    """The shape of a local model directory (its config.json), with a one-line error naming the file."""
    path = directory / "config.json"
    try:
        return ModelShape.from_config(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise HarnessError(f"{path}: cannot read the model's sizes for the memory estimate ({error})") from None


def lora_parameters(shape: ModelShape, rank: int) -> int:
    """LoRA adapters on every linear layer of the blocks ("all-linear"): r x (in + out) per matrix."""
    head_dim = shape.hidden // shape.heads
    q, kv = shape.heads * head_dim, shape.kv_heads * head_dim
    matrices = [(shape.hidden, q), (shape.hidden, kv), (shape.hidden, kv), (q, shape.hidden),
                (shape.hidden, shape.intermediate), (shape.hidden, shape.intermediate), (shape.intermediate, shape.hidden)]
    return shape.layers * sum(rank * (n_in + n_out) for n_in, n_out in matrices)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per process, by part; `total` is what is compared with the device's memory."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    attention_scores: int
    logits: int
    process: int

    @property
    def total(self) -> int:
        return sum(astuple(self))

    def as_record(self) -> dict[str, float]:
        parts = {part.name: round(getattr(self, part.name) / GIB, 3) for part in fields(self)}
        return parts | {"total_gib": round(self.total / GIB, 3)}


def estimate_training(
    shape: ModelShape,
    *,
    precision: str,
    rows_per_step: int,
    row_tokens: int,
    response_share: float = 0.5,
    lora_rank: int | None = None,
    gradient_checkpointing: bool = False,
    processes: int = 1,
    fsdp: bool = False,
    device: str = "cpu",
) -> MemoryEstimate:
    """Peak memory of one training process. `precision` is a resolved training precision (fp32, bf16,
    bf16-mixed, fp16-mixed); `rows_per_step` packed rows of `row_tokens` tokens go through one micro-step;
    `response_share` of the tokens are scored (the LM head runs only there)."""
    weight_bytes = 2 if precision == "bf16" else 4
    activation_bytes = 4 if precision == "fp32" else 2
    trainable = lora_parameters(shape, lora_rank) if lora_rank else shape.parameters
    frozen_bytes = 2 if lora_rank and device == "cuda" else weight_bytes  # LoRA keeps the frozen base in bf16 on GPU
    weights = shape.parameters * frozen_bytes
    gradients = trainable * weight_bytes
    optimizer = trainable * 8 + (trainable * 4 if precision == "bf16" else 0)  # AdamW moments (+ fp32 masters)
    if fsdp and processes > 1:
        weights, gradients, optimizer = weights // processes, gradients // processes, optimizer // processes
    tokens = rows_per_step * row_tokens
    head_dim = shape.hidden // shape.heads
    per_token_layer = 8 * shape.hidden + 3 * shape.kv_heads * head_dim + 4 * shape.intermediate
    if gradient_checkpointing:
        activations = tokens * shape.hidden * shape.layers * activation_bytes + tokens * per_token_layer * activation_bytes
    else:
        activations = tokens * per_token_layer * shape.layers * activation_bytes
    scores = 0 if device == "cuda" else shape.heads * row_tokens * row_tokens * activation_bytes
    scored_tokens = int(tokens * response_share)
    logits = 2 * scored_tokens * shape.vocab * activation_bytes
    process = CPU_PROCESS_BYTES if device == "cpu" else 0
    return MemoryEstimate(weights, gradients, optimizer, activations, scores, logits, process)


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"


def fit_problem(estimate: MemoryEstimate, available_bytes: int, where: str, *, lora: bool, fsdp: bool,
                gradient_checkpointing: bool) -> str | None:
    """One line saying that the estimate does not fit `available_bytes` and what to change, or None."""
    if estimate.total <= available_bytes:
        return None
    suggestions = []
    states = estimate.weights + estimate.gradients + estimate.optimizer
    if states > 0.5 * available_bytes and not lora:
        suggestions.append("LoRA (training.lora: {r: 16})" + ("" if fsdp else " or FSDP across GPUs (--nproc N with HARNESS_FSDP=1)"))
    if estimate.activations + estimate.attention_scores + estimate.logits > 0.25 * available_bytes:
        if not gradient_checkpointing:
            suggestions.append("training.gradient_checkpointing=true")
        suggestions.append("fewer tokens per step (training.batch_size or training.max_length)")
    advice = "; try " + ", or ".join(suggestions) if suggestions else ""
    return (f"this training configuration needs about {_gib(estimate.total)} per process ({_gib(states)} weights, "
            f"gradients and optimizer; {_gib(estimate.activations + estimate.attention_scores + estimate.logits)} "
            f"activations) but {where} has {_gib(available_bytes)}{advice}")


def gathered_model_problem(shape: ModelShape, precision: str, estimate: MemoryEstimate, available_bytes: int, where: str) -> str | None:
    """Under FSDP every process gets the whole trained model back on its device after a stage (saving,
    scoring and evaluation use it; distributed.unsharded_model), next to its own shard of the weights.
    One line when that cannot fit, or None: sharded training of a model larger than one GPU (70B class)
    would otherwise train for hours and then fail at the gather."""
    whole = shape.parameters * (2 if precision in ("bf16", "bf16-mixed", "fp16-mixed") else 4)
    if whole + estimate.weights <= available_bytes:
        return None
    return (f"under FSDP every process gathers the whole trained model ({_gib(whole)} in the run's weight dtype) on its "
            f"device for saving, scoring and evaluation, but {where} has {_gib(available_bytes)}: models larger than one "
            "GPU (70B class) are not supported yet; use LoRA (training.lora: {r: 16}) with --distributed ddp, or a smaller model")


def available_memory(device: str) -> tuple[int, str]:
    """Memory of the smallest visible GPU, or the host's available memory (MemAvailable) for the CPU."""
    if device == "cuda":
        import torch

        sizes = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
        index = sizes.index(min(sizes))
        return min(sizes), f"GPU {index} ({torch.cuda.get_device_name(index)})"
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        match = None
    if match is None:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine"
    return int(match.group(1)) * 1024, "this machine (available memory)"


def model_shape(weights: str) -> ModelShape | None:
    """The shape of the model a run will load, read without loading it: the built-in tiny model's spec, a
    local directory's config.json, or a hub id's config (cached or online). None where it cannot be read
    without the weights (a .gguf file): the pre-flight check is then skipped."""
    if weights == "builtin:tiny":
        from harness.models import TINY_SPEC

        return ModelShape.from_config(TINY_SPEC)
    path = Path(weights).expanduser()
    if path.suffix == ".gguf":
        return None
    if path.is_dir():
        return shape_from_directory(path) if (path / "config.json").is_file() else None
    try:
        from transformers import AutoConfig

        return ModelShape.from_config(AutoConfig.from_pretrained(weights).to_dict())
    except Exception:  # noqa: BLE001 - offline without a cached config: the load itself will say why
        return None


def check_training_fits(weights: str, settings: Any, *, processes: int, fsdp: bool, device: str) -> MemoryEstimate | None:
    """Refuse, in one line and before any weight is loaded, a training configuration whose estimate exceeds
    the memory of the device it would run on. `settings` is the run's resolved TrainingSpec. Returns the
    estimate (None where the model's shape cannot be read before loading)."""
    shape = model_shape(weights)
    if shape is None:
        return None
    estimate = estimate_training(
        shape, precision=settings.precision, rows_per_step=settings.batch_size, row_tokens=settings.max_length,
        lora_rank=settings.lora.r if settings.lora else None, gradient_checkpointing=settings.gradient_checkpointing,
        processes=processes, fsdp=fsdp, device=device,
    )
    available, where = available_memory(device)
    if device == "cpu" and processes > 1:  # the processes share the host's memory
        available, where = available // processes, f"{where} shared by {processes} processes"
    problem = fit_problem(estimate, available, where, lora=settings.lora is not None, fsdp=fsdp,
                          gradient_checkpointing=settings.gradient_checkpointing)
    if problem is None and fsdp and processes > 1:
        problem = gathered_model_problem(shape, settings.precision, estimate, available, where)
    if problem is not None:
        raise HarnessError(f"model {weights}: {problem}")
    return estimate
