"""The training core every recipe reuses: transformers' Trainer with response-only loss computed only
at response positions, padding-free packing, an optional extra loss term, optional LoRA, pure-bf16
weights with fp32 master weights, rich progress, checkpoints and resume."""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import Trainer, TrainerCallback, TrainingArguments

from harness import distributed
from harness.batching import RowDataset, collate_rows
from harness.compat import TrainerCheckpointHooks, checkpointing_arguments, force_fsdp_state
from harness.errors import HarnessError
from harness.interrupts import (
    kill_point_for_tests,
    raise_if_terminated,
    set_in_training,
    termination_requested,
)
from harness.losses import final_hidden_states, keep_varlen_attention, response_token_losses
from harness.neftune import noisy_input_embeddings
from harness.spec import TrainingSpec
from harness.templates import TokenizedExample


class ExtraLoss(Protocol):
    """An extra loss term (e.g. SFTMix's mixup) added to the next-token loss while training.

    It gets the batch's last-layer hidden states of the kind it names ("post-norm": the LM head's
    input; "pre-norm": before the final norm), computed once for both terms."""

    state_kind: str

    def __call__(self, model: Any, batch: dict[str, torch.Tensor], states: torch.Tensor) -> torch.Tensor: ...


def sft_loss(
    model: Any,
    batch: dict[str, torch.Tensor],
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    extra_loss: ExtraLoss | None = None,
    neftune_alpha: float | None = None,
    accumulation_steps: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-token NTP losses) of one micro-batch: mean response-token cross entropy, plus the extra
    term while training. NEFTune noise is added to the input embeddings only in training mode."""
    embeds = noisy_input_embeddings(model, batch, neftune_alpha) if neftune_alpha and model.training else None
    pre_norm = extra_loss is not None and model.training and extra_loss.state_kind == "pre-norm"
    if pre_norm:
        from harness.mixup import hidden_states_with_prenorm

        hidden, states = hidden_states_with_prenorm(model, batch, embeds)
    else:
        hidden = states = final_hidden_states(model, batch, inputs_embeds=embeds)
    losses, _ = response_token_losses(model, batch, hidden=hidden)
    denominator = num_items_in_batch if num_items_in_batch is not None else max(losses.numel(), 1)
    loss = losses.sum() / denominator
    if extra_loss is not None and model.training:
        # The NTP sum is normalised over all micro-batches of a step; the extra term is a per-micro-batch
        # mean, so it is divided by the number of micro-batches to keep its weight independent of it.
        loss = loss + extra_loss(model, batch, states) / accumulation_steps
    return loss, losses


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "fp16-mixed"
    return "fp32"


def weight_dtype(precision: str) -> torch.dtype:
    """The dtype model weights are held in for a resolved precision."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def base_weight_dtype(settings: TrainingSpec, device_type: str) -> torch.dtype:
    """The dtype the base model loads in. LoRA on a GPU keeps the frozen base in bf16 (half the memory of
    fp32; peft keeps the adapters themselves in fp32); everywhere else the precision's weight dtype, so CPU
    runs are unchanged."""
    if settings.lora is not None and device_type == "cuda" and settings.precision in ("bf16", "bf16-mixed"):
        return torch.bfloat16
    return weight_dtype(settings.precision)


class MasterWeightAdamW(torch.optim.AdamW):
    """Fused AdamW over fp32 master copies of low-precision (bf16) parameters.

    Updates of size lr * g are far below bf16's resolution (2^-8 relative) for typical fine-tuning
    learning rates, so stepping bf16 weights directly would lose most updates. Forward and backward
    run in bf16 (fast on CPUs with avx512_bf16 and on GPUs); the optimizer steps in fp32.

    Writing the masters back to bf16 uses stochastic rounding: with round-to-nearest, weights that
    start on the bf16 grid (every bf16-loaded model) do not move in the forward pass until their
    master has drifted half a bf16 step, which at lr 2e-5 is several optimizer steps of lag (on
    SmolLM2 the loss fell visibly slower than in fp32). The rounding noise is deterministic: for
    flat index i at write-back t it is (i * 25033 + t * 40503) mod 2^16 in the 16 bits that bf16
    drops, an additive (Weyl) sequence, so each weight's rounding is unbiased over steps and a run
    is reproducible without a random generator.

    Parameters are stepped in chunks of about CHUNK_ELEMENTS: each chunk's bf16 gradients are
    upcast into one reused fp32 scratch buffer, so the fp32 gradients never exist all at once (that
    would be another 4 bytes per parameter on top of the master copy and Adam's two moments)."""

    CHUNK_ELEMENTS = 1 << 23
    ROUNDING_SLICE = 1 << 20  # elements rounded at a time; a multiple of the noise period 2^16

    def __init__(self, param_groups: list[dict[str, Any]], stochastic_rounding: bool = True, **defaults: Any):
        self.pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []  # (parameter, its fp32 master)
        self.chunks: list[list[tuple[torch.nn.Parameter, torch.Tensor]]] = []
        master_groups = []
        for group in param_groups:
            chunk: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
            for number, parameter in enumerate(group["params"], start=1):
                master = parameter.detach().to(torch.float32, copy=True).requires_grad_(True)
                chunk.append((parameter, master))
                if sum(p.numel() for p, _ in chunk) >= self.CHUNK_ELEMENTS or number == len(group["params"]):
                    master_groups.append({**group, "params": [m for _, m in chunk]})
                    self.chunks.append(chunk)
                    self.pairs += chunk
                    chunk = []
        device = self.pairs[0][1].device
        largest = max(sum(p.numel() for p, _ in chunk) for chunk in self.chunks)
        self.scratch = torch.empty(largest, dtype=torch.float32, device=device)
        self.stochastic_rounding = stochastic_rounding
        self.rounding_step = 0
        slice_index = torch.arange(self.ROUNDING_SLICE, dtype=torch.int32, device=device)
        self.rounding_base = (slice_index & 0xFFFF) * 25033 & 0xFFFF  # no int32 overflow: < 2^16 * 25033
        self.rounding_noise = torch.empty_like(self.rounding_base)
        defaults.setdefault("fused", device.type in ("cpu", "cuda"))
        super().__init__(master_groups, **defaults)

    def _set_rounding_step(self, step: int) -> None:
        self.rounding_step = step
        torch.add(self.rounding_base, step * 40503 % 65536, out=self.rounding_noise).bitwise_and_(0xFFFF)

    def _write_back(self, parameter: torch.nn.Parameter, master: torch.Tensor) -> None:
        if not (self.stochastic_rounding and parameter.dtype == torch.bfloat16 and parameter.is_contiguous()):
            parameter.copy_(master)
            return
        bits, target = master.view(-1).view(torch.int32), parameter.view(-1)
        rounded = self.scratch.view(torch.int32)[: self.ROUNDING_SLICE]
        for start in range(0, bits.numel(), self.ROUNDING_SLICE):
            size = min(self.ROUNDING_SLICE, bits.numel() - start)
            # float bits are sign-magnitude: adding noise below the kept bits and truncating them
            # rounds |x| up with probability (dropped part / 2^16), the same for either sign
            torch.add(bits[start : start + size], self.rounding_noise[:size], out=rounded[:size])
            target[start : start + size].copy_(rounded[:size].bitwise_and_(-65536).view(torch.float32))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._set_rounding_step(self.rounding_step + 1)
        for chunk in self.chunks:
            offset = 0
            for parameter, master in chunk:  # masters of other chunks have no gradient: AdamW skips them
                if parameter.grad is not None:
                    master.grad = self.scratch[offset : offset + master.numel()].view_as(master)
                    master.grad.copy_(parameter.grad)
                    offset += master.numel()
            super().step()
            for parameter, master in chunk:
                if master.grad is not None:
                    master.grad = None  # frees the scratch buffer for the write-back below
                    self._write_back(parameter, master)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=True)
        for parameter, _ in self.pairs:
            parameter.grad = None

    def state_dict(self) -> dict[str, Any]:
        """The masters by reference, as torch's optimizers return their moments: a checkpoint is written out
        at once, and a copy would double the masters' memory on the GPU for the save (4 bytes per parameter)."""
        state = super().state_dict()
        state["master_weights"] = [master.detach() for _, master in self.pairs]
        state["rounding_step"] = self.rounding_step
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights", None)
        self._set_rounding_step(state_dict.pop("rounding_step", 0))
        super().load_state_dict(state_dict)
        if masters is not None:
            with torch.no_grad():
                for (parameter, master), saved in zip(self.pairs, masters, strict=True):
                    master.copy_(saved)
                    self._write_back(parameter, master)  # the same rounding as the interrupted run


class StopOnSigterm(TrainerCallback):
    """Checks the SIGTERM flag after every optimizer step: save a checkpoint, then stop training."""

    def on_train_begin(self, args, state, control, **kwargs):
        set_in_training(True)

    def on_step_end(self, args, state, control, **kwargs):
        if termination_requested():
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        set_in_training(False)


PROGRESS_KEY = "HarnessProgress"  # our entry in a checkpoint's trainer_state.json (stateful_callbacks)


@dataclass
class TokenCounter:
    """Tokens and examples trained on. Added to per micro-batch as they come (on a GPU: 0-dim device
    tensors, so counting never waits for the device); read as ints through `totals` at checkpoints and at
    the end."""

    real_tokens: int | torch.Tensor = 0
    response_tokens: int | torch.Tensor = 0
    examples: int | torch.Tensor = 0

    def totals(self) -> dict[str, int]:
        return {name: int(value) for name, value in vars(self).items()}


def call_through_wrapper(
    wrapper: torch.nn.Module, inner: torch.nn.Module, loss_of: Callable[..., Any], batch: dict[str, torch.Tensor]
) -> Any:
    """`loss_of(inner, batch)` computed inside the wrapper's forward (DDP, or any module wrapper).

    The loss calls the decoder and the LM head itself instead of the model's forward. DDP arms its
    gradient all-reduce only when its own forward runs (and skips it under no_sync while accumulating),
    so the call has to go through the wrapper: for the duration, the inner model's forward is the loss."""
    with distributed.forward_replaced(inner, functools.partial(_forward_as_loss, loss_of, inner)):
        return wrapper(batch)


def _forward_as_loss(loss_of: Callable[..., Any], inner: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    loss, losses = loss_of(inner, batch)
    return loss, losses.detach()  # DDP looks for parameters used by the outputs: the loss covers them all


class ResponseOnlyTrainer(TrainerCheckpointHooks, Trainer):
    """Trainer whose loss is the mean cross entropy over response tokens, with the LM head applied
    only at those positions, plus an optional extra term (SFTMix's mixup, ...)."""

    def __init__(
        self,
        *args: Any,
        extra_loss: ExtraLoss | None = None,
        neftune_alpha: float | None = None,
        master_weights: bool = False,
        fsdp_param_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ):
        self.fsdp_param_dtype = fsdp_param_dtype  # read by create_accelerator_and_postprocess in super().__init__
        super().__init__(*args, **kwargs)
        self.extra_loss = extra_loss
        self.neftune_alpha = neftune_alpha
        self.master_weights = master_weights
        self.counter = TokenCounter()

    def create_accelerator_and_postprocess(self) -> None:  # type: ignore[override]
        """Under FSDP (ACCELERATE_USE_FSDP, set by accelerate launch), make accelerate's FSDP2 plugin shard the
        model, with fp32 sharded parameters and, for the bf16 precisions, bf16 compute and fp32 gradient
        reduction (FSDP's MixedPrecisionPolicy: the usual master-weight scheme, no MasterWeightAdamW).

        accelerate (1.15) switches to FSDP only on accelerators (AcceleratorState's MULTI_GPU branch); on
        CPU (gloo processes, as the tests run) it would silently train DDP instead. There the distributed
        type is set to FSDP after the fact, so the CPU run goes through the same accelerate and Trainer
        code (prepare, checkpoint saving and loading) as a GPU run."""
        super().create_accelerator_and_postprocess()
        if not distributed.fsdp_requested():
            return
        if distributed.world_size() <= 1:  # (accelerate shards over one GPU when launched so: nothing gained)
            if self.is_fsdp_enabled:
                raise HarnessError(
                    "FSDP in a single process has nothing to shard: launch several (--nproc N --distributed fsdp), "
                    "or drop --use_fsdp / the FSDP accelerate config"
                )
            return
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
        from torch.distributed.fsdp import MixedPrecisionPolicy

        state = self.accelerator.state
        if state.distributed_type == DistributedType.MULTI_CPU:
            force_fsdp_state(state, FullyShardedDataParallelPlugin())  # its settings from the launcher's FSDP_* variables
            self.is_fsdp_enabled = True
        if not self.accelerator.is_fsdp2:
            raise HarnessError("accelerate did not set up FSDP2 for --distributed fsdp; this is a harness bug, please report it")
        plugin = state.fsdp_plugin
        if self.fsdp_param_dtype is not None:
            plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=self.fsdp_param_dtype, reduce_dtype=torch.float32)
        else:
            plugin.mixed_precision_policy = MixedPrecisionPolicy()  # fp32 throughout

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):  # type: ignore[override]
        """Mixed precision (bf16-mixed, fp16-mixed) around compute_loss.

        transformers 5 leaves autocast to accelerate, which wraps model.forward; the loss here calls
        the decoder and the LM head directly, so without this it would silently run in fp32."""
        return self.accelerator.autocast()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        processes = self.accelerator.num_processes
        if num_items_in_batch is not None and processes > 1 and self.args.average_tokens_across_devices:
            # Trainer counted the response tokens of the whole global batch, and DDP (like FSDP's
            # reduce-scatter) averages gradients over processes: scale each process's token sum by the
            # process count, as Trainer's own compute_loss does, so that the step's loss is the mean over
            # the global batch.
            num_items_in_batch = num_items_in_batch / processes
        loss_of = functools.partial(
            sft_loss,
            num_items_in_batch=num_items_in_batch,
            extra_loss=self.extra_loss,
            neftune_alpha=self.neftune_alpha,
            accumulation_steps=self.args.gradient_accumulation_steps,
        )
        if distributed.is_sharded(model):
            # FSDP2 shards in place (model is self.model); the root's forward hooks gather the root's own
            # parameters (embeddings, final norm, tied LM head) and finish the step's hooks: go through them
            loss, losses = call_through_wrapper(model, model, loss_of, inputs)
        elif model is self.model:  # one process: no wrapper, call the loss directly
            loss, losses = loss_of(model, inputs)
        else:
            loss, losses = call_through_wrapper(model, self.accelerator.unwrap_model(model), loss_of, inputs)
        if model.training:
            self.counter.real_tokens += (inputs["seq_ids"] >= 0).sum()  # no int(): no host synchronisation
            self.counter.response_tokens += losses.numel()
            self.counter.examples += inputs["num_examples"]
        return (loss, None) if return_outputs else loss

    def skips_checkpoint_weights(self) -> bool:
        """Under FSDP a checkpoint's weights are written by accelerate's save_fsdp_model (with the optimizer),
        which is what resuming reads; Trainer would also write them as model.safetensors, doubling every
        checkpoint (a 70B model's full fp32 state is 280 GB). The run's final model is saved by the runner."""
        return self.is_fsdp_enabled

    def before_checkpoint_save(self) -> None:
        """Store the token counters and the loss sum in the checkpoint's trainer_state.json (written with
        it, so they cannot disagree): a resumed run reports the whole run's tokens and mean loss.

        Only the main process writes trainer_state.json, so the counters are summed over the processes
        (every process saves, so the collective is safe); on resume the main process carries the sums."""
        counted = self.counter.totals()
        names = list(counted)
        totals = distributed.sum_over_processes([counted[name] for name in names])
        self.state.stateful_callbacks[PROGRESS_KEY] = {
            **dict(zip(names, totals, strict=True)),
            "loss_sum": self.running_loss_sum(),
        }

    def after_checkpoint_save(self) -> None:
        kill_point_for_tests(f"train/{Path(self.args.output_dir).name}", self.state.global_step)

    def create_optimizer(self, model=None):  # type: ignore[override]
        if not self.master_weights:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self.optimizer is None:
            decay_names = set(self.get_decay_parameter_names(self.model))
            named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in named if n in decay_names], "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in named if n not in decay_names], "weight_decay": 0.0},
            ]
            self.optimizer = MasterWeightAdamW(
                [group for group in groups if group["params"]],
                lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
            )
        return self.optimizer


class RichProgressCallback(TrainerCallback):
    """A rich progress bar over optimizer steps, with the latest loss."""

    def __init__(self, console: Console, description: str):
        self.console = console
        self.description = description
        self.progress: Progress | None = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:  # one bar for a job of several processes
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=state.max_steps, completed=state.global_step, loss="-")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is not None and logs and "loss" in logs:
            self.progress.update(self.task, loss=f"{logs['loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


@dataclass(frozen=True)
class Tracking:
    """Where a run reports to experiment trackers (training.report_to, through Trainer's own integrations)
    and its tags: run id, recipe, model, seed and sweep (HARNESS_SWEEP_ID), so a sweep is one group.
    TensorBoard writes under <run dir>/tensorboard/<stage>; wandb and mlflow take their keys and server
    from the environment (WANDB_API_KEY, MLFLOW_TRACKING_URI), never from the spec."""

    trackers: tuple[str, ...]
    run_dir: Path
    tags: dict[str, str]

    @classmethod
    def for_run(cls, spec: Any, run_dir: Path) -> Tracking:
        import os

        chosen = spec.training.report_to
        names = () if chosen == "none" else (chosen,) if isinstance(chosen, str) else tuple(dict.fromkeys(chosen))
        tags = {"run_id": run_dir.name, "recipe": spec.recipe, "model": spec.model, "seed": str(spec.seed),
                "sweep": os.environ.get("HARNESS_SWEEP_ID", "none")}  # fmt: skip
        return cls(names, run_dir, tags)

    def apply_environment(self) -> None:
        """wandb and mlflow read the group and tags from the environment (the run is a process of its own)."""
        import os

        os.environ.setdefault("WANDB_RUN_GROUP", self.tags["sweep"] if self.tags["sweep"] != "none" else self.tags["run_id"])
        os.environ.setdefault("WANDB_TAGS", ",".join(f"{key}:{value}" for key, value in self.tags.items()))
        os.environ.setdefault("MLFLOW_TAGS", json.dumps(self.tags))

    def writer(self, name: str) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard" / name))
        writer.add_text("tags", json.dumps(self.tags))
        return writer


def check_trackers(settings: TrainingSpec) -> None:
    """A tracker named in training.report_to must be installed: one line before anything runs."""
    import importlib.util

    chosen = settings.report_to
    for name in () if chosen == "none" else (chosen,) if isinstance(chosen, str) else chosen:
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise HarnessError(
                f"training.report_to {name}: the {TRACKER_PACKAGES[name]} package is not installed; "
                f"pip install {TRACKER_PACKAGES[name]}, or set training.report_to=none"
            )


def log_final_metrics(tracking: Tracking, tasks: dict[str, Any]) -> None:
    """The run's evaluation metrics, at the end, to each tracker under the run's tags."""
    if not tracking.trackers or not distributed.is_main():
        return
    metrics = {
        f"eval/{task}/{metric}": float(value["value"])
        for task, entry in tasks.items()
        for metric, value in entry.items()
        if isinstance(value, dict) and isinstance(value.get("value"), (int, float))
    }
    if "tensorboard" in tracking.trackers:
        writer = tracking.writer("eval")
        for name, value in metrics.items():
            writer.add_scalar(name, value, 0)
        writer.add_hparams(dict(tracking.tags), metrics, run_name="hparams")
        writer.close()
    if "wandb" in tracking.trackers:
        import wandb

        tracking.apply_environment()
        run = wandb.init(name=tracking.tags["run_id"], job_type="eval", config=tracking.tags)
        run.log(metrics)
        run.finish()
    if "mlflow" in tracking.trackers:
        import mlflow

        with mlflow.start_run(run_name=f"{tracking.tags['run_id']}/eval", tags=tracking.tags):
            mlflow.log_metrics(metrics)


@dataclass
class TrainResult:
    steps: int
    examples: int
    rows: int
    real_tokens: int  # non-pad tokens processed in forward/backward (all epochs, summed over processes)
    response_tokens: int  # tokens that carried loss
    epoch_tokens: int  # non-pad tokens in one pass over the data
    final_loss: float | None  # the last logged loss (None when the run was shorter than logging_steps)
    mean_loss: float  # mean training loss over the whole run (Trainer's training_loss)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    wall_seconds: float = 0.0
    resumed_from_step: int = 0
    precision: str = "fp32"
    steps_run: int = 0  # optimizer steps run by this process (steps - resumed_from_step): resume counters
    processes: int = 1  # data-parallel processes; the token counts are summed over them
    distributed: str = "single"  # single | ddp (replicated) | fsdp (sharded): harness.distributed.backend()
    parameter_share: float = 1.0  # share of the parameters' elements the main process held while training

    def as_record(self) -> dict[str, Any]:
        return dict(vars(self))


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose trainer state was written. transformers writes trainer_state.json
    after the weights, optimizer and RNG states, so a folder without it is a save cut short by a kill:
    it is removed, and the previous checkpoint (rotation deletes it only after the new one is complete)
    is used."""
    if not output_dir.is_dir():
        return None
    for checkpoint in sorted(output_dir.glob("checkpoint-*"), key=_checkpoint_step, reverse=True):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
            return checkpoint
        except (OSError, json.JSONDecodeError):
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def _checkpoint_step(path: Path) -> int:
    suffix = path.name.rpartition("-")[2]
    return int(suffix) if suffix.isdigit() else -1


def check_checkpoint_backend(checkpoint: Path | None, sharded: bool) -> None:
    """A checkpoint holds the model and optimizer as its run saved them: an FSDP run saves them through
    FSDP (pytorch_model_fsdp.bin, optimizer state keyed by FSDP), which a DDP or one-process run cannot
    load, nor the other way round. Say so in one line instead of Trainer's traceback."""
    if checkpoint is None:
        return
    saved_sharded = (checkpoint / "pytorch_model_fsdp.bin").is_file() or any(checkpoint.glob("pytorch_model_fsdp*/"))
    if saved_sharded != sharded:
        was, now = ("--distributed fsdp", "without it") if saved_sharded else ("without --distributed fsdp", "with it")
        raise HarnessError(
            f"checkpoint {checkpoint} was saved by a run {was}; this run is {now}: rerun as before to resume, "
            f"or delete {checkpoint.parent} to train that stage again"
        )


def _saved_progress(checkpoint: Path | None) -> dict[str, Any]:
    if checkpoint is None:
        return {}
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return state.get("stateful_callbacks", {}).get(PROGRESS_KEY, {}) or {}

def cast_parameters(model: Any, dtype: torch.dtype) -> None:
    """Cast the weights only. `model.to(dtype)` would also cast floating buffers, and RoPE's inv_freq in
    bf16 moves every position's angle (logits off by ~0.9 on SmolLM2): the model would then compute
    differently from the same weights loaded by from_pretrained(dtype=...), which keeps it in fp32."""
    for parameter in model.parameters():
        if parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)


def apply_lora(model: Any, settings: TrainingSpec) -> Any:
    if settings.lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    lora = settings.lora
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


class EpochRowDataset(RowDataset):
    """Rows laid out afresh every epoch (SFTMix redraws its pairs per epoch): epoch e uses
    layouts[e % len(layouts)]. Every layout has the same number of rows, so the Trainer's step count holds."""

    def __init__(self, examples: list[TokenizedExample], layouts: list[list[list[int]]]):
        if len({len(layout) for layout in layouts}) != 1:
            raise ValueError("every epoch's layout must have the same number of rows")
        super().__init__(examples, 0, False, 0, rows=layouts[0])
        self.layouts = [[list(row) for row in layout] for layout in layouts]

    def set_epoch(self, epoch: int) -> None:
        self.rows = self.layouts[epoch % len(self.layouts)]


class SetDatasetEpoch(TrainerCallback):
    """Tells an EpochRowDataset the epoch before its batches are drawn (accelerate forwards set_epoch to the
    dataset only on some paths); after a resume the Trainer's state carries the epoch reached."""

    def __init__(self, dataset: EpochRowDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch + 1e-6) if state.epoch else 0)


def optimizer_steps_per_epoch(rows: int, settings: TrainingSpec) -> int:
    """Optimizer steps in one pass over `rows` packed rows: batch_size is per process, so a step takes
    batch_size x gradient_accumulation_steps x processes rows."""
    return math.ceil(rows / (settings.batch_size * settings.gradient_accumulation_steps * distributed.world_size()))


def optimizer_steps(rows: int, settings: TrainingSpec) -> int:
    """The optimizer steps train_sft runs on `rows` rows: max_steps if set, else the epochs' share of
    them (fractional epochs round up). Recipes that act at points of a training (SFTMix's checkpoints)
    use this, so they and the Trainer count alike."""
    if settings.max_steps > 0:
        return settings.max_steps
    return math.ceil(optimizer_steps_per_epoch(rows, settings) * settings.epochs)


def train_sft(
    model: Any,
    tokenizer: Any,
    examples: list[TokenizedExample],
    settings: TrainingSpec,
    output_dir: Path,
    *,
    seed: int,
    console: Console | None = None,
    description: str = "train",
    extra_loss: ExtraLoss | None = None,
    rows: list[list[int]] | None = None,
    callbacks: list[TrainerCallback] | None = None,
    epoch_rows: list[list[list[int]]] | None = None,
    tracking: Tracking | None = None,
) -> tuple[Any, TrainResult]:
    """Fine-tune `model` on tokenized examples; checkpoints go to output_dir and a rerun resumes there.
    With `tracking`, the loss curve also goes to its trackers under the run's tags.

    `rows` fixes the row layout; `epoch_rows` gives one layout per epoch (cycled), e.g. pairs redrawn.

    `settings.learning_rate` must be resolved (not None). Returns the trained model and its stats."""
    assert settings.learning_rate is not None, "resolve the learning rate from the model set first"
    console = console or Console(stderr=True)
    precision = resolve_precision(settings.precision)
    sharded = distributed.backend() == "fsdp"
    if sharded and settings.lora is not None:
        raise HarnessError(distributed.FSDP_LORA_UNSUPPORTED)
    # Under FSDP the sharded weights stay fp32 and FSDP casts them for compute (fsdp_param_dtype).
    cast_parameters(model, torch.float32 if sharded else weight_dtype(precision))
    model = apply_lora(model, settings)
    if epoch_rows is not None:
        dataset: RowDataset = EpochRowDataset(examples, epoch_rows)
        callbacks = [SetDatasetEpoch(dataset), *(callbacks or [])]
    else:
        dataset = RowDataset(examples, settings.max_length, settings.packing, seed, rows=rows)
    processes = distributed.world_size()
    steps_per_epoch = optimizer_steps_per_epoch(len(dataset), settings)
    total_steps = optimizer_steps(len(dataset), settings)
    repeated = steps_per_epoch * settings.batch_size * settings.gradient_accumulation_steps * processes - len(dataset)
    if processes > 1 and repeated > 0 and distributed.is_main():
        console.print(
            f"[yellow]{description}: {repeated} rows per epoch are repeats from the epoch's start, so that each of the "
            f"{processes} processes gets full batches (accelerate's even_batches); a batch_size that makes "
            f"batch_size x gradient_accumulation_steps x {processes} divide the {len(dataset)} rows avoids it[/]",
            soft_wrap=True,
        )
    use_cpu = not torch.cuda.is_available()
    trackers = list(tracking.trackers) if tracking is not None else []
    tracker_callbacks: list[TrainerCallback] = []
    if tracking is not None and trackers:
        tracking.apply_environment()
        if "tensorboard" in trackers and distributed.is_main():  # our own log dir: <run dir>/tensorboard/<stage>
            from transformers.integrations import TensorBoardCallback

            tracker_callbacks.append(TensorBoardCallback(tracking.writer(output_dir.name)))
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        num_train_epochs=settings.epochs,
        max_steps=total_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=int(settings.warmup_ratio * total_steps),
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        max_grad_norm=settings.max_grad_norm,
        bf16=precision == "bf16-mixed",
        fp16=precision == "fp16-mixed",
        use_cpu=use_cpu,
        logging_steps=settings.logging_steps,
        save_strategy="steps" if settings.save_steps > 0 else "no",
        save_steps=max(settings.save_steps, 1),
        save_total_limit=1,
        seed=seed,
        data_seed=seed,
        report_to=[name for name in trackers if name != "tensorboard"],
        run_name=f"{tracking.tags['run_id']}/{output_dir.name}" if tracking is not None else None,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_timeout=distributed.timeout_seconds(),
        ddp_find_unused_parameters=False,  # the loss uses every trainable parameter: no extra graph traversal
        # non-reentrant checkpointing: works with the packed-row attention's keyword arguments and frozen inputs (LoRA)
        **checkpointing_arguments(  # FSDP: its own
            settings.gradient_checkpointing and distributed.backend() != "fsdp", {"use_reentrant": False}
        ),
    )
    trainer = ResponseOnlyTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=functools.partial(collate_rows, pad_token_id=tokenizer.pad_token_id),
        extra_loss=extra_loss,
        neftune_alpha=settings.neftune_alpha,
        master_weights=precision == "bf16" and not sharded,
        fsdp_param_dtype={"bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(precision),
        callbacks=[RichProgressCallback(console, description), StopOnSigterm(), *tracker_callbacks, *(callbacks or [])],
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    last_checkpoint = last_complete_checkpoint(output_dir)
    check_checkpoint_backend(last_checkpoint, sharded)
    saved = _saved_progress(last_checkpoint)
    for name in vars(trainer.counter):  # sums over the processes: the main process carries them
        setattr(trainer.counter, name, int(saved.get(name, 0)) if distributed.is_main() else 0)
    started = time.perf_counter()
    with keep_varlen_attention(model):  # checkpointed layers recompute with the same per-example attention
        train_output = trainer.train(resume_from_checkpoint=str(last_checkpoint) if last_checkpoint else None)
    raise_if_terminated(trainer.state.global_step)
    wall = time.perf_counter() - started
    trained = trainer.model
    parameter_share = distributed.local_parameter_share(trained)
    if distributed.is_sharded(trained):  # every process gets the whole model back, in the run's weight dtype
        trainer.optimizer = trainer.lr_scheduler = trainer.callback_handler.optimizer = None
        trainer.accelerator.free_memory()  # the sharded optimizer state goes before the full weights are gathered
        trained = distributed.unsharded_model(trained, weight_dtype(precision))
        trainer.model = trainer.model_wrapped = trainer.callback_handler.model = None
        trained.eval()
    out_of_sync = distributed.parameters_out_of_sync(trained)
    if out_of_sync:
        raise HarnessError(
            f"{description}: after training, {len(out_of_sync)} parameters differ between the {processes} processes "
            f"(first: {out_of_sync[0]}): gradients were not synchronised; this is a harness bug, please report it"
        )
    counted = trainer.counter.totals()
    real_tokens, response_tokens = distributed.sum_over_processes([counted["real_tokens"], counted["response_tokens"]])
    curve = [(entry["step"], float(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry]
    resumed_step = _checkpoint_step(last_checkpoint) if last_checkpoint else 0
    steps_run = trainer.state.global_step - resumed_step
    mean_loss = float(train_output.training_loss)
    if resumed_step and "loss_sum" in saved:  # Trainer's mean covers only the steps run by this process
        mean_loss = (float(saved["loss_sum"]) + mean_loss * steps_run) / max(trainer.state.global_step, 1)
    result = TrainResult(
        steps=trainer.state.global_step,
        examples=len(examples),
        rows=len(dataset),
        real_tokens=real_tokens,
        response_tokens=response_tokens,
        epoch_tokens=dataset.token_count(),
        final_loss=curve[-1][1] if curve else None,
        mean_loss=mean_loss,
        loss_curve=curve,
        wall_seconds=wall,
        resumed_from_step=resumed_step,
        precision=precision,
        steps_run=steps_run,
        processes=processes,
        distributed=distributed.backend(),
        parameter_share=round(distributed.from_main(parameter_share), 6),
    )
    if settings.lora is not None:
        trained = trained.merge_and_unload()
    trained.eval()
    return trained, result
