"""Difficulty scorers for Phased IFT, all on the paper's 1-5 scale (higher = harder).

- `judge`: an LLM judge behind an OpenAI-compatible chat endpoint (OpenAI, a vLLM or llama.cpp server),
  with a versioned prompt, concurrency, retries with backoff, token and cost accounting, and a
  per-item cache so an interrupted scoring run resumes.
- `local-judge`: the same prompt run in-process on a local HF model; the score is the expected value
  of the next-token distribution over the labels 1..5.
- `file`: precomputed scores (the Phased IFT scored format), joined on text.
- `ifd`: IFD from the scoring engine as an offline proxy, mapped to 1..5 by rank so that the stage
  thresholds cut at the paper's stage proportions (58.5 / 28.4 / 13.1%; a parameter).

The paper (arXiv 2406.04371) scored with GPT-4-0613; its prompt is in a figure that was not
recoverable, so the prompt (harness/judge/prompts/phased_difficulty.json) is ours, written to the paper's
description. The client, the local forward pass and the verdict store are the judge stack's
(harness.judge): this module only turns their answers into difficulty scores.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from harness.artifacts import ArtifactCache, content_key
from harness.cpu_kernels import onednn_inference
from harness.data import InstructionRecord, parse_rows, read_rows
from harness.errors import HarnessError
from harness.judge.endpoint import JudgeSettings, Reply, api_key, chat, spent
from harness.judge.local import label_probabilities
from harness.judge.prompts import load_difficulty_prompt
from harness.judge.store import VerdictJournal
from harness.scoring import IFDScores, scoring_progress

PROMPT = load_difficulty_prompt()
DIFFICULTY_PROMPT_VERSION = PROMPT.version
SCORE_PATTERN = re.compile(r"(?i)score\s*[:=]?\s*\**\s*([1-5](?:\.\d+)?)")
LEADING_NUMBER = re.compile(r"^\s*\**\s*([1-5](?:\.\d+)?)\b")


def difficulty_prompt(record: InstructionRecord) -> str:
    return PROMPT.render(record.instruction, record.input, record.output)


def difficulty_messages(record: InstructionRecord) -> list[dict[str, str]]:
    return PROMPT.messages(record.instruction, record.input, record.output)


def parse_score(reply: str) -> float | None:
    """The 1-5 score in a judge's reply, or None when the reply has none (a malformed reply)."""
    match = SCORE_PATTERN.search(reply) or LEADING_NUMBER.search(reply)
    if not match:
        return None
    value = float(match.group(1))
    return value if 1.0 <= value <= 5.0 else None


@dataclass
class DifficultyScores:
    """Per-record difficulty (NaN where unscored) and what it cost."""

    scores: np.ndarray
    scorer: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def unscored(self) -> int:
        return int(np.isnan(self.scores).sum())


# ----------------------------------------------------------------------------- file


def _join_key(prompt: str, output: str) -> str:
    return " ".join(prompt.split()) + "\x1f" + " ".join(output.split())


def record_join_key(record: InstructionRecord) -> str:
    """Phased IFT stores data[0] = instruction + "\\n" + input; whitespace differences are ignored."""
    prompt = record.instruction + ("\n" + record.input if record.input.strip() else "")
    return _join_key(prompt, record.output)


def scores_from_file(records: Sequence[InstructionRecord], path: Path | None) -> DifficultyScores:
    """Scores carried by the records themselves (Phased-format data) or joined on text from `path`."""
    if path is None:
        values = [record.metadata.get("difficulty") for record in records]
        if all(value is None for value in values):
            raise HarnessError(
                "phased scorer 'file': the data carries no difficulty scores; set params.scores_file to a Phased IFT "
                "scored JSONL, or use scorer ifd / local-judge / judge"
            )
        scores = np.array([np.nan if value is None else float(value) for value in values])
        return DifficultyScores(scores, "file", {"source": "record metadata"})
    scored, _, _ = parse_rows(read_rows(path), f"scores file {path}")
    table = {record_join_key(record): record.metadata.get("difficulty") for record in scored}
    scores = np.array([table.get(record_join_key(record), np.nan) for record in records], dtype=np.float64)
    return DifficultyScores(scores, "file", {"source": str(path), "file_records": len(scored)})


# ----------------------------------------------------------------------------- ifd proxy


# The share of Alpaca-52k in each stage under GPT-4's scores: 30.3k / 14.7k / 6.8k examples (Phased IFT,
# arXiv 2406.04371, section 3; ../shared/docs/recipes.md section 2), i.e. 58.5% / 28.4% / 13.1% of 51.8k.
PAPER_STAGE_PROPORTIONS: tuple[float, float, float] = (0.585, 0.284, 0.131)


def proxy_ranks(values: np.ndarray, above_one: str = "easiest") -> np.ndarray:
    """Rank (0 = easiest) of every record with a finite IFD, in the order of `np.flatnonzero(finite)`.

    Higher IFD = the instruction helps less = harder. IFD > 1 pairs are those Cherry LLM drops as
    misaligned (the instruction does not help at all): with `above_one="easiest"` they rank below every
    IFD <= 1 pair (the least informative, trained first and so overwritten most by later stages); with
    `"by-rank"` they keep their IFD rank (and so land in the hardest stage)."""
    valid = values[np.isfinite(values)]
    keys = (valid <= 1.0, valid) if above_one == "easiest" else (valid,)
    order = np.lexsort(tuple(reversed(keys)))  # lexsort sorts by the last key first
    ranks = np.empty(len(valid), dtype=np.int64)
    ranks[order] = np.arange(len(valid))
    return ranks


def stage_bounds(count: int, proportions: tuple[float, float, float]) -> tuple[int, int]:
    """Rank boundaries (b1, b2): ranks [0, b1) -> stage 1, [b1, b2) -> stage 2, [b2, count) -> stage 3."""
    total = sum(proportions)
    first = round(count * proportions[0] / total)
    return first, max(first, round(count * (proportions[0] + proportions[1]) / total))


def scores_from_ifd(
    ifd: IFDScores,
    proportions: tuple[float, float, float] | None = PAPER_STAGE_PROPORTIONS,
    thresholds: tuple[float, float] = (1.5, 3.5),
    above_one: str = "easiest",
) -> DifficultyScores:
    """Map IFD ranks onto the 1..5 scale so that the stage thresholds cut at the given proportions.

    Ranks [0, b1) get scores spread over [1, low), [b1, b2) over [low, high), the rest over [high, 5]
    (see `stage_bounds`), so the stages hold round(N x p) records: by default the paper's 58.5 / 28.4 /
    13.1%. `proportions=None` maps ranks uniformly onto 1..5 (the thresholds then cut at 12.5 / 50 /
    37.5%). Records without a finite IFD stay NaN (unscored; the recipe decides their stage)."""
    values = ifd.ifd
    scores = np.full(len(values), np.nan)
    valid = np.flatnonzero(np.isfinite(values))
    count = len(valid)
    if count:
        ranks = proxy_ranks(values, above_one)
        if proportions is None:
            scores[valid] = 1.0 + 4.0 * (ranks + 0.5) / count
        else:
            low, high = thresholds
            first, second = stage_bounds(count, proportions)
            knots = [(0, first, 1.0, low), (first, second, low, high), (second, count, high, 5.0)]
            mapped = np.empty(count)
            for start, stop, bottom, top in knots:
                inside = (ranks >= start) & (ranks < stop)
                mapped[inside] = bottom + (top - bottom) * (ranks[inside] - start + 0.5) / max(stop - start, 1)
            scores[valid] = mapped
    above = int(np.sum(values[valid] > 1.0))
    details = {
        "scoring": ifd.stats.as_record(), "ifd_skipped": len(ifd.skipped), "ifd_above_one": above,
        "ifd_above_one_rule": above_one,
        "stage_proportions": None if proportions is None else list(proportions),
    }
    return DifficultyScores(scores, "ifd", details)


# ----------------------------------------------------------------------------- local judge


def _label_token_ids(tokenizer: Any) -> tuple[str, list[int]]:
    """(prefix the prompt ends with, token ids of the labels 1..5 that follow it)."""
    spaced = [tokenizer.encode(f" {k}", add_special_tokens=False) for k in range(1, 6)]
    if all(len(ids) == 1 for ids in spaced):
        return "Score:", [ids[0] for ids in spaced]
    bare = [tokenizer.encode(str(k), add_special_tokens=False) for k in range(1, 6)]
    if all(len(ids) == 1 for ids in bare):
        return "Score: ", [ids[0] for ids in bare]
    raise HarnessError("local-judge: the judge's tokenizer has no single tokens for the labels 1..5")


def local_judge_prompt_ids(record: InstructionRecord, tokenizer: Any, prefix: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(difficulty_messages(record), tokenize=False, add_generation_prompt=True) + prefix
        return tokenizer(text, add_special_tokens=False).input_ids
    text = f"{PROMPT.system}\n\n{difficulty_prompt(record)}\n\n{prefix}"
    return tokenizer(text).input_ids


def score_with_local_judge(
    model: Any,
    tokenizer: Any,
    records: Sequence[InstructionRecord],
    *,
    max_length: int = 2048,
    rows_per_batch: int = 4,
    console: Console | None = None,
) -> DifficultyScores:
    """Expected value of the judge's next-token distribution over the labels 1..5 (the judge stack's
    `label_probabilities`; in a job of several processes the batches are dealt out among them)."""
    prefix, label_ids = _label_token_ids(tokenizer)
    prompts = [local_judge_prompt_ids(record, tokenizer, prefix) for record in records]
    usable = sum(len(ids) <= max_length for ids in prompts)
    with scoring_progress(console) as progress, onednn_inference(model):
        task = progress.add_task("local-judge difficulty", total=usable)
        distributions = label_probabilities(
            model, tokenizer, prompts, label_ids, rows_per_batch=rows_per_batch, max_length=max_length, deal_out=True,
            advance=lambda count: progress.advance(task, count),
        )
    labels = np.arange(1, 6, dtype=np.float64)
    scores = np.array([np.nan if d is None else float((np.asarray(d) * labels).sum()) for d in distributions])
    forward_tokens = sum(len(ids) for ids in prompts if len(ids) <= max_length)
    details = {"prompt_version": DIFFICULTY_PROMPT_VERSION, "forward_tokens": forward_tokens,
               "over_length": len(records) - usable}
    return DifficultyScores(scores, "local-judge", details)


# ----------------------------------------------------------------------------- remote judge


def score_with_judge(
    records: Sequence[InstructionRecord],
    settings: JudgeSettings,
    *,
    cache: ArtifactCache | None = None,
    console: Console | None = None,
) -> DifficultyScores:
    """Score every record through the judge endpoint (harness.judge.endpoint.chat: retries, malformed
    replies asked again, one-line 401); finished items are kept in the verdict store and never re-asked."""
    api_key(settings.api_key_env, settings.base_url)  # a remote judge without its key fails before any work
    cache = cache or ArtifactCache()
    file_key = content_key(prompt=DIFFICULTY_PROMPT_VERSION, model=settings.model, base_url=settings.base_url)
    journal = VerdictJournal(cache.root / "judge" / f"{file_key}.jsonl")  # verdicts by record id
    done = journal.entries
    pending = [record for record in records if done.get(record.id, {}).get("score") is None]
    reused = len({record.id for record in records} - {record.id for record in pending})
    failed: dict[str, str] = {}
    with scoring_progress(console) as progress:
        task = progress.add_task(f"judge {settings.model}", total=len(records), completed=reused)

        def finished(index: int, reply: Reply) -> None:
            record = pending[index]
            if reply.value is None:
                failed[record.id] = reply.problem
            else:
                journal.add({record.id: {"id": record.id, "score": reply.value, "prompt_tokens": reply.prompt_tokens,
                                         "completion_tokens": reply.completion_tokens, "attempts": reply.attempts}})
            progress.advance(task)

        replies = chat(settings, [difficulty_messages(record) for record in pending], parse=parse_score, on_reply=finished)
    scores = np.array([done.get(r.id, {}).get("score") or np.nan for r in records], dtype=np.float64)
    tokens = spent(replies)
    cost = (
        tokens["prompt_tokens"] / 1000 * settings.price_per_1k_prompt_tokens
        + tokens["completion_tokens"] / 1000 * settings.price_per_1k_completion_tokens
    )
    details = {
        "prompt_version": DIFFICULTY_PROMPT_VERSION,
        "judge_model": settings.model,
        "base_url": settings.base_url,
        "requested": len(pending),
        "reused_from_cache": reused,
        "failed": len(failed),
        "failure_kinds": sorted(set(failed.values())),
        **tokens,
        "cost_usd": round(cost, 6),
    }
    return DifficultyScores(scores, "judge", details)
