"""AlpacaEval: metric exactness against the official leaderboard, shipped references, the offline LC
GLM, an end-to-end run on the tiny model, and the OpenAI judge through a real local HTTP server."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from harness.alpaca import (
    ALPACA_DIR,
    N_INSTRUCTIONS,
    compute_metrics,
    estimate_difficulty,
    fixed_subset,
    judge_outputs,
    load_difficulty,
    load_reference,
    run_alpaca_eval,
    run_suite_section,
)
from harness.compat import import_alpaca_eval
from harness.errors import HarnessError
from harness.evaluation import SectionContext
from harness.generation import GenerationSettings
from harness.judge import JudgeOptions, LocalJudge, make_judge
from tests.conftest import SHARED
from tests.harness.openai_server import LOSER_LOGPROB, WINNER_LOGPROB, OpenAIServer

ANNOTATED = SHARED / "data" / "alpaca_eval" / "annotated"
# Official leaderboard values (shared/README.md; alpaca_eval 0.6.6 leaderboards/ CSVs).
OFFICIAL = [
    ("alpaca-7b", "weighted_alpaca_eval_gpt4_turbo", 2.5915, 0.4871),
    ("falcon-7b-instruct", "weighted_alpaca_eval_gpt4_turbo", 2.1466, 0.4542),
    ("alpaca-7b", "alpaca_eval_gpt4", 26.4596, 1.5357),
    ("alpaca-7b-neft", "alpaca_eval_gpt4", 61.6438, 1.7170),
]


def official_annotations(model: str, annotator: str) -> list[dict]:
    path = ANNOTATED / model / f"{annotator}_annotations.json"
    if not path.is_file():
        pytest.skip(f"{path} not found (../shared absent)")
    return [row | {"index": i} for i, row in enumerate(json.loads(path.read_text(encoding="utf-8")))]


@pytest.mark.parametrize(("model", "annotator", "win_rate", "stderr"), OFFICIAL)
def test_win_rate_and_standard_error_match_the_official_leaderboard(model, annotator, win_rate, stderr):
    metrics = compute_metrics(official_annotations(model, annotator), lc=False)
    assert metrics["win_rate"]["value"] == pytest.approx(win_rate, abs=1e-3)
    assert metrics["win_rate"]["stderr"] == pytest.approx(stderr, abs=1e-3)
    assert 0 <= metrics["discrete_win_rate"]["value"] <= 100 and metrics["discrete_win_rate"]["stderr"] > 0


def test_failed_annotations_are_counted_not_scored():
    rows = [{"preference": 2.0}, {"preference": 1.0}, {"preference": float("nan")}, {"preference": 1.5}]
    metrics = compute_metrics(rows, lc=False)
    assert metrics["n_failed"] == 1 and metrics["n_total"] == 3
    assert metrics["win_rate"]["value"] == pytest.approx(50.0)
    with pytest.raises(HarnessError, match="no usable preference"):
        compute_metrics([{"preference": None}], lc=False)


def test_length_controlled_win_rate_offline_within_reach_of_the_official_value():
    """The package's GLM with its hub downloads replaced by local inputs (no network here): alpaca-7b's
    LC win rate with a leave-one-out difficulty estimate lands near the official 5.8755."""
    annotations = official_annotations("alpaca-7b", "weighted_alpaca_eval_gpt4_turbo")
    others = [
        [float(r["preference"]) for r in official_annotations(m, "weighted_alpaca_eval_gpt4_turbo")]
        for m in ("falcon-7b-instruct", "text_davinci_003")
    ]
    lc = compute_metrics(annotations, difficulty=estimate_difficulty(others), lc_bootstrap=5)["length_controlled_win_rate"]
    assert lc["glm"] == "length_controlled_noreg" and "df_gamed.csv" in lc["note"]
    assert abs(lc["value"] - 5.8755) < 3.0
    assert lc["stderr"] > 0 and lc["bootstrap"] == 5
    minimal = compute_metrics(annotations, lc_bootstrap=2)["length_controlled_win_rate"]
    assert minimal["glm"] == "length_controlled_minimal" and "unavailable" in minimal["note"]


def test_shipped_references_and_difficulty():
    gpt4, davinci = load_reference("gpt4_1106_preview"), load_reference("text_davinci_003")
    assert len(gpt4) == len(davinci) == N_INSTRUCTIONS
    assert [r["instruction"] for r in gpt4] == [r["instruction"] for r in davinci]
    assert {r["generator"] for r in gpt4} == {"gpt4_1106_preview"}
    assert len(load_difficulty(gpt4)) == N_INSTRUCTIONS
    assert (ALPACA_DIR / "LICENSE").is_file()
    with pytest.raises(HarnessError, match="not found"):
        load_reference("gpt5")


def test_alpaca_eval_1_reference_is_the_baseline_the_official_annotations_used():
    annotations = official_annotations("alpaca-7b", "alpaca_eval_gpt4")
    assert [r["output"] for r in load_reference("text_davinci_003")] == [r["output_1"] for r in annotations]


def test_fixed_subset_is_seeded_sorted_and_spread():
    subset = fixed_subset(50, seed=0)
    assert subset == fixed_subset(50, seed=0) and subset == sorted(subset) and len(set(subset)) == 50
    assert subset != fixed_subset(50, seed=1)
    assert max(subset) > 600 and min(subset) < 200  # not the first 50 (grouped by source)
    assert fixed_subset(None) == list(range(N_INSTRUCTIONS))
    with pytest.raises(HarnessError):
        fixed_subset(0)


def test_run_alpaca_eval_end_to_end_on_the_tiny_model(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    judge = LocalJudge("local:tiny", model, tokenizer, JudgeOptions(max_answer_tokens=64))
    settings = GenerationSettings(max_new_tokens=8, batch_size=2)
    result = run_alpaca_eval(
        model, tokenizer, judge=judge, output_dir=tmp_path, limit=3, settings=settings, generator="tiny", lc_bootstrap=3
    )
    assert result["n"] == 3 and result["subset"] == fixed_subset(3)
    for key in ("win_rate", "discrete_win_rate"):
        assert math.isfinite(result[key]["value"])
    assert result["length_controlled_win_rate"]["value"] is None  # too few examples for the GLM's 5-fold CV
    assert "at least 10" in result["length_controlled_win_rate"]["note"]
    assert result["win_rate"]["stderr"] is not None
    assert result["generation"]["max_new_tokens"] == 8 and result["generation"]["decoding"] == "greedy"
    assert result["position_bias"]["n"] == 3
    annotations = json.loads((tmp_path / "annotations.json").read_text())
    assert [a["index"] for a in annotations] == fixed_subset(3)
    assert all(1 <= a["preference"] <= 2 for a in annotations)
    assert json.loads((tmp_path / "metrics.json").read_text())["n"] == 3

    # a rerun with the same settings reuses the saved outputs instead of generating again
    def no_generation(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr("harness.generation.timed_generate", no_generation)
    again = run_alpaca_eval(
        model, tokenizer, judge=judge, output_dir=tmp_path, limit=3, settings=settings, generator="tiny", lc_bootstrap=3
    )
    assert again["win_rate"] == result["win_rate"]


def test_openai_judge_runs_alpaca_eval_code_against_a_local_server(tmp_path, monkeypatch):
    """The official weighted_alpaca_eval_gpt4_turbo config through alpaca_eval's client and parser, talking
    HTTP to a local server whose rule is 'the longer output wins'."""
    secret = "sk-test-secret-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.delenv("OPENAI_CLIENT_CONFIG_PATH", raising=False)
    reference = load_reference("gpt4_1106_preview")
    indices = [0, 5, 17, 300]
    outputs = []
    for k, i in enumerate(indices):
        text = reference[i]["output"] + " Extra detail." * 50 if k % 2 == 0 else "Short."
        outputs.append({"index": i, "instruction": reference[i]["instruction"], "output": text, "generator": "candidate"})
    with OpenAIServer() as server:
        judge = make_judge("openai:judge-model", JudgeOptions(base_url=server.base_url, price_per_token=1e-6))
        result = judge_outputs(outputs, judge=judge, output_dir=tmp_path, lc_bootstrap=2)
        requests = list(server.requests)
    assert len(requests) == len(indices)
    body = requests[0]["body"]
    assert body["model"] == "judge-model" and body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 5
    assert {r["authorization"] for r in requests} == {f"Bearer {secret}"}
    p_win = math.exp(WINNER_LOGPROB) / (math.exp(WINNER_LOGPROB) + math.exp(LOSER_LOGPROB))
    annotations = json.loads((tmp_path / "annotations.json").read_text())
    for k, note in enumerate(annotations):
        expected = 1 + p_win if k % 2 == 0 else 2 - p_win  # the longer output wins, whatever order it was shown in
        assert note["preference"] == pytest.approx(expected, abs=1e-6)
        assert note["price_per_example"] > 0
    assert result["win_rate"]["value"] == pytest.approx(50.0, abs=1e-6)
    assert result["cost"]["cost_usd"] == pytest.approx(sum(n["price_per_example"] for n in annotations))
    assert result["judge"]["base_url"] == server.base_url
    for path in tmp_path.rglob("*"):  # the key is never written
        if path.is_file():
            assert secret not in path.read_text(errors="ignore"), path


def test_replaying_the_official_judge_reproduces_its_preferences(tmp_path, monkeypatch):
    """The server answers with the official judge's recorded completions (message + logprobs): through
    our openai judge, alpaca_eval's order randomisation and logprob parser, every preference comes out
    exactly as in the official annotations (scripts/alpaca_metrics_check.py --replay does all 805)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    official = official_annotations("alpaca-7b", "weighted_alpaca_eval_gpt4_turbo")
    replay = {r["instruction"]: r["raw_completion"] for r in official if r.get("raw_completion")}
    chosen = [official[i] for i in fixed_subset(16, seed=3)]
    outputs = [{"index": r["index"], "instruction": r["instruction"], "output": r["output_2"], "generator": "alpaca-7b"} for r in chosen]
    with OpenAIServer(replay=replay) as server:
        judge = make_judge("openai:gpt-4-1106-preview", JudgeOptions(base_url=server.base_url))
        result = judge_outputs(outputs, judge=judge, output_dir=tmp_path, lc_bootstrap=0)
    annotations = json.loads((tmp_path / "annotations.json").read_text())
    assert [a["preference"] for a in annotations] == pytest.approx([float(r["preference"]) for r in chosen], abs=1e-9)
    assert result["win_rate"]["value"] == pytest.approx(compute_metrics(chosen, lc=False)["win_rate"]["value"], abs=1e-6)
    # priced by alpaca_eval from gpt-4-1106-preview's per-token price and the recorded token counts
    assert result["cost"]["cost_usd"] == pytest.approx(sum(float(r["price_per_example"] or 0) for r in chosen), abs=1e-9)


def test_remote_openai_judge_without_a_key_is_a_one_line_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_BASE", raising=False)
    with pytest.raises(HarnessError, match="OPENAI_API_KEY is not set") as error:
        make_judge("openai:gpt-4o-mini")
    assert "\n" not in str(error.value)
    with pytest.raises(HarnessError, match="OPENAI_API_KEY"):
        make_judge("openai:", JudgeOptions(base_url="https://judge.example.com/v1"))
    local = make_judge("openai:served-model", JudgeOptions(base_url="http://127.0.0.1:8000/v1"))
    assert local.describe()["model"] == "served-model"


def test_openai_judge_server_error_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    reference = load_reference("gpt4_1106_preview")
    outputs = [{"index": 0, "instruction": reference[0]["instruction"], "output": "x", "generator": "m"}]
    with OpenAIServer() as server:
        judge = make_judge("openai:judge-model", JudgeOptions(base_url=server.base_url.removesuffix("/v1") + "/wrong"))
        with pytest.raises(HarnessError, match="judge 'openai:judge-model'"):
            judge_outputs(outputs, judge=judge, output_dir=tmp_path, lc_bootstrap=0)
    assert not (tmp_path / "metrics.json").exists()


def test_alpaca_eval_1_annotator_config_loads_in_alpaca_eval(tmp_path):
    import_alpaca_eval()
    from alpaca_eval.annotators import PairwiseAnnotator

    judge = make_judge("openai:gpt-4", JudgeOptions(base_url="http://127.0.0.1:1/v1", annotator_config="alpaca_eval_gpt4"))
    path = judge.write_annotator_config(tmp_path)
    annotator = PairwiseAnnotator(annotators_config=str(path), caching_path=None)
    [single] = annotator.annotators.values()
    assert "{instruction}" in single.prompt_template and single.completions_kwargs["model_name"] == "gpt-4"


def test_unknown_judges_and_configs_are_named():
    with pytest.raises(HarnessError, match="did you mean 'local'"):
        make_judge("locla:tiny")
    with pytest.raises(HarnessError, match="annotator config"):
        make_judge("openai:x", JudgeOptions(base_url="http://127.0.0.1:1/v1", annotator_config="weighted_alpaca_eval_gpt4_trubo"))


def test_reference_files_are_gzip_json():
    for path in (ALPACA_DIR / "references").glob("*.json.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as stream:
            assert isinstance(json.load(stream), list)
    assert Path(ALPACA_DIR / "README.md").is_file()


# ----------------------------------------------------------------------------- the suite section

SECTION = {"judge": "local:tiny", "limit": 4, "max_new_tokens": 8, "batch_size": 2, "chunk_size": 3, "lc_bootstrap": 0}


def test_suite_section_on_the_tiny_model_with_the_local_judge(tiny, tmp_path, monkeypatch):
    """Cells in the lm-eval shape with 95% intervals, per-example rows that reproduce the win rate, and a
    rerun that neither generates nor judges again (both cached in the section's directory)."""
    model, tokenizer = tiny
    config = SECTION | {"judge_options": {"max_answer_tokens": 64, "batch_size": 4}}
    result = run_suite_section(model, tokenizer, config, output_dir=tmp_path, seed=5, context=SectionContext(generator="run-x"))
    win = result["win_rate"]
    assert result["n"] == 4 and result["judge"] == "local:tiny" and result["judge_cost_usd"] is None
    assert 0 <= win["value"] <= 100 and win["stderr"] > 0 and win["ci_low"] < win["value"] < win["ci_high"]
    assert result["length_controlled_win_rate"]["value"] is None  # the GLM needs 10 examples
    assert result["details"]["subset"] == fixed_subset(4) and result["details"]["generation"]["chunk_size"] == 3
    assert result["details"]["judge"]["cache"] == {"file": "judge_cache.jsonl", "reused": 0, "judged": 4}
    samples = result["samples"]
    assert [row["doc_id"] for row in samples] == fixed_subset(4)
    assert sum(row["win_rate"] for row in samples) / 4 == pytest.approx(win["value"], rel=1e-9)
    outputs = json.loads((tmp_path / "model_outputs.json").read_text())
    assert {o["generator"] for o in outputs["outputs"]} == {"run-x"} and not (tmp_path / "model_outputs.partial.json").exists()
    assert outputs["generation"]["template"] == "chat"  # the tokenizer's chat template, as in training

    def refuse(*args, **kwargs):
        raise AssertionError("called again")

    monkeypatch.setattr("harness.generation.timed_generate", refuse)
    monkeypatch.setattr(LocalJudge, "label_probabilities", refuse)
    again = run_suite_section(model, tokenizer, config, output_dir=tmp_path, seed=5, context=SectionContext(generator="run-x"))
    assert again["win_rate"] == win and again["details"]["judge"]["cache"]["reused"] == 4


def test_suite_section_bad_keys_are_one_line_errors(tiny, tmp_path):
    from harness.alpaca import check_suite_section

    model, tokenizer = tiny
    cases = [
        (SECTION | {"judge_option": {}}, "section alpaca_eval: unknown key 'judge_option'; did you mean 'judge_options'?"),
        (SECTION | {"judge_options": {"base_ur": "x"}}, "unknown key 'base_ur'; did you mean 'base_url'?"),
        (SECTION | {"version": 3}, "AlpacaEval version '3'"),
        (SECTION | {"reference": "text_davinci_003"}, "is not AlpacaEval 2's baseline 'gpt4_1106_preview'"),
        (SECTION | {"limit": 0}, "key 'limit' = 0"),
        (SECTION | {"judge": "local:tinyy"}, "did you mean 'tiny'"),
    ]
    for config, message in cases:
        with pytest.raises(HarnessError) as error:
            check_suite_section(config)
        assert message in str(error.value) and "\n" not in str(error.value), (config, str(error.value))
    with pytest.raises(HarnessError, match="judge_option"):
        run_suite_section(model, tokenizer, SECTION | {"judge_option": {}}, output_dir=tmp_path / "x", seed=0)
    assert not (tmp_path / "x").exists()


def test_suite_section_with_an_openai_protocol_judge_caches_its_verdicts(tiny, tmp_path, monkeypatch):
    """The paid judge's stand-in is a real HTTP server; a rerun sends it nothing, a different judge model
    is asked again, the cost is recorded and the key is written nowhere."""
    secret = "sk-test-secret-section-42"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.delenv("OPENAI_CLIENT_CONFIG_PATH", raising=False)
    model, tokenizer = tiny
    with OpenAIServer() as server:
        options = {"base_url": server.base_url, "price_per_token": 1e-6}
        config = SECTION | {"judge": "openai:judge-model", "judge_options": options}
        first = run_suite_section(model, tokenizer, config, output_dir=tmp_path, seed=0)
        assert len(server.requests) == 4
        again = run_suite_section(model, tokenizer, config, output_dir=tmp_path, seed=0)
        assert len(server.requests) == 4  # every verdict came from judge_cache.jsonl
        other = run_suite_section(model, tokenizer, config | {"judge": "openai:other-model"}, output_dir=tmp_path, seed=0)
        assert len(server.requests) == 8 and {r["body"]["model"] for r in server.requests[4:]} == {"other-model"}
    assert again["win_rate"] == first["win_rate"] and other["win_rate"] == first["win_rate"]  # same rule, same verdicts
    assert first["judge"] == "openai:judge-model" and first["judge_cost_usd"] > 0
    assert again["judge_cost_usd"] == first["judge_cost_usd"]  # the evaluation's cost, paid once
    assert again["details"]["judge"]["cache"] == {"file": "judge_cache.jsonl", "reused": 4, "judged": 0}
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="ignore"), path
