"""The one store for judge verdicts: Phased IFT's difficulty scores (harness.difficulty.score_with_judge)
and the suite sections' AlpacaEval and pairwise verdicts (CachedJudge).

An append-only JSONL journal, one line per finished verdict, flushed and fsynced as it is written: a
killed job keeps everything judged before the kill, and a rerun asks the judge nothing it has
answered. A line cut short by a kill, or written in another format, is ignored and that item is
judged again. The journal holds verdicts and raw replies only, never a key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.judge.base import LOCAL_ALPACA_LABELS, LOCAL_ALPACA_PROMPT, Judge, JudgeOptions, Review
from harness.judge.local import LocalJudge
from harness.judge.openai_judge import OpenAIJudge
from harness.judge.prompts import DEFAULT_PAIRWISE_PROMPT, load_pairwise_prompt

VERDICT_FORMAT = 2  # 1: the judge caches before they were merged (a JSON file / a per-id JSONL)


def json_safe(value: Any) -> Any:
    """NaN (a failed verdict) as null: the journal stays strict JSON; readers coerce null back to NaN."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class VerdictJournal:
    """Verdicts by key (`entries`), loaded from `path` and extended with `add` (thread-safe)."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.cut_line = False  # the file ends inside a line (a kill mid-write): start the next on a new one
        self.entries: dict[str, Any] = self._load()

    def _load(self) -> dict[str, Any]:
        entries: dict[str, Any] = {}
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return entries  # absent (or unreadable): everything is judged
        self.cut_line = bool(text) and not text.endswith("\n")
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and entry.get("format") == VERDICT_FORMAT and isinstance(entry.get("key"), str):
                entries[entry["key"]] = entry.get("value")
        return entries

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def add(self, items: dict[str, Any]) -> None:
        """Append verdicts (key -> JSON value) with one fsync."""
        if not items:
            return
        lines = "".join(
            json.dumps({"format": VERDICT_FORMAT, "key": key, "value": value}, ensure_ascii=False) + "\n"
            for key, value in items.items()
        )
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write("\n" * self.cut_line + lines)
                self.cut_line = False
                handle.flush()
                os.fsync(handle.fileno())
            self.entries.update(items)


# ----------------------------------------------------------------------------- cached verdicts


def _prompt_identity(options: JudgeOptions) -> dict[str, Any]:
    """The pairwise prompt's part of a cache key; empty for the default prompt, so verdicts saved before
    prompts became selectable (all with that prompt) keep their keys."""
    if options.pairwise_prompt == DEFAULT_PAIRWISE_PROMPT:
        return {}
    return {"pairwise_prompt": f"{options.pairwise_prompt}:{load_pairwise_prompt(options.pairwise_prompt).digest()}"}


def judge_identity(judge: Any) -> dict[str, Any]:
    """What decides a judge's verdicts (not its counters or its price): the judge part of a cache key."""
    inner = judge.judge if isinstance(judge, CachedJudge) else judge
    if isinstance(inner, OpenAIJudge):
        return {
            "kind": "openai",
            "model": inner.model,
            "base_url": inner.describe()["base_url"],
            "annotator_config": inner.options.annotator_config,
            "pairwise_max_tokens": inner.options.pairwise_max_tokens,
        } | _prompt_identity(inner.options)
    if isinstance(inner, LocalJudge):
        return {
            "kind": "local",
            "judge": inner.name,
            "model_path": inner.options.model_path,
            "alpaca_prompt": LOCAL_ALPACA_PROMPT,
            "labels": list(LOCAL_ALPACA_LABELS),
            "max_answer_tokens": inner.options.max_answer_tokens,
        } | _prompt_identity(inner.options)
    return {"judge": inner.name}


class CachedJudge:
    """A judge whose verdicts are kept in a verdict journal (VerdictJournal), keyed by (judge identity,
    task, instruction, both answers as shown): a killed evaluation resumes where it stopped, and a rerun
    asks the judge nothing it has answered. Work goes to the judge in chunks; each finished chunk is
    appended to the journal."""

    def __init__(self, judge: Judge, path: Path, *, chunk_size: int = 64) -> None:
        if chunk_size < 1:
            raise HarnessError(f"judge cache chunk_size={chunk_size}: must be >= 1")
        self.judge = judge
        self.name = judge.name
        self.path = path
        self.chunk_size = chunk_size
        self.identity = judge_identity(judge)
        self.journal = VerdictJournal(path)
        self.entries = self.journal.entries
        self.reused = 0  # verdicts read from the cache in this process
        self.judged = 0  # verdicts asked of the judge in this process

    def _key(self, task: str, *texts: str) -> str:
        canonical = json.dumps([self.identity, task, *texts], ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def _missing(self, keys: list[str]) -> list[int]:
        """Positions to ask the judge about: not cached, first occurrence only (equal items are asked once)."""
        missing, seen = [], set()
        for position, key in enumerate(keys):
            if key not in self.entries and key not in seen:
                missing.append(position)
                seen.add(key)
        self.reused += sum(key in self.entries for key in keys)
        self.judged += len(missing)
        return missing

    def describe(self) -> dict[str, Any]:
        return self.judge.describe() | {"cache": {"file": self.path.name, "reused": self.reused, "judged": self.judged}}

    def annotate_alpaca(self, rows: list[dict[str, Any]], work_dir: Path) -> list[dict[str, Any]]:
        keys = [self._key("alpaca_eval", r["instruction"], r["output_1"], r["output_2"]) for r in rows]
        missing = self._missing(keys)
        for start in range(0, len(missing), self.chunk_size):
            chunk = missing[start : start + self.chunk_size]
            notes = self.judge.annotate_alpaca([rows[i] for i in chunk], work_dir)
            self.journal.add({
                keys[position]: {k: json_safe(v) for k, v in note.items() if k not in rows[position]}
                for position, note in zip(chunk, notes, strict=True)
            })
        out = []
        for row, key in zip(rows, keys, strict=True):
            added = dict(self.entries[key])
            if added.get("preference") is None:
                added["preference"] = math.nan
            out.append(row | added)
        return out

    def review_pairs(self, items: list[tuple[str, str, str]]) -> list[Review]:
        keys = [self._key("pairwise", *item) for item in items]
        missing = self._missing(keys)
        for start in range(0, len(missing), self.chunk_size):
            chunk = missing[start : start + self.chunk_size]
            reviews = self.judge.review_pairs([items[i] for i in chunk])
            self.journal.add({
                keys[position]: {
                    "scores": list(review.scores) if review.scores is not None else None,
                    "raw": review.raw,
                    "price": json_safe(review.price),
                }
                for position, review in zip(chunk, reviews, strict=True)
            })
        out = []
        for key in keys:
            entry = self.entries[key]
            scores = tuple(entry["scores"]) if entry["scores"] is not None else None
            out.append(Review(scores, entry["raw"], entry["price"]))  # type: ignore[arg-type]
        return out
