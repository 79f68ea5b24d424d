import numpy as np
import pytest

from harness.errors import HarnessError
from harness.spec import validate_params
from harness.training import ResponseOnlyTrainer
from recipes.phased import Params, assign_stages, random_stages
from tests.recipes.helpers import TrainCalls, run_recipe, write_phased_file

SCORES = [1.0, 1.25, 2.0, 3.0, 3.75, 4.5]


@pytest.fixture()
def scored_data(tmp_path, sample_records):
    records = sample_records[:60]
    scores = [SCORES[i % len(SCORES)] for i in range(len(records))]
    return write_phased_file(tmp_path / "scored.jsonl", records, scores)


def test_stage_membership_follows_the_thresholds():
    scores = np.array([1.0, 1.49, 1.5, 3.49, 3.5, 5.0, np.nan])
    assert assign_stages(scores, (1.5, 3.5)) == {1: [0, 1], 2: [2, 3], 3: [4, 5]}
    stages = assign_stages(scores, (1.5, 3.5))
    shuffled = random_stages(stages, seed=0)
    assert [len(shuffled[k]) for k in (1, 2, 3)] == [2, 2, 2]
    assert sorted(sum(shuffled.values(), [])) == [0, 1, 2, 3, 4, 5]


def test_params_are_validated():
    with pytest.raises(HarnessError, match="stage_order"):
        validate_params(Params, {"stage_order": [1, 1]}, "recipe params")
    with pytest.raises(HarnessError, match="thresholds"):
        validate_params(Params, {"thresholds": [3.5, 1.5]}, "recipe params")
    with pytest.raises(HarnessError, match="did you mean 'params.stage_order'"):
        validate_params(Params, {"stage_ordr": [1]}, "recipe params")


def test_stages_run_in_the_configured_order_with_a_fresh_optimizer_each(tmp_path, scored_data, monkeypatch):
    calls = TrainCalls(monkeypatch)
    optimizers = []
    original = ResponseOnlyTrainer.create_optimizer

    def recording(self, *args, **kwargs):
        optimizer = original(self, *args, **kwargs)
        optimizers.append((optimizer, len(optimizer.state)))  # holding it keeps ids distinct
        return optimizer

    monkeypatch.setattr(ResponseOnlyTrainer, "create_optimizer", recording)
    record = run_recipe("phased", tmp_path / "runs", ["params.stage_order=[3, 1, 2]", "training.batch_size=4"],
                        data=str(scored_data))
    assert [stage for stage, _ in calls.calls] == ["stage3", "stage1", "stage2"]
    bounds = {"stage1": (1.0, 1.5), "stage2": (1.5, 3.5), "stage3": (3.5, 5.01)}
    for stage, records in calls.calls:
        low, high = bounds[stage]
        assert records and all(low <= r.metadata["difficulty"] < high for r in records)
    assert [len(records) for _, records in calls.calls] == [20, 20, 20]
    # One optimizer per stage, each created with empty state: the optimizer restarts every stage.
    assert len(optimizers) == 3 and len({id(optimizer) for optimizer, _ in optimizers}) == 3
    assert all(state_size == 0 for _, state_size in optimizers)
    details = record["recipe"]
    assert details["scorer"] == "file"
    assert [s["stage"] for s in details["stages"]] == [3, 1, 2]
    assert details["stages"][0]["mean_difficulty"] == pytest.approx(np.mean([3.75, 4.5]))
    assert set(record["training"]) == {"stage1", "stage2", "stage3"}


def test_random_order_control_keeps_stage_sizes(tmp_path, scored_data, monkeypatch):
    calls = TrainCalls(monkeypatch)
    run_recipe("phased", tmp_path / "runs", ["params.stage_order=random", "training.max_steps=1"], data=str(scored_data))
    assert [len(records) for _, records in calls.calls] == [20, 20, 20]
    difficulties = [sorted(r.metadata["difficulty"] for r in records) for _, records in calls.calls]
    assert difficulties[0] != [1.0] * 10 + [1.25] * 10  # mixed, not the easy stage
