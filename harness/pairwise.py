"""Pairwise judging of two runs, the protocol of Phased IFT and Cherry LLM.

Each run generates greedy answers on the pairwise test sets shipped in benchmarks/pairwise/ (Vicuna 80,
Koala 180, LIMA 300, Self-Instruct 252, WizardLM 218). A judge scores both answers 1-10 with A shown
first, then again with B shown first. Per question: win = won twice or won + tied; tie = tied twice or
won + lost; loss otherwise. WinRate = (win + tie/2) / N - 0.5 (xubuvd/PhasedSFT), per set and over
all sets pooled (each set weighted by its size). Replies without two scores are counted skips and
left out of N. Standard errors are over questions (outcome 1 / 0.5 / 0).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError, unknown_name
from harness.generation import GenerationSettings, timed_generate
from harness.judges import Judge, Review
from harness.records import atomic_write_json, atomic_write_text

PAIRWISE_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "pairwise"
PAIRWISE_SETS = {"vicuna": 80, "koala": 180, "lima": 300, "sinstruct": 252, "wizardlm": 218}


@dataclass(frozen=True)
class PairwiseItem:
    set: str
    id: str
    question: str


def _question(name: str, row: dict[str, Any], line: int) -> tuple[str, str]:
    """(id, question) for one row; field names differ per set (as in Cherry LLM's eva_generation.py)."""
    try:
        if name == "vicuna":
            return str(row["question_id"]), row["text"]
        if name == "koala":
            return str(row["id"]), row["prompt"]
        if name == "lima":
            return f"lima_{line}", row["conversations"]
        if name == "wizardlm":
            return str(row["idx"]), row["Instruction"]
        if name == "sinstruct":
            instances = row["instances"]
            extra = instances[0]["input"].strip() if instances else ""
            return str(row["id"]), f"{row['instruction']}\n\n{extra}" if extra else row["instruction"]
    except (KeyError, IndexError, TypeError) as error:
        raise HarnessError(f"pairwise set {name}, line {line + 1}: missing field {error}") from None
    raise unknown_name("pairwise set", name, PAIRWISE_SETS)


def load_pairwise_set(name: str, limit: int | None = None) -> list[PairwiseItem]:
    """The questions of one test set in file order (the first `limit` when given)."""
    if name not in PAIRWISE_SETS:
        raise unknown_name("pairwise set", name, PAIRWISE_SETS)
    path = PAIRWISE_DIR / f"{name}_test_set.jsonl"
    items = []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise HarnessError(f"{path}, line {line + 1}: invalid JSON ({error.msg})") from None
        identifier, question = _question(name, row, line)
        if not isinstance(question, str) or not question.strip():
            raise HarnessError(f"{path}, line {line + 1}: empty question")
        items.append(PairwiseItem(name, identifier, question))
    return items[:limit] if limit is not None else items


def resolve_sets(sets: list[str] | None) -> list[str]:
    chosen = list(sets) if sets else list(PAIRWISE_SETS)
    for name in chosen:
        if name not in PAIRWISE_SETS:
            raise unknown_name("pairwise set", name, PAIRWISE_SETS)
    return chosen


# ----------------------------------------------------------------------------- generation


def generate_pairwise_outputs(
    model: Any,
    tokenizer: Any,
    *,
    output_dir: Path,
    settings: GenerationSettings | None = None,
    sets: list[str] | None = None,
    limit: int | None = None,
    generator: str = "model",
    progress: Any = None,
) -> dict[str, Any]:
    """Greedy answers for every set, written to output_dir/outputs_<set>.jsonl (+ generation.json)."""
    settings = settings or GenerationSettings()
    chosen = resolve_sets(sets)
    items = [item for name in chosen for item in load_pairwise_set(name, limit)]
    journal = output_dir / "outputs.partial.jsonl"  # finished batches: a killed run resumes there
    generations, summary = timed_generate(model, tokenizer, [i.question for i in items], settings, progress, journal)
    for name in chosen:
        lines = [
            json.dumps(
                {"id": i.id, "question": i.question, "output": g.text, "generator": generator, "new_tokens": g.new_tokens, "finished": g.finished},
                ensure_ascii=False,
            )
            for i, g in zip(items, generations, strict=True)
            if i.set == name
        ]
        atomic_write_text(output_dir / f"outputs_{name}.jsonl", "\n".join(lines) + "\n")
    record = {"generator": generator, "sets": chosen, "limit": limit, "settings": settings.as_record(), **summary}
    atomic_write_json(output_dir / "generation.json", record)
    journal.unlink(missing_ok=True)
    return record


def read_outputs(directory: Path, name: str) -> dict[str, dict[str, Any]]:
    path = directory / f"outputs_{name}.jsonl"
    if not path.is_file():
        raise HarnessError(f"pairwise outputs not found: {path} (generate them first for this run)")
    rows = {}
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if text.strip():
            try:
                row = json.loads(text)
                rows[str(row["id"])] = row
            except (json.JSONDecodeError, KeyError) as error:
                raise HarnessError(f"{path}, line {line + 1}: not a pairwise output row ({error})") from None
    return rows


# ----------------------------------------------------------------------------- the protocol


def outcome(scores: tuple[float, float] | None, scores_reverse: tuple[float, float] | None) -> str | None:
    """A's result from two reviews: `scores` with A shown first, `scores_reverse` with B shown first."""
    if scores is None or scores_reverse is None:
        return None
    first = (scores[0] > scores[1]) - (scores[0] < scores[1])
    second = (scores_reverse[1] > scores_reverse[0]) - (scores_reverse[1] < scores_reverse[0])
    total = first + second  # +2 won twice, +1 won + tied, 0 tied twice or won + lost, ...
    return "win" if total > 0 else "tie" if total == 0 else "loss"


OUTCOME_VALUE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def win_rate(outcomes: list[str | None]) -> dict[str, Any]:
    """WinRate = (win + tie/2) / N - 0.5 over judged questions; skips counted, not in N."""
    judged = [OUTCOME_VALUE[o] for o in outcomes if o is not None]
    counts = {k: sum(o == k for o in outcomes) for k in OUTCOME_VALUE}
    n = len(judged)
    value = sum(judged) / n - 0.5 if n else None
    stderr = None
    if n > 1:
        mean = sum(judged) / n
        stderr = math.sqrt(sum((v - mean) ** 2 for v in judged) / (n - 1) / n)
    return {"win_rate": {"value": value, "stderr": stderr}, **counts, "skipped": len(outcomes) - n, "n": n}


def judge_pairwise(
    outputs_a: Path,
    outputs_b: Path,
    *,
    judge: Judge,
    output_dir: Path,
    sets: list[str] | None = None,
    name_a: str = "A",
    name_b: str = "B",
) -> dict[str, Any]:
    """Judge run A's answers against run B's on every set, in both orders; returns A's WinRate over B.

    Writes judgments_<set>.jsonl (per question: both reviews, raw replies, outcome) and pairwise.json."""
    chosen = resolve_sets(sets)
    started = time.perf_counter()
    per_set: dict[str, Any] = {}
    all_outcomes: list[str | None] = []
    first_position = {"first": 0, "second": 0, "equal": 0}
    prices: list[float] = []
    for name in chosen:
        rows_a, rows_b = read_outputs(outputs_a, name), read_outputs(outputs_b, name)
        ids = [i for i in rows_a if i in rows_b]
        if not ids:
            raise HarnessError(f"pairwise set {name}: runs {name_a} and {name_b} share no question ids")
        items = [(rows_a[i]["question"], rows_a[i]["output"], rows_b[i]["output"]) for i in ids]
        reviews: list[Review] = judge.review_pairs(items + [(q, b, a) for q, a, b in items])
        forward, backward = reviews[: len(ids)], reviews[len(ids) :]
        outcomes = [outcome(f.scores, r.scores) for f, r in zip(forward, backward, strict=True)]
        for review in reviews:
            if review.scores is not None:
                s1, s2 = review.scores
                first_position["first" if s1 > s2 else "second" if s2 > s1 else "equal"] += 1
            if review.price is not None:
                prices.append(review.price)
        lines = [
            json.dumps(
                {
                    "id": i,
                    "question": rows_a[i]["question"],
                    "scores_a_first": list(f.scores) if f.scores else None,
                    "scores_b_first": list(r.scores) if r.scores else None,
                    "reply_a_first": f.raw,
                    "reply_b_first": r.raw,
                    "outcome": o,
                },
                ensure_ascii=False,
            )
            for i, f, r, o in zip(ids, forward, backward, outcomes, strict=True)
        ]
        atomic_write_text(output_dir / f"judgments_{name}.jsonl", "\n".join(lines) + "\n")
        per_set[name] = win_rate(outcomes) | {"missing_in_b": len(rows_a) - len(ids)}
        all_outcomes += outcomes
    parsed = sum(first_position.values())
    result = {
        "a": name_a,
        "b": name_b,
        "judge": judge.describe(),
        "protocol": "Phased IFT / Cherry LLM: 1-10 scores in both orders; WinRate = (win + tie/2)/N - 0.5",
        "overall": win_rate(all_outcomes),
        "sets": per_set,
        "position_bias": {
            "reviews_parsed": parsed,
            "first_shown_higher": first_position["first"] / parsed if parsed else None,
            "second_shown_higher": first_position["second"] / parsed if parsed else None,
            "equal_scores": first_position["equal"] / parsed if parsed else None,
        },
        "cost_usd": round(sum(prices), 6) if prices else None,
        "judge_seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_json(output_dir / "pairwise.json", result)
    return result
