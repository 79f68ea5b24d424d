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
recoverable, so DIFFICULTY_PROMPT below is ours, written to the paper's description.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from harness import distributed
from harness.artifacts import ArtifactCache, content_key
from harness.batching import collate_rows
from harness.cpu_kernels import onednn_inference
from harness.data import InstructionRecord, parse_rows, read_rows
from harness.errors import HarnessError
from harness.losses import final_hidden_states
from harness.scoring import IFDScores, scoring_progress
from harness.templates import TokenizedExample
from harness.verdicts import VerdictJournal

DIFFICULTY_PROMPT_VERSION = "phased-difficulty-v1"
DIFFICULTY_SYSTEM = "You are a careful annotator who rates instruction-tuning examples."
DIFFICULTY_PROMPT = """Rate how difficult the following instruction-following example is for an AI assistant.

[Instruction]
{instruction}

[Input]
{input}

[Expected response]
{output}

Judge two things together: how hard the instruction itself is (the knowledge, reasoning and skill it asks for), and how hard it is to get from the instruction to the expected response. Use a scale from 1 to 5, where 1 is trivial and 5 is very hard; fractional scores such as 2.5 are allowed.
Reply with the score on the first line in the form "Score: <number>", then one sentence of justification."""

SCORE_PATTERN = re.compile(r"(?i)score\s*[:=]?\s*\**\s*([1-5](?:\.\d+)?)")
LEADING_NUMBER = re.compile(r"^\s*\**\s*([1-5](?:\.\d+)?)\b")


def difficulty_prompt(record: InstructionRecord) -> str:
    return DIFFICULTY_PROMPT.format(
        instruction=record.instruction, input=record.input.strip() or "(none)", output=record.output
    )


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
    messages = [
        {"role": "system", "content": DIFFICULTY_SYSTEM},
        {"role": "user", "content": difficulty_prompt(record)},
    ]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefix
        return tokenizer(text, add_special_tokens=False).input_ids
    text = f"{DIFFICULTY_SYSTEM}\n\n{difficulty_prompt(record)}\n\n{prefix}"
    return tokenizer(text).input_ids


@torch.no_grad()
def score_with_local_judge(
    model: Any,
    tokenizer: Any,
    records: Sequence[InstructionRecord],
    *,
    max_length: int = 2048,
    rows_per_batch: int = 4,
    console: Console | None = None,
) -> DifficultyScores:
    """Expected value of the judge's next-token distribution over the labels 1..5."""
    prefix, label_ids = _label_token_ids(tokenizer)
    labels = torch.arange(1, 6, dtype=torch.float64)
    model.eval()
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    prompts = [local_judge_prompt_ids(record, tokenizer, prefix) for record in records]
    scores = np.full(len(records), np.nan)
    usable = [i for i, ids in enumerate(prompts) if len(ids) <= max_length]
    usable.sort(key=lambda i: len(prompts[i]))
    batches = [usable[start : start + rows_per_batch] for start in range(0, len(usable), rows_per_batch)]
    processes, rank = distributed.world_size(), distributed.rank()
    mine: dict[int, list[float]] = {}  # batch number -> scores: in a job of several processes, batches are dealt out
    with scoring_progress(console) as progress, onednn_inference(model):
        task = progress.add_task("local-judge difficulty", total=len(usable))
        for number in range(rank, len(batches), processes):
            chunk = batches[number]
            examples = [TokenizedExample(prompts[i], [-100] * len(prompts[i])) for i in chunk]
            batch = {k: v.to(device) for k, v in collate_rows([[e] for e in examples], tokenizer.pad_token_id).items()}
            hidden = final_hidden_states(model, batch)
            last = torch.tensor([len(prompts[i]) - 1 for i in chunk], device=device)
            logits = head(hidden[torch.arange(len(chunk), device=device), last]).float()
            probs = torch.softmax(logits[:, label_ids].double(), dim=-1).cpu()
            mine[number] = (probs * labels).sum(-1).tolist()
            progress.advance(task, len(chunk))
        for share in distributed.gather(mine):  # [mine] with one process
            for number, values in share.items():
                scores[batches[number]] = values
                if number not in mine:
                    progress.advance(task, len(values))
    forward_tokens = sum(len(prompts[i]) for i in usable)
    details = {"prompt_version": DIFFICULTY_PROMPT_VERSION, "forward_tokens": forward_tokens,
               "over_length": len(records) - len(usable)}
    return DifficultyScores(scores, "local-judge", details)


# ----------------------------------------------------------------------------- remote judge


class JudgeSettings(BaseModel):
    """An OpenAI-compatible chat endpoint. The key is read from the environment variable named here."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4-0613"  # the paper's judge
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = Field(4, gt=0, le=64)
    max_retries: int = Field(4, ge=0)
    backoff_seconds: float = Field(1.0, ge=0)
    timeout_seconds: float = Field(60.0, gt=0)
    max_tokens: int = Field(64, gt=0)
    price_per_1k_prompt_tokens: float = Field(0.03, ge=0)  # gpt-4-0613 list price, USD
    price_per_1k_completion_tokens: float = Field(0.06, ge=0)


def _is_local(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def judge_api_key(settings: JudgeSettings) -> str:
    key = os.environ.get(settings.api_key_env, "")
    if key:
        return key
    if _is_local(settings.base_url):
        return "EMPTY"  # local vLLM / llama.cpp servers accept any key
    raise HarnessError(
        f"judge at {settings.base_url}: environment variable {settings.api_key_env} is not set; "
        f"export it, or point params.judge.base_url at a local OpenAI-compatible server"
    )


class _KeyRejected(Exception):
    """The judge endpoint answered 401: raised in the worker threads, reported once by the caller."""


def _judge_one(client: Any, settings: JudgeSettings, record: InstructionRecord, rejected: threading.Event) -> dict[str, Any]:
    """One judgment with retries and exponential backoff; malformed replies are retried too. Once the
    endpoint has rejected the key (`rejected`), no worker sends another request."""
    import openai

    last_problem = ""
    prompt_tokens = completion_tokens = 0
    for attempt in range(settings.max_retries + 1):
        if attempt:
            time.sleep(settings.backoff_seconds * 2 ** (attempt - 1))
        if rejected.is_set():
            raise _KeyRejected
        try:
            response = client.chat.completions.create(
                model=settings.model,
                messages=[
                    {"role": "system", "content": DIFFICULTY_SYSTEM},
                    {"role": "user", "content": difficulty_prompt(record)},
                ],
                temperature=0,
                max_tokens=settings.max_tokens,
            )
        except openai.AuthenticationError:
            rejected.set()
            raise _KeyRejected from None
        except (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError, openai.InternalServerError) as error:
            last_problem = type(error).__name__
            continue
        except openai.APIStatusError as error:
            last_problem = f"HTTP {error.status_code}"
            continue
        if response.usage is not None:
            prompt_tokens += response.usage.prompt_tokens or 0
            completion_tokens += response.usage.completion_tokens or 0
        reply = (response.choices[0].message.content or "") if response.choices else ""
        score = parse_score(reply)
        if score is not None:
            return {"id": record.id, "score": score, "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens, "attempts": attempt + 1}
        last_problem = "malformed reply"
    return {"id": record.id, "score": None, "problem": last_problem, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "attempts": settings.max_retries + 1}


def score_with_judge(
    records: Sequence[InstructionRecord],
    settings: JudgeSettings,
    *,
    cache: ArtifactCache | None = None,
    console: Console | None = None,
) -> DifficultyScores:
    """Score every record through the judge endpoint; finished items are cached and never re-asked."""
    import openai

    key = judge_api_key(settings)
    cache = cache or ArtifactCache()
    file_key = content_key(prompt=DIFFICULTY_PROMPT_VERSION, model=settings.model, base_url=settings.base_url)
    journal = VerdictJournal(cache.root / "judge" / f"{file_key}.jsonl")  # verdicts by record id
    done = journal.entries
    pending = [record for record in records if done.get(record.id, {}).get("score") is None]
    reused = len({record.id for record in records} - {record.id for record in pending})
    client = openai.OpenAI(base_url=settings.base_url, api_key=key, max_retries=0, timeout=settings.timeout_seconds)
    failed: dict[str, str] = {}
    spent = {"prompt_tokens": 0, "completion_tokens": 0}
    with scoring_progress(console) as progress, ThreadPoolExecutor(settings.concurrency) as pool:
        task = progress.add_task(f"judge {settings.model}", total=len(records), completed=reused)
        rejected = threading.Event()
        futures = [pool.submit(_judge_one, client, settings, record, rejected) for record in pending]
        for future in as_completed(futures):
            try:
                entry = future.result()
            except _KeyRejected:  # every other request would fail the same way: stop them all
                for queued in futures:
                    queued.cancel()
                raise HarnessError(
                    f"judge at {settings.base_url} rejected the key in {settings.api_key_env} (401); check it"
                ) from None
            spent["prompt_tokens"] += entry["prompt_tokens"]
            spent["completion_tokens"] += entry["completion_tokens"]
            if entry["score"] is None:
                failed[entry["id"]] = entry["problem"]
            else:
                journal.add({entry["id"]: entry})
            progress.advance(task)
    scores = np.array([done.get(r.id, {}).get("score") or np.nan for r in records], dtype=np.float64)
    cost = (
        spent["prompt_tokens"] / 1000 * settings.price_per_1k_prompt_tokens
        + spent["completion_tokens"] / 1000 * settings.price_per_1k_completion_tokens
    )
    details = {
        "prompt_version": DIFFICULTY_PROMPT_VERSION,
        "judge_model": settings.model,
        "base_url": settings.base_url,
        "requested": len(pending),
        "reused_from_cache": reused,
        "failed": len(failed),
        "failure_kinds": sorted(set(failed.values())),
        **spent,
        "cost_usd": round(cost, 6),
    }
    return DifficultyScores(scores, "judge", details)
