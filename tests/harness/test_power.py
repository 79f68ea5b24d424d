"""`harness power`: per-task and headline MDE from the suite's declared items, chance levels and the
planning formula, in seconds and without loading a model."""

from __future__ import annotations

import math

import pytest

from harness import stats
from harness.evaluation import load_suite
from harness.power import study_power
from tests.cli_helpers import run_cli


def test_small_suite_at_40_items_and_3_seeds(capsys):
    code, out, err = run_cli(["power", "--suite", "small", "--limit", "40", "--seeds", "3"], capsys)
    assert code == 0, err
    suite = load_suite("small")
    for entry in suite.tasks:
        assert entry.task in out
    # (1.96 + 0.84) * sqrt(0.15 / (3 * 40)) = 9.9 points per task; MMLU (small) is a group of 4 subjects,
    # each limited to 40: 160 items, 5.0 points
    assert out.count(" 9.9 ") >= len(suite.tasks) - 1
    assert "local_mmlu_small" in out and "160" in out and " 5.0 " in out
    assert "headline" in out


def test_headline_normalises_each_task_by_its_chance_level():
    suite = load_suite("small")
    study = study_power(suite, limit=40, seeds=1, discordance=0.15)
    items = [160 if entry.task == "local_mmlu_small" else 40 for entry in suite.tasks]  # MMLU: 4 subjects x 40
    assert [row.items for row in study.tasks] == items
    per_task = [math.sqrt(0.15 / n) for n in items]
    assert [row.stderr for row in study.tasks] == pytest.approx(per_task)
    assert study.tasks[0].mde == pytest.approx(stats.minimum_detectable_effect(per_task[0]))
    assert study.tasks[0].mde == pytest.approx(0.17, abs=0.005)  # the "about 17 points at 40 items"
    expected = math.sqrt(sum((se / (1 - entry.chance)) ** 2 for se, entry in zip(per_task, suite.tasks, strict=True)))
    expected /= len(suite.tasks)
    assert study.headline_stderr == pytest.approx(expected)
    more_seeds = study_power(suite, limit=40, seeds=4, discordance=0.15)
    assert more_seeds.headline_mde == pytest.approx(study.headline_mde / 2)


def test_seed_variance_is_a_floor_more_items_cannot_remove():
    suite = load_suite("smoke")
    huge = study_power(suite, limit=10**7, seeds=3, seed_sd=0.01)
    assert huge.tasks[0].stderr == pytest.approx(math.sqrt(2 * 0.01**2 / 3), rel=1e-3)


def test_bad_flags_are_one_line(capsys):
    code, _, err = run_cli(["power", "--suite", "nope"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nope" in err
    code, _, err = run_cli(["power", "--discordance", "1.5"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "discordance" in err
