"""Statistics for the leaderboard: percentile-bootstrap confidence intervals of a mean, and the paired
bootstrap test of a difference between two runs scored on the same items.

Every call starts its own generator from a fixed seed, so a figure does not depend on which other
figures were computed before it (the leaderboard renders byte-identically on every machine). The
resampling is the textbook one (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993:
percentile interval, ch. 13; bootstrap hypothesis test with the null distribution obtained by
centring the bootstrap replicates, ch. 16): resample item indices with replacement, recompute the
mean (of the per-item differences), read the interval off the replicate quantiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
SEED = 0
CONFIDENCE = 0.95
_CHUNK = 1_000  # replicates drawn per step, so memory stays at _CHUNK x n indices


@dataclass(frozen=True)
class Interval:
    """A mean with its standard error and a percentile-bootstrap confidence interval."""

    mean: float
    stderr: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class PairedTest:
    """B minus A over the items both were scored on: the mean difference, its CI, and a two-sided p-value."""

    delta: float
    stderr: float
    low: float
    high: float
    p_value: float
    n: int
    resamples: int


def bootstrap_means(values: np.ndarray, *, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Means of `resamples` resamples (with replacement) of `values`.

    The indices come from one generator drawn in fixed-size chunks; numpy's Generator.integers consumes
    its stream element by element, so the chunked draw equals one (resamples, n) draw."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, _CHUNK):
        stop = min(start + _CHUNK, resamples)
        indices = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[indices].mean(axis=1)
    return means


def _percentiles(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _check(values: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.shape[0] == 0:
        raise ValueError(f"{what}: need a non-empty 1-D array, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{what}: values must be finite")
    return values


def mean_interval(
    values: np.ndarray, *, resamples: int = RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE
) -> Interval:
    """Mean, standard error (sample std / sqrt(n), as lm-eval reports it) and percentile-bootstrap CI."""
    values = _check(values, "mean_interval")
    n = values.shape[0]
    stderr = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    low, high = _percentiles(bootstrap_means(values, resamples=resamples, seed=seed), confidence)
    return Interval(float(values.mean()), stderr, low, high, n)


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> PairedTest:
    """Paired bootstrap of mean(b) - mean(a), where a[i] and b[i] are the scores of the same item i.

    Resampling items (not the two runs separately) keeps the pairing, so the between-item variance
    cancels. p-value: the share of centred replicates at least as far from zero as the observed
    difference, |d* - d| >= |d|, with the +1 of a Monte Carlo test (Davison & Hinkley, "Bootstrap
    Methods and their Application", 1997, sec. 4.2.1) so a finite number of resamples never claims p = 0."""
    a = _check(a, "paired_bootstrap a")
    b = _check(b, "paired_bootstrap b")
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap: a and b must be scored on the same items ({a.shape} vs {b.shape})")
    differences = b - a
    n = differences.shape[0]
    delta = float(differences.mean())
    replicates = bootstrap_means(differences, resamples=resamples, seed=seed)
    low, high = _percentiles(replicates, confidence)
    extreme = int(np.count_nonzero(np.abs(replicates - delta) >= abs(delta) - 1e-12))
    p_value = (extreme + 1) / (resamples + 1)
    stderr = float(differences.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return PairedTest(delta, stderr, low, high, min(1.0, p_value), n, resamples)


def normal_interval(mean: float, stderr: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """mean ± z·stderr: the fallback when a run has no per-item results to resample."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    return mean - z * stderr, mean + z * stderr
