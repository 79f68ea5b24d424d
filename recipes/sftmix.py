"""SFTMix (Xiao et al., arXiv 2410.05248; no code released), recipes.md section 4. Details come from
secondary sources; every unknown is a parameter below with a documented default.

1. Training dynamics: train a reference model (the same base by default, or another model - a small
   reference can score for a larger target) with plain next-token loss, and at C evenly spaced
   checkpoints (at fractions 1/C, 2/C, ..., 1 of its optimizer steps, so even a one-epoch run has
   dynamics) measure each example's response perplexity.
   Conf = -(1/C) * sum_c perplexity_c(response | instruction).
   The paper's C is not stated in the sources we have (recipes.md: [unknown]); default C = 3.
2. Split at the median into a confident half D_c and an unconfident half D_u.
3. Train the target: every batch holds equal numbers of confident and unconfident examples, paired
   at random; the last layer's hidden states at response positions of each pair are mixed,
   Z = lambda Z_c + (1 - lambda) Z_u (aligned by truncating the longer response), lambda ~ Beta(0.5, 0.5),
   mixup loss = lambda CE(head(Z), Y_c) + (1 - lambda) CE(head(Z), Y_u), and
   total loss = NTP loss + mu * mixup loss, mu = 0.2.
   Pairs are redrawn every epoch (seeded by the run's seed and the epoch: deterministic).
Confidences are cached artifacts keyed by the reference model, data and training settings.

Batching (`batching`): `one-off` (default) takes the same examples per optimizer step as the one-off
baseline on the same data and spec, so that SFTMix's difference from one-off is the mixup and not more,
smaller updates: with packing, the pairs are packed best-fit like one-off packs its examples, into as
many rows as one-off's (rows split to reach it; more only when the pairs need more); without packing,
one pair per row at half the rows per step.
`pair-per-row`: one pair per row at the run's batch size (about twice one-off's steps when it packs).
The record's details say which, with both runs' rows, steps and examples per epoch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import TrainerCallback

from harness.artifacts import content_key
from harness.batching import RowDataset
from harness.errors import HarnessError
from harness.io import atomic_write_json
from harness.mixup import (
    confidence,
    epoch_pairs,
    matched_layouts,
    mixup_loss,
    sample_lambdas,
    split_at_median,
)
from harness.models import resolve_model
from harness.runner import Overhead, RecipeOutput, RunContext
from harness.scoring import mean_response_losses
from harness.templates import tokenize_for_training
from harness.training import optimizer_steps, optimizer_steps_per_epoch, weight_dtype

NAME = "sftmix"
DESCRIPTION = "SFTMix: confidence-split pairs with hidden-state mixup regularisation (Xiao et al. 2024)"
# The parameters that name the variant on the leaderboard, e.g. sftmix[batching=one-off]
VARIANT_PARAMS = ("batching",)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    reference_model: str | None = Field(None, description="model-set name, path or hub id; None: the run's base model")
    reference_model_path: str | None = None
    reference_epochs: float | None = Field(None, gt=0, description="None: the run's training.epochs")
    checkpoints: int = Field(3, gt=0, description="C: reference checkpoints at fractions 1/C ... 1 of its steps")
    checkpoints_per_epoch: int | None = Field(None, gt=0, description="if set: C = ceil(reference_epochs * this)")
    batching: Literal["one-off", "pair-per-row"] = Field(
        "one-off", description="one-off: the one-off baseline's examples per optimizer step; pair-per-row: one pair a row")
    mu: float = Field(0.2, ge=0)
    alpha: float = Field(0.5, gt=0, description="lambda ~ Beta(alpha, alpha)")
    lambda_per: Literal["pair", "batch"] = "pair"
    states: Literal["post-norm", "pre-norm"] = "post-norm"
    truncation: Literal["first", "last"] = "first"


@dataclass
class SFTMixLoss:
    """The extra loss term the training core adds: mu * mixup loss over the batch's (c, u) pairs."""

    mu: float
    alpha: float
    lambda_per: Literal["pair", "batch"]
    state_kind: Literal["post-norm", "pre-norm"]
    truncation: Literal["first", "last"]

    def __call__(self, model: Any, batch: dict[str, torch.Tensor], states: torch.Tensor) -> torch.Tensor:
        if self.mu == 0:
            return states.sum() * 0.0
        pairs = int(batch["num_examples"]) // 2
        lambdas = sample_lambdas(pairs, self.alpha, self.lambda_per, states.device)
        return self.mu * mixup_loss(model, batch, states, lambdas, state_kind=self.state_kind, truncation=self.truncation)


class CheckpointPerplexities(TrainerCallback):
    """At each chosen optimizer step, the mean response perplexity of every training example.

    With a `path` they are saved as they come, so a reference training resumed after a kill (or found
    finished by the runner) still has the perplexities of the steps before the restart."""

    def __init__(self, steps: set[int], examples: list, pad_token_id: int, path: Path | None = None):
        self.steps = steps
        self.examples = examples
        self.pad_token_id = pad_token_id
        self.path = path
        self.perplexities: dict[int, list[float]] = {}
        self.forward_tokens = 0
        if path is not None and path.is_file():
            saved = json.loads(path.read_text())
            self.perplexities = {int(step): values for step, values in saved["perplexities"].items()}
            self.forward_tokens = int(saved["forward_tokens"])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps and state.global_step not in self.perplexities:
            losses, stats = mean_response_losses(
                model, self.examples, pad_token_id=self.pad_token_id, description=f"confidence @ step {state.global_step}",
                prefix_groups=[0] * len(self.examples),  # the template's preamble, common to all, is run once
            )
            self.perplexities[state.global_step] = np.exp(losses).tolist()
            self.forward_tokens += stats.forward_tokens
            if self.path is not None:
                atomic_write_json(self.path, {"perplexities": self.perplexities, "forward_tokens": self.forward_tokens})
            model.train()


def training_dynamics(ctx: RunContext[Params]) -> tuple[np.ndarray, dict[str, Any]]:
    """[C, N] response perplexities of the reference model at C checkpoints (cached)."""
    params, settings = ctx.params, ctx.spec.training
    epochs = params.reference_epochs or settings.epochs
    reference = params.reference_model
    key = content_key(
        kind="sftmix-dynamics", reference=reference or ctx.base_model_key, reference_path=params.reference_model_path,
        epochs=epochs, checkpoints=params.checkpoints, per_epoch=params.checkpoints_per_epoch, training=ctx.training_key(settings),
        records=[r.id for r in ctx.data.records], seed=ctx.spec.seed,
    )

    def train_reference() -> dict[str, Any]:
        if reference is None:
            model, tokenizer = ctx.base_model()
        else:  # another model: in the run's training weight dtype (not the base's, which LoRA may keep in bf16)
            model, tokenizer = ctx.load_model(resolve_model(reference, params.reference_model_path),
                                              dtype=weight_dtype(settings.precision), stage="load_model:reference")
        examples, _ = tokenize_for_training(ctx.data.records, tokenizer, settings.template, settings.max_length)
        rows = len(RowDataset(examples, settings.max_length, settings.packing, ctx.spec.seed))
        total = optimizer_steps(rows, settings.model_copy(update={"epochs": epochs}))  # as ctx.train will run it
        checkpoints = params.checkpoints
        if params.checkpoints_per_epoch is not None:
            checkpoints = max(1, math.ceil(epochs * params.checkpoints_per_epoch))
        # evenly spaced fractions of the reference run (a run shorter than C steps has fewer, distinct ones)
        steps = sorted({max(1, round(total * (c + 1) / checkpoints)) for c in range(checkpoints)})
        saved = ctx.checkpoint_path("reference_perplexities.json")
        recorder = CheckpointPerplexities(set(steps), examples, tokenizer.pad_token_id, saved)
        _, result = ctx.train(model, tokenizer, ctx.data.records, stage="reference", overrides={"epochs": epochs},
                              callbacks=[recorder], overhead=True)
        recorded = sorted(recorder.perplexities)
        details = {"checkpoint_steps": recorded, "reference_steps": total,
                   "checkpoint_fractions": [round(step / total, 4) for step in recorded],
                   "reference": reference or "base model",
                   "scoring_forward_tokens": recorder.forward_tokens, "reference_train_tokens": result.real_tokens}
        return {"perplexities": [recorder.perplexities[step] for step in recorded], "details": details}

    dynamics, cached = ctx.cached("sftmix", key, train_reference)
    return np.array(dynamics["perplexities"]), dynamics["details"] | {"cached": cached}


def batch_layouts(
    ctx: RunContext[Params], tokenizer: Any, draws: list[list[tuple[int, int]]]
) -> tuple[list[list[list[int]]], dict[str, Any], dict[str, Any]]:
    """(one row layout per epoch, training overrides, what the record says about the batching)."""
    params, settings = ctx.params, ctx.spec.training
    examples, _ = tokenize_for_training(ctx.data.records, tokenizer, settings.template, settings.max_length)
    if len(examples) != len(ctx.data.records):
        raise HarnessError(f"sftmix: {len(ctx.data.records) - len(examples)} examples exceed training.max_length; raise it")
    one_off_rows = len(RowDataset(examples, settings.max_length, settings.packing, ctx.spec.seed))
    one_off_steps = optimizer_steps_per_epoch(one_off_rows, settings)
    overrides: dict[str, Any] = {}
    if params.batching == "pair-per-row":
        layouts = [[[c, u] for c, u in draw] for draw in draws]
    elif settings.packing:
        lengths = [len(example.input_ids) for example in examples]
        layouts = matched_layouts(draws, lengths, one_off_rows, settings.max_length, ctx.spec.seed)
    else:  # one-off: one example a row; here a pair a row, so half the rows per step
        layouts = [[[c, u] for c, u in draw] for draw in draws]
        if settings.batch_size % 2 == 0:
            overrides = {"batch_size": settings.batch_size // 2}
        elif settings.gradient_accumulation_steps % 2 == 0:
            overrides = {"gradient_accumulation_steps": settings.gradient_accumulation_steps // 2}
        else:
            raise HarnessError(
                f"sftmix: with training.packing off, one-off takes training.batch_size={settings.batch_size} examples a "
                "step and a row holds one (confident, unconfident) pair, so batch_size or gradient_accumulation_steps "
                "must be even to take the same examples per step; make one even, or set params.batching=pair-per-row"
            )
    rows = len(layouts[0])
    steps = optimizer_steps_per_epoch(rows, settings.model_copy(update=overrides))
    summary = {
        "mode": params.batching, "rows_per_epoch": rows, "steps_per_epoch": steps,
        "examples_per_epoch": sum(len(row) for row in layouts[0]),
        "one_off_rows_per_epoch": one_off_rows, "one_off_steps_per_epoch": one_off_steps,
        "one_off_examples_per_epoch": len(examples), "overrides": overrides,
    }
    if params.batching == "one-off" and steps != one_off_steps:
        ctx.console.print(f"[yellow]sftmix: {steps} optimizer steps per epoch against one-off's {one_off_steps} "
                          "(too few pairs, or pairs too long to share rows)[/]")
    return layouts, overrides, summary


def run(ctx: RunContext[Params]) -> RecipeOutput:
    params = ctx.params
    perplexities, dynamics = training_dynamics(ctx)
    conf = confidence(perplexities)
    confident, unconfident = split_at_median(conf)
    settings = ctx.spec.training
    draws = epoch_pairs(confident, unconfident, ctx.spec.seed, max(1, math.ceil(settings.epochs)))
    records = ctx.data.records
    halves = {i: "confident" for i in confident} | {i: "unconfident" for i in unconfident}
    atomic_write_json(ctx.artifact_path("sftmix_confidence.json"), [
        {"id": record.id, "confidence": float(conf[i]), "half": halves[i]} for i, record in enumerate(records)
    ])
    model, tokenizer = ctx.base_model()
    loss = SFTMixLoss(params.mu, params.alpha, params.lambda_per, params.states, params.truncation)
    # Each row holds whole (confident, unconfident) pairs: examples 2k and 2k+1 of a batch pair up.
    layouts, overrides, batching = batch_layouts(ctx, tokenizer, draws)
    trained, _ = ctx.train(model, tokenizer, records, stage="sft", extra_loss=loss, epoch_rows=layouts,
                           overrides=overrides or None)
    overhead = Overhead(  # the method's cost whether or not this run found the dynamics cached
        scoring_tokens=int(dynamics.get("scoring_forward_tokens", 0)),
        cached_train_tokens=int(dynamics["reference_train_tokens"]) if dynamics.get("cached") else 0,
    )
    details = {
        "checkpoints": len(perplexities),
        "dynamics": dynamics,
        "confident": len(confident),
        "unconfident": len(unconfident),
        "median_confidence": float(np.median(conf)),
        "pairs": len(draws[0]),
        "pair_draws": len(draws),
        "batching": batching,
        "extra_scoring_tokens": overhead.scoring_tokens,
        "cached_overhead_train_tokens": overhead.cached_train_tokens,
    }
    return RecipeOutput(model=trained, tokenizer=tokenizer, details=details, overhead=overhead)
