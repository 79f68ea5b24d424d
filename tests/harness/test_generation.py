"""Batched greedy generation on the tiny model: order, determinism, limits, constraints, settings."""

from __future__ import annotations

import pytest

from harness import generation
from harness.errors import HarnessError
from harness.generation import (
    GenerationSettings,
    generate,
    generate_from_prompts,
    render_prompts,
    resumable_generate,
    timed_generate,
)

PROMPTS = ["Name a colour.", "Write one sentence about the sea and the sky.", "Add two and two.", "Hi"]


def test_batched_generation_keeps_order_and_is_deterministic(tiny):
    model, tokenizer = tiny
    settings = GenerationSettings(max_new_tokens=6, batch_size=2)
    first = generate(model, tokenizer, PROMPTS, settings)
    assert len(first) == len(PROMPTS)
    assert first == generate(model, tokenizer, PROMPTS, settings)
    single = generate(model, tokenizer, [PROMPTS[1]], GenerationSettings(max_new_tokens=6, batch_size=1))
    reversed_order = generate(model, tokenizer, PROMPTS[::-1], settings)
    assert [g.new_tokens for g in reversed_order[::-1]] == [g.new_tokens for g in first]
    assert single[0].new_tokens == first[1].new_tokens
    for g in first:
        assert g.new_tokens <= 6 and (g.finished or g.new_tokens == 6)


def test_generation_summary_and_settings_record(tiny):
    model, tokenizer = tiny
    settings = GenerationSettings(max_new_tokens=4, repetition_penalty=1.2, batch_size=4)
    generations, summary = timed_generate(model, tokenizer, PROMPTS[:2], settings)
    assert summary["n"] == 2 and summary["new_tokens"] == sum(g.new_tokens for g in generations)
    assert summary["cut_at_max_new_tokens"] == sum(not g.finished for g in generations)
    record = settings.as_record()
    assert record["repetition_penalty"] == 1.2 and record["max_new_tokens"] == 4 and record["decoding"] == "greedy"


def test_prompts_use_the_template(tiny):
    _, tokenizer = tiny
    chat = render_prompts(["Say hi."], tokenizer, "chat")[0]
    assert chat.startswith("<|im_start|>user\nSay hi.") and chat.endswith("<|im_start|>assistant\n")
    alpaca = render_prompts(["Say hi."], tokenizer, "alpaca")[0]
    assert alpaca.endswith("### Instruction:\nSay hi.\n\n### Response:")  # Stanford Alpaca: no newline


def test_constrained_decoding_only_emits_allowed_tokens(tiny):
    model, tokenizer = tiny
    allowed = tokenizer("7", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    prompts = render_prompts(["Give a number."], tokenizer, "chat")
    [result] = generate_from_prompts(model, tokenizer, prompts, max_new_tokens=3, allowed_tokens=lambda new: allowed)
    assert set(result.text) <= {"7"}


@pytest.mark.parametrize(
    "kwargs", [{"max_new_tokens": 0}, {"repetition_penalty": 0}, {"batch_size": 0}, {"template": "vicuna"}]
)
def test_bad_settings_are_one_line_errors(kwargs):
    with pytest.raises(HarnessError):
        GenerationSettings(**kwargs)


def test_resumable_generation_resumes_a_killed_job_exactly(tiny, tmp_path, monkeypatch):
    """Fixed chunks: a job killed after its first chunk resumes there and ends with exactly the outputs of
    an uninterrupted job; a progress file from other settings is not trusted."""
    model, tokenizer = tiny
    settings = GenerationSettings(max_new_tokens=6, batch_size=2)
    whole, _ = resumable_generate(model, tokenizer, PROMPTS, settings, progress_file=tmp_path / "whole.json", chunk_size=3)
    real = generation.timed_generate
    calls = []

    def killed_after_one_chunk(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "timed_generate", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        resumable_generate(model, tokenizer, PROMPTS, settings, progress_file=tmp_path / "killed.json", chunk_size=3)
    monkeypatch.setattr(generation, "timed_generate", real)
    resumed, summary = resumable_generate(model, tokenizer, PROMPTS, settings, progress_file=tmp_path / "killed.json", chunk_size=3)
    assert resumed == whole and summary["resumed_items"] == 3 and summary["n"] == 4 and summary["chunk_size"] == 3
    shorter = GenerationSettings(max_new_tokens=3, batch_size=2)
    _, fresh = resumable_generate(model, tokenizer, PROMPTS, shorter, progress_file=tmp_path / "killed.json", chunk_size=3)
    assert fresh["resumed_items"] == 0


def test_generation_batches_are_fixed_on_the_cpu_and_sized_by_tokens_on_a_gpu():
    from harness.generation import GPU_GENERATION_MAX_ROWS, generation_batches

    lengths = [900, 800, 300, 120, 100, 100, 50, 20, 10]  # sorted longest first, as generate_from_prompts sorts
    assert generation_batches(lengths, 4, 100, None) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]  # the CPU: unchanged
    # budget 2,000 tokens with 100 new each: 900+100 fits twice; then 300+100 five times; the rest together
    assert generation_batches(lengths, 4, 100, 2000) == [[0, 1], [2, 3, 4, 5, 6], [7, 8]]
    assert generation_batches([5000, 10], 4, 100, 2000) == [[0], [1]]  # an over-budget prompt still runs, alone
    many = generation_batches([10] * 1000, 4, 10, 10**9)
    assert max(len(batch) for batch in many) == GPU_GENERATION_MAX_ROWS and sum(map(len, many)) == 1000
