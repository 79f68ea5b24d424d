"""Pairwise judging of two runs, the protocol of Phased IFT and Cherry LLM.

Each run generates greedy answers on the pairwise test sets shipped in benchmarks/pairwise/ (Vicuna 80,
Koala 180, LIMA 300, Self-Instruct 252, WizardLM 218). A judge scores both answers 1-10 with A shown
first, then again with B shown first. Per question: win = won twice or won + tied; tie = tied twice or
won + lost; loss otherwise. WinRate = (win + tie/2) / N - 0.5 (xubuvd/PhasedSFT), per set and over
all sets pooled (each set weighted by its size). Replies without two scores are counted skips and
left out of N. Standard errors are over questions (outcome 1 / 0.5 / 0).

As a suite section (`pairwise:` in a suite YAML, run by run_suite_section) the run's model is A and a
reference is B; WinRate > 0 means the run's answers are preferred. The reference is one of:
- `base` (default): the run's base model before fine-tuning (spec.model / model_path), so the section
  measures what the recipe's training bought. Its answers are generated once per (weights, sets,
  limit, generation settings) and kept in the artifact cache ($HARNESS_CACHE/artifacts), so every
  recipe run on that base model is judged against the same answers.
- `{model: NAME, model_path: PATH}`: any model the model set resolves, cached the same way.
- `{outputs: DIR}`: saved answers, a directory of outputs_<set>.jsonl, e.g. another run's
  eval/pairwise/model/ (the papers' comparison: a recipe's run against one-off's run).
Both answers are generated from the same prompts (the run's template). Two finished runs can also be
compared after the fact with judge_pairwise(runA/eval/pairwise/model, runB/eval/pairwise/model, ...).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from harness.errors import HarnessError, unknown_name
from harness.evaluation import SectionContext, SectionSettings, metric_cell, parse_section
from harness.generation import GenerationSettings, resumable_generate
from harness.judges import CachedJudge, Judge, Review, check_judge, judge_options, make_judge
from harness.records import atomic_write_json, atomic_write_text

PAIRWISE_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "pairwise"
PAIRWISE_SETS = {"vicuna": 80, "koala": 180, "lima": 300, "sinstruct": 252, "wizardlm": 218}
OUTPUTS_PREFIX = "outputs_"


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
    chunk_size: int = 64,
) -> dict[str, Any]:
    """Greedy answers for every set, written to output_dir/outputs_<set>.jsonl (+ generation.json).
    Reused when generation.json says the same generator, sets, limit and settings; saved chunk by chunk
    (generation.partial.json) while running, so a killed job resumes."""
    settings = settings or GenerationSettings()
    chosen = resolve_sets(sets)
    key = {"generator": generator, "sets": chosen, "limit": limit, "settings": settings.as_record()}
    record_path = output_dir / "generation.json"
    if record_path.is_file() and all((output_dir / f"outputs_{name}.jsonl").is_file() for name in chosen):
        try:
            saved = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            saved = {}
        if saved.get("key") == key:
            return saved
    items = [item for name in chosen for item in load_pairwise_set(name, limit)]
    partial = output_dir / "generation.partial.json"
    generations, summary = resumable_generate(
        model, tokenizer, [i.question for i in items], settings, progress_file=partial, chunk_size=chunk_size, progress=progress
    )
    write_outputs(output_dir, items, [g.text for g in generations], generator, generations)
    record = {"generator": generator, "sets": chosen, "limit": limit, "settings": settings.as_record(), **summary, "key": key}
    atomic_write_json(record_path, record)
    partial.unlink(missing_ok=True)
    return record


def write_outputs(
    output_dir: Path, items: list[PairwiseItem], texts: list[str], generator: str, generations: list[Any] | None = None
) -> None:
    """outputs_<set>.jsonl for every set among `items` (the format judge_pairwise reads)."""
    for name in dict.fromkeys(i.set for i in items):
        lines = []
        for k, (item, text) in enumerate(zip(items, texts, strict=True)):
            if item.set != name:
                continue
            row: dict[str, Any] = {"id": item.id, "question": item.question, "output": text, "generator": generator}
            if generations is not None:
                row |= {"new_tokens": generations[k].new_tokens, "finished": generations[k].finished}
            lines.append(json.dumps(row, ensure_ascii=False))
        atomic_write_text(output_dir / f"{OUTPUTS_PREFIX}{name}.jsonl", "\n".join(lines) + "\n")


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


# ----------------------------------------------------------------------------- as a suite section


class PairwiseSection(SectionSettings):
    """The `pairwise:` keys of a suite (benchmarks/suites/paper.yaml)."""

    test_sets: list[str] = Field(default_factory=lambda: list(PAIRWISE_SETS))
    both_orders: bool = Field(True, description="the protocol judges both orders; false is refused")
    reference: str | dict[str, Any] = Field("base", description="base | {model, model_path} | {outputs}")
    judge: str = Field("openai:gpt-4", description="the papers used GPT-4")


@dataclass(frozen=True)
class Reference:
    """Side B of the comparison."""

    kind: str  # base | model | outputs
    model: str | None = None
    model_path: str | None = None
    outputs: Path | None = None

    @property
    def name(self) -> str:
        if self.kind == "outputs":
            return f"outputs:{self.outputs}"
        return f"{self.kind}:{self.model}"


def parse_reference(raw: str | dict[str, Any]) -> Reference:
    if raw == "base":
        return Reference("base")
    if isinstance(raw, dict) and set(raw) == {"outputs"} and isinstance(raw["outputs"], str):
        return Reference("outputs", outputs=Path(raw["outputs"]).expanduser())
    if (
        isinstance(raw, dict)
        and "model" in raw
        and set(raw) <= {"model", "model_path"}
        and isinstance(raw["model"], str)
        and isinstance(raw.get("model_path"), (str, type(None)))
    ):
        return Reference("model", model=raw["model"], model_path=raw.get("model_path"))
    shown = json.dumps(raw, default=str)
    raise HarnessError(
        f"section pairwise: reference = {shown}: give base, {{model: NAME, model_path: PATH}} or {{outputs: DIR}}"
    )


def _section_settings(config: dict[str, Any]) -> tuple[PairwiseSection, Reference, Any]:
    settings = parse_section(PairwiseSection, config, "pairwise")
    if not settings.both_orders:
        raise HarnessError("section pairwise: both_orders = false: the protocol judges both orders (position bias); drop the key")
    try:
        resolve_sets(settings.test_sets)
    except HarnessError as error:
        raise HarnessError(f"section pairwise: test_sets: {error}") from None
    options = judge_options(settings.judge_options, where="section pairwise: judge_options")
    return settings, parse_reference(settings.reference), options


def check_suite_section(config: dict[str, Any]) -> None:
    """Called before training: keys, sets, judge and reference are usable."""
    from harness.models import resolve_model

    settings, reference, options = _section_settings(config)
    check_judge(settings.judge, options)
    if reference.kind == "model":
        resolve_model(reference.model or "", reference.model_path)
    if reference.kind == "outputs":
        for name in settings.test_sets:
            path = (reference.outputs or Path()) / f"{OUTPUTS_PREFIX}{name}.jsonl"
            if not path.is_file():
                raise HarnessError(f"section pairwise: reference outputs not found: {path}")


def _weights_identity(weights: str) -> str:
    """A file's content hash (a .gguf), else the name: what decides the reference model's answers."""
    from harness.artifacts import file_digest

    path = Path(weights)
    return f"sha256:{file_digest(path)}" if path.is_file() else weights


def reference_outputs(
    reference: Reference,
    *,
    output_dir: Path,
    sets: list[str],
    limit: int | None,
    settings: GenerationSettings,
    chunk_size: int = 64,
) -> dict[str, Any]:
    """Write the reference's answers to output_dir/outputs_<set>.jsonl; a model's answers are generated
    once per (weights, sets, limit, settings) into the artifact cache and copied from there after."""
    from harness import __version__
    from harness.artifacts import ArtifactCache, content_key
    from harness.models import MODEL_SET_VERSION, load_model_and_tokenizer, resolve_model

    if reference.kind == "outputs":
        items, texts = [], []
        for name in sets:
            rows = read_outputs(reference.outputs or Path(), name)
            for item in load_pairwise_set(name, limit):
                if item.id in rows:
                    items.append(item)
                    texts.append(rows[item.id]["output"])
        write_outputs(output_dir, items, texts, generator=reference.name)
        return {"reference": reference.name, "answers": len(items)}
    resolved = resolve_model(reference.model or "", reference.model_path)
    cache = ArtifactCache()
    kind = "pairwise_reference"
    key = content_key(
        weights=_weights_identity(resolved.weights),
        model=resolved.entry.name,
        sets=sets,
        limit=limit,
        settings=settings.as_record(),
        harness=__version__,
        model_set=MODEL_SET_VERSION,
    )
    saved = cache.load(kind, key)
    from_cache = saved is not None
    if saved is None:
        import gc

        import torch

        model, tokenizer = load_model_and_tokenizer(resolved)
        if torch.cuda.is_available():
            model.to("cuda")
        items = [item for name in sets for item in load_pairwise_set(name, limit)]
        progress_file = cache.partial_dir(kind, key) / "generation.json"
        generations, summary = resumable_generate(
            model, tokenizer, [i.question for i in items], settings, progress_file=progress_file, chunk_size=chunk_size
        )
        del model
        gc.collect()
        saved = {
            "model": resolved.as_record(),
            "generation": settings.as_record() | summary,
            "answers": [{"set": i.set, "id": i.id, "output": g.text} for i, g in zip(items, generations, strict=True)],
        }
        cache.save(kind, key, saved)
    answers = {(a["set"], a["id"]): a["output"] for a in saved["answers"]}
    items = [item for name in sets for item in load_pairwise_set(name, limit)]
    write_outputs(output_dir, items, [answers[(i.set, i.id)] for i in items], generator=reference.name)
    return {
        "reference": reference.name,
        "answers": len(items),
        "cache_key": key,
        "from_cache": from_cache,
        "generation": saved["generation"],
    }


def run_suite_section(
    model: Any, tokenizer: Any, config: dict[str, Any], *, output_dir: Path, seed: int, context: SectionContext | None = None
) -> dict[str, Any]:
    """Pairwise judging as a suite section: the run's answers (A) against the reference's (B) on every
    set, both orders, with WinRate (and a 95% interval) pooled and per set, the judge's cost and
    per-question rows for paired tests across runs. Writes model/ and reference/ (answers),
    judgments_<set>.jsonl, pairwise.json and judge_cache.jsonl (verdicts, so a rerun judges nothing again)."""
    del seed  # greedy decoding and a deterministic judge: nothing is drawn at random
    context = context or SectionContext()
    settings, reference, options = _section_settings(config)
    if reference.kind == "base":
        if context.base_model is None:
            raise HarnessError("section pairwise: reference base needs the run's base model; give reference: {model: NAME}")
        reference = Reference("base", model=context.base_model, model_path=context.base_model_path)
    sets = resolve_sets(settings.test_sets)
    generation = settings.generation_settings(context.template_for(tokenizer))
    output_dir.mkdir(parents=True, exist_ok=True)
    produced = generate_pairwise_outputs(
        model,
        tokenizer,
        output_dir=output_dir / "model",
        settings=generation,
        sets=sets,
        limit=settings.limit,
        generator=context.generator,
        chunk_size=settings.chunk_size,
    )
    from_reference = reference_outputs(
        reference,
        output_dir=output_dir / "reference",
        sets=sets,
        limit=settings.limit,
        settings=generation,
        chunk_size=settings.chunk_size,
    )
    judge = CachedJudge(make_judge(settings.judge, options), output_dir / "judge_cache.jsonl", chunk_size=settings.chunk_size)
    result = judge_pairwise(
        output_dir / "model",
        output_dir / "reference",
        judge=judge,
        output_dir=output_dir,
        sets=sets,
        name_a=context.generator,
        name_b=reference.name,
    )
    overall = result["overall"]
    bounds = (-0.5, 0.5)  # WinRate's range
    cells = {"win_rate": metric_cell(overall["win_rate"]["value"], overall["win_rate"]["stderr"], bounds=bounds)}
    for name, entry in result["sets"].items():
        cell = metric_cell(entry["win_rate"]["value"], entry["win_rate"]["stderr"], bounds=bounds, n=entry["n"])
        cells[f"win_rate_{name}"] = cell
    samples = []
    for name in sets:
        for line in (output_dir / f"judgments_{name}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row["outcome"] is not None:
                samples.append({"doc_id": f"{name}/{row['id']}", "set": name, "win_rate": OUTCOME_VALUE[row["outcome"]] - 0.5})
    return cells | {
        "n": overall["n"],
        "win": overall["win"],
        "tie": overall["tie"],
        "loss": overall["loss"],
        "skipped": overall["skipped"],
        "reference": reference.name,
        "judge": result["judge"]["judge"],
        "judge_cost_usd": result["cost_usd"],
        "details": {
            "protocol": result["protocol"],
            "judge": result["judge"],
            "position_bias": result["position_bias"],
            "sets": result["sets"],
            "limit": settings.limit,
            "generation": {key: value for key, value in produced.items() if key != "key"},
            "reference": from_reference,
            "judge_seconds": result["judge_seconds"],
        },
        "samples": samples,
    }
