"""Training seeds and the untrained reference: `--seeds` trains a recipe once per seed, every seed is
scored on the same items with the same few-shot prompts (the evaluation's seed is eval.seed or the
suite's, never the training seed), and `--recipe base` evaluates the model as it is."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from harness.evaluation import Suite, SuiteTask, load_suite, run_lm_eval
from harness.runner import eval_seed
from harness.spec import build_spec, parse_seeds
from tests.cli_helpers import run_cli

FAST = ["--set", "data.limit=48", "--set", "training.logging_steps=1", "--limit", "20"]


def prompts(output_dir: Path, task: str) -> list[tuple[int, str]]:
    rows = [json.loads(line) for line in (output_dir / f"samples_{task}.jsonl").read_text().splitlines()]
    return [(row["doc_id"], row["prompt_hash"]) for row in rows]


def test_every_training_seed_is_scored_on_the_same_items_and_few_shot_prompts(tiny, tmp_path: Path):
    """Two 'checkpoints' (the tiny model and a perturbed copy, as two training seeds give) on a 3-shot
    task with a random subset: identical doc ids and prompt hashes. The control shows the test can
    fail: another evaluation seed draws other few-shot examples."""
    model, tokenizer = tiny
    other = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    suite = Suite(name="fewshot", description="3-shot ARC-Easy sample", sample_seed=1234,
                  tasks=[SuiteTask(task="local_arc_easy", num_fewshot=3, sample=12, metrics=["acc"])])
    seeds = [eval_seed(build_spec(config_file=None, overrides=[], flags={"seed": s}), suite) for s in (0, 1)]
    assert seeds == [1234, 1234]
    run_lm_eval(model, tokenizer, suite, output_dir=tmp_path / "seed0", seed=seeds[0])
    run_lm_eval(other, tokenizer, suite, output_dir=tmp_path / "seed1", seed=seeds[1])
    first, second = prompts(tmp_path / "seed0", "local_arc_easy"), prompts(tmp_path / "seed1", "local_arc_easy")
    assert len(first) == 12 and first == second
    run_lm_eval(model, tokenizer, suite, output_dir=tmp_path / "control", seed=7)
    control = prompts(tmp_path / "control", "local_arc_easy")
    assert [doc for doc, _ in control] == [doc for doc, _ in first]  # the item sample has its own seed
    assert [h for _, h in control] != [h for _, h in first]  # the few-shot draw follows the evaluation seed
    explicit = build_spec(config_file=None, overrides=["eval.seed=7"], flags={})
    assert eval_seed(explicit, suite) == 7


@pytest.mark.e2e
def test_seeds_flag_trains_once_per_seed_on_a_fixed_evaluation(tmp_path: Path, capsys):
    code, out, err = run_cli(["run", "--recipe", "one-off", "--seeds", "2", "--output", str(tmp_path), *FAST], capsys)
    assert code == 0, err
    records = sorted((json.loads(path.read_text()) for path in tmp_path.glob("*/record.json")), key=lambda r: r["seed"])
    assert [record["seed"] for record in records] == [0, 1]
    assert records[0]["run_id"] != records[1]["run_id"]
    assert records[0]["suite"]["eval_seed"] == records[1]["suite"]["eval_seed"] == load_suite("smoke").sample_seed
    runs = [tmp_path / record["run_id"] / "eval" for record in records]
    assert prompts(runs[0], "local_arc_easy") == prompts(runs[1], "local_arc_easy")
    assert records[0]["training"]["sft"]["final_loss"] != records[1]["training"]["sft"]["final_loss"]
    assert "(seed 0)" in out and "(seed 1)" in out  # the comparison table names each seed
    cost = records[0]["cost"]  # compute: 6N per trained token, 2N per scored token; phases add up to the stages
    assert cost["parameters"] > 0 and cost["flops"] == 6 * cost["parameters"] * (
        cost["train_tokens"] + cost["overhead_train_tokens"]) + 2 * cost["parameters"] * cost["scoring_tokens"]
    assert sum(cost["phase_seconds"].values()) == pytest.approx(sum(records[0]["timings"].values()), abs=0.01)
    assert cost["phase_seconds"]["training"] > 0 and cost["phase_seconds"]["evaluation"] > 0
    assert 0 < cost["training_device_hours"] < cost["device_hours"]
    assert cost["cached"] == {"scoring": False, "training": False}


def test_base_recipe_evaluates_the_untrained_model(tmp_path: Path, capsys):
    code, _, err = run_cli(["run", "--recipe", "base", "--output", str(tmp_path), *FAST], capsys)
    assert code == 0, err
    (path,) = tmp_path.glob("*/record.json")
    record = json.loads(path.read_text())
    assert record["recipe"]["name"] == "base" and record["training"] == {} and record["cost"]["train_tokens"] == 0
    assert record["cost"]["flops"] == 0 and record["cost"]["phase_seconds"]["training"] == 0
    assert 0.0 <= record["metrics"]["local_arc_easy"]["acc"]["value"] <= 1.0


def test_parse_seeds():
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("5,") == [5]
    assert parse_seeds("7, 9") == [7, 9]
    for bad in ("x", "1,1", "", "-1,2"):
        with pytest.raises(ValueError):
            parse_seeds(bad)


@pytest.mark.parametrize("args, message", [
    (["--seeds", "3", "--seed", "1"], "not both"),
    (["--seeds", "two"], "--seeds"),
    (["--seeds", "2", "--nproc", "2"], "one --seed per command"),
])
def test_bad_seed_flags_are_one_line(tmp_path: Path, capsys, args, message):
    code, _, err = run_cli(["run", *args, "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
