"""The judges' prompts, versioned data files in harness/judge/prompts/ (package data), and their one loader.

- `pairwise_<name>.json` (PAIRWISE_PROMPTS): the pairwise review prompts. `cherry` is the Vicuna
  evaluation's prompt (lm-sys/FastChat) as Cherry LLM sends it (tianyi-lab/Cherry_LLM
  evaluation/generation/eval.py): two 1-10 scores on the first line, then an explanation; `phasedsft` is
  PhasedSFT's active prompt (xubuvd/PhasedSFT evaluation/eval.py): the same with "Do not explain for your
  scores." JudgeOptions.pairwise_prompt picks one.
- `phased_difficulty.json`: Phased IFT's difficulty prompt (ours, written to the paper's description;
  arXiv 2406.04371), used by the `judge` and `local-judge` scorers in harness.difficulty.

Each file holds the system message, the user message's template, the version and the source it was
copied from (or that it is ours). The rendered text decides the judges' verdicts and their cache keys.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from harness.errors import HarnessError, unknown_name

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
PAIRWISE_PROMPTS = ("cherry", "phasedsft")
DEFAULT_PAIRWISE_PROMPT = "cherry"
DIFFICULTY_PROMPT_FILE = "phased_difficulty"


@cache
def load_prompt_file(name: str) -> dict[str, Any]:
    """harness/judge/prompts/<name>.json as a mapping; an unreadable file is a one-line error naming it."""
    path = PROMPT_DIR / f"{name}.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
        return raw
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise HarnessError(f"judge prompt file {path}: unreadable ({type(error).__name__}: {error})") from None


@dataclass(frozen=True)
class PairwisePrompt:
    """A pairwise review prompt as shipped: the system message, the user message's template and criteria."""

    name: str
    version: int
    source: str
    system: str
    template: str
    criteria: str

    def render(self, question: str, answer_1: str, answer_2: str) -> str:
        return self.template.format(question=question, answer_1=answer_1, answer_2=answer_2, criteria=self.criteria)

    def digest(self) -> str:
        """What decides the judge's reply: part of the verdict cache key."""
        text = json.dumps([self.system, self.template, self.criteria])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_pairwise_prompt(name: str) -> PairwisePrompt:
    """The shipped prompt file harness/judge/prompts/pairwise_<name>.json."""
    if name not in PAIRWISE_PROMPTS:
        raise unknown_name("pairwise judge prompt", name, PAIRWISE_PROMPTS)
    raw = load_prompt_file(f"pairwise_{name}")
    try:
        return PairwisePrompt(name, int(raw["version"]), raw["source"], raw["system"], raw["template"], raw["criteria"])
    except (KeyError, TypeError, ValueError) as error:
        raise HarnessError(f"judge prompt file {PROMPT_DIR / f'pairwise_{name}.json'}: {type(error).__name__}: {error}") from None


def pairwise_prompt(question: str, answer_1: str, answer_2: str, prompt: str = DEFAULT_PAIRWISE_PROMPT) -> str:
    return load_pairwise_prompt(prompt).render(question, answer_1, answer_2)


@dataclass(frozen=True)
class DifficultyPrompt:
    """Phased IFT's difficulty prompt: `render` fills the template with one instruction-tuning example."""

    version: str
    source: str
    system: str
    template: str

    def render(self, instruction: str, input: str, output: str) -> str:  # noqa: A002 - the record's field name
        return self.template.format(instruction=instruction, input=input.strip() or "(none)", output=output)

    def messages(self, instruction: str, input: str, output: str) -> list[dict[str, str]]:  # noqa: A002
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.render(instruction, input, output)}]


def load_difficulty_prompt() -> DifficultyPrompt:
    """The shipped file harness/judge/prompts/phased_difficulty.json."""
    raw = load_prompt_file(DIFFICULTY_PROMPT_FILE)
    try:
        return DifficultyPrompt(str(raw["version"]), raw["source"], raw["system"], raw["template"])
    except (KeyError, TypeError) as error:
        raise HarnessError(f"judge prompt file {PROMPT_DIR / f'{DIFFICULTY_PROMPT_FILE}.json'}: {type(error).__name__}: {error}") from None
