"""Judges: score parsing, the local judge's two-order preference and score grammar on the tiny model,
and key handling of the OpenAI-compatible judge."""

from __future__ import annotations

import pytest

from harness.errors import HarnessError
from harness.judges import (
    CachedJudge,
    JudgeOptions,
    LocalJudge,
    OpenAIJudge,
    judge_options,
    make_judge,
    parse_score_pair,
    position_bias,
)
from tests.harness.openai_server import OpenAIServer, score_for

ROWS = [
    {"instruction": "Name a fruit.", "output_1": "Apple.", "output_2": "A banana is a fruit.", "generator_1": "ref", "generator_2": "model"},  # noqa: E501
    {"instruction": "Add 2 and 2.", "output_1": "4", "output_2": "The answer is four.", "generator_1": "ref", "generator_2": "model"},
]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("8 6\nAssistant 1 is better.", (8.0, 6.0)),
        ("7, 9", (7.0, 9.0)),
        ("10 1", (10.0, 1.0)),
        ("  3.5 4\n", (3.5, 4.0)),
        ("8", None),
        ("Assistant 1: 8\nAssistant 2: 6", None),
        ("11 5", None),
        ("0 5", None),
        ("", None),
        ("nan 5", None),
    ],
)
def test_parse_score_pair(reply, expected):
    assert parse_score_pair(reply) == expected


@pytest.fixture(scope="module")
def local_judge(tiny):
    model, tokenizer = tiny
    return LocalJudge("local:tiny", model, tokenizer, JudgeOptions(batch_size=2, max_answer_tokens=32))


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


def test_openai_judge_reviews_pairs_and_skips_malformed_replies(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    items = [("Q1", "short", "a much longer answer " * 3), ("MALFORMED question", "a", "b")]
    with OpenAIServer() as server:
        judge = make_judge("openai:judge-model", JudgeOptions(base_url=server.base_url, price_per_token=1e-6))
        reviews = judge.review_pairs(items)
        body = server.requests[0]["body"]
    assert reviews[0].scores == (score_for(items[0][1]), score_for(items[0][2]))
    assert reviews[1].scores is None and "cannot" in reviews[1].raw
    assert reviews[0].price > 0
    assert body["temperature"] == 0 and body["messages"][0]["role"] == "system"


def test_loopback_base_url_needs_no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for url in ("http://localhost:8000/v1", "http://127.0.0.1:9/v1", "http://[::1]:9/v1"):
        assert isinstance(OpenAIJudge("m", JudgeOptions(base_url=url)), OpenAIJudge)
    with pytest.raises(HarnessError, match="OPENAI_API_KEY"):
        OpenAIJudge("m", JudgeOptions(base_url="http://10.0.0.5:8000/v1"))


def test_local_judge_needs_a_model_name():
    with pytest.raises(HarnessError, match="name the local model"):
        make_judge("local:")


def test_cached_judge_resumes_a_killed_job_and_never_asks_twice(local_judge, tiny, tmp_path, monkeypatch):
    items = [(f"Question {k}?", f"Answer number {k}.", "No.") for k in range(5)]
    direct = local_judge.review_pairs(items)
    real = local_judge.review_pairs
    asked = []

    def killed_on_the_second_chunk(batch):
        asked.append(len(batch))
        if len(asked) == 2:
            raise KeyboardInterrupt
        return real(batch)

    path = tmp_path / "judge_cache.jsonl"
    monkeypatch.setattr(local_judge, "review_pairs", killed_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        CachedJudge(local_judge, path, chunk_size=2).review_pairs(items)
    monkeypatch.setattr(local_judge, "review_pairs", lambda batch: asked.append(len(batch)) or real(batch))
    cached = CachedJudge(local_judge, path, chunk_size=2)
    assert [(r.scores, r.raw) for r in cached.review_pairs(items)] == [(r.scores, r.raw) for r in direct]
    assert asked == [2, 2, 2, 1] and (cached.reused, cached.judged) == (2, 3)
    again = CachedJudge(local_judge, path, chunk_size=2)
    again.review_pairs(items[::-1])
    assert (again.reused, again.judged) == (5, 0) and len(asked) == 4
    # the judge is part of the key: the same model with another answer budget is another judge
    model, tokenizer = tiny
    other = CachedJudge(LocalJudge("local:tiny", model, tokenizer, JudgeOptions(max_answer_tokens=16)), path)
    assert other._key("pairwise", *items[0]) != again._key("pairwise", *items[0])


def test_judge_options_from_a_config_name_bad_keys_and_values():
    assert judge_options({"base_url": "http://127.0.0.1:1/v1", "batch_size": 2}) == JudgeOptions(base_url="http://127.0.0.1:1/v1", batch_size=2)  # noqa: E501
    with pytest.raises(HarnessError, match="unknown key 'bach_size'; did you mean 'batch_size'"):
        judge_options({"bach_size": 2})
    with pytest.raises(HarnessError, match="judge_options.batch_size = 'many'"):
        judge_options({"batch_size": "many"})
