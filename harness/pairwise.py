"""Pairwise judging of two runs, the protocols of Cherry LLM and Phased IFT.

Each run generates greedy answers on the pairwise test sets shipped in benchmarks/pairwise/ (Vicuna 80,
Koala 180, LIMA 300, Self-Instruct 252, WizardLM 218). A judge scores both answers 1-10 with A shown
first, then again with B shown first. Per question: win = won twice or won + tied; tie = tied twice or
won + lost; loss otherwise. WinRate = (win + tie/2) / N - 0.5, per set. Standard errors are over
questions (outcome 1 / 0.5 / 0). Two named protocols (PROTOCOLS; the section key `protocol`) differ in
the rest, and the record names the one used:
- `cherry` (default; tianyi-lab/Cherry_LLM): the judge prompt asks for scores then an explanation, 1,024
  reply tokens; all five sets; the overall WinRate pools all questions (each set weighted by its size);
  a review without two scores is a counted skip, left out of N.
- `phasedsft` (xubuvd/PhasedSFT, the Phased IFT paper): the judge prompt says "Do not explain for your
  scores", 256 reply tokens; the paper's sets (Self-Instruct, WizardLM, Koala, Vicuna; its OASST and
  Anthropic sets are not available; no LIMA); a question whose reviews do not both parse stays in N
  and adds nothing, i.e. counts as a loss (win_tie_loss_stat.py divides by all questions); the overall
  WinRate is the mean of the per-set WinRates.

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

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from harness.errors import HarnessError, unknown_name
from harness.evaluation import SectionContext, SectionSettings, metric_cell, parse_section
from harness.generation import GenerationSettings, resumable_generate
from harness.io import atomic_write_json, atomic_write_text
from harness.judge import CachedJudge, Judge, Review, check_judge, judge_options, make_judge

PAIRWISE_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "pairwise"
PAIRWISE_SETS = {"vicuna": 80, "koala": 180, "lima": 300, "sinstruct": 252, "wizardlm": 218}
OUTPUTS_PREFIX = "outputs_"


@dataclass(frozen=True)
class PairwiseProtocol:
    """How verdicts become a WinRate, and which prompt and sets the judge sees."""

    name: str
    test_sets: tuple[str, ...]  # the default sets
    judge_prompt: str  # harness.judge.PAIRWISE_PROMPTS (a data file in harness/judge/prompts/)
    judge_max_tokens: int  # reply budget of an OpenAI-protocol judge
    failed_as_loss: bool  # a question whose reviews do not both parse: in N as a loss (True) or skipped (False)
    overall: Literal["pooled", "set_mean"]
    source: str
    unavailable_sets: tuple[str, ...] = ()
    input_joiner: str = "\n\n"  # a Self-Instruct question's instruction and input, as the model sees them
    judge_input_joiner: str = "\n\n"  # ... and as the judge sees them

    def as_record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "judge_prompt": self.judge_prompt,
            "judge_max_tokens": self.judge_max_tokens,
            "failed_reviews": "counted as losses (in N)" if self.failed_as_loss else "skipped (not in N)",
            "overall": "mean of the per-set WinRates" if self.overall == "set_mean" else "all questions pooled",
            "default_test_sets": list(self.test_sets),
            "self_instruct_question": {"model": f"instruction{self.input_joiner!r}input", "judge": f"instruction{self.judge_input_joiner!r}input"},  # noqa: E501
            "unavailable_sets": list(self.unavailable_sets),
            "outcome_rule": "win = won twice or won + tied; tie = tied twice or won + lost; WinRate = (win + tie/2)/N - 0.5",
            "source": self.source,
        }


PROTOCOLS = {
    "cherry": PairwiseProtocol(
        name="cherry",
        test_sets=("vicuna", "koala", "lima", "sinstruct", "wizardlm"),
        judge_prompt="cherry",
        judge_max_tokens=1024,
        failed_as_loss=False,
        overall="pooled",
        source=(
            "tianyi-lab/Cherry_LLM evaluation/generation/eval.py (prompt; --max_tokens default 1024), "
            "review_eval_score.py (task_list Vicuna, Koala, WizardLM, SInstruct, LIMA; cal_rate pools their counts)"
        ),
    ),
    "phasedsft": PairwiseProtocol(
        name="phasedsft",
        test_sets=("sinstruct", "wizardlm", "koala", "vicuna"),
        judge_prompt="phasedsft",
        judge_max_tokens=256,
        failed_as_loss=True,
        overall="set_mean",
        source=(
            "xubuvd/PhasedSFT evaluation/eval.py (gen_prompt's active criteria; --max_tokens default 256, "
            "run_gpt4_scoring.sh passes 256), evaluation/win_tie_loss_stat.py (per test set; a pair of reviews "
            "with a score <= 0, i.e. unparsed, is skipped by `continue` but N = total_len, all questions), "
            "run_win_rate.sh / generation/evaluation.sh (sets oasst, anthropic, koala, vicuna, sinstruct, wizardlm; "
            "no LIMA); Phased IFT paper (arXiv 2406.04371) reports each set and their mean"
        ),
        unavailable_sets=("oasst", "anthropic"),
        input_joiner="\n",  # generation/generation_v2.py: prompt_input "User: {instruction}\n{input}</s>..."
        judge_input_joiner=" Input: ",  # evaluation/eval.py: '{instruction} Input: {input}'
    ),
}


def get_protocol(name: str) -> PairwiseProtocol:
    if name not in PROTOCOLS:
        raise unknown_name("pairwise protocol", name, PROTOCOLS)
    return PROTOCOLS[name]


@dataclass(frozen=True)
class PairwiseItem:
    set: str
    id: str
    question: str  # what the model answers
    judge_question: str = ""  # what the judge is shown ("": the same)


def _question(name: str, row: dict[str, Any], line: int, joiner: str = "\n\n") -> tuple[str, str]:
    """(id, question) for one row; field names differ per set (as in Cherry LLM's eva_generation.py).
    A Self-Instruct question is its instruction, then `joiner` and its input when it has one."""
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
            return str(row["id"]), f"{row['instruction']}{joiner}{extra}" if extra else row["instruction"]
    except (KeyError, IndexError, TypeError) as error:
        raise HarnessError(f"pairwise set {name}, line {line + 1}: missing field {error}") from None
    raise unknown_name("pairwise set", name, PAIRWISE_SETS)


def load_pairwise_set(name: str, limit: int | None = None, protocol: str = "cherry") -> list[PairwiseItem]:
    """The questions of one test set in file order (the first `limit` when given), worded as `protocol` does."""
    rules = get_protocol(protocol)
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
        identifier, question = _question(name, row, line, rules.input_joiner)
        if not isinstance(question, str) or not question.strip():
            raise HarnessError(f"{path}, line {line + 1}: empty question")
        _, judge_question = _question(name, row, line, rules.judge_input_joiner)
        items.append(PairwiseItem(name, identifier, question, judge_question))
    return items[:limit] if limit is not None else items


def resolve_sets(sets: list[str] | None, protocol: PairwiseProtocol | None = None) -> list[str]:
    """The sets asked for, else the protocol's (all shipped sets without one)."""
    chosen = list(sets) if sets else list(protocol.test_sets if protocol else PAIRWISE_SETS)
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
    protocol: str = "cherry",
) -> dict[str, Any]:
    """Greedy answers for every set, written to output_dir/outputs_<set>.jsonl (+ generation.json).
    Reused when generation.json says the same generator, sets, limit, settings and question wording
    (`protocol`); saved chunk by chunk (generation.partial.json) while running, so a killed job resumes."""
    settings = settings or GenerationSettings()
    chosen = resolve_sets(sets)
    key = {"generator": generator, "sets": chosen, "limit": limit, "settings": settings.as_record()}
    key |= _wording_key(protocol)
    record_path = output_dir / "generation.json"
    if record_path.is_file() and all((output_dir / f"outputs_{name}.jsonl").is_file() for name in chosen):
        try:
            saved = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            saved = {}
        if saved.get("key") == key:
            return saved
    items = [item for name in chosen for item in load_pairwise_set(name, limit, protocol)]
    partial = output_dir / "generation.partial.json"
    generations, summary = resumable_generate(
        model, tokenizer, [i.question for i in items], settings, progress_file=partial, chunk_size=chunk_size, progress=progress
    )
    write_outputs(output_dir, items, [g.text for g in generations], generator, generations)
    record = {"generator": generator, "sets": chosen, "limit": limit, "settings": settings.as_record(), **summary, "key": key}
    atomic_write_json(record_path, record)
    partial.unlink(missing_ok=True)
    return record


def _wording_key(protocol: str) -> dict[str, str]:
    """The question wording's part of a generation key: empty for cherry's (the only wording before
    protocols), so answers saved before keep their keys."""
    return {} if protocol == "cherry" else {"questions": protocol}


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


def outcome_value(result: str | None, failed_as_loss: bool = False) -> float | None:
    """A question's share of a win (1 / 0.5 / 0); an unjudged question is 0 (a loss) or None (skipped)."""
    if result is None:
        return 0.0 if failed_as_loss else None
    return OUTCOME_VALUE[result]


def win_rate(outcomes: list[str | None], failed_as_loss: bool = False) -> dict[str, Any]:
    """WinRate = (win + tie/2) / N - 0.5. Questions without two parsed reviews (`failed`) are left out of
    N (`skipped`), or with failed_as_loss kept in N as losses (PhasedSFT's win_tie_loss_stat.py)."""
    values = [outcome_value(o, failed_as_loss) for o in outcomes]
    judged = [v for v in values if v is not None]
    counts = {k: sum(o == k for o in outcomes) for k in OUTCOME_VALUE}
    failed = sum(o is None for o in outcomes)
    n = len(judged)
    value = sum(judged) / n - 0.5 if n else None
    stderr = None
    if n > 1:
        mean = sum(judged) / n
        stderr = math.sqrt(sum((v - mean) ** 2 for v in judged) / (n - 1) / n)
    return {
        "win_rate": {"value": value, "stderr": stderr},
        **counts,
        "failed": failed,
        "failed_counted_as_loss": failed if failed_as_loss else 0,
        "skipped": len(outcomes) - n,
        "n": n,
    }


def set_mean(per_set: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The mean of the per-set WinRates (Phased IFT's overall figure); its standard error from the
    per-set ones (the sets are independent); counts summed over the sets."""
    values = [entry["win_rate"]["value"] for entry in per_set.values()]
    stderrs = [entry["win_rate"]["stderr"] for entry in per_set.values()]
    value = sum(values) / len(values) if values and None not in values else None
    stderr = math.sqrt(sum(e**2 for e in stderrs)) / len(stderrs) if stderrs and None not in stderrs else None
    keys = [*OUTCOME_VALUE, "failed", "failed_counted_as_loss", "skipped", "n"]
    return {"win_rate": {"value": value, "stderr": stderr}} | {k: sum(e[k] for e in per_set.values()) for k in keys}


def judge_pairwise(
    outputs_a: Path,
    outputs_b: Path,
    *,
    judge: Judge,
    output_dir: Path,
    sets: list[str] | None = None,
    name_a: str = "A",
    name_b: str = "B",
    protocol: str = "cherry",
) -> dict[str, Any]:
    """Judge run A's answers against run B's on every set, in both orders; returns A's WinRate over B
    under `protocol` (PROTOCOLS; the judge's prompt and reply budget are the judge's own options).

    Writes judgments_<set>.jsonl (per question: both reviews, raw replies, outcome, the value counted)
    and pairwise.json."""
    rules = get_protocol(protocol)
    chosen = resolve_sets(sets, rules)
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
        # the judge's wording of each question (PhasedSFT shows it a Self-Instruct input as " Input: ...")
        shown = {item.id: item.judge_question for item in load_pairwise_set(name, protocol=rules.name)}
        questions = {i: shown.get(i) or rows_a[i]["question"] for i in ids}
        items = [(questions[i], rows_a[i]["output"], rows_b[i]["output"]) for i in ids]
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
                    "question": questions[i],
                    "scores_a_first": list(f.scores) if f.scores else None,
                    "scores_b_first": list(r.scores) if r.scores else None,
                    "reply_a_first": f.raw,
                    "reply_b_first": r.raw,
                    "outcome": o,
                    "value": outcome_value(o, rules.failed_as_loss),
                },
                ensure_ascii=False,
            )
            for i, f, r, o in zip(ids, forward, backward, outcomes, strict=True)
        ]
        atomic_write_text(output_dir / f"judgments_{name}.jsonl", "\n".join(lines) + "\n")
        per_set[name] = win_rate(outcomes, rules.failed_as_loss) | {"missing_in_b": len(rows_a) - len(ids)}
        all_outcomes += outcomes
    parsed = sum(first_position.values())
    overall = set_mean(per_set) if rules.overall == "set_mean" else win_rate(all_outcomes, rules.failed_as_loss)
    result = {
        "a": name_a,
        "b": name_b,
        "judge": judge.describe(),
        "protocol": rules.as_record() | {"test_sets": chosen},
        "overall": overall,
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

    protocol: Literal["cherry", "phasedsft"] = Field("cherry", description="PROTOCOLS: prompt, sets, failed reviews, overall")
    test_sets: list[str] | None = Field(None, description="None: the protocol's sets")
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
    rules = PROTOCOLS[settings.protocol]
    # the protocol's prompt and reply budget unless judge_options names its own (the record shows both)
    defaults = {"pairwise_prompt": rules.judge_prompt, "pairwise_max_tokens": rules.judge_max_tokens}
    options = judge_options(defaults | settings.judge_options, where="section pairwise: judge_options")
    return settings, parse_reference(settings.reference), options


def check_suite_section(config: dict[str, Any]) -> None:
    """Called before training: keys, sets, judge and reference are usable."""
    from harness.models import resolve_model

    settings, reference, options = _section_settings(config)
    check_judge(settings.judge, options)
    if reference.kind == "model":
        resolve_model(reference.model or "", reference.model_path)
    if reference.kind == "outputs":
        for name in resolve_sets(settings.test_sets, PROTOCOLS[settings.protocol]):
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
    protocol: str = "cherry",
) -> dict[str, Any]:
    """Write the reference's answers to output_dir/outputs_<set>.jsonl; a model's answers are generated
    once per (weights, sets, limit, settings, question wording) into the artifact cache and copied from there after."""
    from harness import __version__
    from harness.accelerator import process_inference_dtype
    from harness.artifacts import ArtifactCache, content_key
    from harness.models import MODEL_SET_VERSION, load_model_and_tokenizer, resolve_model

    settings = dataclasses.replace(settings, backend="hf")  # the reference model is loaded here and generates with HF
    if reference.kind == "outputs":
        items, texts = [], []
        for name in sets:
            rows = read_outputs(reference.outputs or Path(), name)
            for item in load_pairwise_set(name, limit, protocol):
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
        **_wording_key(protocol),
    )
    saved = cache.load(kind, key)
    from_cache = saved is not None
    if saved is None:
        import gc

        import torch

        model, tokenizer = load_model_and_tokenizer(resolved, dtype=process_inference_dtype())
        if torch.cuda.is_available():
            model.to("cuda")
        items = [item for name in sets for item in load_pairwise_set(name, limit, protocol)]
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
    items = [item for name in sets for item in load_pairwise_set(name, limit, protocol)]
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
    rules = PROTOCOLS[settings.protocol]
    sets = resolve_sets(settings.test_sets, rules)
    generation = settings.generation_settings(context.template_for(tokenizer), context.backend)
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
        protocol=rules.name,
    )
    from_reference = reference_outputs(
        reference,
        output_dir=output_dir / "reference",
        sets=sets,
        limit=settings.limit,
        settings=generation,
        chunk_size=settings.chunk_size,
        protocol=rules.name,
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
        protocol=rules.name,
    )
    overall = result["overall"]
    bounds = (-0.5, 0.5)  # WinRate's range
    cells = {"win_rate": metric_cell(overall["win_rate"]["value"], overall["win_rate"]["stderr"], bounds=bounds)}
    for name, entry in result["sets"].items():
        cell = metric_cell(entry["win_rate"]["value"], entry["win_rate"]["stderr"], bounds=bounds, n=entry["n"])
        cells[f"win_rate_{name}"] = cell
    # Per-question rows for the leaderboard's paired tests. Their plain mean is the overall WinRate: under
    # a per-set mean each row is weighted by N / (sets x questions in its set).
    samples = []
    counted = {name: entry["n"] for name, entry in result["sets"].items()}
    total = sum(counted.values())
    for name in sets:
        weight = total / (len(sets) * counted[name]) if rules.overall == "set_mean" and counted[name] else 1.0
        for line in (output_dir / f"judgments_{name}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            value = outcome_value(row["outcome"], rules.failed_as_loss)
            if value is not None:
                samples.append({"doc_id": f"{name}/{row['id']}", "set": name, "win_rate": (value - 0.5) * weight})
    return cells | {
        "n": overall["n"],
        "win": overall["win"],
        "tie": overall["tie"],
        "loss": overall["loss"],
        "skipped": overall["skipped"],
        "failed_reviews": overall["failed"],
        "protocol": rules.name,
        "reference": reference.name,
        "judge": result["judge"]["judge"],
        "judge_cost_usd": result["cost_usd"],
        "details": {
            "protocol": result["protocol"],
            "judge": result["judge"],
            "judge_prompt": {"name": options.pairwise_prompt, "max_tokens": options.pairwise_max_tokens},
            "position_bias": result["position_bias"],
            "sets": result["sets"],
            "limit": settings.limit,
            "generation": {key: value for key, value in produced.items() if key != "key"},
            "reference": from_reference,
            "judge_seconds": result["judge_seconds"],
        },
        "samples": samples,
    }
