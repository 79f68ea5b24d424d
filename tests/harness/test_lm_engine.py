"""The engine model (harness/lm_engine.py) against lm-eval's HFLM on the same model: per-request
log-likelihoods within fp32 rounding (below), is_greedy and the tasks' metrics identical, on every shipped
log-likelihood task; the plan really shares contexts; the run records who produced each number.

Tolerance: 1e-4 + 2e-6 x |log-likelihood| on every request, long continuations included (PIQA's solutions
sum a hundred or more tokens). That is fp32's own spread: HFLM against itself with eager instead of sdpa
attention (same model and weights) differs by 9.2e-5 on a PIQA log-likelihood of -66 (SmolLM2-135M), and the
rounding moves with the CPU's vector width: the largest engine-HFLM gap was 9.9e-5 on one machine and
1.4e-4 at -111 (1.2e-6 relative, 18 fp32 steps) on an AMD EPYC."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from harness.evaluation import Suite, run_suite, task_manager
from harness.lm_engine import EngineLM, _plan, model_in_precision, score_continuations
from tests.records import make_record

# Every shipped log-likelihood task (MMLU: the small suite's four subjects).
LOGLIKELIHOOD_TASKS = [
    "local_arc_easy", "local_arc_challenge", "local_hellaswag", "local_mmlu_small", "local_truthfulqa_mc1",
    "local_truthfulqa_mc2", "local_piqa", "local_winogrande", "local_boolq",
]
# Metrics that are continuous functions of the log-likelihoods (TruthfulQA MC2's probability mass on the
# true answers) agree to float rounding; every other metric (accuracies) must be identical.
CONTINUOUS = {("local_truthfulqa_mc2", "acc")}


def evaluate(lm, limit: int) -> dict:
    return simple_evaluate(model=lm, tasks=LOGLIKELIHOOD_TASKS, limit=limit, task_manager=task_manager(False),
                           log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                           torch_random_seed=0, fewshot_random_seed=0, verbosity="ERROR")


def within(ll: float, reference: float) -> bool:
    return abs(ll - reference) <= 1e-4 + 2e-6 * abs(reference)


def compare(hflm: dict, engine: dict) -> tuple[float, int]:
    """Per request, log-likelihoods within tolerance (`within`) and is_greedy identical; every metric
    identical. Returns (largest difference, requests compared)."""
    largest, compared = 0.0, 0
    assert set(hflm["samples"]) == set(engine["samples"])
    for task, theirs in hflm["samples"].items():
        mine = engine["samples"][task]
        assert [s["doc_id"] for s in mine] == [s["doc_id"] for s in theirs]
        for ours, reference in zip(mine, theirs, strict=True):
            assert len(ours["resps"]) == len(reference["resps"])
            for (ll, greedy), (ll_ref, greedy_ref) in zip((r[0] for r in ours["resps"]), (r[0] for r in reference["resps"]), strict=True):
                assert within(ll, ll_ref), (task, ours["doc_id"], ll, ll_ref)
                assert greedy == greedy_ref, (task, ours["doc_id"])
                largest, compared = max(largest, abs(ll - ll_ref)), compared + 1
    for task, results in hflm["results"].items():
        for key, value in results.items():
            if not isinstance(value, float) or "stderr" in key or math.isnan(value):
                continue
            other = engine["results"][task][key]
            if (task, key.split(",")[0]) in CONTINUOUS:
                assert other == pytest.approx(value, abs=1e-6), (task, key)
            else:
                assert other == value, (task, key, other, value)
    return largest, compared


def test_engine_equals_hflm_on_every_loglikelihood_task(tiny):
    model, tokenizer = tiny
    hflm = evaluate(HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=8), limit=3)
    engine_lm = EngineLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=8)
    assert engine_lm.uses_engine  # the engine, not HFLM's fallback
    engine = evaluate(engine_lm, limit=3)
    largest, compared = compare(hflm, engine)
    assert compared >= 9 * 3 * 2 and largest > 0  # every task, two or more choices per item; not the same code path


def _instances(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def test_tokenization_edges_truncation_and_rolling_windows_match_hflm(tiny):
    """HFLM's own tokenization (trailing whitespace moved to the continuation, empty context -> prefix
    token), left truncation at a short max_length, and loglikelihood_rolling's windows."""
    model, tokenizer = tiny
    hflm = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=4, max_length=48)
    engine = EngineLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=4, max_length=48)
    long_context = "Give three tips for staying healthy. Eat a balanced diet and drink water. " * 6
    pairs = [
        ("Question: What is the capital of France?\nAnswer:", " Paris"),
        ("Question: What is the capital of France?\nAnswer: ", "Lyon"),  # trailing space moves to the continuation
        ("Question: What is the capital of France?\nAnswer:", " Marseille is a port city in the south"),
        ("", "An empty context scores after the prefix token."),
        (long_context, " Sleep well."),  # longer than max_length: truncated from the left
        (long_context, " Exercise every day and sleep at least seven hours."),
        ("A", "B"),
    ]
    assert len(tokenizer(long_context).input_ids) > 48
    expected = hflm.loglikelihood(_instances("loglikelihood", pairs))
    got = engine.loglikelihood(_instances("loglikelihood", pairs))
    for (ll, greedy), (ll_ref, greedy_ref) in zip(got, expected, strict=True):
        assert within(ll, ll_ref) and greedy == greedy_ref
    texts = [(long_context,), ("Short text.",)]
    rolling_ref = hflm.loglikelihood_rolling(_instances("loglikelihood_rolling", texts))
    rolling = engine.loglikelihood_rolling(_instances("loglikelihood_rolling", texts))
    assert rolling == pytest.approx(rolling_ref, abs=1e-4) and rolling[0] < rolling[1] < 0


def test_the_plan_runs_a_shared_context_once_and_same_inputs_once():
    context = list(range(10, 40))
    choices = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    pairs = [(context, choice) for choice in choices]
    inputs, tails, owners, chunks = _plan(pairs, max_length=1024, token_budget=4096)
    (chunk,) = chunks
    (unit,) = chunk
    assert unit.prefix == tuple(context[:-1])  # the context but its last token, whose output predicts the choice
    assert [len(inputs[m]) - len(unit.prefix) for m in unit.members] == [3, 2, 1, 4]  # each choice runs only itself
    assert tails == [3, 2, 1, 4] and [o[1] for o in owners] == [3, 2, 1, 4]
    # One-token answers after the same context ("A".."D") are one model input scored at one position.
    inputs, tails, owners, chunks = _plan([(context, [t]) for t in (1, 2, 3, 4)], max_length=1024, token_budget=4096)
    assert len(inputs) == 1 and tails == [1] and [o[0] for o in owners] == [0, 0, 0, 0]
    # Truncation from the left at max_length + 1, as HFLM's input (context + continuation)[-(L + 1):][:-1].
    inputs, *_ = _plan([(context, [1, 2])], max_length=8, token_budget=4096)
    assert inputs == [tuple((context + [1, 2])[-9:][:-1])]


def test_scores_do_not_depend_on_chunking(tiny):
    """A budget that forces every unit into its own chunk (and splits the shared group) gives the same
    answers: each sequence attends only to itself and its own context."""
    model, tokenizer = tiny
    context = tokenizer("The quick brown fox jumps over the lazy dog because").input_ids
    pairs = [(context, tokenizer(text, add_special_tokens=False).input_ids) for text in (" it", " the dog", " foxes jump")]
    pairs += [(tokenizer("Another context").input_ids, tokenizer(" entirely", add_special_tokens=False).input_ids)]
    together = score_continuations(model, pairs, max_length=1024, token_budget=4096)
    apart = score_continuations(model, pairs, max_length=1024, token_budget=4)
    for (a, greedy_a), (b, greedy_b) in zip(together, apart, strict=True):
        assert a == pytest.approx(b, abs=1e-5) and greedy_a == greedy_b


def test_a_preamble_every_item_shares_runs_once_per_chunk(tiny):
    """A few-shot preamble (TruthfulQA's six QA pairs) is the same for every item: one forward pass per
    chunk runs it once, each item's question once and each choice's own tokens, and the answers are the
    ones each item gets scored on its own."""
    model, tokenizer = tiny
    preamble = tokenizer("Q: What is the capital of France?\nA: Paris.\n\nQ: How many legs does a spider have?\nA: Eight.").input_ids
    questions = [tokenizer(f"\n\nQ: {q}\nA:", add_special_tokens=False).input_ids for q in ("Why is the sky blue?", "Who wrote Hamlet?")]
    choices = [tokenizer(c, add_special_tokens=False).input_ids for c in (" Rayleigh scattering.", " Shakespeare.", " Nobody knows")]
    pairs = [(preamble + question, choice) for question in questions for choice in choices]
    seen: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, output: seen.append(args[0].shape[-1]))
    try:
        together = score_continuations(model, pairs, max_length=1024, token_budget=4096)
    finally:
        hook.remove()
    shared = len(os.path.commonprefix([preamble + question for question in questions]))  # the preamble and "\n\nQ:"
    assert shared > len(preamble)
    expected = shared + sum(len(preamble) + len(question) - shared - 1 + sum(len(choice) for choice in choices) for question in questions)
    assert seen == [expected]  # one pass; without the chunk's shared part it would run the preamble per item
    apart = score_continuations(model, pairs, max_length=1024, token_budget=8)  # every item in a chunk of its own
    for (a, greedy_a), (b, greedy_b) in zip(together, apart, strict=True):
        assert a == pytest.approx(b, abs=1e-5) and greedy_a == greedy_b


def test_bf16_is_a_copy_and_close_to_fp32(tiny):
    model, tokenizer = tiny
    copy16 = model_in_precision(model, "bf16")
    assert next(copy16.parameters()).dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    assert model_in_precision(model, "fp32") is model
    pairs = [(tokenizer("Name a primary colour:").input_ids, tokenizer(" red", add_special_tokens=False).input_ids)]
    (ll32, _), = score_continuations(model, pairs, max_length=1024)
    (ll16, _), = score_continuations(copy16, pairs, max_length=1024)
    assert ll16 != ll32 and ll16 == pytest.approx(ll32, abs=0.5)


def test_run_suite_records_model_class_and_precision_per_task(tiny, tmp_path: Path):
    model, tokenizer = tiny
    suite = Suite.model_validate({"name": "t", "description": "t", "tasks": [{"task": "local_arc_easy", "limit": 4}]})
    engine = run_suite(model, tokenizer, suite, output_dir=tmp_path / "engine")
    hflm = run_suite(model, tokenizer, suite, output_dir=tmp_path / "hflm", model_class="hflm")
    bf16 = run_suite(model, tokenizer, suite, output_dir=tmp_path / "bf16", precision="bf16")
    task = "local_arc_easy"
    assert (engine["tasks"][task]["model_class"], engine["tasks"][task]["precision"]) == ("engine", "fp32")
    assert (hflm["tasks"][task]["model_class"], hflm["tasks"][task]["precision"]) == ("hflm", "fp32")
    assert (bf16["tasks"][task]["model_class"], bf16["tasks"][task]["precision"]) == ("engine", "bf16")
    assert (engine["model_class"], engine["precision"], bf16["precision"]) == ("engine", "fp32", "bf16")
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched

    def lls(folder: str) -> list[float]:
        rows = (tmp_path / folder / f"samples_{task}.jsonl").read_text().splitlines()
        return [ll for row in rows for ll in json.loads(row)["loglikelihoods"]]

    assert lls("engine") == pytest.approx(lls("hflm"), abs=1e-4)
    assert engine["tasks"][task]["acc"] == hflm["tasks"][task]["acc"]
    assert lls("bf16") != lls("engine")


@pytest.mark.slow
def test_smollm2_engine_equals_hflm_on_every_loglikelihood_task():
    from harness.models import load_model_and_tokenizer, resolve_model
    from tests.conftest import require_smollm2

    model, tokenizer = load_model_and_tokenizer(resolve_model("smollm2-135m-instruct", str(require_smollm2())), dtype=torch.float32)
    hflm = evaluate(HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=8), limit=2)
    engine = evaluate(EngineLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=8), limit=2)
    largest, compared = compare(hflm, engine)
    assert compared >= 9 * 2 * 2


def test_the_leaderboard_never_pairs_runs_evaluated_in_different_precisions(tmp_path: Path):
    from harness.leaderboard import build_groups, load_runs

    def record(run_id: str, recipe: str, suite: dict, training_precision: str = "fp32") -> None:
        folder = tmp_path / run_id
        folder.mkdir()
        body = make_record(run_id=run_id, recipe={"name": recipe}, model={"name": "m"}, suite={"name": "small", **suite},
                           spec={"training": {"precision": training_precision}},
                           metrics={"local_arc_easy": {"n": 10, "acc": {"value": 0.5, "stderr": 0.1}}})
        (folder / "record.json").write_text(json.dumps(body))

    record("a", "one-off", {"precision": "fp32", "model_class": "engine"})
    record("b", "ifd", {"precision": "bf16", "model_class": "engine"})
    record("c", "ifd", {"precision": "fp32", "model_class": "hflm"})
    record("d", "phased", {}, training_precision="bf16")  # before precisions were recorded: HFLM on bf16 weights
    warnings: list[str] = []
    groups = build_groups(load_runs([tmp_path], warnings.append))
    assert warnings == []
    by_precision = {group.precision: sorted(run.run_id for run in group.runs) for group in groups}
    assert by_precision == {"fp32": ["a", "c"], "bf16": ["b", "d"]}
    assert {group.title for group in groups} == {"m · suite small · evaluated in fp32", "m · suite small · evaluated in bf16"}
    fp32 = next(group for group in groups if group.precision == "fp32")
    assert any("HFLM" in note for note in fp32.notes)  # engine and HFLM numbers side by side are flagged
    bf16 = next(group for group in groups if group.precision == "bf16")
    assert all(cell.delta is None for cell in bf16.cells.values())  # no one-off run evaluated in bf16: nothing paired
    (single,) = build_groups([run for run in load_runs([tmp_path], warnings.append) if run.run_id in ("a", "c")])
    assert single.precision is None and single.title == "m · suite small"  # one precision: titles as before


def test_a_gpu_pass_takes_a_larger_token_budget():
    from harness.lm_engine import CPU_TOKEN_BUDGET, GPU_TOKEN_BUDGET, token_budget_for

    assert token_budget_for(torch.device("cpu")) == CPU_TOKEN_BUDGET < GPU_TOKEN_BUDGET == token_budget_for(torch.device("cuda", 1))
