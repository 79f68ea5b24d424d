"""The verdict statistics (harness.stats): the two-level bootstrap against its exact variance, the
sign-flip test against brute-force enumeration and the binomial test, Holm and Benjamini-Hochberg against
their definitions, the MDE against simulated power, and the whole decision rule calibrated on
simulated studies with and without a true effect."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats

from harness import stats


def crossed_scores(rng: np.random.Generator, seeds: int, items: np.ndarray, *, shift: float = 0.0,
                   seed_sd: float = 0.0, noise: float = 0.3) -> np.ndarray:
    """(seeds, items) scores: a shared item difficulty, a per-checkpoint offset, item x seed noise."""
    return items[None, :] + shift + rng.normal(0, seed_sd, (seeds, 1)) + rng.normal(0, noise, (seeds, items.shape[0]))


def test_two_level_bootstrap_variance_equals_the_exact_pigeonhole_variance():
    rng = np.random.default_rng(7)
    items = rng.normal(0.5, 0.3, 300)
    recipe = crossed_scores(rng, 4, items, shift=0.05, seed_sd=0.03)
    baseline = crossed_scores(rng, 3, items + rng.normal(0, 0.1, 300), seed_sd=0.02)
    result = stats.two_level_bootstrap(recipe, baseline, resamples=40_000)
    exact = stats.two_level_variance(recipe, baseline)
    # Monte Carlo error of a variance from 40k replicates: about sqrt(2/40k) = 0.7% relative
    assert result.variance == pytest.approx(exact["total"], rel=0.03)
    assert result.delta == pytest.approx(recipe.mean() - baseline.mean())
    assert result.seed_variance == exact["seed"] and result.item_variance == exact["item"]
    assert result.low < result.delta < result.high
    # the components: by hand, from the grids' row and column means
    seed = recipe.mean(axis=1).var() / 4 + baseline.mean(axis=1).var() / 3
    item = ((recipe.mean(axis=0) - recipe.mean()) - (baseline.mean(axis=0) - baseline.mean())).var() / 300
    assert exact["seed"] == pytest.approx(seed) and exact["item"] == pytest.approx(item)


def test_headline_over_tasks_shares_seeds_and_keeps_tasks_apart():
    """Three tasks of different sizes, a checkpoint effect common to all tasks of a seed: the stratified
    bootstrap's variance equals its exact formula, and the seed part is that of the per-seed headline."""
    rng = np.random.default_rng(8)
    sizes = (40, 150, 90)
    offsets_r, offsets_b = rng.normal(0, 0.04, (3, 1)), rng.normal(0, 0.04, (2, 1))
    recipe, baseline = [], []
    for n in sizes:
        items = rng.uniform(0, 1, n)
        recipe.append(items[None, :] + 0.03 + offsets_r + rng.normal(0, 0.2, (3, n)))
        baseline.append(items[None, :] + offsets_b + rng.normal(0, 0.2, (2, n)))
    result = stats.two_level_bootstrap(recipe, baseline, resamples=40_000)
    exact = stats.two_level_variance(recipe, baseline)
    assert result.variance == pytest.approx(exact["total"], rel=0.03)
    assert result.delta == pytest.approx(np.mean([r.mean() - b.mean() for r, b in zip(recipe, baseline, strict=True)]))
    headline_r = np.mean([grid.mean(axis=1) for grid in recipe], axis=0)  # per seed, over tasks
    headline_b = np.mean([grid.mean(axis=1) for grid in baseline], axis=0)
    assert exact["seed"] == pytest.approx(headline_r.var() / 3 + headline_b.var() / 2)
    with pytest.raises(ValueError, match="same seeds on every task"):
        stats.two_level_bootstrap([recipe[0], recipe[1][:2], recipe[2]], baseline)


def test_one_seed_each_reduces_to_the_paired_item_bootstrap():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 200), rng.normal(0.1, 1, 200)
    result = stats.two_level_bootstrap(b, a, resamples=20_000)
    assert result.seed_variance == 0.0
    assert result.variance == pytest.approx((b - a).var() / 200, rel=0.03)


def brute_force_sign_flip(differences: np.ndarray) -> float:
    nonzero = differences[differences != 0]
    observed = abs(nonzero.sum())
    flips = [abs(np.dot(signs, nonzero)) >= observed - 1e-9 for signs in itertools.product((-1, 1), repeat=len(nonzero))]
    return sum(flips) / len(flips)


def test_sign_flip_is_exact_for_few_differing_items():
    rng = np.random.default_rng(3)
    for _ in range(5):
        differences = np.where(rng.uniform(size=40) < 0.7, 0.0, rng.normal(0.3, 1.0, 40))[:14]
        assert stats.sign_flip_test(differences) == pytest.approx(brute_force_sign_flip(differences), abs=1e-12)
    # 0/1 metrics: with differences of +-1 the test is the two-sided binomial sign test
    differences = np.array([1.0] * 11 + [-1.0] * 3 + [0.0] * 30)
    assert stats.sign_flip_test(differences) == pytest.approx(scipy.stats.binomtest(11, 14, 0.5).pvalue, abs=1e-12)
    assert stats.sign_flip_test(np.zeros(10)) == 1.0


def test_sign_flip_monte_carlo_agrees_with_the_binomial_test_when_many_items_differ():
    differences = np.array([1.0] * 40 + [-1.0] * 22 + [0.0] * 100)
    expected = scipy.stats.binomtest(40, 62, 0.5).pvalue
    assert stats.sign_flip_test(differences, resamples=40_000) == pytest.approx(expected, abs=0.01)


def test_holm_and_benjamini_hochberg_match_their_definitions():
    rng = np.random.default_rng(5)
    for m in (1, 2, 5, 12):
        p = rng.uniform(0, 0.2, m)
        order = np.argsort(p)
        holm_by_definition = np.empty(m)
        for rank, index in enumerate(order):
            holm_by_definition[index] = min(1.0, max((m - r) * p[order[r]] for r in range(rank + 1)))
        assert stats.holm(list(p)) == pytest.approx(list(holm_by_definition))
        assert stats.benjamini_hochberg(list(p)) == pytest.approx(list(scipy.stats.false_discovery_control(p)))
    assert stats.adjust([0.01, 0.04], "none") == [0.01, 0.04]
    with pytest.raises(ValueError, match="unknown correction"):
        stats.adjust([0.1], "bonferroni-ish")


def test_the_minimum_detectable_effect_is_detected_about_80_percent_of_the_time():
    """Simulated paired 0/1 items with discordance D and a true difference of exactly the planned MDE."""
    items, discordance = 300, 0.2
    mde = stats.minimum_detectable_effect(stats.planned_stderr(items, discordance=discordance))
    rng = np.random.default_rng(11)
    up, down = discordance / 2 + mde / 2, discordance / 2 - mde / 2
    rejected = 0
    replicates = 400
    for _ in range(replicates):
        u = rng.uniform(size=items)
        differences = np.where(u < up, 1.0, np.where(u < up + down, -1.0, 0.0))
        rejected += stats.sign_flip_test(differences, resamples=2_000) < 0.05
    assert 0.72 <= rejected / replicates <= 0.88, rejected / replicates


def simulated_study(rng: np.random.Generator, effects: list[float], *, seeds: int = 3, items: int = 60,
                    seed_sd: float = 0.03) -> list[str]:
    """Verdicts of len(effects) recipes against one baseline, all on the same 0/1 items, Holm over the
    family: the rule the leaderboard applies (two-level bootstrap CI and corrected sign-flip p)."""
    difficulty = rng.uniform(0.2, 0.8, items)

    def run(shift: float) -> np.ndarray:
        probability = np.clip(difficulty[None, :] + shift + rng.normal(0, seed_sd, (seeds, 1)), 0, 1)
        return (rng.uniform(size=(seeds, items)) < probability).astype(float)

    baseline = run(0.0)
    deltas, p_values = [], []
    for effect in effects:
        recipe = run(effect)
        deltas.append(stats.two_level_bootstrap(recipe, baseline, resamples=1_000))
        p_values.append(stats.sign_flip_test(recipe.mean(axis=0) - baseline.mean(axis=0), resamples=1_000))
    return [stats.verdict(d.low, d.high, p, margin=0.01) for d, p in zip(deltas, stats.holm(p_values), strict=True)]


def test_calibration_no_true_effect_rejects_at_most_alpha_familywise():
    rng = np.random.default_rng(2026)
    replicates = 300
    false_claims = sum(any(v in ("better", "worse") for v in simulated_study(rng, [0.0, 0.0, 0.0]))
                       for _ in range(replicates))
    # alpha plus three Monte Carlo standard errors of a proportion near alpha
    assert false_claims / replicates <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / replicates), false_claims


def test_calibration_a_planted_effect_is_found():
    rng = np.random.default_rng(2027)
    found = [simulated_study(rng, [0.0, 0.25]) for _ in range(40)]
    assert sum(verdicts[1] == "better" for verdicts in found) >= 36
    assert sum(verdicts[0] == "better" for verdicts in found) <= 2


def test_no_flip_interval_is_the_exact_binomial_bound_not_zero_width():
    low, high = stats.no_flip_interval(40)
    assert low == -high and high > 0
    assert scipy.stats.binom.pmf(0, 40, high) == pytest.approx(0.025)
    assert stats.no_flip_interval(2_000)[1] == pytest.approx(3.69 / 2_000, rel=0.01)  # the two-sided rule of three


def test_verdict_rule():
    assert stats.verdict(0.02, 0.08, 0.01, margin=0.01) == "better"
    assert stats.verdict(-0.08, -0.02, 0.01, margin=0.01) == "worse"
    assert stats.verdict(0.02, 0.08, 0.01, margin=0.01, higher_is_better=False) == "worse"
    assert stats.verdict(0.02, 0.08, 0.2, margin=0.01) == "inconclusive"  # CI alone does not make a claim
    assert stats.verdict(-0.004, 0.006, 0.6, margin=0.01) == "equivalent"
    assert stats.verdict(-0.05, 0.06, 0.6, margin=0.01) == "inconclusive"
