"""The `heldout_nll` suite section: mean per-token negative log-likelihood of reference answers on
held-out instructions, per item, so two runs can be compared item by item.

A proxy, not a benchmark: it measures how likely the trained model finds a strong model's answer (by
default AlpacaEval's 805 instructions with the GPT-4-Turbo outputs AlpacaEval 2 compares against), in
the run's own prompt template. It is cheap on a CPU (one forward pass per item, no generation, no judge)
and continuous, so a difference between recipes too small to flip 40 multiple-choice items still
shows; it says nothing by itself about instruction following or correctness. Lower is better.
The instructions are not filtered against the training data (AlpacaEval's sources overlap Alpaca's
little: helpful_base, koala, oasst, selfinstruct and vicuna test sets)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from harness.alpaca import fixed_subset, load_reference
from harness.data import InstructionRecord
from harness.evaluation import SectionContext, metric_cell, parse_section
from harness.scoring import mean_response_losses
from harness.templates import TokenizedExample, render_prompt, tokenize_example

SECTION = "heldout_nll"


class HeldoutNLLSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    reference: str = Field("gpt4_1106_preview", description="answers: a file in benchmarks/alpaca_eval/references")
    limit: int | None = Field(None, gt=0, description="a fixed random subset of this many instructions; None: all 805")
    subset_seed: int = Field(0, ge=0, description="seed of the subset (not the run's seed: every run gets the same items)")
    max_length: int = Field(1024, gt=8, description="prompt + answer tokens; longer answers are cut here")


def check_suite_section(config: dict[str, Any]) -> None:
    parse_section(HeldoutNLLSettings, config, SECTION)


def tokenized_items(tokenizer: Any, template: str, settings: HeldoutNLLSettings) -> tuple[list[int], list[TokenizedExample]]:
    """(positions in the reference file, tokenized prompt + answer + EOS with labels on the answer) of the
    items whose prompt fits; an answer past max_length is cut there."""
    rows = load_reference(settings.reference)
    positions, examples = [], []
    for position in fixed_subset(settings.limit, seed=settings.subset_seed, total=len(rows)):
        record = InstructionRecord(instruction=rows[position]["instruction"], output=rows[position]["output"])
        prompt = render_prompt(record, template, tokenizer)
        example = tokenize_example(prompt, record.output + tokenizer.eos_token, tokenizer, template)
        if len(example.input_ids) - example.response_tokens >= settings.max_length - 1:
            continue
        positions.append(position)
        examples.append(TokenizedExample(example.input_ids[: settings.max_length], example.labels[: settings.max_length]))
    return positions, examples


def run_suite_section(
    model: Any, tokenizer: Any, config: dict[str, Any], *, output_dir: Path, seed: int, context: SectionContext | None = None
) -> dict[str, Any]:
    del seed, output_dir  # a deterministic forward pass per item; nothing to resume that costs more than recomputing
    settings = parse_section(HeldoutNLLSettings, config, SECTION)
    template = (context or SectionContext()).template_for(tokenizer)
    positions, examples = tokenized_items(tokenizer, template, settings)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses, _ = mean_response_losses(model, examples, pad_token_id=pad, description="held-out NLL")
    rows = load_reference(settings.reference)
    samples = [
        {"doc_id": position, "doc_hash": hashlib.sha256(rows[position]["instruction"].encode()).hexdigest()[:16],
         "nll": float(loss)}
        for position, loss in zip(positions, losses, strict=True)
    ]
    n = len(samples)
    mean = float(np.mean(losses))
    stderr = float(np.std(losses, ddof=1) / math.sqrt(n)) if n > 1 else None
    return {"nll": metric_cell(mean, stderr), "n": n, "skipped_prompt_too_long": len(fixed_subset(
        settings.limit, seed=settings.subset_seed, total=len(rows))) - n, "template": template,
            "reference": settings.reference, "samples": samples}
