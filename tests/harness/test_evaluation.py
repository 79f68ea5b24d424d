"""Suites: the shipped suite files, fixed random subsets recorded in the record, per-example results,
standard errors, online task names, non-lm-eval sections, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import shutil
import sys
import types
from pathlib import Path

import pytest

from harness import evaluation
from harness.errors import HarnessError
from harness.evaluation import (
    ONLINE_TASKS,
    SectionContext,
    Suite,
    _fit_generation_budget,
    check_sections,
    list_suites,
    load_suite,
    metric_cell,
    online_task_name,
    plan_suite,
    run_extra_sections,
    run_suite,
    sample_indices,
    stderr_from_samples,
)


def make_suite(**fields) -> Suite:
    return Suite.model_validate({"name": "t", "description": "t", **fields})


def test_shipped_suites_validate_and_resolve_offline():
    assert {"smoke", "small", "openllm-v1", "paper"} <= set(list_suites())
    for name in ("smoke", "small", "openllm-v1", "paper"):
        planned = plan_suite(load_suite(name))
        assert all(sum(plan.leaves.values()) > 0 for plan in planned)


def test_openllm_v1_is_the_leaderboard_protocol_on_full_sets():
    suite = load_suite("openllm-v1")
    setup = {t.task: (t.num_fewshot, t.metrics[0], t.limit, t.sample) for t in suite.tasks}
    assert setup == {
        "local_arc_challenge": (25, "acc_norm", None, None),
        "local_hellaswag": (10, "acc_norm", None, None),
        "local_mmlu": (5, "acc", None, None),
        "local_truthfulqa_mc2": (0, "acc", None, None),
    }
    paper = load_suite("paper")
    assert [t.task for t in paper.tasks[:4]] == [t.task for t in suite.tasks]
    assert paper.alpaca_eval is not None and paper.pairwise is not None
    assert any(t.task == "local_ifeval" and t.chat_template for t in paper.tasks)


def test_small_suite_uses_fixed_random_subsets():
    suite = load_suite("small")
    assert all(t.limit is None for t in suite.tasks)
    sizes = {t.task: t.sample for t in suite.tasks}
    assert sizes["local_arc_easy"] == 500 and sizes["local_ifeval"] is not None


def test_sample_indices_are_fixed_sorted_and_shared_with_online_names():
    first = sample_indices("local_arc_easy", 2376, 500, 1234)
    assert first == sample_indices("local_arc_easy", 2376, 500, 1234)
    assert first == sorted(set(first)) and len(first) == 500 and 0 <= first[0] and first[-1] < 2376
    assert first == sample_indices("arc_easy", 2376, 500, 1234)  # the online task draws the same items
    assert first != sample_indices("local_arc_easy", 2376, 500, 1235)
    assert first != sample_indices("local_arc_challenge", 2376, 500, 1234)
    assert sample_indices("local_piqa", 10, 50, 0) == list(range(10))


def test_stderr_from_samples_matches_hand_computation():
    values = [1.0, 0.0, 1.0, 1.0]
    mean = 0.75
    assert stderr_from_samples(mean, values) == pytest.approx(math.sqrt(0.25 / 3 / 4 * 3))  # sd=0.5, /sqrt(4)
    assert stderr_from_samples(0.5, values) is None  # does not reproduce the reported value
    assert stderr_from_samples(1.0, [1.0]) is None
    # IFEval instruction level: prompts are clusters of instructions; ratio estimator by hand.
    per_prompt = [[True, False], [True], [False, False, True]]
    totals, counts = [1, 1, 1], [2, 1, 3]
    ratio = 3 / 6
    residuals = [t - ratio * c for t, c in zip(totals, counts, strict=True)]  # 0, 0.5, -0.5
    expected = math.sqrt(3 / 2 * sum(r * r for r in residuals)) / 6
    assert stderr_from_samples(ratio, per_prompt) == pytest.approx(expected)


def test_online_names_are_registered_lm_eval_tasks():
    import lm_eval
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.__file__).parent / "tasks"
    folders = ["arc", "hellaswag", "mmlu/default", "truthfulqa", "piqa", "winogrande", "super_glue/boolq", "ifeval"]
    manager = TaskManager(include_path=[str(root / f) for f in folders] + [str(evaluation.ONLINE_TASKS_DIR)], include_defaults=False)
    local = evaluation.task_manager(False).all_tasks
    for name in local:
        if name.startswith("local_") and not name.endswith("_tasks"):
            assert online_task_name(name) in manager.all_tasks, name
    assert set(ONLINE_TASKS) <= set(local)
    with pytest.raises(HarnessError, match="no lm-eval counterpart"):
        online_task_name("my_task")


def test_online_mode_without_hub_access_is_a_one_line_error(monkeypatch):
    """Here the hub is unreachable (HF_*_OFFLINE=1): online tasks cannot load, and the error says so."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.__file__).parent / "tasks"
    restricted = TaskManager(include_path=[str(root / "piqa")], include_defaults=False)  # fast: one folder
    monkeypatch.setattr(evaluation, "task_manager", lambda online=False: restricted)
    with pytest.raises(HarnessError) as error:
        plan_suite(make_suite(tasks=[{"task": "local_piqa"}]), online=True)
    text = str(error.value)
    assert text.startswith("task piqa (online): could not load it from the hub") and "\n" not in text


def test_unknown_task_in_a_suite_is_a_one_line_error():
    with pytest.raises(HarnessError) as error:
        plan_suite(make_suite(tasks=[{"task": "local_arc_esy"}]))
    assert "local_arc_easy" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "body, message",
    [
        ("name: x\ndescription: x\ntasks:\n  - {task: local_piqa, limit: 5, sample: 5}\n", "either limit or sample"),
        ("name: x\ndescription: x\ntasks:\n  - {task: local_piqa, shots: 5}\n", "tasks.0.shots"),
        ("name: x\ndescription: x\ntaks: []\n", "taks"),
        ("name: x\ndescription: [unclosed\n", "invalid YAML"),
    ],
)
def test_bad_suite_file_is_a_one_line_error_naming_file_and_key(tmp_path, monkeypatch, body, message):
    (tmp_path / "bad.yaml").write_text(body)
    monkeypatch.setattr(evaluation, "SUITES_DIR", tmp_path)
    with pytest.raises(HarnessError) as error:
        load_suite("bad")
    text = str(error.value)
    assert message in text and str(tmp_path / "bad.yaml") in text and "\n" not in text


@pytest.fixture
def tasks_without_data(tmp_path, monkeypatch):
    """A copy of the task folder whose data folder is empty, as after a broken install."""
    tasks = tmp_path / "benchmarks" / "tasks"
    shutil.copytree(evaluation.TASKS_DIR, tasks, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "benchmarks" / "data").mkdir()
    monkeypatch.setattr(evaluation, "TASKS_DIR", tasks)
    evaluation.task_manager.cache_clear()
    yield tmp_path / "benchmarks" / "data"
    evaluation.task_manager.cache_clear()


def test_missing_data_file_is_a_one_line_error_naming_it(tasks_without_data):
    with pytest.raises(HarnessError) as error:
        plan_suite(make_suite(tasks=[{"task": "local_piqa"}]))
    text = str(error.value)
    assert "\n" not in text and str(tasks_without_data / "mc" / "piqa.jsonl.gz") in text
    assert text.startswith("task local_piqa: benchmark data file missing")


def test_missing_data_fails_the_cli_before_training_and_writes_nothing(tasks_without_data, tmp_path, capsys):
    from harness.cli import main

    output = tmp_path / "runs"
    with pytest.raises(SystemExit) as exited:
        main(["run", "--output", str(output), "--limit", "5"])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and err.startswith("error: task local_arc_easy: benchmark data file missing")
    assert len(err.splitlines()) == 1 and not output.exists()


def test_chat_template_on_a_tokenizer_without_one_is_a_one_line_error(tiny, tmp_path):
    model, tokenizer = tiny
    plain = types.SimpleNamespace(chat_template=None)
    suite = make_suite(tasks=[{"task": "local_piqa", "limit": 1}, {"task": "local_ifeval", "limit": 1, "chat_template": True}])
    with pytest.raises(HarnessError, match="task local_ifeval uses the chat template but the model's tokenizer has none"):
        run_suite(model, plain, suite, output_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_metric_cells_carry_a_95_percent_interval_clipped_to_the_range():
    cell = metric_cell(50.0, 5.0)
    assert cell["ci_low"] == pytest.approx(50 - 1.959964 * 5, abs=1e-5) and cell["ci_high"] == pytest.approx(50 + 1.959964 * 5, abs=1e-5)
    assert metric_cell(95.0, 5.0, bounds=(0.0, 100.0))["ci_high"] == 100.0
    assert metric_cell(None, None, note="not computed") == {"value": None, "stderr": None, "note": "not computed"}


def test_generation_budget_is_capped_only_when_the_model_cannot_fit_it():
    """IFEval asks for 1280 new tokens; a 1024-token model (the tiny one) gets half its context, noted in
    the record; models with room run the task as configured."""
    (ifeval,) = plan_suite(make_suite(tasks=[{"task": "local_ifeval", "limit": 1}]))
    assert ifeval.max_gen_toks == 1280
    assert _fit_generation_budget(ifeval, 8192) == (None, None)
    kwargs, note = _fit_generation_budget(ifeval, 1024)
    assert kwargs == {"max_gen_toks": 512} and note == "max_gen_toks capped from 1280 to 512: the model's context is 1024 tokens"
    (arc,) = plan_suite(make_suite(tasks=[{"task": "local_arc_easy"}]))
    assert arc.max_gen_toks is None and _fit_generation_budget(arc, 16) == (None, None)


def test_sections_without_an_implementation_are_skipped_with_a_note(monkeypatch):
    monkeypatch.setattr(evaluation, "EXTRA_SECTIONS", {"alpaca_eval": "harness._absent_module", "pairwise": "harness._absent_module"})
    metrics, skipped = run_extra_sections(None, None, make_suite(alpaca_eval={"version": 2}), output_dir=Path("unused"))
    assert metrics == {} and skipped == {"alpaca_eval": "not implemented yet (harness._absent_module is absent)"}


def test_sections_with_an_implementation_run_through_it(monkeypatch, tmp_path):
    calls = []

    def section(model, tokenizer, config, *, output_dir, seed, context):
        calls.append((config, output_dir, seed, context))
        return {"win_rate": {"value": 1.0, "stderr": 0.1}, "judge_cost_usd": 0.25, "samples": [{"doc_id": 3, "win_rate": 1.0}]}

    module = types.ModuleType("harness._section_for_test")
    module.run_suite_section = section
    monkeypatch.setitem(sys.modules, "harness._section_for_test", module)
    monkeypatch.setattr(evaluation, "EXTRA_SECTIONS", {"pairwise": "harness._section_for_test"})
    suite = make_suite(pairwise={"test_sets": ["vicuna"], "limit": 9, "judge": "openai:gpt-4"})
    metrics, skipped = run_extra_sections(None, None, suite, output_dir=tmp_path, seed=3)
    assert metrics == {"pairwise": {"win_rate": {"value": 1.0, "stderr": 0.1}, "judge_cost_usd": 0.25}} and skipped == {}
    assert calls == [({"test_sets": ["vicuna"], "limit": 9, "judge": "openai:gpt-4"}, tmp_path / "pairwise", 3, SectionContext())]
    assert json.loads((tmp_path / "samples_pairwise.jsonl").read_text()) == {"doc_id": 3, "win_rate": 1.0}
    # the run's eval.limit and eval.judge override the suite's
    context = SectionContext(template="alpaca", generator="run")
    run_extra_sections(None, None, suite, output_dir=tmp_path, limit=2, judge="local:tiny", context=context)
    assert calls[-1] == ({"test_sets": ["vicuna"], "limit": 2, "judge": "local:tiny"}, tmp_path / "pairwise", 0, context)


def test_section_configs_are_checked_before_training(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_BASE", raising=False)
    paper = load_suite("paper")
    with pytest.raises(HarnessError) as error:
        check_sections(paper)  # the official judge needs a key
    assert str(error.value).startswith("suite paper: judge 'openai:gpt-4-1106-preview': OPENAI_API_KEY is not set")
    check_sections(paper, judge="local:tiny", limit=3)  # offline with a local judge
    with pytest.raises(HarnessError, match="suite t: section pairwise: unknown key 'test_set'; did you mean 'test_sets'"):
        check_sections(make_suite(pairwise={"test_set": ["vicuna"], "judge": "local:tiny"}))


def test_paper_suite_without_a_judge_key_fails_before_training_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from harness.cli import main

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_BASE", raising=False)
    output = tmp_path / "runs"
    with pytest.raises(SystemExit) as exited:
        main(["run", "--suite", "paper", "--output", str(output), "--limit", "2"])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: suite paper: judge 'openai:gpt-4-1106-preview': OPENAI_API_KEY is not set")
    assert not output.exists()


SECTIONS_SUITE = """\
name: sections
description: one lm-eval task and both judged sections, for tests
tasks:
  - {task: local_arc_easy, limit: 100, metrics: [acc]}
alpaca_eval: {version: 2, judge: "openai:", max_new_tokens: 8, lc_bootstrap: 0, judge_options: {price_per_token: 1.0e-6}}
pairwise: {test_sets: [vicuna, koala], judge: openai:gpt-4, max_new_tokens: 8, reference: base, judge_options: {price_per_token: 1.0e-6}}
"""


def _run_sections_suite(tmp_path, monkeypatch, capsys, output, judge):
    from harness.cli import main

    suites = tmp_path / "suites"
    suites.mkdir(exist_ok=True)
    (suites / "sections.yaml").write_text(SECTIONS_SUITE)
    monkeypatch.setattr(evaluation, "SUITES_DIR", suites)
    args = ["run", "--suite", "sections", "--output", str(output), "--limit", "3", "--set", "data.limit=64", "--set", f"eval.judge={judge}"]
    with pytest.raises(SystemExit) as exited:
        main(args)
        raise SystemExit(0)
    return exited.value.code or 0, capsys.readouterr().out


def test_cli_run_with_a_paid_judge_records_its_cost_and_never_its_key(tmp_path, monkeypatch, capsys):
    """The paid judge's stand-in: a real local server speaking the OpenAI protocol, reached through
    OPENAI_BASE_URL. The record's cost is what both sections' judges reported; the key is in no file."""
    from tests.harness.openai_server import OpenAIServer

    secret = "sk-test-secret-record-7731"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.delenv("OPENAI_CLIENT_CONFIG_PATH", raising=False)
    output = tmp_path / "runs"
    with OpenAIServer() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        code, _ = _run_sections_suite(tmp_path, monkeypatch, capsys, output, "openai:judge-model")
        assert code == 0 and len(server.requests) == 3 + 2 * 6  # AlpacaEval: 1 per item; pairwise: 2 orders
    (run_dir,) = output.iterdir()
    record = json.loads((run_dir / "record.json").read_text())
    alpaca, pairwise = record["metrics"]["alpaca_eval"]["judge_cost_usd"], record["metrics"]["pairwise"]["judge_cost_usd"]
    assert alpaca > 0 and pairwise > 0
    assert record["cost"]["judge_cost_usd"] == record["cost"]["eval_judge_cost_usd"] == pytest.approx(alpaca + pairwise)
    for path in output.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes().decode(errors="ignore"), path


def test_a_judge_outage_keeps_the_run_and_a_rerun_resumes_it(tmp_path, monkeypatch, capsys):
    """The judge fails after training and generation: one-line error, the run directory (model, answers)
    is kept, and the rerun finishes without generating the answers again."""
    from tests.harness.openai_server import OpenAIServer

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.delenv("OPENAI_CLIENT_CONFIG_PATH", raising=False)
    output = tmp_path / "runs"
    with OpenAIServer() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url.removesuffix("/v1") + "/down")
        code, _ = _run_sections_suite(tmp_path, monkeypatch, capsys, output, "openai:judge-model")
        assert code == 2
        (run_dir,) = output.iterdir()
        outputs = run_dir / "eval" / "alpaca_eval" / "model_outputs.json"
        assert not (run_dir / "record.json").exists() and outputs.is_file() and (run_dir / "model").is_dir()
        generated_at = outputs.stat().st_mtime_ns
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        code, _ = _run_sections_suite(tmp_path, monkeypatch, capsys, output, "openai:judge-model")
        assert code == 0 and (run_dir / "record.json").is_file()
    assert outputs.stat().st_mtime_ns == generated_at


def test_cli_run_with_judged_sections_offline_and_the_leaderboard_reads_them(tmp_path, monkeypatch, capsys):
    """`harness run` on the tiny model with AlpacaEval and pairwise sections, the local judge named by
    eval.judge: metrics in the record with standard errors, per-example rows the leaderboard's paired
    tests accept, judge cost in the record's cost."""
    from harness.leaderboard import load_runs

    output = tmp_path / "runs"
    code, out = _run_sections_suite(tmp_path, monkeypatch, capsys, output, "local:tiny")
    assert code == 0
    assert "alpaca_eval" in out and "pairwise" in out
    (run_dir,) = output.iterdir()
    record = json.loads((run_dir / "record.json").read_text())
    alpaca, pairwise = record["metrics"]["alpaca_eval"], record["metrics"]["pairwise"]
    assert alpaca["n"] == 3 and alpaca["win_rate"]["stderr"] is not None and alpaca["judge"] == "local:tiny"
    assert pairwise["n"] + pairwise["skipped"] == 6 and pairwise["reference"] == "base:tiny"
    assert -0.5 <= pairwise["win_rate"]["value"] <= 0.5 and pairwise["win_rate"]["stderr"] is not None
    assert record["suite"]["skipped"] == {} and record["cost"]["eval_judge_cost_usd"] == 0.0
    assert {"samples_alpaca_eval.jsonl", "samples_pairwise.jsonl"} <= {p.name for p in (run_dir / "eval").iterdir()}
    warnings = []
    (run,) = load_runs([output], warnings.append)
    assert warnings == []
    assert ("alpaca_eval", "win_rate") in run.metrics and ("pairwise", "win_rate_koala") in run.metrics
    assert "win_rate" in run.samples["alpaca_eval"].metrics and "win_rate" in run.samples["pairwise"].metrics


def test_run_suite_records_subsets_and_per_example_results(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    suite = make_suite(
        sample_seed=7,
        tasks=[{"task": "local_arc_challenge", "sample": 5}, {"task": "local_boolq", "limit": 2, "metrics": ["acc"]}],
        pairwise={"test_sets": ["vicuna"]},
    )
    monkeypatch.setattr(evaluation, "EXTRA_SECTIONS", {"pairwise": "harness._absent_module"})
    result = run_suite(model, tokenizer, suite, output_dir=tmp_path, batch_size=4)
    arc = result["tasks"]["local_arc_challenge"]
    expected_ids = sample_indices("local_arc_challenge", 1172, 5, 7)
    assert arc["sample"] == {"per_task": 5, "seed": 7, "doc_ids": {"local_arc_challenge": expected_ids}}
    assert arc["n"] == 5 and set(arc) >= {"acc", "acc_norm"} and arc["limit"] is None
    rows = [json.loads(line) for line in (tmp_path / "samples_local_arc_challenge.jsonl").read_text().splitlines()]
    assert sorted(row["doc_id"] for row in rows) == expected_ids
    assert all(len(row["loglikelihoods"]) == 4 and row["acc"] in (0.0, 1.0) and "acc_norm" in row for row in rows)
    assert arc["acc"]["value"] == pytest.approx(sum(row["acc"] for row in rows) / 5)
    boolq = result["tasks"]["local_boolq"]
    assert boolq["n"] == 2 and boolq["limit"] == 2 and boolq["sample"] is None and set(boolq) & {"acc_norm"} == set()
    assert result["skipped"] == {"pairwise": "not implemented yet (harness._absent_module is absent)"}
    assert result["online"] is False and result["chat_template"] is False
    # A global limit replaces the suite's subsets (first N items) and is recorded.
    limited = run_suite(model, tokenizer, make_suite(tasks=[{"task": "local_arc_challenge", "sample": 5}]), output_dir=tmp_path, limit=2)
    assert limited["limit"] == 2 and limited["tasks"]["local_arc_challenge"]["sample"] is None
    assert limited["tasks"]["local_arc_challenge"]["n"] == 2


def test_resume_reuses_finished_tasks_and_replays_the_request_cache_bit_identically(tiny, tmp_path):
    """With resume (the runner's run directory), a finished task is reused from result_<task>.json and a
    task started again replays lm-eval's request cache: the same metrics and per-example log-likelihoods,
    to the bit, as an evaluation without any cache."""
    model, tokenizer = tiny
    suite = make_suite(tasks=[{"task": "local_arc_easy", "limit": 12}, {"task": "local_boolq", "limit": 4}])
    plain = run_suite(model, tokenizer, suite, output_dir=tmp_path / "plain", batch_size=4)
    assert not (tmp_path / "plain" / "request_cache").exists() and not list((tmp_path / "plain").glob("result_*"))
    total = plain["work"]["requests_computed"]
    assert plain["work"] == {"tasks_computed": 2, "tasks_reused": 0, "requests_computed": total, "requests_cached": 0}
    choices = {name: sum(len(json.loads(line)["loglikelihoods"]) for line in (tmp_path / "plain" / f"samples_{name}.jsonl").open())
               for name in ("local_arc_easy", "local_boolq")}  # one log-likelihood request per choice
    assert total == sum(choices.values()) and choices["local_boolq"] == 4 * 2

    def without_seconds(tasks: dict) -> dict:
        return {name: {k: v for k, v in entry.items() if k != "seconds"} for name, entry in tasks.items()}

    resumed = tmp_path / "resumed"
    first = run_suite(model, tokenizer, suite, output_dir=resumed, batch_size=4, resume=True)
    assert first["work"] == plain["work"] and without_seconds(first["tasks"]) == without_seconds(plain["tasks"])
    again = run_suite(model, tokenizer, suite, output_dir=resumed, batch_size=4, resume=True)
    assert again["work"] == {"tasks_computed": 0, "tasks_reused": 2, "requests_computed": 0, "requests_cached": 0}
    assert again["tasks"] == first["tasks"]
    (resumed / "result_local_arc_easy.json").unlink()  # as if killed before the task's result was saved
    replayed = run_suite(model, tokenizer, suite, output_dir=resumed, batch_size=4, resume=True)
    assert replayed["work"] == {"tasks_computed": 1, "tasks_reused": 1, "requests_computed": 0,
                                "requests_cached": choices["local_arc_easy"]}
    assert without_seconds(replayed["tasks"]) == without_seconds(plain["tasks"])
    for name in ("samples_local_arc_easy.jsonl", "samples_local_boolq.jsonl"):
        assert (resumed / name).read_text() == (tmp_path / "plain" / name).read_text()


@pytest.mark.slow
def test_smollm2_arc_easy_is_clearly_above_chance(tmp_path):
    """The real SmolLM2-135M-Instruct on 150 random ARC-Easy items (0-shot, plain prompt; bf16 weights where the
    CPU has bf16 units: about 3x faster there than fp32, and what a GPU evaluates in; fp32 where it would
    emulate bf16)."""
    from harness.cpu_kernels import native_bf16
    from harness.models import load_model_and_tokenizer, resolve_model
    from tests.conftest import require_smollm2

    model, tokenizer = load_model_and_tokenizer(resolve_model("smollm2-135m-instruct", str(require_smollm2())))
    suite = make_suite(tasks=[{"task": "local_arc_easy", "sample": 150, "metrics": ["acc"]}])
    precision = "bf16" if native_bf16() else "fp32"
    accuracy = run_suite(model, tokenizer, suite, output_dir=tmp_path, precision=precision)["tasks"]["local_arc_easy"]["acc"]
    rows = [json.loads(line) for line in (tmp_path / "samples_local_arc_easy.jsonl").read_text().splitlines()]
    chance = sum(1 / len(row["loglikelihoods"]) for row in rows) / len(rows)
    assert accuracy["value"] - chance > 3 * accuracy["stderr"], (accuracy, chance)  # p < 0.002
