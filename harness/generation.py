"""Batched greedy generation shared by AlpacaEval and pairwise judging.

Prompts are user messages rendered with the run's template (the model's chat template or the Alpaca
prompt), exactly as in training. Batches are sorted by prompt length and left-padded; outputs come
back in the caller's order. Greedy decoding is deterministic on CPU; the settings are recorded.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.data import InstructionRecord
from harness.errors import HarnessError
from harness.io import atomic_write_json
from harness.templates import PLAIN_TEMPLATES, render_prompt


@dataclass(frozen=True)
class GenerationSettings:
    """What decides the outputs; stored with every set of generations."""

    max_new_tokens: int = 512
    repetition_penalty: float = 1.0  # NEFTune evaluated with 1.2
    template: str = "chat"  # chat | alpaca | user-assistant (the run's resolved training template)
    batch_size: int = 8
    max_prompt_tokens: int = 2048  # longer prompts keep their last tokens (counted)
    backend: str = "hf"  # hf (transformers' generate) or vllm (harness.vllm_server): part of the outputs' key

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise HarnessError(f"generation max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.repetition_penalty <= 0:
            raise HarnessError(f"generation repetition_penalty={self.repetition_penalty}: must be > 0")
        if self.batch_size < 1:
            raise HarnessError(f"generation batch_size={self.batch_size}: must be >= 1")
        if self.backend not in ("hf", "vllm"):
            raise HarnessError(f"generation backend '{self.backend}': must be hf or vllm")
        if self.template not in ("chat", *PLAIN_TEMPLATES):
            raise HarnessError(f"generation template '{self.template}': must be chat, {' or '.join(PLAIN_TEMPLATES)}")

    def as_record(self) -> dict[str, Any]:
        """The settings as recorded and keyed; `backend` only when it is vLLM, so outputs generated before
        the option existed keep their keys."""
        record = asdict(self) | {"decoding": "greedy"}
        if self.backend == "hf":
            del record["backend"]
        return record


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
) -> list[Generation]:
    """Greedy responses to `instructions`, in order. `progress(done, total)` is called after each batch."""
    from harness.vllm_server import ServedModel

    if (settings.backend == "vllm") != isinstance(model, ServedModel):
        raise HarnessError(f"generation backend {settings.backend} does not match the model given ({type(model).__name__})")
    prompts = render_prompts(instructions, tokenizer, settings.template)
    return generate_from_prompts(
        model,
        tokenizer,
        prompts,
        max_new_tokens=settings.max_new_tokens,
        repetition_penalty=settings.repetition_penalty,
        batch_size=settings.batch_size,
        max_prompt_tokens=settings.max_prompt_tokens,
        add_special_tokens=settings.template in PLAIN_TEMPLATES,  # chat templates carry their own special tokens
        progress=progress,
    )


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


# On a GPU, generation batches are sized by tokens, not rows: prompts sorted longest first fill each batch
# up to this many prompt-plus-new tokens (the KV cache: 17 GB for Llama-3-8B in bf16), so short prompts go
# many to a batch. On the CPU the fixed batch size stays (its numbers do not move).
GPU_GENERATION_TOKEN_BUDGET = 131072
GPU_GENERATION_MAX_ROWS = 256


def generation_batches(
    lengths: list[int], batch_size: int, max_new_tokens: int, token_budget: int | None
) -> list[list[int]]:
    """Positions 0..n-1 of prompts sorted longest first, in batches: `batch_size` rows each without a token
    budget; with one, as many rows as fit (rows x (longest prompt of the batch + max_new_tokens) <= budget,
    at most GPU_GENERATION_MAX_ROWS; always at least one)."""
    if token_budget is None:
        return [list(range(start, min(start + batch_size, len(lengths)))) for start in range(0, len(lengths), batch_size)]
    batches: list[list[int]] = []
    for position, length in enumerate(lengths):
        current = batches[-1] if batches else None
        if current is not None and len(current) < GPU_GENERATION_MAX_ROWS:
            longest = lengths[current[0]]  # sorted longest first: the batch's first prompt
            if (len(current) + 1) * (max(longest, length) + max_new_tokens) <= token_budget:
                current.append(position)
                continue
        batches.append([position])
    return batches


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
) -> list[Generation]:
    """Greedy continuations of already-rendered prompts, batched by length, returned in order.

    allowed_tokens(new_ids) -> token ids permitted next: constrained decoding (a judge reading a score).
    `model` may be a ServedModel (harness.vllm_server): the same token ids then go to vLLM."""
    import torch

    from harness.vllm_server import ServedModel

    encoded = [tokenizer(p, add_special_tokens=add_special_tokens).input_ids for p in prompts]
    truncated = [len(ids) > max_prompt_tokens for ids in encoded]
    encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    if isinstance(model, ServedModel):
        if allowed_tokens is not None:
            raise HarnessError("constrained decoding (allowed_tokens) runs on HF models only, not through vLLM")
        served = model.complete(encoded, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty, progress=progress)
        return [Generation(text, count, finished, cut) for (text, count, finished), cut in zip(served, truncated, strict=True)]
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = _stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    results: list[Generation | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    budget = GPU_GENERATION_TOKEN_BUDGET if device.type == "cuda" else None
    done = 0
    try:
        for positions in generation_batches([len(encoded[i]) for i in order], batch_size, max_new_tokens, budget):
            batch = [order[position] for position in positions]
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
            done += len(batch)
            if progress is not None:
                progress(done, len(order))
    finally:
        model.train(was_training)
    return [r for r in results if r is not None]


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
    model: Any, tokenizer: Any, instructions: list[str], settings: GenerationSettings, progress: Any = None
) -> tuple[list[Generation], dict[str, Any]]:
    started = time.perf_counter()
    generations = generate(model, tokenizer, instructions, settings, progress)
    return generations, generation_summary(generations, time.perf_counter() - started)


def _merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    merged = {key: sum(s[key] for s in summaries) for key in ("n", "new_tokens", "cut_at_max_new_tokens", "prompts_truncated")}
    seconds = sum(s["seconds"] for s in summaries)
    merged["seconds"] = round(seconds, 2)
    merged["tokens_per_second"] = round(merged["new_tokens"] / seconds, 2) if seconds > 0 else None
    return merged


def resumable_generate(
    model: Any,
    tokenizer: Any,
    instructions: list[str],
    settings: GenerationSettings,
    *,
    progress_file: Path,
    chunk_size: int = 64,
    progress: Any = None,
) -> tuple[list[Generation], dict[str, Any]]:
    """timed_generate in fixed chunks of the instruction list, each saved to `progress_file` as it
    finishes: a killed job resumes at its first unfinished chunk, and because the chunks are fixed, a
    resumed job batches (and so decodes) exactly like an uninterrupted one. The file is keyed by the
    instructions and settings; a stale one is ignored. The caller deletes it once it has the results."""
    if chunk_size < 1:
        raise HarnessError(f"generation chunk_size={chunk_size}: must be >= 1")
    key = {
        "instructions": hashlib.sha256(json.dumps(instructions, ensure_ascii=False).encode()).hexdigest(),
        "settings": settings.as_record(),
        "chunk_size": chunk_size,
    }
    done: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    resumed = 0
    if progress_file.is_file():
        try:
            saved = json.loads(progress_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            saved = {}
        if isinstance(saved, dict) and saved.get("key") == key:
            done, summaries = saved["generations"], saved["summaries"]
            resumed = len(done)
    total = len(instructions)
    for start in range(len(done), total, chunk_size):
        chunk = instructions[start : start + chunk_size]
        report = None if progress is None else (lambda finished, _, start=start: progress(start + finished, total))
        generations, summary = timed_generate(model, tokenizer, chunk, settings, report)
        done += [asdict(g) for g in generations]
        summaries.append(summary)
        atomic_write_json(progress_file, {"key": key, "generations": done, "summaries": summaries})
    summary = _merge_summaries(summaries) if summaries else generation_summary([], 0.0)
    return [Generation(**g) for g in done], summary | {"chunk_size": chunk_size, "resumed_items": resumed}
