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


def _ifd(values: list[float]):
    from harness.scoring import IFDScores

    direct = np.ones(len(values))
    return IFDScores(np.array(values, dtype=np.float64), direct, [i for i, v in enumerate(values) if np.isnan(v)])


def test_the_ifd_proxy_cuts_stages_at_the_configured_proportions():
    from harness.difficulty import PAPER_STAGE_PROPORTIONS, scores_from_ifd

    values = list(np.random.default_rng(0).uniform(0.2, 0.99, 1000))
    stages = assign_stages(scores_from_ifd(_ifd(values)).scores, (1.5, 3.5))
    assert PAPER_STAGE_PROPORTIONS == (0.585, 0.284, 0.131)  # 30.3k / 14.7k / 6.8k of Alpaca-52k
    assert [len(stages[k]) for k in (1, 2, 3)] == [585, 284, 131]
    # Harder = higher IFD: every stage-3 record has a higher IFD than every stage-1 record.
    assert min(values[i] for i in stages[3]) > max(values[i] for i in stages[2]) > max(values[i] for i in stages[1])
    custom = assign_stages(scores_from_ifd(_ifd(values), (0.2, 0.3, 0.5)).scores, (1.5, 3.5))
    assert [len(custom[k]) for k in (1, 2, 3)] == [200, 300, 500]
    uniform = assign_stages(scores_from_ifd(_ifd(values), None).scores, (1.5, 3.5))
    assert [len(uniform[k]) for k in (1, 2, 3)] == [125, 500, 375]


def test_ifd_above_one_ranks_easiest_not_hardest():
    from harness.difficulty import scores_from_ifd

    values = [0.5, 0.6, 0.7, 0.8, 0.9, 1.5, 2.0, 0.95, 0.55, 0.65]
    easiest = scores_from_ifd(_ifd(values), (0.3, 0.4, 0.3))
    assert sorted(assign_stages(easiest.scores, (1.5, 3.5))[1]) == [0, 5, 6]  # the two IFD > 1 and the lowest
    assert easiest.details["ifd_above_one"] == 2 and easiest.details["ifd_above_one_rule"] == "easiest"
    by_rank = scores_from_ifd(_ifd(values), (0.3, 0.4, 0.3), above_one="by-rank")
    assert sorted(assign_stages(by_rank.scores, (1.5, 3.5))[3]) == [5, 6, 7]


def test_unscored_records_are_trained_in_the_stated_stage_and_counted(tmp_path, sample_records, monkeypatch):
    records = sample_records[:60]
    scores = [SCORES[i % len(SCORES)] for i in range(len(records))]
    # The scores file covers the first 50 records only: 10 are unscored.
    scored = write_phased_file(tmp_path / "scored.jsonl", records[:50], scores[:50])
    data = write_phased_file(tmp_path / "data.jsonl", records, scores)
    calls = TrainCalls(monkeypatch)
    record = run_recipe("phased", tmp_path / "runs", [f"params.scores_file={scored}", "params.scorer=file",
                                                      "params.unscored_stage=3", "training.max_steps=1"], data=str(data))
    details = record["recipe"]
    assert details["unscored"] == 10 and details["unscored_reasons"] == {"not in the scores file": 10}
    sizes = {int(stage[-1]): len(members) for stage, members in calls.calls}
    expected = {k: sum(1 for s in scores[:50] if (s < 1.5, 1.5 <= s < 3.5, s >= 3.5)[k - 1]) for k in (1, 2, 3)}
    assert sizes == {1: expected[1], 2: expected[2], 3: expected[3] + 10}
    trained = [r.id for _, members in calls.calls for r in members]
    assert len(trained) == len(set(trained)) == record["data"]["records"] == 60  # count in == count trained
    assert details["stages"][2] == details["stages"][2] | {"stage": 3, "unscored": 10}
    assert details["variant"] == "phased[scorer=file, stage_order=1-2-3]"


def test_shipped_data_stages_follow_the_paper_proportions_and_no_record_is_dropped(tmp_path, monkeypatch):
    from harness.difficulty import stage_bounds

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    calls = TrainCalls(monkeypatch)
    # the shipped alpaca-sample at the committed runs' 400 records
    record = run_recipe("phased", tmp_path / "runs", ["data.limit=400", "training.max_steps=1", "training.max_length=256"])
    details = record["recipe"]
    total = record["data"]["records"]
    assert details["variant"] == "phased[scorer=ifd-proxy, stage_order=1-2-3]"
    assert details["scorer_details"]["scoring_max_length"] == 256  # follows training.max_length
    unscored = details["unscored"]
    first, second = stage_bounds(total - unscored, (0.585, 0.284, 0.131))
    sizes = [len(members) for _, members in calls.calls]
    assert sizes == [first, second - first + unscored, total - unscored - second]  # unscored: stage 2
    assert sum(sizes) == total == 400 == len({r.id for _, members in calls.calls for r in members})
    assert abs(sizes[0] / total - 0.585) < 0.01 + unscored / total
