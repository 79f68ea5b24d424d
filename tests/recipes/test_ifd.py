import numpy as np

from harness.models import load_model_and_tokenizer, resolve_model
from harness.scoring import compute_ifd
from recipes.ifd import Params, experience_samples, middle_confidence_samples, select_top_ifd
from tests.recipes.helpers import TrainCalls, run_recipe


def test_select_top_ifd_drops_above_one_and_keeps_the_top_rate():
    ifd = np.array([0.9, 1.2, 0.5, np.nan, 0.99, 0.7, 1.0, 0.2, 0.95, 0.3, 0.6])
    # 9 scored with IFD <= 1 -> int(9 * 0.34) = 3 kept: 1.0, 0.99, 0.95
    assert select_top_ifd(ifd, 0.34) == [4, 6, 8]
    assert select_top_ifd(ifd, 0.34, drop_above_one=False) == [1, 4, 6]


def test_ifd_recipe_trains_on_exactly_the_top_rate_subset(tmp_path, sample_records, monkeypatch):
    calls = TrainCalls(monkeypatch)
    record = run_recipe("ifd", tmp_path / "runs", ["data.limit=200", "params.rate=0.2", "training.max_steps=2"])
    ((stage, trained_on),) = calls.calls
    assert stage == "sft"
    model, tokenizer = load_model_and_tokenizer(resolve_model("tiny"))
    records = sample_records[:200]
    independent = compute_ifd(model, tokenizer, records, template="chat", model_key="independent", cache=None).ifd
    eligible = [i for i in range(200) if not np.isnan(independent[i]) and independent[i] <= 1]
    expected = sorted(eligible, key=lambda i: -independent[i])[: int(len(eligible) * 0.2)]
    assert {r.id for r in trained_on} == {records[i].id for i in expected}
    assert record["recipe"]["selected"] == len(expected)
    assert record["recipe"]["selected_ifd_range"][1] <= 1.0
    assert record["recipe"]["above_one"] == int(np.sum(independent[~np.isnan(independent)] > 1))


def test_second_recipe_reuses_cached_scores(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    common = ["data.limit=120", "training.max_steps=1"]
    phased = run_recipe("phased", tmp_path / "runs", [*common, "params.scorer=ifd"])
    ifd = run_recipe("ifd", tmp_path / "runs", common)
    assert phased["scoring"]["computed"] > 0 and phased["scoring"]["cached"] == 0
    assert ifd["scoring"]["computed"] == 0 and ifd["scoring"]["cached"] == phased["scoring"]["computed"]
    assert ifd["cost"]["scoring_tokens"] == phased["cost"]["scoring_tokens"] > 0  # the method's cost, cached or not


def test_brief_experience_selection_follows_cherrys_rule_on_a_synthetic_layout():
    """Cherry's sample_middle_confidence_data (data_by_cluster.py), 3 per cluster, band 25th-75th percentile."""
    labels = np.full(30, -1)
    perplexities = np.zeros(30)
    labels[[3, 7]] = 0  # fewer than 3 members: kept whole
    one = [1, 2, 4, 5, 6, 8, 9, 11, 12, 13, 14, 15]
    labels[one], perplexities[one] = 1, [12, 1, 5, 9, 4, 11, 7, 2, 6, 10, 8, 3]
    # band [3.75, 9.25] holds perplexities 4..9 at indices 4, 5, 6, 9, 12, 14 (dataset order): stride 6 // 3 = 2
    two = [0, 10, 20, 29]
    labels[two], perplexities[two] = 2, [4, 1, 3, 2]  # band [1.75, 3.25]: 20 and 29 only, fewer than 3: both
    three = [16, 17, 18, 19, 21, 22, 23, 24, 25, 26, 27, 28]
    labels[three], perplexities[three] = 3, 5.0  # all in the band: stride 12 // 3 = 4 -> positions 0, 4, 8
    assert (labels >= 0).all()
    chosen = middle_confidence_samples(labels, perplexities, 3)
    assert chosen == sorted([3, 7] + [4, 6, 12] + [20, 29] + [16, 21, 25])


def test_brief_experience_picks_per_cluster_samples_and_counts_as_overhead(tiny, sample_records, tmp_path, monkeypatch):
    model, tokenizer = tiny
    params = Params(brief_experience=True, experience_clusters=4, experience_per_cluster=3)
    chosen, tokens = experience_samples(model, tokenizer, sample_records[:80], "chat", params, seed=0)
    assert 4 <= len(chosen) <= 12 and len(set(chosen)) == len(chosen) and tokens > 0
    calls = TrainCalls(monkeypatch)
    record = run_recipe("ifd", tmp_path / "runs", ["data.limit=80", "params.brief_experience=true",
                                                   "params.experience_clusters=4", "params.experience_per_cluster=3",
                                                   "training.max_steps=1"])
    assert [stage for stage, _ in calls.calls] == ["experience", "sft"]
    assert [r.id for r in calls.calls[0][1]] == [sample_records[i].id for i in chosen]
    training, cost = record["training"], record["cost"]
    assert cost["overhead_train_tokens"] == training["experience"]["real_tokens"] > 0  # the method's cost
    assert cost["train_tokens"] == training["sft"]["real_tokens"]  # not counted as the target's training
    assert cost["scoring_tokens"] == record["scoring"]["forward_tokens"] + tokens
    assert record["recipe"]["experience_samples"] == len(chosen)


def test_random_control_trains_as_many_records_drawn_at_random(tmp_path, sample_records, monkeypatch):
    """params.control=random: the same count as the IFD selection, drawn uniformly from the pool (seeded),
    named in the variant; the plain recipe's name is unchanged."""
    calls = TrainCalls(monkeypatch)
    common = ["data.limit=200", "params.rate=0.2", "training.max_steps=1"]
    selected = run_recipe("ifd", tmp_path / "runs", common)
    control = run_recipe("ifd", tmp_path / "runs", [*common, "params.control=random"])
    (_, chosen), (_, drawn) = calls.calls
    assert len(drawn) == len(chosen) == control["recipe"]["selected"] == selected["recipe"]["selected"] > 0
    assert {r.id for r in drawn} != {r.id for r in chosen}
    from harness.controls import same_size_random_subset

    expected = same_size_random_subset(200, len(chosen), seed=0)
    assert [r.id for r in drawn] == [sample_records[:200][i].id for i in expected]
    assert control["recipe"]["variant"] == "ifd[rate=0.2, brief_experience=false, control=random]"
    assert selected["recipe"]["variant"] == "ifd[rate=0.2, brief_experience=false]"
    assert control["recipe"]["control"] == "random" and selected["recipe"]["control"] is None
