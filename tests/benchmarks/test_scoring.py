"""TruthfulQA MC2 and WinoGrande (partial) scoring, checked against a hand computation: the tiny model's
log-likelihoods computed directly with torch, then the papers' formulas applied by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from harness.evaluation import Suite, run_lm_eval


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), tokenized as lm-eval's HFLM does (no special tokens;
    the continuation's tokens are those of context+continuation after the context's)."""
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    whole_ids = tokenizer(context + continuation, add_special_tokens=False).input_ids
    continuation_ids = whole_ids[len(context_ids) :]
    with torch.no_grad():
        logits = model(torch.tensor([whole_ids[:-1]])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    start = len(whole_ids) - 1 - len(continuation_ids)
    return float(sum(logprobs[start + i, token] for i, token in enumerate(continuation_ids)))


def evaluate(tiny, tmp_path, task: str, limit: int) -> tuple[dict, list[dict]]:
    model, tokenizer = tiny
    suite = Suite.model_validate({"name": "t", "description": "t", "tasks": [{"task": task, "limit": limit}]})
    result = run_lm_eval(model, tokenizer, suite, output_dir=tmp_path, batch_size=4)["tasks"][task]
    rows = [json.loads(line) for line in (tmp_path / f"samples_{task}.jsonl").read_text().splitlines()]
    return result, rows


def documents(task: str, limit: int) -> list[dict]:
    from lm_eval.tasks import TaskManager

    from harness.evaluation import TASKS_DIR

    loaded = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load(task)["tasks"][task]
    return [(loaded, doc) for _, doc in zip(range(limit), loaded.eval_docs, strict=False)]


def test_truthfulqa_mc2_is_the_normalized_probability_of_the_true_answers(tiny, tmp_path):
    model, tokenizer = tiny
    result, rows = evaluate(tiny, tmp_path, "local_truthfulqa_mc2", limit=3)
    by_id = {row["doc_id"]: row for row in rows}
    scores = []
    for doc_id, (task, doc) in enumerate(documents("local_truthfulqa_mc2", 3)):
        context = task.doc_to_text(doc)
        choices, labels = doc["mc2_targets"]["choices"], doc["mc2_targets"]["labels"]
        lls = [loglikelihood(model, tokenizer, context, " " + choice) for choice in choices]
        assert by_id[doc_id]["loglikelihoods"] == pytest.approx(lls, abs=2e-3)
        probabilities = [math.exp(ll) for ll in lls]
        true_mass = sum(p for p, label in zip(probabilities, labels, strict=True) if label == 1) / sum(probabilities)
        assert by_id[doc_id]["acc"] == pytest.approx(true_mass, rel=1e-3)
        scores.append(true_mass)
    mean = sum(scores) / len(scores)
    assert result["acc"]["value"] == pytest.approx(mean, rel=1e-3)
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1))
    assert result["acc"]["stderr"] == pytest.approx(sd / math.sqrt(len(scores)), rel=1e-3)


def test_winogrande_scores_the_same_continuation_after_each_filled_in_context(tiny, tmp_path):
    model, tokenizer = tiny
    result, rows = evaluate(tiny, tmp_path, "local_winogrande", limit=4)
    by_id = {row["doc_id"]: row for row in rows}
    correct = []
    for doc_id, (_, doc) in enumerate(documents("local_winogrande", 4)):
        lls = [loglikelihood(model, tokenizer, context, " " + doc["continuation"]) for context in doc["context_options"]]
        assert by_id[doc_id]["loglikelihoods"] == pytest.approx(lls, abs=2e-3)
        hit = float(max(range(len(lls)), key=lls.__getitem__) == doc["gold"])
        assert by_id[doc_id]["acc"] == hit
        correct.append(hit)
    assert result["acc"]["value"] == pytest.approx(sum(correct) / len(correct))
