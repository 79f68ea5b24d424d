"""The bootstrap statistics against independent computations: a plain numpy re-implementation with the
same resampling (exact), scipy.stats.bootstrap's percentile CI (within Monte Carlo tolerance), and
the normal approximation's p-value (large n)."""

import math
from statistics import NormalDist

import numpy as np
import pytest
import scipy.stats

from harness import stats


def _pair(n: int, p_a: float, p_b: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Correlated 0/1 scores of two models on the same n items (as accuracy per item)."""
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(size=n)
    a = (difficulty < p_a).astype(float)
    b = (difficulty < p_b).astype(float)
    flip = rng.uniform(size=n) < 0.15  # some items one model gets right by chance
    b[flip] = 1.0 - b[flip]
    return a, b


def _numpy_reference(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> tuple[float, float, float, float]:
    """The paired bootstrap written out once more, with one (resamples, n) draw instead of chunks."""
    d = b - a
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    reps = d[idx].mean(axis=1)
    low, high = np.quantile(reps, [0.025, 0.975])
    p = (np.sum(np.abs(reps - d.mean()) >= abs(d.mean()) - 1e-12) + 1) / (resamples + 1)
    return d.mean(), low, high, p


@pytest.mark.parametrize("n, resamples", [(57, 2_500), (300, 10_000)])
def test_paired_bootstrap_equals_a_plain_numpy_reimplementation(n, resamples):
    a, b = _pair(n, 0.4, 0.5, seed=n)
    test = stats.paired_bootstrap(a, b, resamples=resamples, seed=7)
    delta, low, high, p = _numpy_reference(a, b, resamples, 7)
    assert test.delta == pytest.approx(delta, abs=1e-15)
    assert (test.low, test.high) == pytest.approx((low, high), abs=1e-12)
    assert test.p_value == pytest.approx(p, abs=1e-15)
    assert test.n == n and test.resamples == resamples
    assert test.stderr == pytest.approx(np.std(b - a, ddof=1) / math.sqrt(n))


def test_paired_ci_agrees_with_scipy_percentile_bootstrap():
    a, b = _pair(400, 0.45, 0.55, seed=1)
    ours = stats.paired_bootstrap(a, b)
    theirs = scipy.stats.bootstrap(
        (a, b), lambda x, y, axis: np.mean(y, axis=axis) - np.mean(x, axis=axis), paired=True, vectorized=True,
        method="percentile", n_resamples=20_000, confidence_level=0.95, rng=np.random.default_rng(123),
    ).confidence_interval
    # Different random streams: the endpoints agree to Monte Carlo error, a few percent of the SE.
    assert ours.low == pytest.approx(theirs.low, abs=0.15 * ours.stderr)
    assert ours.high == pytest.approx(theirs.high, abs=0.15 * ours.stderr)
    assert ours.low < ours.delta < ours.high


def test_mean_interval_agrees_with_scipy_and_lm_evals_stderr():
    values = _pair(250, 0.3, 0.3, seed=2)[0]
    interval = stats.mean_interval(values)
    theirs = scipy.stats.bootstrap((values,), np.mean, method="percentile", n_resamples=20_000,
                                   rng=np.random.default_rng(5)).confidence_interval
    assert interval.mean == values.mean()
    assert interval.stderr == pytest.approx(scipy.stats.sem(values))  # lm-eval's mean_stderr: ddof=1
    assert interval.low == pytest.approx(theirs.low, abs=0.15 * interval.stderr)
    assert interval.high == pytest.approx(theirs.high, abs=0.15 * interval.stderr)


def test_p_value_matches_the_normal_approximation_for_large_n():
    a, b = _pair(2_000, 0.50, 0.54, seed=3)
    test = stats.paired_bootstrap(a, b)
    d = b - a
    z = abs(d.mean()) / (d.std(ddof=1) / math.sqrt(len(d)))
    normal_p = 2 * (1 - NormalDist().cdf(z))
    assert 0.001 < normal_p < 0.5  # a case where the p-value is informative
    assert test.p_value == pytest.approx(normal_p, abs=0.02)


def test_edge_cases_identical_runs_and_a_sure_difference():
    a, _ = _pair(80, 0.5, 0.5, seed=4)
    same = stats.paired_bootstrap(a, a.copy())
    assert (same.delta, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    better = stats.paired_bootstrap(np.zeros(80), np.ones(80), resamples=999)
    assert better.delta == 1.0 and better.p_value == pytest.approx(1 / 1000)


def test_null_p_values_are_not_too_small():
    """Under no difference, p < 0.05 should happen about 5% of the time (not 20%)."""
    rng = np.random.default_rng(11)
    rejections = 0
    for trial in range(150):
        a = (rng.uniform(size=120) < 0.5).astype(float)
        b = (rng.uniform(size=120) < 0.5).astype(float)
        rejections += stats.paired_bootstrap(a, b, resamples=1_000, seed=trial).p_value < 0.05
    assert 1 <= rejections <= 18


@pytest.mark.parametrize("a, b, message", [
    ([], [], "non-empty"), ([1.0, 2.0], [1.0], "same items"), ([1.0, float("nan")], [1.0, 1.0], "finite"),
])
def test_bad_input_is_rejected(a, b, message):
    with pytest.raises(ValueError, match=message):
        stats.paired_bootstrap(np.array(a), np.array(b))


def test_normal_interval():
    low, high = stats.normal_interval(0.5, 0.1)
    assert (low, high) == pytest.approx((0.5 - 0.1959964, 0.5 + 0.1959964), abs=1e-6)
