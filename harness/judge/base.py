"""What every judge shares: the Judge interface, Review, JudgeOptions and their validation, the pairwise
score parser and the position-bias summary of a two-order judge."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from harness.errors import HarnessError, closest
from harness.judge.prompts import DEFAULT_PAIRWISE_PROMPT

JUDGE_KINDS = ("openai", "local")
DEFAULT_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
# The official AlpacaEval 2 prompt; the local judge uses it for every AlpacaEval version.
LOCAL_ALPACA_PROMPT = "alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt"
LOCAL_ALPACA_LABELS = ("m", "M")  # first output, second output (as in the official config)


def alpaca_eval_configs_dir() -> Path:
    from harness.compat import import_alpaca_eval

    import_alpaca_eval()
    from alpaca_eval import constants

    return Path(constants.EVALUATORS_CONFIG_DIR)


@dataclass
class Review:
    """One pairwise review: the two 1-10 scores (None when the reply could not be parsed)."""

    scores: tuple[float, float] | None
    raw: str
    price: float | None = None


class Judge(Protocol):
    name: str

    def describe(self) -> dict[str, Any]: ...

    def annotate_alpaca(self, rows: list[dict[str, Any]], work_dir: Path) -> list[dict[str, Any]]:
        """rows have instruction, output_1 (baseline), output_2 (model), generator_1, generator_2; the result
        adds `preference` (1 = baseline wins, 2 = model wins, fractional for soft judges, NaN = failed)."""
        ...

    def review_pairs(self, items: list[tuple[str, str, str]]) -> list[Review]:
        """(question, answer_1, answer_2) -> scores for Assistant 1 and Assistant 2 as shown."""
        ...


@dataclass(frozen=True)
class JudgeOptions:
    base_url: str | None = None  # openai: an OpenAI-compatible endpoint (default api.openai.com or OPENAI_BASE_URL)
    annotator_config: str = DEFAULT_ANNOTATOR  # openai: the official alpaca_eval annotator config to run
    price_per_token: float | None = None  # openai: USD per token when alpaca_eval does not know the model
    pairwise_max_tokens: int = 1024  # openai: reply budget for a pairwise review (Cherry LLM used 1024)
    pairwise_prompt: str = DEFAULT_PAIRWISE_PROMPT  # the review prompt, one of PAIRWISE_PROMPTS (a data file)
    model_path: str | None = None  # local: weights (.gguf or directory) for a model-set name
    max_answer_tokens: int = 1024  # local: each answer is cut to this many judge tokens (counted)
    batch_size: int = 4  # local


def judge_options(raw: dict[str, Any], where: str = "judge_options") -> JudgeOptions:
    """JudgeOptions from a config mapping; an unknown key or a wrong type is a one-line error naming it."""
    from pydantic import TypeAdapter, ValidationError

    names = [f.name for f in dataclasses.fields(JudgeOptions)]
    for key in raw:
        if key not in names:
            suggestion = closest(key, names)
            hint = f"did you mean '{suggestion}'?" if suggestion else f"valid: {', '.join(names)}"
            raise HarnessError(f"{where}: unknown key '{key}'; {hint}")
    try:
        return TypeAdapter(JudgeOptions).validate_python(dict(raw))
    except ValidationError as error:
        detail = error.errors()[0]
        key = ".".join(str(part) for part in detail["loc"])
        raise HarnessError(f"{where}.{key} = {detail.get('input')!r}: {detail['msg'].lower()}") from None


def parse_score_pair(reply: str) -> tuple[float, float] | None:
    """The two scores on the reply's first line ("8 6" or "8, 6"); None unless both are in 1..10."""
    first = reply.strip().split("\n")[0].replace(",", " ").split()
    if len(first) != 2:
        return None
    try:
        scores = (float(first[0]), float(first[1]))
    except ValueError:
        return None
    if not all(1 <= s <= 10 and math.isfinite(s) for s in scores):
        return None
    return scores


def position_bias(annotations: list[dict[str, Any]]) -> dict[str, Any]:
    """How much a two-order local judge favours the first position, with standard errors.

    first_position_preference: mean P(first shown wins) over all 2N judgments (0.5 = unbiased).
    Standard errors are over examples.
    order_consistency: share of examples whose winner is the same in both orders."""
    import numpy as np

    rows = [a for a in annotations if "p_model_baseline_first" in a]
    if not rows:
        return {}
    # per example, the mean over its two orders: the two judgments of one example are not independent
    first = np.array([0.5 * ((1 - a["p_model_baseline_first"]) + a["p_model_model_first"]) for a in rows])
    consistent = np.array([(a["p_model_baseline_first"] > 0.5) == (a["p_model_model_first"] > 0.5) for a in rows], dtype=float)
    return {
        "first_position_preference": {"value": float(first.mean()), "stderr": _sem(first)},
        "order_consistency": {"value": float(consistent.mean()), "stderr": _sem(consistent)},
        "n": len(rows),
    }


def _sem(values: Any) -> float | None:
    import numpy as np

    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
