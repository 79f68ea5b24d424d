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


def test_random_control_trains_as_many_records_drawn_at_random(tmp_path, sample_records, monkeypatch):
    from harness.controls import same_size_random_subset

    calls = TrainCalls(monkeypatch)
    common = ["data.limit=200", "params.rate=0.1", "training.max_steps=1", "params.topics=3", "params.leaves_per_topic=2"]
    selected = run_recipe("unifit", tmp_path / "runs", common)
    control = run_recipe("unifit", tmp_path / "runs", [*common, "params.control=random"])
    (_, chosen), (_, drawn) = calls.calls
    assert len(drawn) == len(chosen) == control["recipe"]["selected"] == selected["recipe"]["selected"] > 0
    expected = same_size_random_subset(200, len(chosen), seed=0)
    assert [r.id for r in drawn] == [sample_records[:200][i].id for i in expected]
    assert control["recipe"]["variant"].endswith("control=random]") and "control" not in selected["recipe"]["variant"]
