"""The shipped lm-eval tasks: they load offline (no socket may open), build the expected documents with
lm-eval's prompts, and evaluate a handful of items on the tiny model."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from harness.evaluation import TASKS_DIR, Suite, run_lm_eval

# Every local task with its size and the lm-eval task whose prompt and metrics it mirrors.
TASKS = {
    "local_arc_easy": (2376, "arc/arc_easy.yaml"),
    "local_arc_challenge": (1172, "arc/arc_easy.yaml"),
    "local_hellaswag": (10042, "hellaswag/hellaswag.yaml"),
    "local_truthfulqa_mc1": (817, "truthfulqa/truthfulqa_mc1.yaml"),
    "local_truthfulqa_mc2": (817, "truthfulqa/truthfulqa_mc2.yaml"),
    "local_piqa": (1838, "piqa/piqa.yaml"),
    "local_winogrande": (1267, "winogrande/default.yaml"),
    "local_boolq": (3270, "super_glue/boolq/default.yaml"),
    "local_ifeval": (541, "ifeval/ifeval.yaml"),
}


@pytest.fixture(scope="module")
def manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def lm_eval_yaml(relative: str) -> dict:
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(Path(lm_eval.__file__).parent / "tasks" / relative, resolve_func=False)


def test_offline_variables_are_set():
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_loads_offline_with_all_documents(manager, no_network, name):
    size, _ = TASKS[name]
    task = manager.load(name)["tasks"][name]
    docs = list(task.eval_docs)
    assert len(docs) == size
    assert task.doc_to_text(docs[0]) is not None


def test_mmlu_group_has_57_subjects_weighted_by_size(manager, no_network):
    loaded = manager.load("local_mmlu")
    assert len(loaded["tasks"]) == 57
    assert sum(len(list(task.eval_docs)) for task in loaded["tasks"].values()) == 14042
    assert set(loaded["group_map"]["local_mmlu"]) == {
        "local_mmlu_stem", "local_mmlu_other", "local_mmlu_social_sciences", "local_mmlu_humanities"
    }
    assert [m.weight_by_size for m in loaded["groups"]["local_mmlu"].aggregate_metric_list] == [True]
    anatomy = loaded["tasks"]["local_mmlu_anatomy"]
    assert len(list(anatomy.eval_docs)) == 135 and len(list(anatomy.fewshot_docs())) == 5
    mine = lm_eval_yaml("mmlu/default/_default_template_yaml")
    assert anatomy.config.doc_to_text == mine["doc_to_text"] and anatomy.config.doc_to_choice == mine["doc_to_choice"]
    assert anatomy.config.description == lm_eval_yaml("mmlu/default/mmlu_anatomy.yaml")["description"]


@pytest.mark.parametrize(
    "name, field",
    [
        ("local_piqa", "doc_to_text"),
        ("local_boolq", "doc_to_text"),
        ("local_boolq", "doc_to_choice"),
        ("local_truthfulqa_mc1", "doc_to_text"),
        ("local_truthfulqa_mc2", "doc_to_text"),
        ("local_ifeval", "generation_kwargs"),
        ("local_hellaswag", "doc_to_text"),
    ],
)
def test_prompt_fields_are_lm_evals_own(manager, name, field):
    task = manager.load(name)["tasks"][name]
    theirs = lm_eval_yaml(TASKS[name][1])
    if name == "local_hellaswag":  # lm-eval builds `query` in process_docs; the shipped data holds it
        assert theirs[field] == "{{query}}" == task.config.doc_to_text
    else:
        assert getattr(task.config, field) == theirs[field]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_metrics_are_lm_evals_own(manager, name):
    task = manager.load(name)["tasks"][name]
    theirs = [m["metric"] for m in lm_eval_yaml(TASKS[name][1])["metric_list"]]
    assert [m["metric"] for m in task.config.metric_list] == theirs


def test_documents_render_as_lm_eval_renders_them(manager):
    """First items, written out: the prompts lm-eval's hub-backed tasks give for the same items."""

    def first(name):
        task = manager.load(name)["tasks"][name]
        doc = next(iter(task.eval_docs))
        return task, doc

    task, doc = first("local_hellaswag")
    assert task.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. He"
    assert task.doc_to_choice(doc)[3] == "starts pulling up roofing on a roof." and task.doc_to_target(doc) == 3
    task, doc = first("local_piqa")
    assert task.doc_to_text(doc) == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    task, doc = first("local_boolq")
    text = task.doc_to_text(doc)
    assert text.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert not text.startswith("Passage:") and task.doc_to_choice(doc) == ["no", "yes"]
    task, doc = first("local_arc_easy")
    assert task.doc_to_text(doc).startswith("Question: Which statement best explains") and task.doc_to_text(doc).endswith("\nAnswer:")
    task, doc = first("local_winogrande")  # partial scoring: the gold *context* index, the shared continuation
    assert task.doc_to_text(doc) == 1 and task.doc_to_target(doc) == "always got the easier cases."
    assert task.doc_to_choice(doc) == ["Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"]  # noqa: E501
    task, doc = first("local_truthfulqa_mc2")
    assert task.doc_to_text(doc).endswith("\n\nQ: What is the smallest country in the world that is at least one square mile in area?\nA:")
    assert doc["mc2_targets"]["labels"][0] == 1


@pytest.mark.parametrize("name", sorted(TASKS) + ["local_mmlu_small"])
def test_a_handful_of_items_evaluate_on_the_tiny_model(tiny, tmp_path, no_network, name):
    model, tokenizer = tiny
    entry = {"task": name, "limit": 3}
    if name == "local_ifeval":
        entry["gen_kwargs"] = {"max_gen_toks": 8}
    if name == "local_mmlu_small":
        entry = {"task": name, "sample": 1, "num_fewshot": 1}
    suite = Suite.model_validate({"name": "t", "description": "t", "tasks": [entry]})
    result = run_lm_eval(model, tokenizer, suite, output_dir=tmp_path, batch_size=4)["tasks"][name]
    expected_n = 4 if name == "local_mmlu_small" else 3
    assert result["n"] == expected_n
    metrics = {key: value for key, value in result.items() if isinstance(value, dict) and "value" in value}
    assert metrics, result
    for metric in metrics.values():
        assert 0.0 <= metric["value"] <= 1.0 and metric["stderr"] is not None
    rows = [json.loads(line) for line in (tmp_path / f"samples_{name}.jsonl").read_text().splitlines()]
    assert len(rows) == expected_n
    for row in rows:
        assert all(metric in row for metric in metrics)
        assert ("response" in row) == (name == "local_ifeval")
        assert ("loglikelihoods" in row) == (name != "local_ifeval")


def test_mmlu_group_accuracy_is_weighted_by_subject_size(tiny, manager):
    """As lm-eval's mmlu: the group's accuracy is the mean over all items, not the mean of subject means."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=8)
    subsets = {
        "local_mmlu_college_biology": list(range(6)),
        "local_mmlu_world_religions": [0],
        "local_mmlu_high_school_geography": [0, 1],
        "local_mmlu_nutrition": [0],
    }
    output = simple_evaluate(model=lm, tasks=["local_mmlu_small"], samples=subsets, task_manager=manager, bootstrap_iters=0)
    per_item = [s["acc"] for name in subsets for s in output["samples"][name]]
    assert len(per_item) == 10
    group = output["results"]["local_mmlu_small"]["acc,none"]
    assert group == pytest.approx(sum(per_item) / len(per_item))
    means = [sum(s["acc"] for s in output["samples"][name]) / len(subsets[name]) for name in subsets]
    assert group != pytest.approx(sum(means) / len(means))  # the items at hand tell the two apart
