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


def test_a_finished_reference_stage_is_not_retrained_on_rerun(tmp_path, monkeypatch):
    """Killed after the reference model finished (its dynamics not yet in the artifact cache, the target
    not yet trained): the rerun loads the reference stage's final model and its saved perplexities."""
    import shutil

    from harness.models import build_tiny_model

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(build_tiny_model().parent, target_is_directory=True)
    monkeypatch.setenv("HARNESS_CACHE", str(cache))
    overrides = ["data.limit=40", "training.batch_size=4", "params.checkpoints_per_epoch=2"]
    first = run_recipe("sftmix", tmp_path / "runs", overrides)
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = json.loads((run_dir / "checkpoints" / "reference_perplexities.json").read_text())
    assert sorted(int(step) for step in saved["perplexities"]) == first["recipe"]["dynamics"]["checkpoint_steps"]
    shutil.rmtree(cache / "artifacts" / "sftmix")
    shutil.rmtree(run_dir / "checkpoints" / "sft")
    (run_dir / "record.json").unlink()
    second = run_recipe("sftmix", tmp_path / "runs", overrides)
    assert second["resume"]["attempts"] == 2
    assert second["resume"]["training"]["reference"] == {"reused": True, "steps_run": 0,
                                                        "resumed_from_step": first["training"]["reference"]["steps"]}
    assert second["resume"]["training"]["sft"]["steps_run"] == first["training"]["sft"]["steps"]
    assert second["recipe"]["median_confidence"] == first["recipe"]["median_confidence"]
    assert second["training"]["sft"]["loss_curve"] == first["training"]["sft"]["loss_curve"]
    assert second["cost"]["overhead_train_tokens"] == first["cost"]["overhead_train_tokens"]
