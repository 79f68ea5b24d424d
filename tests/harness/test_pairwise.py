"""Pairwise judging (Cherry LLM and Phased IFT protocols): test sets, outcome rules, WinRate, the two
protocols' prompts and counting, and a full comparison of two sets of outputs with the local tiny judge
and with an OpenAI-protocol server."""

from __future__ import annotations

import json

import pytest

from harness.errors import HarnessError
from harness.evaluation import SectionContext
from harness.generation import GenerationSettings
from harness.judge import CachedJudge, JudgeOptions, LocalJudge, load_pairwise_prompt, make_judge
from harness.pairwise import (
    PAIRWISE_SETS,
    PROTOCOLS,
    check_suite_section,
    generate_pairwise_outputs,
    judge_pairwise,
    load_pairwise_set,
    outcome,
    read_outputs,
    resolve_sets,
    run_suite_section,
    set_mean,
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
            tmp_path / "a", tmp_path / "b", judge=judge, output_dir=tmp_path / "out", sets=["vicuna", "koala"], name_a="long", name_b="short"  # noqa: E501
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


# ----------------------------------------------------------------------------- the suite section

SECTION = {"judge": "local:tiny", "test_sets": ["vicuna", "koala"], "limit": 2, "max_new_tokens": 6, "batch_size": 4, "chunk_size": 3}


def test_section_against_the_base_model_itself_is_an_exact_tie(tiny, tmp_path):
    """The run's model is its own base here, so both answers are equal and every question must be a
    tie whatever the judge's position bias (the two orders are the same prompt): WinRate 0 exactly.
    The base model's answers are generated once into the artifact cache and reused by the next run."""
    model, tokenizer = tiny
    context = SectionContext(base_model="tiny", generator="run-a")
    result = run_suite_section(model, tokenizer, SECTION, output_dir=tmp_path / "a", seed=0, context=context)
    assert result["win_rate"] == {"value": 0.0, "stderr": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert result["tie"] == result["n"] == 4 and result["skipped"] == 0
    assert result["win_rate_vicuna"]["n"] == 2 and result["win_rate_koala"]["value"] == 0.0
    assert result["reference"] == "base:tiny" and result["judge"] == "local:tiny" and result["judge_cost_usd"] is None
    assert [row["doc_id"] for row in result["samples"]] == ["vicuna/1", "vicuna/2", "koala/koala_0", "koala/koala_1"]
    assert all(row["win_rate"] == 0.0 for row in result["samples"])
    for name in ("vicuna", "koala"):
        mine, base = (read_outputs(tmp_path / "a" / side, name) for side in ("model", "reference"))
        assert {k: r["output"] for k, r in mine.items()} == {k: r["output"] for k, r in base.items()}
        assert {r["generator"] for r in mine.values()} == {"run-a"} and {r["generator"] for r in base.values()} == {"base:tiny"}
    other = run_suite_section(model, tokenizer, SECTION, output_dir=tmp_path / "b", seed=0, context=context)
    assert other["details"]["reference"]["from_cache"] is True
    assert other["details"]["reference"]["cache_key"] == result["details"]["reference"]["cache_key"]


def test_section_against_saved_outputs_through_an_openai_protocol_server(tiny, tmp_path, monkeypatch):
    """Reference: another run's saved answers; the judge: a real local HTTP server scoring by length.
    A rerun sends the server nothing (verdicts cached by question, both answers and judge)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    model, tokenizer = tiny
    _write_outputs(tmp_path / "one-off", lambda i: "A much longer and more detailed answer than the other. " * 3)
    with OpenAIServer() as server:
        config = SECTION | {
            "judge": "openai:judge-model",
            "judge_options": {"base_url": server.base_url, "price_per_token": 1e-6},
            "reference": {"outputs": str(tmp_path / "one-off")},
        }
        check_suite_section(config)
        result = run_suite_section(model, tokenizer, config, output_dir=tmp_path / "eval", seed=0)
        assert len(server.requests) == 8  # 4 questions x 2 orders
        again = run_suite_section(model, tokenizer, config, output_dir=tmp_path / "eval", seed=0)
        assert len(server.requests) == 8
    assert result["win_rate"]["value"] == pytest.approx(-0.5)  # the reference's longer answers win every time
    assert result["loss"] == 4 and result["judge_cost_usd"] > 0 and again["win_rate"] == result["win_rate"]
    assert again["details"]["judge"]["cache"]["reused"] == 8
    assert result["reference"] == f"outputs:{tmp_path / 'one-off'}"
    assert sum(row["win_rate"] for row in result["samples"]) / 4 == pytest.approx(result["win_rate"]["value"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"both_orders": False}, "both_orders = false"),
        ({"test_sets": ["vicuna", "kaola"]}, "did you mean 'koala'"),
        ({"reference": {"modle": "tiny"}}, "reference = {\"modle\": \"tiny\"}: give base"),
        ({"reference": {"outputs": "/nonexistent/run"}}, "reference outputs not found: /nonexistent/run/outputs_vicuna.jsonl"),
        ({"reference": {"model": "tiniy"}}, "did you mean 'tiny'"),
        ({"judge": "gpt4"}, "unknown judge kind 'gpt4'"),
        ({"test_set": ["vicuna"]}, "unknown key 'test_set'; did you mean 'test_sets'?"),
    ],
)
def test_section_bad_config_is_a_one_line_error(change, message):
    with pytest.raises(HarnessError) as error:
        check_suite_section(SECTION | change)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


# ----------------------------------------------------------------------------- the PhasedSFT protocol

# PhasedSFT's active judge criteria, quoted from xubuvd/PhasedSFT evaluation/eval.py, gen_prompt()
# (commit f688aa2); the explain variant above it there is commented out.
PHASEDSFT_CRITERIA = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user question "
    "displayed above.\nPlease rate the helpfulness, relevance, accuracy, level of details of their responses. Each "
    "assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better overall "
    "performance.\nPlease only output a single line containing only two values indicating the scores for Assistant 1 "
    "and 2, respectively. The two scores are separated by a space. Do not explain for your scores."
)


def test_shipped_judge_prompts_are_the_published_ones():
    phased, cherry = load_pairwise_prompt("phasedsft"), load_pairwise_prompt("cherry")
    assert phased.criteria == PHASEDSFT_CRITERIA and "xubuvd/PhasedSFT evaluation/eval.py" in phased.source
    assert cherry.criteria.endswith("does not affect your judgment.") and "Cherry_LLM" in cherry.source
    assert phased.system == cherry.system == "You are a helpful and precise assistant for checking the quality of the answer."
    assert phased.template == cherry.template and phased.digest() != cherry.digest()
    with pytest.raises(HarnessError, match="unknown pairwise judge prompt 'phased'; did you mean 'phasedsft'"):
        load_pairwise_prompt("phased")


def test_protocols_name_their_sets():
    assert resolve_sets(None, PROTOCOLS["phasedsft"]) == ["sinstruct", "wizardlm", "koala", "vicuna"]  # no LIMA
    assert resolve_sets(None, PROTOCOLS["cherry"]) == list(PAIRWISE_SETS)
    assert PROTOCOLS["phasedsft"].judge_max_tokens == 256 and PROTOCOLS["cherry"].judge_max_tokens == 1024


def test_phasedsft_words_self_instruct_inputs_as_its_scripts():
    """generation_v2.py: "User: {instruction}\\n{input}</s>..."; eval.py shows the judge '{instruction} Input: {input}'."""
    cherry = load_pairwise_set("sinstruct", limit=1)[0]
    phased = load_pairwise_set("sinstruct", limit=1, protocol="phasedsft")[0]
    instruction, extra = cherry.question.split("\n\n", 1)
    assert cherry.judge_question == cherry.question
    assert phased.question == f"{instruction}\n{extra}" and phased.judge_question == f"{instruction} Input: {extra}"
    assert load_pairwise_set("vicuna", limit=1, protocol="phasedsft")[0].question == load_pairwise_set("vicuna", limit=1)[0].question


def test_failed_reviews_count_as_losses_and_sets_are_averaged():
    counted = win_rate(["win", "win", "tie", "loss", None], failed_as_loss=True)
    assert counted["n"] == 5 and counted["failed"] == counted["failed_counted_as_loss"] == 1 and counted["skipped"] == 0
    assert counted["win_rate"]["value"] == pytest.approx((2 + 0.5) / 5 - 0.5)
    per_set = {"a": win_rate(["win", "win"]), "b": win_rate(["loss", "tie", "tie", "tie"])}
    mean = set_mean(per_set)
    assert mean["win_rate"]["value"] == pytest.approx((0.5 + (1.5 / 4 - 0.5)) / 2)  # not the pooled 3.5/6 - 0.5
    assert mean["n"] == 6 and mean["win"] == 2 and mean["tie"] == 3


def test_phasedsft_protocol_counts_a_failed_review_as_a_loss(tmp_path, monkeypatch):
    """The same server verdicts judged under both protocols: koala_1's reviews do not parse. PhasedSFT keeps
    it in N as a loss and averages the two sets; Cherry drops it and pools the questions. The PhasedSFT
    judge gets its own prompt and a 256-token budget, and its verdicts are not read from Cherry's cache."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    _write_outputs(tmp_path / "a", lambda i: "A detailed and helpful answer. " * 4)
    _write_outputs(tmp_path / "b", lambda i: "No." if i.id != "koala_1" else "No. MALFORMED")
    results = {}
    with OpenAIServer() as server:
        for protocol in ("cherry", "phasedsft"):
            rules = PROTOCOLS[protocol]
            options = JudgeOptions(base_url=server.base_url, pairwise_prompt=rules.judge_prompt, pairwise_max_tokens=rules.judge_max_tokens)
            judge = CachedJudge(make_judge("openai:judge-model", options), tmp_path / "judge_cache.jsonl")
            results[protocol] = judge_pairwise(
                tmp_path / "a", tmp_path / "b", judge=judge, output_dir=tmp_path / protocol, sets=["vicuna", "koala"], protocol=protocol
            )
        assert len(server.requests) == 16  # 8 reviews per protocol: the shared cache holds them apart
        bodies = {protocol: server.requests[k * 8]["body"] for k, protocol in enumerate(("cherry", "phasedsft"))}
    assert bodies["phasedsft"]["max_tokens"] == 256 and bodies["cherry"]["max_tokens"] == 1024
    assert "Do not explain for your scores." in bodies["phasedsft"]["messages"][-1]["content"]
    assert "Do not explain" not in bodies["cherry"]["messages"][-1]["content"]
    phased, cherry = results["phasedsft"], results["cherry"]
    koala = phased["sets"]["koala"]
    assert koala["n"] == 2 and koala["win"] == 1 and koala["failed_counted_as_loss"] == 1
    assert koala["win_rate"]["value"] == pytest.approx((1 + 0) / 2 - 0.5)  # the failed question adds nothing to N's wins
    assert phased["overall"]["win_rate"]["value"] == pytest.approx((0.5 + 0.0) / 2)  # mean of the sets
    assert cherry["sets"]["koala"]["n"] == 1 and cherry["sets"]["koala"]["skipped"] == 1
    assert cherry["overall"]["win_rate"]["value"] == pytest.approx(0.5)
    assert phased["protocol"]["name"] == "phasedsft" and "counted as losses" in phased["protocol"]["failed_reviews"]
    assert cherry["protocol"]["name"] == "cherry" and "skipped" in cherry["protocol"]["failed_reviews"]
    judgments = [json.loads(line) for line in (tmp_path / "phasedsft" / "judgments_koala.jsonl").read_text().splitlines()]
    assert [(j["outcome"], j["value"]) for j in judgments] == [("win", 1.0), (None, 0.0)]


def test_section_with_the_phasedsft_protocol_records_it(tiny, tmp_path, monkeypatch):
    """As a suite section: the record names the protocol and its prompt; the per-question rows average to
    the per-set mean (weighted), so the leaderboard's paired tests see the protocol's figure."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    model, tokenizer = tiny
    _write_outputs(tmp_path / "ref", lambda i: "Short." if i.id not in ("koala_1", "1") else "Short. MALFORMED")
    (tmp_path / "ref" / "outputs_koala.jsonl").write_text(
        "\n".join((tmp_path / "ref" / "outputs_koala.jsonl").read_text().splitlines()[:1]) + "\n"
    )  # one koala question: the sets differ in size, so the per-set mean differs from the pooled rate
    with OpenAIServer() as server:
        config = SECTION | {
            "protocol": "phasedsft",
            "judge": "openai:judge-model",
            "judge_options": {"base_url": server.base_url},
            "reference": {"outputs": str(tmp_path / "ref")},
        }
        result = run_suite_section(model, tokenizer, config, output_dir=tmp_path / "eval", seed=0)
        assert {r["body"]["max_tokens"] for r in server.requests} == {256}
    assert result["protocol"] == "phasedsft" and result["details"]["protocol"]["name"] == "phasedsft"
    assert result["details"]["judge_prompt"] == {"name": "phasedsft", "max_tokens": 256}
    assert result["failed_reviews"] == 1 and result["n"] == 3  # vicuna 2 (one failed, kept), koala 1
    sets = result["details"]["sets"]
    expected = (sets["vicuna"]["win_rate"]["value"] + sets["koala"]["win_rate"]["value"]) / 2
    assert result["win_rate"]["value"] == pytest.approx(expected)
    assert sum(row["win_rate"] for row in result["samples"]) / len(result["samples"]) == pytest.approx(expected)
    with pytest.raises(HarnessError, match="unknown key 'protocl'"):
        check_suite_section(SECTION | {"protocl": "phasedsft"})
    with pytest.raises(HarnessError, match="protocol"):
        check_suite_section(SECTION | {"protocol": "phased"})
