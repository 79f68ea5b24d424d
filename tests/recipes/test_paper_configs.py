"""The shipped paper configurations (recipes/configs/*.yaml): each validates offline, a dry run resolves it
to the values its `source:` block documents (each with the file it was read from), `harness recipes
--configs` lists them with their sources, and Phased IFT's User/Assistant template renders and tokenizes
as PhasedSFT's code builds its training examples."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from harness.data import InstructionRecord
from harness.errors import HarnessError
from harness.runner import resolve_spec
from harness.spec import build_spec, config_source, paper_configs
from harness.templates import render_prompt, tokenize_for_training
from tests.cli_helpers import run_cli

CONFIGS = paper_configs()
EXPECTED = {"phased-ift-llama-2-7b", "phased-ift-mistral-7b", "cherry-ifd-llama-2-7b", "neftune-alpaca-llama-2-7b"}


def _lookup(spec: dict, dotted: str):
    """A value of the printed spec by key path; `global_batch` is examples per optimizer step (one process)."""
    training = spec["training"]
    if dotted == "global_batch":
        assert training["packing"] is False, "a packed row holds several examples: the batch would not be 128 examples"
        return training["batch_size"] * training["gradient_accumulation_steps"]
    value = spec
    for part in dotted.split("."):
        value = value[part]
    return value


def _same(printed, stated) -> bool:
    if isinstance(stated, float) or isinstance(printed, float):
        return math.isclose(float(printed), float(stated), rel_tol=1e-12)
    if isinstance(stated, list):
        return list(printed) == stated
    return printed == stated


def test_the_paper_configs_ship():
    assert set(CONFIGS) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_validates_offline_and_names_its_sources(name):
    spec = build_spec(config_file=CONFIGS[name], overrides=[], flags={})
    resolved, recipe, _, model_info = resolve_spec(spec)  # recipe params and model set: no weights, no data
    assert recipe.NAME == resolved.recipe and model_info.entry.name == resolved.model
    source = config_source(CONFIGS[name])
    assert "arXiv" in source["paper"] and source["code"] and all("github.com/" in line for line in source["code"])
    assert source["values"] and all(set(entry) == {"value", "from"} and entry["from"] for entry in source["values"].values())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dry_run_resolves_to_the_documented_values(name, tmp_path, capsys):
    """The printed spec holds every value the source block states (e.g. Phased IFT: lr 5e-6, weight decay
    0.1, beta2 0.95, 128 examples per step, length 2048, its template). Nothing is loaded: the data is a
    hub id and the models are 7B, neither reachable here."""
    code, out, err = run_cli(["run", "--config", str(CONFIGS[name]), "--dry-run", "--output", str(tmp_path / "runs")], capsys)
    assert code == 0, err
    (printed,) = list(yaml.safe_load_all(out))
    values = config_source(CONFIGS[name])["values"]
    wrong = {
        key: (_lookup(printed, key), entry["value"]) for key, entry in values.items() if not _same(_lookup(printed, key), entry["value"])
    }
    assert not wrong, wrong
    assert "dry run" in err and not (tmp_path / "runs").exists()


def test_phased_configs_state_the_issue_values():
    """The values issue 18 names for Phased IFT, checked against what the two files document."""
    for name in ("phased-ift-llama-2-7b", "phased-ift-mistral-7b"):
        values = {key: entry["value"] for key, entry in config_source(CONFIGS[name])["values"].items()}
        assert values["training.learning_rate"] == 5e-6 and values["training.weight_decay"] == 0.1
        assert values["training.adam_beta2"] == 0.95 and values["global_batch"] == 128
        assert values["training.max_length"] == 2048 and values["training.template"] == "user-assistant"


def test_shipped_config_by_name_and_listing(capsys, tmp_path):
    code, out, _ = run_cli(["run", "--config", "neftune-alpaca-llama-2-7b", "--dry-run"], capsys)
    assert code == 0 and yaml.safe_load(out)["training"]["neftune_alpha"] == 5.0
    code, _, err = run_cli(["run", "--config", "neftune-alpaca", "--dry-run"], capsys)
    assert code == 2 and "did you mean the shipped config 'neftune-alpaca-llama-2-7b'" in err
    code, out, _ = run_cli(["recipes", "--configs"], capsys)
    assert code == 0
    for name in EXPECTED:
        assert name in out
    assert "2406.04371" in out and "2308.12032" in out and "2310.05914" in out and "xubuvd/PhasedSFT" in out


def test_source_block_is_not_part_of_the_spec(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(Path(CONFIGS["cherry-ifd-llama-2-7b"]).read_text())
    stripped = tmp_path / "stripped.yaml"
    raw = yaml.safe_load(config.read_text())
    raw.pop("source")
    stripped.write_text(yaml.safe_dump(raw))
    with_source = build_spec(config_file=config, overrides=[], flags={})
    assert with_source == build_spec(config_file=stripped, overrides=[], flags={})
    assert with_source.content_hash() == build_spec(config_file=stripped, overrides=[], flags={}).content_hash()
    with pytest.raises(HarnessError, match="unknown config key 'sources'"):
        config.write_text("sources: {}\n")
        build_spec(config_file=config, overrides=[], flags={})


# ----------------------------------------------------------------------------- the User/Assistant template


def test_user_assistant_template_renders_phasedsfts_text(tiny):
    _, tokenizer = tiny
    eos = tokenizer.eos_token
    record = InstructionRecord(instruction="Name a colour.", output="Blue.")
    assert render_prompt(record, "user-assistant", tokenizer) == f"User: Name a colour.{eos}\nAssistant: "
    with_input = InstructionRecord(instruction="Add them.", input="2 and 3", output="5")
    assert render_prompt(with_input, "user-assistant", tokenizer) == f"User: Add them.\n2 and 3{eos}\nAssistant: "
    talk = InstructionRecord(instruction="And 4?", output="9", history=(("Add 2 and 3.", "5"),))
    assert render_prompt(talk, "user-assistant", tokenizer) == (
        f"User: Add 2 and 3.{eos}\nAssistant: 5{eos}\nUser: And 4?{eos}\nAssistant: "
    )


def test_user_assistant_tokens_match_phasedsfts_tokenize_example(tiny):
    """xubuvd/PhasedSFT xllm/xllm_dataset.py tokenize_example, reimplemented from its code: the user turn
    bos + 'User: ' + c + eos (no loss), '\\nAssistant: ' (no loss), then c + eos (loss). The harness's
    training example must have the same ids and the same loss positions (BOS: the tokenizer's own)."""
    _, tokenizer = tiny
    record = InstructionRecord(instruction="Give three tips for staying healthy.", output="Eat well, sleep, move.")
    (example,), _ = tokenize_for_training([record], tokenizer, "user-assistant", max_length=512)
    bos = tokenizer(" ", add_special_tokens=True).input_ids[: -len(tokenizer(" ", add_special_tokens=False).input_ids)]
    user = tokenizer("User: " + record.instruction + tokenizer.eos_token, add_special_tokens=False).input_ids
    tag = tokenizer("\nAssistant: ", add_special_tokens=False).input_ids
    answer = tokenizer(record.output + tokenizer.eos_token, add_special_tokens=False).input_ids
    assert example.input_ids == bos + user + tag + answer
    assert example.labels == [-100] * (len(bos) + len(user) + len(tag)) + answer
    assert answer[-1] == tokenizer.eos_token_id
