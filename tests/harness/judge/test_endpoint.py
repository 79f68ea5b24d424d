"""The one OpenAI-compatible client and the OpenAI judge's pairwise reviews, against a real HTTP server on
127.0.0.1 speaking the protocol (tests/harness/openai_server.py): score parsing, retries of malformed
replies, token accounting, the loopback check and the key lookup."""

from __future__ import annotations

import pytest

from harness.errors import HarnessError
from harness.judge import (
    JudgeOptions,
    JudgeSettings,
    OpenAIJudge,
    api_key,
    chat,
    is_loopback,
    judge_options,
    load_pairwise_prompt,
    make_judge,
    parse_score_pair,
)
from tests.harness.openai_server import OpenAIServer, score_for


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


def test_openai_judge_reviews_pairs_and_skips_malformed_replies(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    items = [("Q1", "short", "a much longer answer " * 3), ("MALFORMED question", "a", "b")]
    with OpenAIServer() as server:
        judge = make_judge("openai:judge-model", JudgeOptions(base_url=server.base_url, price_per_token=1e-6))
        reviews = judge.review_pairs(items)
        body = server.requests[0]["body"]
        assert len(server.requests) == 2  # a malformed review is kept, not asked again
    assert reviews[0].scores == (score_for(items[0][1]), score_for(items[0][2]))
    assert reviews[1].scores is None and "cannot" in reviews[1].raw
    assert reviews[0].price > 0
    assert body["temperature"] == 0 and body["messages"][0]["role"] == "system"


def test_pairwise_price_is_tokens_times_the_price_per_token(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    item = ("Q1", "short", "a much longer answer")
    with OpenAIServer() as server:
        [priced] = make_judge("openai:judge-model", JudgeOptions(base_url=server.base_url, price_per_token=1e-6)).review_pairs([item])
        [unpriced] = make_judge("openai:judge-model", JudgeOptions(base_url=server.base_url)).review_pairs([item])
        [listed] = make_judge("openai:gpt-4-0613", JudgeOptions(base_url=server.base_url)).review_pairs([item])
        bodies = [r["body"] for r in server.requests]
    # the server counts whitespace-separated words of the messages as prompt tokens, of the reply as completion tokens
    prompt_tokens = len("\n".join(m["content"] for m in bodies[0]["messages"]).split())
    assert priced.price == pytest.approx((prompt_tokens + len(priced.raw.split())) * 1e-6)
    assert unpriced.price is None and unpriced.scores == priced.scores  # a model alpaca_eval has no price for
    assert listed.price == pytest.approx((prompt_tokens + len(listed.raw.split())) * 0.03 / 1000)  # its list price
    prompt = load_pairwise_prompt("cherry")
    assert bodies[0]["messages"][1]["content"] == prompt.render(*item).strip() and bodies[0]["max_tokens"] == 1024


def test_chat_retries_replies_the_parser_rejects_and_counts_every_attempt(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a loopback server needs no key
    prompt = load_pairwise_prompt("cherry")
    conversations = [
        [{"role": "user", "content": prompt.render(question, "an answer", "another answer")}]
        for question in ("Fine question", "MALFORMED question")
    ]
    seen = []
    with OpenAIServer() as server:
        settings = JudgeSettings(base_url=server.base_url, model="m", max_retries=2, backoff_seconds=0)
        good, bad = chat(settings, conversations, parse=parse_score_pair, on_reply=lambda i, r: seen.append(i))
        assert len(server.requests) == 1 + 3
    assert good.ok and good.value == (score_for("an answer"), score_for("another answer")) and good.attempts == 1
    assert bad.value is None and bad.problem == "malformed reply" and bad.attempts == 3 and "cannot" in bad.text
    assert bad.prompt_tokens > 2 * good.prompt_tokens  # three attempts, all counted
    assert sorted(seen) == [0, 1]


def test_is_loopback():
    for url in ("http://localhost:8000/v1", "http://ip6-localhost/v1", "http://127.0.0.5:9/v1", "http://[::1]:9/v1", "http://127.0.0.1"):
        assert is_loopback(url), url
    for url in ("https://example.com/v1", "http://10.0.0.1:8000/v1", "http://127.example.com/v1", "", None):
        assert not is_loopback(url), url


def test_key_lookup_reads_the_environment_only(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-x")
    assert api_key("MY_JUDGE_KEY", "https://example.com/v1") == "sk-x"
    monkeypatch.delenv("MY_JUDGE_KEY")
    assert api_key("MY_JUDGE_KEY", "http://127.0.0.1:1/v1") == "EMPTY"
    with pytest.raises(HarnessError) as raised:
        api_key("MY_JUDGE_KEY", "https://example.com/v1")
    assert "MY_JUDGE_KEY is not set" in str(raised.value) and "\n" not in str(raised.value)


def test_loopback_base_url_needs_no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for url in ("http://localhost:8000/v1", "http://127.0.0.1:9/v1", "http://[::1]:9/v1"):
        assert isinstance(OpenAIJudge("m", JudgeOptions(base_url=url)), OpenAIJudge)
    with pytest.raises(HarnessError, match="OPENAI_API_KEY"):
        OpenAIJudge("m", JudgeOptions(base_url="http://10.0.0.5:8000/v1"))


def test_judge_options_from_a_config_name_bad_keys_and_values():
    assert judge_options({"base_url": "http://127.0.0.1:1/v1", "batch_size": 2}) == JudgeOptions(base_url="http://127.0.0.1:1/v1", batch_size=2)  # noqa: E501
    with pytest.raises(HarnessError, match="unknown key 'bach_size'; did you mean 'batch_size'"):
        judge_options({"bach_size": 2})
    with pytest.raises(HarnessError, match="judge_options.batch_size = 'many'"):
        judge_options({"batch_size": "many"})
