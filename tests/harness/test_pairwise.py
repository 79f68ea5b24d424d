"""Pairwise judging (Phased IFT / Cherry LLM protocol): test sets, outcome rules, WinRate, and a full
comparison of two sets of outputs with the local tiny judge and with an OpenAI-protocol server."""

from __future__ import annotations

import json

import pytest

from harness.errors import HarnessError
from harness.generation import GenerationSettings
from harness.judges import JudgeOptions, LocalJudge, make_judge
from harness.pairwise import (
    PAIRWISE_SETS,
    generate_pairwise_outputs,
    judge_pairwise,
    load_pairwise_set,
    outcome,
    win_rate,
)
from tests.harness.openai_server import OpenAIServer


@pytest.mark.parametrize(("name", "size"), PAIRWISE_SETS.items())
def test_shipped_sets_load_with_their_sizes(name, size):
    items = load_pairwise_set(name)
    assert len(items) == size
    assert len({i.id for i in items}) == size
    assert all(i.question.strip() for i in items)


def test_self_instruct_questions_include_their_input():
    first = load_pairwise_set("sinstruct", limit=1)[0]
    assert first.question.startswith("The sentence you are given might be too wordy")
    assert first.question.endswith("please let me know.")


@pytest.mark.parametrize(
    ("forward", "backward", "expected"),
    [
        ((8, 6), (6, 8), "win"),  # won twice
        ((8, 6), (7, 7), "win"),  # won + tied
        ((7, 7), (7, 7), "tie"),  # tied twice
        ((8, 6), (8, 6), "tie"),  # won + lost (position bias)
        ((5, 7), (7, 7), "loss"),  # lost + tied
        ((5, 7), (7, 5), "loss"),  # lost twice
        (None, (7, 5), None),  # a malformed reply: skipped
    ],
)
def test_outcome_rules(forward, backward, expected):
    assert outcome(forward, backward) == expected


def test_win_rate_formula_and_skips():
    result = win_rate(["win", "win", "tie", "loss", None])
    assert result["win_rate"]["value"] == pytest.approx((2 + 0.5) / 4 - 0.5)
    assert result["skipped"] == 1 and result["n"] == 4 and result["win"] == 2
    assert result["win_rate"]["stderr"] > 0
    assert win_rate([None])["win_rate"]["value"] is None


def test_unknown_set_is_named():
    with pytest.raises(HarnessError, match="did you mean 'koala'"):
        load_pairwise_set("kaola")


def _write_outputs(directory, answers):
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("vicuna", "koala"):
        items = load_pairwise_set(name, limit=2)
        lines = [json.dumps({"id": i.id, "question": i.question, "output": answers(i)}) for i in items]
        (directory / f"outputs_{name}.jsonl").write_text("\n".join(lines) + "\n")


def test_two_runs_judged_through_an_openai_protocol_server(tmp_path, monkeypatch):
    """Run A answers at length, run B tersely; the server scores by length and garbles one question."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    _write_outputs(tmp_path / "a", lambda i: "A detailed and helpful answer. " * 4)
    _write_outputs(tmp_path / "b", lambda i: "No." if i.id != "koala_1" else "No. MALFORMED")
    with OpenAIServer() as server:
        judge = make_judge("openai:judge-model", JudgeOptions(base_url=server.base_url, price_per_token=1e-6))
        result = judge_pairwise(
            tmp_path / "a", tmp_path / "b", judge=judge, output_dir=tmp_path / "out", sets=["vicuna", "koala"], name_a="long", name_b="short"
        )
        assert len(server.requests) == 8  # 4 questions x 2 orders
    assert result["sets"]["vicuna"]["win"] == 2 and result["sets"]["vicuna"]["win_rate"]["value"] == pytest.approx(0.5)
    assert result["sets"]["koala"]["skipped"] == 1 and result["sets"]["koala"]["n"] == 1
    assert result["overall"]["n"] == 3 and result["overall"]["win_rate"]["value"] == pytest.approx(0.5)
    assert result["position_bias"]["first_shown_higher"] == pytest.approx(0.5)
    assert result["cost_usd"] > 0
    judgments = [json.loads(line) for line in (tmp_path / "out" / "judgments_koala.jsonl").read_text().splitlines()]
    assert [j["outcome"] for j in judgments] == ["win", None]
    assert json.loads((tmp_path / "out" / "pairwise.json").read_text())["a"] == "long"


def test_generate_and_judge_two_runs_with_the_local_tiny_judge(tiny, tmp_path):
    model, tokenizer = tiny
    settings = GenerationSettings(max_new_tokens=6, batch_size=4)
    for run, penalty in (("a", 1.0), ("b", 1.3)):
        record = generate_pairwise_outputs(
            model, tokenizer, output_dir=tmp_path / run, settings=GenerationSettings(**(vars(settings) | {"repetition_penalty": penalty})),
            sets=["vicuna", "wizardlm"], limit=2, generator=run,
        )
        assert record["n"] == 4 and record["settings"]["repetition_penalty"] == penalty
    judge = LocalJudge("local:tiny", model, tokenizer, JudgeOptions(batch_size=4, max_answer_tokens=32))
    result = judge_pairwise(tmp_path / "a", tmp_path / "b", judge=judge, output_dir=tmp_path / "out", sets=["vicuna", "wizardlm"])
    assert result["overall"]["n"] + result["overall"]["skipped"] == 4
    assert result["overall"]["skipped"] == 0  # the local judge's grammar always yields two scores
    assert -0.5 <= result["overall"]["win_rate"]["value"] <= 0.5
    assert (tmp_path / "out" / "judgments_wizardlm.jsonl").is_file()


def test_missing_outputs_are_a_one_line_error(tmp_path, tiny):
    model, tokenizer = tiny
    judge = LocalJudge("local:tiny", model, tokenizer)
    with pytest.raises(HarnessError, match="pairwise outputs not found"):
        judge_pairwise(tmp_path / "a", tmp_path / "b", judge=judge, output_dir=tmp_path / "out", sets=["vicuna"])
