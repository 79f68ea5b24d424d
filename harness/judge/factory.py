"""Judges selected by name: `openai:<model>` (OpenAIJudge) or `local:<model>` (LocalJudge)."""

from __future__ import annotations

from typing import Any

from harness.errors import HarnessError, unknown_name
from harness.judge.base import JUDGE_KINDS, Judge, JudgeOptions
from harness.judge.local import LocalJudge
from harness.judge.openai_judge import OpenAIJudge
from harness.judge.prompts import load_pairwise_prompt


def parse_judge_name(name: str, options: JudgeOptions) -> tuple[str, str]:
    """(kind, target) of `openai:<model>` / `local:<model>`, with what is wrong with either (or with the
    pairwise prompt's name) as a one-line error before any work starts."""
    kind, _, target = name.partition(":")
    if kind not in JUDGE_KINDS:
        raise unknown_name("judge kind", kind, JUDGE_KINDS)
    load_pairwise_prompt(options.pairwise_prompt)  # a bad prompt name fails before any generation
    if kind == "local" and not target:
        raise HarnessError(f"judge '{name}': name the local model, e.g. local:smollm2-135m-instruct")
    return kind, target


def check_judge(name: str, options: JudgeOptions | None = None) -> None:
    """Everything make_judge would reject, without loading a local judge's weights: run before training."""
    options = options or JudgeOptions()
    kind, target = parse_judge_name(name, options)
    if kind == "openai":
        OpenAIJudge(target, options)  # checks the annotator config and that a remote judge has its key
        return
    from harness.models import resolve_model

    resolve_model(target, options.model_path)


def make_judge(name: str, options: JudgeOptions | None = None, *, model: Any = None, tokenizer: Any = None) -> Judge:
    """`openai:<model>` or `local:<model>`; a local judge may be given an already loaded (model, tokenizer)."""
    options = options or JudgeOptions()
    kind, target = parse_judge_name(name, options)
    if kind == "openai":
        return OpenAIJudge(target, options)
    if model is None:
        from harness.accelerator import process_inference_dtype
        from harness.models import load_model_and_tokenizer, resolve_model

        model, tokenizer = load_model_and_tokenizer(resolve_model(target, options.model_path), dtype=process_inference_dtype())
    return LocalJudge(f"local:{target}", model, tokenizer, options)
