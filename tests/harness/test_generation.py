"""Batched greedy generation on the tiny model: order, determinism, limits, constraints, settings."""

from __future__ import annotations

import pytest

from harness.errors import HarnessError
from harness.generation import (
    GenerationSettings,
    generate,
    generate_from_prompts,
    render_prompts,
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
    assert "### Instruction:\nSay hi.\n\n### Response:\n" in alpaca


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


def test_a_journal_lets_an_interrupted_generation_resume_with_the_same_outputs(tiny, tmp_path):
    """A call killed after its first batch, rerun with the same journal, generates only the other batches
    and returns exactly what one uninterrupted call returns."""
    model, tokenizer = tiny
    settings = GenerationSettings(max_new_tokens=6, batch_size=2)
    expected = generate(model, tokenizer, PROMPTS, settings)
    journal = tmp_path / "partial.jsonl"

    class Killed(Exception):
        pass

    def die_after_first_batch(done: int, total: int) -> None:
        raise Killed

    with pytest.raises(Killed):
        generate(model, tokenizer, PROMPTS, settings, progress=die_after_first_batch, journal=journal)
    with journal.open("a") as handle:
        handle.write('{"key": "cut by the kill')  # a torn last line is ignored
    calls = []
    original = model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    model.generate = counting
    try:
        resumed = generate(model, tokenizer, PROMPTS, settings, journal=journal)
        assert resumed == expected
        assert calls == [2]  # only the second batch of two was generated again
        calls.clear()  # other settings never reuse the journal
        generate(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=5, batch_size=2), journal=journal)
        assert calls == [2, 2]
    finally:
        del model.generate
