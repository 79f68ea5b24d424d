import numpy as np

from harness.artifacts import ArtifactCache
from harness.models import load_model_and_tokenizer, resolve_model
from harness.scoring import compute_ifd
from recipes.ifd import Params, experience_samples, select_top_ifd
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


def test_brief_experience_picks_mid_perplexity_samples_per_cluster(tiny, sample_records):
    model, tokenizer = tiny
    params = Params(brief_experience=True, experience_clusters=4, experience_per_cluster=3)
    chosen = experience_samples(model, tokenizer, sample_records[:80], "chat", params, seed=0)
    assert 4 <= len(chosen) <= 12
    assert len(set(chosen)) == len(chosen)
    assert ArtifactCache  # the experienced scorer is cached under its own key (covered in run tests)
