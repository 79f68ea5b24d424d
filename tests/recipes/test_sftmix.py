import json

import numpy as np

from tests.recipes.helpers import TrainCalls, run_recipe


def test_sftmix_trains_a_reference_then_pairs_across_the_median(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    calls = TrainCalls(monkeypatch)
    record = run_recipe("sftmix", tmp_path / "runs", ["data.limit=40", "training.batch_size=4",
                                                      "params.checkpoints_per_epoch=2"])
    assert [stage for stage, _ in calls.calls] == ["reference", "sft"]
    details = record["recipe"]
    assert details["checkpoints"] == 2 and details["pairs"] == 20
    (run_dir,) = (tmp_path / "runs").iterdir()
    table = json.loads((run_dir / "artifacts" / "sftmix_confidence.json").read_text())
    confidences = np.array([row["confidence"] for row in table])
    median = np.median(confidences)
    confident = [row["confidence"] for row in table if row["half"] == "confident"]
    unconfident = [row["confidence"] for row in table if row["half"] == "unconfident"]
    assert len(confident) == len(unconfident) == 20
    assert min(confident) >= median >= max(unconfident)
    # The target trains on pairs: every row is (confident, unconfident).
    halves = {row["id"]: row["half"] for row in table}
    trained = calls.calls[1][1]
    assert [halves[r.id] for r in trained[:4]] == ["confident", "unconfident", "confident", "unconfident"]
    # Costs: the reference training is overhead, not target training tokens.
    assert record["cost"]["overhead_train_tokens"] == record["training"]["reference"]["real_tokens"] > 0
    assert record["cost"]["train_tokens"] == record["training"]["sft"]["real_tokens"]
    assert record["cost"]["scoring_tokens"] > 0
