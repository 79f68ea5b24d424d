import json

import numpy as np
import pytest

from harness.mixup import epoch_pairs, matched_layouts, pack_pairs
from harness.runner import RunContext
from harness.training import EpochRowDataset, SetDatasetEpoch
from tests.recipes.helpers import TrainCalls, run_recipe

LAYOUTS: dict[str, list] = {}


@pytest.fixture(autouse=True)
def _record_layouts(monkeypatch):
    """Keeps the per-epoch row layouts the recipe hands to the training core (keyed by run id)."""
    original = RunContext.train

    def recording(ctx, model, tokenizer, records, *, stage, **kwargs):
        if kwargs.get("epoch_rows") is not None:
            LAYOUTS[ctx.run_dir.name] = kwargs["epoch_rows"]
        return original(ctx, model, tokenizer, records, stage=stage, **kwargs)

    monkeypatch.setattr(RunContext, "train", recording)


def _layouts(record):
    return LAYOUTS[record["run_id"]]


def test_sftmix_trains_a_reference_then_pairs_across_the_median(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    calls = TrainCalls(monkeypatch)
    record = run_recipe("sftmix", tmp_path / "runs", ["data.limit=40", "training.batch_size=4",
                                                      "params.checkpoints_per_epoch=2"])
    assert [stage for stage, _ in calls.calls] == ["reference", "sft"]
    details = record["recipe"]
    assert details["checkpoints"] == 2 and details["pairs"] == 20
    assert details["variant"] == "sftmix[batching=one-off]"
    (run_dir,) = (tmp_path / "runs").iterdir()
    table = json.loads((run_dir / "artifacts" / "sftmix_confidence.json").read_text())
    confidences = np.array([row["confidence"] for row in table])
    median = np.median(confidences)
    confident = [row["confidence"] for row in table if row["half"] == "confident"]
    unconfident = [row["confidence"] for row in table if row["half"] == "unconfident"]
    assert len(confident) == len(unconfident) == 20
    assert min(confident) >= median >= max(unconfident)
    # The target trains on pairs: every row holds whole (confident, unconfident) pairs, in that order.
    halves = [row["half"] for row in table]
    for row in _layouts(record)[0]:
        assert [halves[i] for i in row] == ["confident", "unconfident"] * (len(row) // 2)
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


@pytest.mark.e2e
def test_sftmix_takes_one_off_steps_and_examples_per_step_with_three_dynamics_checkpoints(tmp_path, monkeypatch):
    """On the shipped data (the committed runs' 400 records, one epoch, the default spec): the same optimizer
    steps and examples per step as one-off's run, and dynamics at three fractions of the reference run."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    sftmix = run_recipe("sftmix", tmp_path / "runs", ["data.limit=400"])
    one_off = run_recipe("one-off", tmp_path / "runs", ["data.limit=400"])
    mine, theirs = sftmix["training"]["sft"], one_off["training"]["sft"]
    assert mine["steps"] == theirs["steps"] == sftmix["recipe"]["batching"]["one_off_steps_per_epoch"]
    trained = sum(len(row) for row in _layouts(sftmix)[0])
    assert trained == theirs["examples"] == 400  # 200 pairs: every example once, as in one-off
    assert trained / mine["steps"] == theirs["examples"] / theirs["steps"]
    assert mine["rows"] >= theirs["rows"]  # same steps: up to a step's worth more (smaller) rows
    dynamics = sftmix["recipe"]["dynamics"]
    assert sftmix["recipe"]["checkpoints"] == 3 and len(dynamics["checkpoint_steps"]) == 3
    total = sftmix["training"]["reference"]["steps"]
    assert dynamics["checkpoint_steps"] == [round(total / 3), round(2 * total / 3), total]


def test_pairs_are_redrawn_every_epoch_deterministically():
    confident, unconfident = list(range(0, 20)), list(range(20, 41))
    draws = epoch_pairs(confident, unconfident, seed=3, epochs=3)
    assert draws == epoch_pairs(confident, unconfident, seed=3, epochs=3)
    assert draws[0] != draws[1] != draws[2]
    for draw in draws:  # every example in every epoch, each pair across the halves
        assert sorted({i for pair in draw for i in pair}) == list(range(41))
        assert all(c < 20 <= u for c, u in draw)
    lengths = [10 + (7 * i) % 50 for i in range(41)]
    packed = [len(pack_pairs(draw, lengths, capacity=300, seed=0)) for draw in draws]
    assert max(packed) < 12
    layouts = matched_layouts(draws, lengths, target_rows=12, capacity=300, seed=0)
    assert [len(layout) for layout in layouts] == [12, 12, 12]  # split up to the target, never merged
    for layout, draw in zip(layouts, draws, strict=True):
        assert sorted(tuple(row[k : k + 2]) for row in layout for k in range(0, len(row), 2)) == sorted(draw)
        assert all(sum(lengths[i] for i in row) <= 300 for row in layout)
    # Fewer rows than the pairs need: as many as the packing needs, the same for every epoch.
    assert [len(layout) for layout in matched_layouts(draws, lengths, 2, 300, 0)] == [max(packed)] * 3
    assert pack_pairs([(0, 1), (2, 3)], [200, 150, 10, 20], capacity=300, seed=0) == [[1], [0]]


def test_the_training_dataset_switches_layout_at_each_epoch():
    from harness.templates import TokenizedExample

    examples = [TokenizedExample([1, 2, 3], [-100, 2, 3]) for _ in range(4)]
    dataset = EpochRowDataset(examples, [[[0, 1], [2, 3]], [[0, 3], [2, 1]]])
    setter = SetDatasetEpoch(dataset)

    class State:
        epoch = 1.0

    setter.on_epoch_begin(None, State(), None)
    assert dataset.rows == [[0, 3], [2, 1]]
    State.epoch = 2.5  # resumed in the middle of the third epoch: the first layout again
    setter.on_epoch_begin(None, State(), None)
    assert dataset.rows == [[0, 1], [2, 3]]


def test_a_two_epoch_run_trains_a_new_draw_in_its_second_epoch(tmp_path, monkeypatch):
    from harness.training import ResponseOnlyTrainer

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    used: list[int] = []  # per target-training step: which epoch's layout the batch came from
    original = ResponseOnlyTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        dataset = self.train_dataset
        if isinstance(dataset, EpochRowDataset):
            used.append(next(k for k, layout in enumerate(dataset.layouts) if dataset.rows is layout))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(ResponseOnlyTrainer, "compute_loss", recording)
    record = run_recipe("sftmix", tmp_path / "runs", ["data.limit=40", "training.batch_size=4", "training.epochs=2"])
    layouts = _layouts(record)
    assert len(layouts) == 2 and layouts[0] != layouts[1]
    steps = record["training"]["sft"]["steps"]
    assert used == [0] * (steps // 2) + [1] * (steps // 2)
