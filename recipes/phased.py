"""Phased IFT (Pang et al., arXiv 2406.04371; code xubuvd/PhasedSFT), recipes.md section 2.

1. Score each (instruction, input, output) triplet's difficulty on 1-5 (the paper: GPT-4-0613).
2. Split by hand-picked thresholds, default 1.5 and 3.5: stage 1 = [1, 1.5), stage 2 = [1.5, 3.5),
   stage 3 = [3.5, 5].
3. Uptrain sequentially, easy to hard: each stage starts from the previous stage's weights, with the
   SAME training settings, and a NEW optimizer and LR schedule (the authors' code runs each stage as a
   separate job). With the run's epochs per stage every example is seen as often as in One-off.

Controls from the paper: any permutation of the stages (e.g. [3, 2, 1] reversed), a subset (e.g. [3]:
stage 3 alone), and `random`: the same stage sizes filled with randomly assigned examples.

Scorers (harness.difficulty): `judge` (OpenAI-compatible endpoint), `local-judge` (in-process HF
model), `file` (Phased-format scores joined on text), `ifd` (offline proxy). `auto` = `file` when the
data carries scores, else `ifd`.

The `ifd` proxy has no 1-5 scale of its own: its ranks are mapped so that the thresholds cut at
`stage_proportions`, by default the paper's 58.5 / 28.4 / 13.1% (30.3k / 14.7k / 6.8k of Alpaca-52k under
GPT-4's scores, arXiv 2406.04371; ../shared/docs/recipes.md section 2). IFD > 1 pairs (the instruction does
not help; Cherry LLM drops them) rank as the easiest by default (`ifd_above_one`), not the hardest.

No record is dropped: a record the scorer could not score (over `scoring_max_length`, no parseable judge
score, not in the scores file) goes to `unscored_stage` (default 2, the middle: its difficulty is unknown),
and the record's details count them per reason. `scoring_max_length` defaults to training.max_length.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from harness.accelerator import process_inference_dtype
from harness.difficulty import (
    PAPER_STAGE_PROPORTIONS,
    DifficultyScores,
    score_with_judge,
    score_with_local_judge,
    scores_from_file,
    scores_from_ifd,
)
from harness.judge import JudgeSettings
from harness.models import resolve_model
from harness.runner import Overhead, RecipeOutput, RunContext

NAME = "phased"
DESCRIPTION = "Phased IFT: difficulty-scored stages, uptrained easy -> hard (Pang et al. 2024)"
# The parameters that name the variant on the leaderboard, e.g. phased[scorer=ifd-proxy, stage_order=1-2-3]
VARIANT_PARAMS = ("scorer", "stage_order")
# Reasons a scorer leaves a record unscored, as counted in the record's details
UNSCORED_REASONS = {
    "ifd": "no IFD (over scoring_max_length or no answer tokens)",
    "file": "not in the scores file",
    "judge": "no judge score (a reply without one, or a failed request)",
    "local-judge": "over the local judge's max_length",
}


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    scorer: Literal["auto", "ifd", "local-judge", "judge", "file"] = "auto"
    thresholds: tuple[float, float] = (1.5, 3.5)
    stage_order: list[int] | Literal["random"] = Field(default_factory=lambda: [1, 2, 3])
    scores_file: str | None = Field(None, description="Phased IFT scored JSONL for scorer=file")
    judge: JudgeSettings = JudgeSettings()
    local_judge_model: str | None = Field(None, description="model-set name or path; None: the run's base model")
    evaluate_each_stage: bool = False
    scoring_max_length: int | None = Field(None, gt=8, description="IFD proxy scoring length; None: training.max_length")
    stage_proportions: tuple[float, float, float] | None = Field(
        PAPER_STAGE_PROPORTIONS, description="ifd proxy: share of stages 1/2/3 (the paper's 58.5/28.4/13.1%); "
        "None: ranks spread evenly over 1..5")
    ifd_above_one: Literal["easiest", "by-rank"] = Field(
        "easiest", description="ifd proxy: IFD > 1 pairs rank as the easiest, or by their IFD (the hardest)")
    unscored_stage: Literal[1, 2, 3] = Field(2, description="the stage of records the scorer could not score")

    @field_validator("stage_proportions")
    @classmethod
    def _proportions(cls, value: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if value is not None and (min(value) < 0 or abs(sum(value) - 1.0) > 1e-6):
            raise ValueError("stage_proportions must be three non-negative shares summing to 1, e.g. [0.585, 0.284, 0.131]")
        return value

    @field_validator("thresholds")
    @classmethod
    def _ascending(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 1.0 <= value[0] < value[1] <= 5.0:
            raise ValueError("thresholds must satisfy 1 <= low < high <= 5")
        return value

    @model_validator(mode="after")
    def _valid_order(self) -> Params:
        if self.stage_order != "random":
            order = self.stage_order
            if not order or len(set(order)) != len(order) or not set(order) <= {1, 2, 3}:
                raise ValueError("stage_order must be distinct stages from {1, 2, 3} (e.g. [1, 2, 3], [3, 2, 1], [3]) or 'random'")
        return self


def score_difficulty(ctx: RunContext[Params], model: Any, tokenizer: Any) -> DifficultyScores:
    params, records = ctx.params, ctx.data.records
    scorer = params.scorer
    if scorer == "auto":
        scorer = "file" if params.scores_file or any("difficulty" in r.metadata for r in records) else "ifd"
    if scorer == "file":
        return scores_from_file(records, Path(params.scores_file) if params.scores_file else None)
    if scorer == "ifd":
        max_length = params.scoring_max_length or ctx.spec.training.max_length
        ifd = ctx.ifd(model, tokenizer, records, model_key=ctx.base_model_key, max_length=max_length)
        scores = scores_from_ifd(ifd, params.stage_proportions, params.thresholds, params.ifd_above_one)
        scores.details["scoring_max_length"] = max_length
        return scores
    if scorer == "local-judge":
        judge_model, judge_tokenizer = model, tokenizer
        if params.local_judge_model:  # loaded to score only: the inference dtype, not the run's
            judge_model, judge_tokenizer = ctx.load_model(
                resolve_model(params.local_judge_model), dtype=process_inference_dtype(), stage="load_model:judge")
        with ctx.stage("score:local-judge"):
            return score_with_local_judge(judge_model, judge_tokenizer, records, console=ctx.console)
    with ctx.stage("score:judge"):
        return score_with_judge(records, params.judge, cache=ctx.cache, console=ctx.console)


def assign_stages(scores: np.ndarray, thresholds: tuple[float, float], unscored_stage: int | None = None) -> dict[int, list[int]]:
    """Record indices per stage: 1 = [1, low), 2 = [low, high), 3 = [high, 5]; NaN scores go to
    `unscored_stage` (None: left out, for callers that place them themselves)."""
    low, high = thresholds
    stages: dict[int, list[int]] = {1: [], 2: [], 3: []}
    for index, score in enumerate(scores):
        if np.isnan(score):
            if unscored_stage is not None:
                stages[unscored_stage].append(index)
            continue
        stages[1 if score < low else 2 if score < high else 3].append(index)
    return stages


def random_stages(stages: dict[int, list[int]], seed: int) -> dict[int, list[int]]:
    """The paper's control: the same stage sizes, filled with randomly assigned examples."""
    pool = [index for stage in (1, 2, 3) for index in stages[stage]]
    random.Random(seed).shuffle(pool)
    shuffled, start = {}, 0
    for stage in (1, 2, 3):
        shuffled[stage] = sorted(pool[start : start + len(stages[stage])])
        start += len(stages[stage])
    return shuffled


def run(ctx: RunContext[Params]) -> RecipeOutput:
    params = ctx.params
    model, tokenizer = ctx.base_model()
    difficulty = score_difficulty(ctx, model, tokenizer)
    stages = assign_stages(difficulty.scores, params.thresholds, params.unscored_stage)
    order = [1, 2, 3] if params.stage_order == "random" else list(params.stage_order)
    if params.stage_order == "random":
        stages = random_stages(stages, ctx.spec.seed)
    records = ctx.data.records
    visited, stage_evaluations = [], {}
    for stage in order:
        members = stages[stage]
        scored = difficulty.scores[members][~np.isnan(difficulty.scores[members])]
        summary = {
            "stage": stage,
            "size": len(members),
            "unscored": int(len(members) - len(scored)),
            "mean_difficulty": float(np.mean(scored)) if len(scored) else None,
            "min_difficulty": float(np.min(scored)) if len(scored) else None,
            "max_difficulty": float(np.max(scored)) if len(scored) else None,
        }
        if not members:
            summary["skipped"] = "empty stage"
            visited.append(summary)
            continue
        model, result = ctx.train(model, tokenizer, [records[i] for i in members], stage=f"stage{stage}")
        summary["steps"] = result.steps
        visited.append(summary)
        if params.evaluate_each_stage and stage != order[-1]:
            stage_evaluations[f"stage{stage}"] = ctx.evaluate(model, tokenizer, f"stage{stage}")
    overhead = Overhead(  # an API judge's bill; a local judge's forward pass (the ifd proxy's is in ctx.scoring)
        scoring_tokens=int(difficulty.details.get("forward_tokens", 0)) if difficulty.scorer == "local-judge" else 0,
        judge_cost_usd=float(difficulty.details.get("cost_usd", 0.0)),
    )
    details = {
        "scorer": difficulty.scorer,
        "scorer_details": difficulty.details,
        "unscored": difficulty.unscored,
        "unscored_reasons": {UNSCORED_REASONS[difficulty.scorer]: difficulty.unscored} if difficulty.unscored else {},
        "unscored_stage": params.unscored_stage,
        "thresholds": list(params.thresholds),
        "stage_order": params.stage_order,
        "stages": visited,
        "stage_evaluations": stage_evaluations,
        "judge_cost_usd": overhead.judge_cost_usd,
        "extra_scoring_tokens": overhead.scoring_tokens,
    }
    scorer_name = "ifd-proxy" if difficulty.scorer == "ifd" else difficulty.scorer
    return RecipeOutput(model=model, tokenizer=tokenizer, details=details, overhead=overhead,
                        variant_params={"scorer": scorer_name})
