"""Verdicts from run records: seeds pooled per variant, the headline normalised by each task's chance
level, Holm over the main family, the zero-width fix, unpaired items flagged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness import leaderboard as board
from harness import stats
from harness.report.summary import summarise
from tests.records import make_record


def write_run(root: Path, run_id: str, recipe: str, seed: int, values: np.ndarray, *, task: str = "local_arc_easy",
              metric: str = "acc_norm", suite: str = "smoke", start: int = 0) -> None:
    run_dir = root / run_id
    (run_dir / "eval").mkdir(parents=True)
    lines = [json.dumps({"doc_id": start + i, "doc_hash": f"h{start + i}", metric: float(v)}) for i, v in enumerate(values)]
    (run_dir / "eval" / f"samples_{task}.jsonl").write_text("\n".join(lines) + "\n")
    record = make_record(run_id=run_id, seed=seed, recipe={"name": recipe}, suite={"name": suite},
                         data={"source": "s", "sha256": "d"},
                         metrics={task: {"n": len(values), metric: {"value": float(np.mean(values)), "stderr": 0.05}}})
    (run_dir / "record.json").write_text(json.dumps(record))


def load(root: Path):
    runs = board.load_runs([root], print)
    return runs, {run.run_id: run.recipe for run in runs}


def binary(rng, probability, items=120):
    return (rng.uniform(size=items) < probability).astype(float)


def test_seeds_pool_per_variant_and_the_planted_effect_is_the_only_claim(tmp_path: Path):
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0.2, 0.7, 120)
    for seed in range(3):
        write_run(tmp_path, f"one-off-{seed}", "one-off", seed, binary(rng, difficulty))
        write_run(tmp_path, f"ifd-{seed}", "ifd", seed, binary(rng, difficulty + 0.25))
        write_run(tmp_path, f"phased-{seed}", "phased", seed, binary(rng, difficulty))
        write_run(tmp_path, f"base-{seed}", "base", seed, binary(rng, difficulty - 0.1))
    runs, labels = load(tmp_path)
    summary = summarise(runs, "smoke", labels, resamples=2_000)
    assert [spec.task for spec in summary.tasks] == ["local_arc_easy"] and summary.tasks[0].chance == 0.25
    variants = {v.label: v for v in summary.variants}
    assert set(variants) == {"one-off", "ifd", "phased"} and [r.label for r in summary.references] == ["base"]
    ifd, phased = variants["ifd"], variants["phased"]
    assert ifd.seeds == [0, 1, 2] and not ifd.conditional
    # headline = chance-normalised difference of the pooled means
    pooled = {name: np.mean([r.samples["local_arc_easy"].metrics["acc_norm"].mean() for r in runs if r.recipe == name])
              for name in ("ifd", "one-off")}
    assert ifd.headline.delta == pytest.approx((pooled["ifd"] - pooled["one-off"]) / 0.75)
    assert ifd.tasks["local_arc_easy"].delta == pytest.approx(pooled["ifd"] - pooled["one-off"])
    assert ifd.headline.verdict == "better" and phased.headline.verdict != "better"
    assert [ifd.headline.adjusted_p, phased.headline.adjusted_p] == pytest.approx(
        stats.holm([ifd.headline.p_value, phased.headline.p_value]))
    assert ifd.headline.seed_variance > 0 and ifd.headline.mde > 0
    assert variants["one-off"].headline_seed_sd is not None


def test_one_seed_is_conditional_and_no_flip_is_not_zero_width(tmp_path: Path):
    values = np.array([1.0, 0.0] * 30)
    write_run(tmp_path, "one-off-0", "one-off", 0, values)
    write_run(tmp_path, "ifd-0", "ifd", 0, values)
    runs, labels = load(tmp_path)
    (ifd,) = [v for v in summarise(runs, "smoke", labels, resamples=500).variants if v.label == "ifd"]
    assert ifd.conditional
    cell = ifd.tasks["local_arc_easy"]
    assert cell.delta == 0.0 and (cell.low, cell.high) == pytest.approx(stats.no_flip_interval(60))
    assert cell.verdict == "inconclusive" and "binomial" in cell.method


def test_items_not_scored_by_every_run_are_flagged(tmp_path: Path):
    rng = np.random.default_rng(1)
    write_run(tmp_path, "one-off-0", "one-off", 0, binary(rng, 0.5, 100))
    write_run(tmp_path, "ifd-0", "ifd", 0, binary(rng, 0.5, 110), start=0)
    runs, labels = load(tmp_path)
    (ifd,) = [v for v in summarise(runs, "smoke", labels, resamples=500).variants if v.label == "ifd"]
    assert ifd.tasks["local_arc_easy"].items == 100 and ifd.tasks["local_arc_easy"].items_scored == 110


def test_unknown_suite_falls_back_to_the_recorded_metric(tmp_path: Path):
    rng = np.random.default_rng(2)
    write_run(tmp_path, "one-off-0", "one-off", 0, binary(rng, 0.5), task="t", metric="acc", suite="gone")
    write_run(tmp_path, "ifd-0", "ifd", 0, binary(rng, 0.6), task="t", metric="acc", suite="gone")
    runs, labels = load(tmp_path)
    summary = summarise(runs, "gone", labels, resamples=500)
    assert [(s.task, s.metric, s.chance) for s in summary.tasks] == [("t", "acc", 0.0)]


def test_leaderboard_json_and_page_carry_the_verdicts_under_stable_keys(tmp_path: Path, capsys):
    from tests.cli_helpers import run_cli

    rng = np.random.default_rng(3)
    difficulty = rng.uniform(0.2, 0.7, 120)
    for seed in range(3):
        write_run(tmp_path / "runs", f"one-off-{seed}", "one-off", seed, binary(rng, difficulty))
        write_run(tmp_path / "runs", f"ifd-{seed}", "ifd", seed, binary(rng, difficulty + 0.2))
        write_run(tmp_path / "runs", f"phased-{seed}", "phased", seed, binary(rng, difficulty + 0.01))
    code, out, err = run_cli(["leaderboard", "--runs", str(tmp_path / "runs"), "--format", "json"], capsys)
    assert code == 0, err
    summary = json.loads(out)["groups"][0]["summary"]
    assert summary["baseline"] == "one-off" and summary["settings"]["correction"] == "holm"
    variants = {v["label"]: v for v in summary["variants"]}
    headline = variants["ifd"]["headline"]
    assert set(headline) >= {"delta", "ci_low", "ci_high", "p_value", "adjusted_p", "mde", "verdict", "items"}
    assert headline["verdict"] == "better" and variants["ifd"]["seeds"] == [0, 1, 2]
    assert variants["phased"]["headline"]["adjusted_p"] >= variants["phased"]["headline"]["p_value"]
    code, out, _ = run_cli(["leaderboard", "--runs", str(tmp_path / "runs"), "--format", "json", "--correction", "none",
                            "--baseline", "phased"], capsys)
    summary = json.loads(out)["groups"][0]["summary"]
    raw = {v["label"]: v["headline"] for v in summary["variants"] if v["headline"]}
    assert summary["baseline"] == "phased" and set(raw) == {"ifd", "one-off"}
    assert all(h["adjusted_p"] == h["p_value"] for h in raw.values())
    code, out, _ = run_cli(["leaderboard", "--runs", str(tmp_path / "runs"), "--format", "md"], capsys)
    assert "### Verdicts" in out and "| ifd | 3 |" in out and "better" in out
    code, _, err = run_cli(["leaderboard", "--runs", str(tmp_path / "runs"), "--correction", "bonf"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
