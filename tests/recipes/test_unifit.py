from tests.recipes.helpers import TrainCalls, run_recipe


def test_unifit_selects_six_percent_covering_every_leaf_with_ifd_at_most_one(tmp_path, monkeypatch):
    calls = TrainCalls(monkeypatch)
    record = run_recipe("unifit", tmp_path / "runs", ["data.limit=500", "params.topics=4", "params.leaves_per_topic=3",
                                                      "params.min_leaf_size=10", "training.max_steps=2"])
    details = record["recipe"]
    assert details["selected"] == 30  # 6% of 500
    assert details["leaves_required"] > 0 and details["leaves_covered"] == details["leaves_required"]
    assert details["under_covered_leaves"] == []
    assert details["selected_ifd_range"][1] <= 1.0
    ((stage, trained_on),) = calls.calls
    assert stage == "sft" and len(trained_on) == 30
    assert record["spec"]["recipe"] == "unifit" and details["neftune_alpha"] == 5.0
