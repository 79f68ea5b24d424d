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


# ----------------------------------------------------------------------------------------------
# Verdicts across training seeds: the two-level bootstrap, the paired sign-flip test, corrections for
# multiple comparisons, power (minimum detectable effect) and the verdict rule.


@dataclass(frozen=True)
class SeededDelta:
    """Recipe minus baseline, each scored by several training seeds on the same items.

    `seed_variance` and `item_variance` split the bootstrap variance of `delta` into what resampling the
    checkpoints and what resampling the items contributes (the item x seed interaction is in neither:
    `variance` is their sum plus it)."""

    delta: float
    low: float
    high: float
    variance: float  # of the two-level bootstrap replicates
    seed_variance: float
    item_variance: float
    seeds: tuple[int, int]  # (recipe, baseline)
    n: int
    resamples: int


def _as_grid(scores: np.ndarray, what: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[None, :]
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"{what}: need a (seeds, items) array, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{what}: values must be finite")
    return scores


Grids = np.ndarray | list[np.ndarray]


def _as_tasks(recipe: Grids, baseline: Grids) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One (seeds, items) grid per task for each side; each task's items the same on both sides and each
    side's seeds the same across tasks (a seed is one checkpoint, scored on every task)."""
    recipe_tasks = [recipe] if isinstance(recipe, np.ndarray) else list(recipe)
    baseline_tasks = [baseline] if isinstance(baseline, np.ndarray) else list(baseline)
    if not recipe_tasks or len(recipe_tasks) != len(baseline_tasks):
        raise ValueError("two_level_bootstrap: need the same tasks (at least one) on both sides")
    recipe_tasks = [_as_grid(grid, "recipe scores") for grid in recipe_tasks]
    baseline_tasks = [_as_grid(grid, "baseline scores") for grid in baseline_tasks]
    for r, b in zip(recipe_tasks, baseline_tasks, strict=True):
        if r.shape[1] != b.shape[1]:
            raise ValueError(f"two_level_bootstrap: recipe and baseline need the same items ({r.shape[1]} vs {b.shape[1]})")
        if r.shape[0] != recipe_tasks[0].shape[0] or b.shape[0] != baseline_tasks[0].shape[0]:
            raise ValueError("two_level_bootstrap: each side needs the same seeds on every task")
    return recipe_tasks, baseline_tasks


def two_level_bootstrap(
    recipe: Grids,
    baseline: Grids,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> SeededDelta:
    """Bootstrap of mean(recipe) - mean(baseline) over (seeds, items) score grids on the same items; with a
    list of grids (one per task), of the mean over tasks of each task's mean (a headline).

    Each replicate draws each task's items once (shared by both sides, so the pairing is kept; tasks
    apart, so every task keeps its size) and the seeds of each side on their own (a recipe's seeds are
    independent checkpoints; one draw per side serves every task, since a checkpoint is scored on all):
    the 'pigeonhole' bootstrap of a crossed design (Owen, "The pigeonhole bootstrap", Ann. Appl. Stat.
    2007), stratified by task. Its exact variance is `two_level_variance` (checked in the tests)."""
    recipe_tasks, baseline_tasks = _as_tasks(recipe, baseline)
    seeds_r, seeds_b = recipe_tasks[0].shape[0], baseline_tasks[0].shape[0]
    tasks = len(recipe_tasks)
    rng = np.random.default_rng(seed)
    replicates = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - start)
        # A resample with replacement is a multinomial count per seed (and per item): the mean over the
        # drawn seeds and items is (seed weights) . grid . (item weights).
        weight_r = rng.multinomial(seeds_r, np.full(seeds_r, 1.0 / seeds_r), size=size) / seeds_r
        weight_b = rng.multinomial(seeds_b, np.full(seeds_b, 1.0 / seeds_b), size=size) / seeds_b
        per_seed_r = np.zeros((size, seeds_r))
        per_seed_b = np.zeros((size, seeds_b))
        for grid_r, grid_b in zip(recipe_tasks, baseline_tasks, strict=True):
            n = grid_r.shape[1]
            item_weights = rng.multinomial(n, np.full(n, 1.0 / n), size=size) / n
            per_seed_r += item_weights @ grid_r.T / tasks  # each seed's headline over the drawn items
            per_seed_b += item_weights @ grid_b.T / tasks
        replicates[start : start + size] = (weight_r * per_seed_r).sum(axis=1) - (weight_b * per_seed_b).sum(axis=1)
    delta = float(np.mean([r.mean() - b.mean() for r, b in zip(recipe_tasks, baseline_tasks, strict=True)]))
    low, high = _percentiles(replicates, confidence)
    components = two_level_variance(recipe_tasks, baseline_tasks)
    n_items = sum(grid.shape[1] for grid in recipe_tasks)
    return SeededDelta(delta, low, high, float(replicates.var()), components["seed"], components["item"],
                       (seeds_r, seeds_b), n_items, resamples)


def two_level_variance(recipe: Grids, baseline: Grids) -> dict[str, float]:
    """The exact variance of `two_level_bootstrap`'s replicates. Each task's grid decomposes as
    y[s, i] = m + a[s] + b[i] + e[s, i] (plug-in mean squares: divisors S, N, SN); over T tasks,
    seed = v(A_recipe)/S_r + v(A_baseline)/S_b with A[s] the mean over tasks of a[s] (a seed is one
    checkpoint on every task), item = sum_t v(b_recipe,t - b_baseline,t) / (T^2 N_t), interaction =
    sum_t (v_e(recipe,t)/S_r + v_e(baseline,t)/S_b) / (T^2 N_t); total = their sum."""
    recipe_tasks, baseline_tasks = _as_tasks(recipe, baseline)
    tasks = len(recipe_tasks)

    def parts(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        mean = grid.mean()
        a = grid.mean(axis=1) - mean
        b = grid.mean(axis=0) - mean
        e = grid - mean - a[:, None] - b[None, :]
        return a, b, float((e**2).mean())

    seeds_r, seeds_b = recipe_tasks[0].shape[0], baseline_tasks[0].shape[0]
    a_r, a_b = np.zeros(seeds_r), np.zeros(seeds_b)
    item = interaction = 0.0
    for grid_r, grid_b in zip(recipe_tasks, baseline_tasks, strict=True):
        n = grid_r.shape[1]
        ar, br, ver = parts(grid_r)
        ab, bb, veb = parts(grid_b)
        a_r += ar / tasks
        a_b += ab / tasks
        item += float(((br - bb) ** 2).mean()) / (n * tasks**2)
        interaction += (ver / seeds_r + veb / seeds_b) / (n * tasks**2)
    seed = float((a_r**2).mean()) / seeds_r + float((a_b**2).mean()) / seeds_b
    return {"seed": seed, "item": item, "interaction": interaction, "total": seed + item + interaction}


EXACT_SIGN_FLIP_MAX = 16  # up to 2^16 sign patterns are enumerated; beyond, Monte Carlo


def sign_flip_test(differences: np.ndarray, *, resamples: int = RESAMPLES, seed: int = SEED) -> float:
    """Two-sided p-value of the paired sign-flip permutation test of mean(differences) = 0.

    Under the null each item's difference is as likely negative as positive (the two runs are
    exchangeable on it), so flipping signs gives the null distribution of the mean. Items with a zero
    difference cannot flip and drop out. Exact (all 2^k patterns) when k <= EXACT_SIGN_FLIP_MAX items
    differ, else a Monte Carlo test with the +1 correction (Davison & Hinkley 1997, sec. 4.2.1)."""
    differences = _check(differences, "sign_flip_test")
    nonzero = differences[differences != 0]
    k = nonzero.shape[0]
    if k == 0:
        return 1.0
    observed = abs(nonzero.sum())
    tolerance = 1e-9 * max(1.0, float(np.abs(nonzero).sum()))
    if k <= EXACT_SIGN_FLIP_MAX:
        patterns = ((np.arange(2**k)[:, None] >> np.arange(k)[None, :]) & 1) * 2 - 1
        sums = np.abs(patterns @ nonzero)
        return float(np.count_nonzero(sums >= observed - tolerance) / 2**k)
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - start)
        signs = rng.integers(0, 2, size=(size, k)) * 2 - 1
        extreme += int(np.count_nonzero(np.abs(signs @ nonzero) >= observed - tolerance))
    return min(1.0, (extreme + 1) / (resamples + 1))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error rate; Holm 1979), in the input's order."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.shape[0]
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    result = np.empty(m)
    result[order] = np.minimum(adjusted, 1.0)
    return [float(x) for x in result]


def benjamini_hochberg(p_values: list[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (false discovery rate; Benjamini & Hochberg 1995), in order."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.shape[0]
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
    result = np.empty(m)
    result[order] = np.minimum(adjusted, 1.0)
    return [float(x) for x in result]


def adjust(p_values: list[float], method: str) -> list[float]:
    if method == "holm":
        return holm(p_values)
    if method == "bh":
        return benjamini_hochberg(p_values)
    if method == "none":
        return [float(p) for p in p_values]
    raise ValueError(f"unknown correction '{method}' (holm, bh or none)")


POWER = 0.80
ALPHA = 0.05


def _z(probability: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(probability)


def minimum_detectable_effect(stderr: float, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true difference a two-sided level-alpha test with this standard error detects with
    probability `power`: (z_{1-alpha/2} + z_power) * stderr (normal approximation)."""
    return (_z(1.0 - alpha / 2.0) + _z(power)) * stderr


def planned_stderr(items: int, *, discordance: float, seeds: int = 1, seed_sd: float = 0.0) -> float:
    """Standard error of a recipe-minus-baseline difference planned before any run.

    `discordance`: share of items on which two checkpoints' scores differ (for 0/1 metrics the variance
    of a per-item difference is about that share when the effect is small); each recipe is trained with
    `seeds` seeds and scored on the same `items`; `seed_sd`: the SD of a checkpoint's mean score from
    seed to seed (the part that more items cannot shrink). Var = D / (K N) + 2 seed_sd^2 / K."""
    if items <= 0 or seeds <= 0:
        raise ValueError("items and seeds must be positive")
    if not 0.0 <= discordance <= 1.0:
        raise ValueError(f"discordance must lie in [0, 1], got {discordance}")
    return math.sqrt(discordance / (seeds * items) + 2.0 * seed_sd**2 / seeds)


def no_flip_interval(n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """A difference interval when no item's score changed between two runs: the observed difference is
    0, but with n items a share of flips up to 1-(alpha/2)^(1/n) each way (exact binomial upper bound;
    about 3.7/n at 95%, the 'rule of three' two-sided) cannot be ruled out, so the interval is not [0, 0]."""
    if n <= 0:
        raise ValueError("n must be positive")
    bound = 1.0 - ((1.0 - confidence) / 2.0) ** (1.0 / n)
    return -bound, bound


VERDICTS = ("better", "worse", "equivalent", "inconclusive")


def verdict(low: float, high: float, adjusted_p: float, *, margin: float, alpha: float = ALPHA,
            higher_is_better: bool = True) -> str:
    """better / worse: the corrected test rejects and the CI excludes 0 on that side; equivalent: the
    CI lies inside +-margin (two one-sided tests at the CI's level); else inconclusive."""
    if adjusted_p < alpha and (low > 0 or high < 0):
        return "better" if (low > 0) == higher_is_better else "worse"
    if -margin < low and high < margin:
        return "equivalent"
    return "inconclusive"
