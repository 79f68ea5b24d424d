"""The local judge on the tiny model: its two-order AlpacaEval preference, the score grammar of its
pairwise reviews, and the one label-probability pass it shares with Phased IFT's local difficulty judge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.cpu_kernels import onednn_inference
from harness.data import InstructionRecord
from harness.difficulty import _label_token_ids, local_judge_prompt_ids, score_with_local_judge
from harness.errors import HarnessError
from harness.judge import label_probabilities, make_judge, position_bias
from harness.judge import local as local_module

ROWS = [
    {"instruction": "Name a fruit.", "output_1": "Apple.", "output_2": "A banana is a fruit.", "generator_1": "ref", "generator_2": "model"},  # noqa: E501
    {"instruction": "Add 2 and 2.", "output_1": "4", "output_2": "The answer is four.", "generator_1": "ref", "generator_2": "model"},
]


def test_local_judge_combines_both_orders_symmetrically(local_judge):
    annotated = local_judge.annotate_alpaca(ROWS)
    swapped = local_judge.annotate_alpaca([r | {"output_1": r["output_2"], "output_2": r["output_1"]} for r in ROWS])
    for a, b in zip(annotated, swapped, strict=True):
        assert 1 <= a["preference"] <= 2
        # the same two prompts are judged either way, so the combined preference mirrors exactly
        assert a["preference"] - 1 == pytest.approx(1 - (b["preference"] - 1), abs=1e-5)
        assert a["p_model_baseline_first"] == pytest.approx(1 - b["p_model_model_first"], abs=1e-5)
    bias = position_bias(annotated)
    assert 0 <= bias["first_position_preference"]["value"] <= 1 and bias["n"] == 2


def test_identical_outputs_tie(local_judge):
    [note] = local_judge.annotate_alpaca([ROWS[0] | {"output_2": ROWS[0]["output_1"]}])
    assert note["preference"] == 1.5


def test_local_judge_uses_the_official_prompt(local_judge):
    [prompt] = local_judge.alpaca_prompts(ROWS[:1])
    assert '"model_identifier": "m"' in prompt and '"output": """Apple."""' in prompt
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")


def test_local_judge_cuts_long_answers(local_judge):
    before = local_judge.answers_truncated
    local_judge.alpaca_prompts([ROWS[0] | {"output_2": "word " * 500}])
    assert local_judge.answers_truncated == before + 1


def test_score_grammar_only_allows_two_scores(local_judge, tiny):
    _, tokenizer = tiny
    allowed = local_judge.score_grammar()

    def ids(text):
        return [tokenizer(ch, add_special_tokens=False).input_ids[0] for ch in text]

    def chars(tokens):
        return {tokenizer.decode([t]) for t in tokens}

    assert chars(allowed([])) == {str(d) for d in range(1, 10)}
    assert chars(allowed(ids("1"))) == {"0", " "}
    assert chars(allowed(ids("10"))) == {" "}
    assert chars(allowed(ids("7"))) == {" "}
    assert chars(allowed(ids("7 "))) == {str(d) for d in range(1, 10)}
    assert "\n" in chars(allowed(ids("7 1"))) and "0" in chars(allowed(ids("7 1")))
    assert allowed(ids("7 3")) == [tokenizer("\n", add_special_tokens=False).input_ids[0], tokenizer.eos_token_id]


def test_local_judge_reads_scores_in_range(local_judge):
    reviews = local_judge.review_pairs([(r["instruction"], r["output_1"], r["output_2"]) for r in ROWS])
    assert len(reviews) == 2
    for review in reviews:
        assert review.scores is not None, review.raw
        assert all(1 <= s <= 10 for s in review.scores)


def test_local_judge_needs_a_model_name():
    with pytest.raises(HarnessError, match="name the local model"):
        make_judge("local:")


# ----------------------------------------------------------------------------- the one label-probability pass


def test_label_probabilities_match_a_plain_forward_and_skip_long_prompts(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer(text).input_ids for text in ("Score: ", "A much longer prompt that ends in Score: ", "x " * 40)]
    labels = [tokenizer(str(k), add_special_tokens=False).input_ids[0] for k in range(1, 6)]
    got = label_probabilities(model, tokenizer, prompts, labels, rows_per_batch=2, max_length=30)
    assert got[2] is None  # over max_length
    for ids, distribution in zip(prompts[:2], got[:2], strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1, labels]
        np.testing.assert_allclose(distribution, torch.softmax(logits.double(), -1).numpy(), rtol=0, atol=1e-6)


def _recording(monkeypatch):
    """Record every call of the shared function (its arguments and results) through the module it lives in."""
    calls = []
    real = local_module.label_probabilities

    def recorded(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(local_module, "label_probabilities", recorded)
    monkeypatch.setattr("harness.difficulty.label_probabilities", recorded)
    return calls


def test_alpaca_local_judge_goes_through_the_shared_pass(local_judge, tiny, monkeypatch):
    model, tokenizer = tiny
    calls = _recording(monkeypatch)
    [note] = local_judge.annotate_alpaca(ROWS[:1])
    [(args, kwargs, result)] = calls
    prompts = local_judge.alpaca_prompts(ROWS[:1])
    swapped = local_judge.alpaca_prompts([ROWS[0] | {"output_1": ROWS[0]["output_2"], "output_2": ROWS[0]["output_1"]}])
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts + swapped]
    direct = label_probabilities(model, tokenizer, encoded, local_judge.label_ids, rows_per_batch=2)
    assert [list(ids) for ids in args[2]] == encoded and result == direct
    assert note["p_model_baseline_first"] == pytest.approx(1 - direct[0][0], abs=1e-12)
    assert note["p_model_model_first"] == pytest.approx(direct[1][0], abs=1e-12)


def test_difficulty_local_judge_goes_through_the_shared_pass(tiny, monkeypatch):
    model, tokenizer = tiny
    items = [InstructionRecord(f"Task number {i} {'x' * i}", f"answer {i}") for i in range(3)]
    calls = _recording(monkeypatch)
    scores = score_with_local_judge(model, tokenizer, items, rows_per_batch=2).scores
    [(args, kwargs, result)] = calls
    prefix, label_ids = _label_token_ids(tokenizer)
    prompts = [local_judge_prompt_ids(record, tokenizer, prefix) for record in items]
    with onednn_inference(model):  # where the difficulty scorer runs it
        direct = label_probabilities(model, tokenizer, prompts, label_ids, rows_per_batch=2, max_length=2048)
    assert kwargs["deal_out"] is True and [list(ids) for ids in args[2]] == prompts
    np.testing.assert_allclose(result, direct, rtol=0, atol=1e-9)
    np.testing.assert_allclose(scores, [sum(p * k for p, k in zip(d, range(1, 6), strict=True)) for d in direct], rtol=0, atol=1e-9)
