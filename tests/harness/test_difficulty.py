"""Difficulty scorers. The judge scorer talks to a real HTTP server on 127.0.0.1 that speaks the OpenAI
chat-completions protocol, scripted to fail, answer garbage, or score, so retries, malformed replies,
cost accounting and resume are exercised through the real openai client."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from harness.artifacts import ArtifactCache
from harness.data import InstructionRecord
from harness.difficulty import (
    JudgeSettings,
    _label_token_ids,
    local_judge_prompt_ids,
    parse_score,
    score_with_judge,
    score_with_local_judge,
    scores_from_file,
    scores_from_ifd,
)
from harness.errors import HarnessError
from harness.scoring import IFDScores
from tests.harness.openai_server import send_json
from tests.recipes.helpers import write_phased_file


class ScriptedJudge:
    """Replies per instruction: a score derived from the instruction, after `failures` HTTP 500s;
    instructions containing 'garbage' always get a reply without a score; `down` refuses everything;
    `unauthorized` answers 401 to everything."""

    def __init__(self):
        self.requests: list[str] = []
        self.failures: dict[str, int] = {}
        self.down = False
        self.unauthorized = False
        self.lock = threading.Lock()

    def reply(self, instruction: str) -> tuple[int, dict]:
        with self.lock:
            self.requests.append(instruction)
            if self.unauthorized:
                return 401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}
            if self.down:
                return 503, {"error": {"message": "overloaded"}}
            if self.failures.get(instruction, 0) > 0:
                self.failures[instruction] -= 1
                return 500, {"error": {"message": "boom"}}
        content = "I cannot rate this." if "garbage" in instruction else f"Score: {1 + len(instruction) % 5}\nBecause."
        return 200, {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "judge",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
        }


@pytest.fixture()
def judge_server():
    script = ScriptedJudge()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            user = body["messages"][-1]["content"]
            instruction = user.split("[Instruction]\n", 1)[1].split("\n\n[Input]", 1)[0]
            send_json(self, *script.reply(instruction))

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield script, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def records(n: int) -> list[InstructionRecord]:
    return [InstructionRecord(f"Task number {i} {'x' * i}", f"answer {i}") for i in range(n)]


def expected_score(record: InstructionRecord) -> float:
    return float(1 + len(record.instruction) % 5)


def test_parse_score():
    assert parse_score("Score: 4.125\nhard") == 4.125
    assert parse_score("**Score:** 2") == 2.0
    assert parse_score("3.5 - moderately hard") == 3.5
    assert parse_score("Score: 7") is None
    assert parse_score("no idea") is None


def test_judge_retries_counts_malformed_and_accounts_cost(judge_server, tmp_path, monkeypatch):
    script, url = judge_server
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    items = records(6) + [InstructionRecord("garbage please", "x")]
    script.failures = {items[0].instruction: 2, items[1].instruction: 1}
    settings = JudgeSettings(base_url=url, model="judge", concurrency=3, max_retries=3, backoff_seconds=0.01,
                             price_per_1k_prompt_tokens=1.0, price_per_1k_completion_tokens=2.0)
    result = score_with_judge(items, settings, cache=ArtifactCache(tmp_path))
    np.testing.assert_array_equal(result.scores[:6], [expected_score(r) for r in items[:6]])
    assert np.isnan(result.scores[6])
    assert result.details["failed"] == 1 and result.details["failure_kinds"] == ["malformed reply"]
    # 6 good items + 3 retried 500s + 4 attempts at the garbage item
    assert len(script.requests) == 6 + 3 + 4
    assert result.details["prompt_tokens"] == 100 * (6 + 4)  # HTTP 500s carry no usage
    assert result.details["cost_usd"] == pytest.approx((1000 * 1.0 + 100 * 2.0) / 1000)


def test_judge_resumes_after_interruption(judge_server, tmp_path):
    script, url = judge_server
    items = records(8)
    settings = JudgeSettings(base_url=url, model="judge", concurrency=2, max_retries=0, backoff_seconds=0)
    cache = ArtifactCache(tmp_path)
    script.failures = {r.instruction: 1 for r in items[4:]}  # the server dies for the second half
    first = score_with_judge(items, settings, cache=cache)
    assert np.isnan(first.scores[4:]).all() and not np.isnan(first.scores[:4]).any()
    script.requests.clear()
    second = score_with_judge(items, settings, cache=cache)
    assert sorted(script.requests) == sorted(r.instruction for r in items[4:])  # only the unfinished ones
    assert second.details["reused_from_cache"] == 4
    np.testing.assert_array_equal(second.scores, [expected_score(r) for r in items])


def test_a_rejected_key_stops_the_judging_in_one_line(judge_server, tmp_path):
    script, url = judge_server
    script.unauthorized = True
    settings = JudgeSettings(base_url=url, model="judge", concurrency=2, max_retries=3, backoff_seconds=0)
    with pytest.raises(HarnessError, match=r"rejected the key in OPENAI_API_KEY \(401\)") as error:
        score_with_judge(records(40), settings, cache=ArtifactCache(tmp_path))
    assert "\n" not in str(error.value)
    assert len(script.requests) <= settings.concurrency  # at most the requests in flight: none sent after a 401


def test_missing_key_for_a_remote_judge_is_one_line(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(HarnessError) as raised:
        score_with_judge(records(1), JudgeSettings(base_url="https://api.openai.com/v1"))
    assert "OPENAI_API_KEY is not set" in str(raised.value) and "\n" not in str(raised.value)


def test_local_judge_reads_the_expected_label(tiny):
    model, tokenizer = tiny
    items = records(3)
    result = score_with_local_judge(model, tokenizer, items)
    assert ((result.scores >= 1) & (result.scores <= 5)).all()
    prefix, label_ids = _label_token_ids(tokenizer)
    ids = torch.tensor([local_judge_prompt_ids(items[1], tokenizer, prefix)])
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids).logits[0, -1, label_ids].double(), -1)
    assert result.scores[1] == pytest.approx(float((probs * torch.arange(1, 6)).sum()), abs=1e-6)


def test_file_scores_join_on_text(tmp_path, sample_records):
    path = write_phased_file(tmp_path / "s.jsonl", sample_records[:5], [1.0, 2.0, 3.0, 4.0, 5.0])
    result = scores_from_file(sample_records[:7], path)
    np.testing.assert_array_equal(result.scores[:5], [1, 2, 3, 4, 5])
    assert np.isnan(result.scores[5:]).all()
    with pytest.raises(HarnessError, match="carries no difficulty"):
        scores_from_file(sample_records[:2], None)


def test_ifd_proxy_keeps_ifd_order_on_the_1_to_5_scale():
    ifd = IFDScores(np.array([0.5, 0.9, np.nan, 0.7]), np.ones(4), skipped=[2])
    scores = scores_from_ifd(ifd).scores
    assert np.isnan(scores[2]) and scores[0] < scores[3] < scores[1]
    assert np.nanmin(scores) > 1 and np.nanmax(scores) < 5
