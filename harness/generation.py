"""Batched greedy generation shared by AlpacaEval and pairwise judging.

Prompts are user messages rendered with the run's template (the model's chat template or the Alpaca
prompt), exactly as in training. Batches are sorted by prompt length and left-padded; outputs come
back in the caller's order. Greedy decoding is deterministic on CPU; the settings are recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.data import InstructionRecord
from harness.errors import HarnessError
from harness.templates import render_prompt


@dataclass(frozen=True)
class GenerationSettings:
    """What decides the outputs; stored with every set of generations."""

    max_new_tokens: int = 512
    repetition_penalty: float = 1.0  # NEFTune evaluated with 1.2
    template: str = "chat"  # chat | alpaca (the run's resolved training template)
    batch_size: int = 8
    max_prompt_tokens: int = 2048  # longer prompts keep their last tokens (counted)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise HarnessError(f"generation max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.repetition_penalty <= 0:
            raise HarnessError(f"generation repetition_penalty={self.repetition_penalty}: must be > 0")
        if self.batch_size < 1:
            raise HarnessError(f"generation batch_size={self.batch_size}: must be >= 1")
        if self.template not in ("chat", "alpaca"):
            raise HarnessError(f"generation template '{self.template}': must be chat or alpaca")

    def as_record(self) -> dict[str, Any]:
        return asdict(self) | {"decoding": "greedy"}


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    finished: bool  # ended with EOS (False: cut at max_new_tokens)
    prompt_truncated: bool


def render_prompts(instructions: list[str], tokenizer: Any, template: str) -> list[str]:
    """The exact text the model sees for each instruction (no input field: AlpacaEval-style prompts)."""
    return [render_prompt(InstructionRecord(instruction=text, output=""), template, tokenizer) for text in instructions]


def _stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def generate(
    model: Any,
    tokenizer: Any,
    instructions: list[str],
    settings: GenerationSettings,
    progress: Any = None,
    journal: Path | None = None,
) -> list[Generation]:
    """Greedy responses to `instructions`, in order. `progress(done, total)` is called after each batch;
    `journal`: see generate_from_prompts."""
    prompts = render_prompts(instructions, tokenizer, settings.template)
    return generate_from_prompts(
        model,
        tokenizer,
        prompts,
        max_new_tokens=settings.max_new_tokens,
        repetition_penalty=settings.repetition_penalty,
        batch_size=settings.batch_size,
        max_prompt_tokens=settings.max_prompt_tokens,
        add_special_tokens=settings.template == "alpaca",  # chat templates carry their own special tokens
        progress=progress,
        journal=journal,
    )


def _journal_key(prompts: list[str], settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([prompts, settings], sort_keys=True).encode()).hexdigest()


def _read_journal(journal: Path, key: str) -> dict[int, list[Any]]:
    """Batches an interrupted call finished, by their start in the length order: {start: rows}. Lines of
    other inputs or cut short by a kill are ignored."""
    done: dict[int, list[Any]] = {}
    if not journal.is_file():
        return done
    for line in journal.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            if entry["key"] == key:
                done[int(entry["start"])] = entry["rows"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return done


def left_padded_batch(sequences: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """(input_ids, attention_mask) with every sequence ending at the last column."""
    import torch

    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids) :] = 1
    return input_ids, attention


def generate_from_prompts(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    repetition_penalty: float = 1.0,
    batch_size: int = 8,
    max_prompt_tokens: int = 2048,
    add_special_tokens: bool = False,
    allowed_tokens: Callable[[list[int]], list[int]] | None = None,
    progress: Any = None,
    journal: Path | None = None,
) -> list[Generation]:
    """Greedy continuations of already-rendered prompts, batched by length, returned in order.

    allowed_tokens(new_ids) -> token ids permitted next: constrained decoding (a judge reading a score).
    journal: a JSONL file each finished batch is appended to; a call cut short by a kill, rerun with the
    same prompts and settings, skips the batches it finished (the batches are fixed by the length order,
    so the outputs are the same as in one uninterrupted call)."""
    import torch

    encoded = [tokenizer(p, add_special_tokens=add_special_tokens).input_ids for p in prompts]
    truncated = [len(ids) > max_prompt_tokens for ids in encoded]
    encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = _stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    results: list[Generation | None] = [None] * len(encoded)
    key = _journal_key(prompts, {"max_new_tokens": max_new_tokens, "repetition_penalty": repetition_penalty,
                                 "batch_size": batch_size, "max_prompt_tokens": max_prompt_tokens,
                                 "add_special_tokens": add_special_tokens})  # fmt: skip
    finished_batches = _read_journal(journal, key) if journal is not None and allowed_tokens is None else {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            if start in finished_batches:
                for index, text, new_tokens, finished in finished_batches[start]:
                    results[index] = Generation(text, new_tokens, finished, truncated[index])
                if progress is not None:
                    progress(min(start + batch_size, len(order)), len(order))
                continue
            input_ids, attention = left_padded_batch([encoded[i] for i in batch], pad_id)
            width = input_ids.shape[1]
            constraint: dict[str, Any] = {}
            if allowed_tokens is not None:
                constraint["prefix_allowed_tokens_fn"] = lambda _, ids, width=width: allowed_tokens(ids[width:].tolist())
            with torch.no_grad():
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=max_new_tokens,
                    repetition_penalty=repetition_penalty,
                    eos_token_id=stop_ids,
                    pad_token_id=pad_id,
                    use_cache=True,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    **constraint,
                )
            for row, index in enumerate(batch):
                new = output[row, width:].tolist()
                finished = any(token in stop_ids for token in new)
                if finished:
                    new = new[: next(k for k, token in enumerate(new) if token in stop_ids)]
                text = tokenizer.decode(new, skip_special_tokens=True).strip()
                results[index] = Generation(text, len(new), finished, truncated[index])
            if journal is not None and allowed_tokens is None:
                rows = [[index, results[index].text, results[index].new_tokens, results[index].finished] for index in batch]
                _append_line(journal, json.dumps({"key": key, "start": start, "rows": rows}, ensure_ascii=False))
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    finally:
        model.train(was_training)
    return [r for r in results if r is not None]


def _append_line(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def generation_summary(generations: list[Generation], seconds: float) -> dict[str, Any]:
    """Counts worth recording next to the outputs (how many hit the token limit, tokens/s)."""
    tokens = sum(g.new_tokens for g in generations)
    return {
        "n": len(generations),
        "new_tokens": tokens,
        "cut_at_max_new_tokens": sum(not g.finished for g in generations),
        "prompts_truncated": sum(g.prompt_truncated for g in generations),
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None,
    }


def timed_generate(
    model: Any, tokenizer: Any, instructions: list[str], settings: GenerationSettings, progress: Any = None,
    journal: Path | None = None,
) -> tuple[list[Generation], dict[str, Any]]:
    started = time.perf_counter()
    generations = generate(model, tokenizer, instructions, settings, progress, journal)
    return generations, generation_summary(generations, time.perf_counter() - started)
