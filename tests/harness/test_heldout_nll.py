"""The held-out NLL section: per-item mean NLL of the reference answers equals a plain forward pass,
every run is scored on the same items, and bad config is one line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from harness.errors import HarnessError
from harness.evaluation import SectionContext, Suite, check_sections, run_extra_sections
from harness.heldout_nll import HeldoutNLLSettings, tokenized_items

SUITE = Suite(name="nll", description="held-out NLL only", heldout_nll={"limit": 6, "max_length": 256})


def plain_nll(model, example) -> float:
    """Mean cross-entropy over the labelled tokens, from one unpadded forward pass."""
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    labels = torch.tensor(example.labels[1:])
    mask = labels != -100
    return float(torch.nn.functional.cross_entropy(logits[mask], labels[mask]))


def test_per_item_nll_equals_a_plain_forward_pass_and_items_are_shared(tiny, tmp_path: Path):
    model, tokenizer = tiny
    context = SectionContext(template="alpaca")
    metrics, skipped = run_extra_sections(model, tokenizer, SUITE, output_dir=tmp_path / "a", context=context)
    assert skipped == {}
    rows = [json.loads(line) for line in (tmp_path / "a" / "samples_heldout_nll.jsonl").read_text().splitlines()]
    positions, examples = tokenized_items(tokenizer, "alpaca", HeldoutNLLSettings(limit=6, max_length=256))
    assert [row["doc_id"] for row in rows] == positions and len(rows) == metrics["heldout_nll"]["n"] > 0
    for row, example in zip(rows, examples, strict=True):
        assert row["nll"] == pytest.approx(plain_nll(model, example), abs=1e-4)
    cell = metrics["heldout_nll"]["nll"]
    assert cell["value"] == pytest.approx(sum(row["nll"] for row in rows) / len(rows))
    assert cell["stderr"] > 0 and cell["ci_low"] < cell["value"] < cell["ci_high"]
    # another model (another run): the same items, other values
    other = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    run_extra_sections(other, tokenizer, SUITE, output_dir=tmp_path / "b", context=context, judge="openai:gpt-4o")
    again = [json.loads(line) for line in (tmp_path / "b" / "samples_heldout_nll.jsonl").read_text().splitlines()]
    assert [row["doc_hash"] for row in again] == [row["doc_hash"] for row in rows]
    assert [row["nll"] for row in again] != [row["nll"] for row in rows]


def test_bad_section_key_is_one_line():
    suite = Suite(name="nll", description="bad", heldout_nll={"limt": 6})
    with pytest.raises(HarnessError, match="unknown key 'limt'; did you mean 'limit'"):
        check_sections(suite)
