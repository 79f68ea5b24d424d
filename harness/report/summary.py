"""One verdict per recipe variant: headline difference from the baseline with a two-level (seeds x
items) bootstrap CI, a paired sign-flip p-value adjusted over the family, the minimum detectable
effect and better / worse / equivalent / inconclusive; the same per benchmark.

The headline is the mean over the suite's tasks of the chance-normalised primary metric,
(x - chance) / (1 - chance), as the Open LLM Leaderboard v2 normalises; each task declares its primary
metric and chance level in the suite YAML. Continuous side metrics (held-out NLL) and judged sections
(AlpacaEval's LC win rate) are reported beside it on their own scales, never averaged into it.

Family-wise error: Holm over the main family (variants x {headline, AlpacaEval LC}); false discovery
rate: Benjamini-Hochberg over the per-benchmark cells. Fewer than `min_seeds` seeds per side: the
result is conditional on the checkpoints trained, which the output says."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness import stats

# Metrics where smaller is better (the sign of a Δ and which value is best flip for them).
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "loss", "ter", "nll"}

BASELINE = "one-off"
REFERENCE_ROWS = ("base",)  # shown apart: not compared as recipes
SIDE_METRICS = {"heldout_nll": ("nll", False)}  # section -> (metric, higher is better)
LC_SECTION, LC_METRIC = "alpaca_eval", "length_controlled_win_rate"


@dataclass(frozen=True)
class TaskSpec:
    task: str
    metric: str
    chance: float = 0.0
    higher_is_better: bool = True


@dataclass
class Comparison:
    """One variant against the baseline on one quantity (the headline, a task, a side metric)."""

    delta: float
    low: float
    high: float
    stderr: float
    p_value: float
    mde: float
    items: int
    items_scored: int  # the most items any run was scored on: more than `items` means some could not be paired
    method: str
    seed_variance: float | None = None
    item_variance: float | None = None
    adjusted_p: float | None = None
    verdict: str = "inconclusive"
    per_seed: list[float] = field(default_factory=list)  # each recipe seed's difference from the pooled baseline

    @property
    def underpowered(self) -> bool:
        return self.verdict == "inconclusive"


@dataclass
class VariantSummary:
    label: str
    seeds: list[int | None]
    headline_mean: float | None  # over seeds, normalised
    headline_seed_sd: float | None
    headline: Comparison | None = None
    lc: Comparison | None = None
    tasks: dict[str, Comparison] = field(default_factory=dict)
    conditional: bool = False  # fewer than min_seeds seeds on this side or the baseline's
    cost: dict[str, float | None] = field(default_factory=dict)  # means over seeds; None where a run lacks it
    compute_ratio: float | None = None  # FLOPs (training + scoring) relative to the baseline's


@dataclass(frozen=True)
class VerdictOptions:
    """`harness leaderboard`'s --baseline, --correction, --alpha, --margin and --min-seeds."""

    baseline: str = BASELINE
    correction: str = "holm"
    alpha: float = stats.ALPHA
    margin: float = 0.01
    min_seeds: int = 3
    resamples: int = 4_000


@dataclass
class GroupSummary:
    baseline: str
    tasks: list[TaskSpec]
    variants: list[VariantSummary]
    references: list[VariantSummary]
    settings: dict[str, Any]
    notes: list[str]


def task_specs(suite_name: str, runs: list[Any]) -> list[TaskSpec]:
    """The suite's declared primary metric and chance per task; a suite file that is gone (or a run of an
    older suite) falls back to the first metric a run recorded for the task, chance 0."""
    from harness.errors import HarnessError
    from harness.evaluation import load_suite

    recorded = {task for run in runs for task, _ in run.metrics}
    try:
        suite = load_suite(suite_name)
        declared = [TaskSpec(t.task, t.primary_metric, t.chance) for t in suite.tasks
                    if t.primary_metric and t.task in recorded]
    except HarnessError:
        declared = []
    if declared:
        return declared

    fallback = []
    for task in sorted(recorded - set(SIDE_METRICS) - {LC_SECTION, "pairwise"}):
        metric = next(m for t, m in sorted({key for run in runs for key in run.metrics}) if t == task)
        fallback.append(TaskSpec(task, metric, 0.0, metric not in LOWER_IS_BETTER))
    return fallback


def _items(runs: list[Any], task: str, metric: str) -> tuple[list[tuple[str, str]], int] | None:
    """Item keys every run scored (in the first run's order) and the most items any run scored."""
    per_run = []
    for run in runs:
        scores = run.samples.get(task)
        if scores is None or metric not in scores.metrics:
            return None
        per_run.append(scores)
    common = set(per_run[0].keys)
    for scores in per_run[1:]:
        common &= set(scores.keys)
    keys = [key for key in per_run[0].keys if key in common]
    return (keys, max(len(scores.keys) for scores in per_run)) if keys else None


def _grid(runs: list[Any], task: str, metric: str, keys: list[tuple[str, str]], scale: float, chance: float) -> np.ndarray:
    rows = []
    for run in runs:
        scores = run.samples[task]
        index = {key: i for i, key in enumerate(scores.keys)}
        values = scores.metrics[metric][[index[key] for key in keys]]
        rows.append((values - chance) / scale)
    return np.array(rows)


def _compare(recipe: list[np.ndarray], baseline: list[np.ndarray], *, items_scored: int, resamples: int) -> Comparison:
    """Two-level bootstrap of the difference and the sign-flip test on the per-item differences of the
    seed means (weighted as the headline weighs tasks). No item differing and no seed variance on 0/1
    scores: the exact binomial bound instead of a zero-width interval."""
    result = stats.two_level_bootstrap(recipe, baseline, resamples=resamples)
    tasks = len(recipe)
    weighted = np.concatenate([(r.mean(axis=0) - b.mean(axis=0)) / (tasks * r.shape[1])
                               for r, b in zip(recipe, baseline, strict=True)])
    p_value = stats.sign_flip_test(weighted, resamples=resamples)
    low, high, method = result.low, result.high, "two-level bootstrap"
    binary = all(np.isin(grid, (0.0, 1.0)).all() for grid in recipe + baseline)
    if low == high == result.delta == 0.0 and binary and tasks == 1:
        low, high = stats.no_flip_interval(recipe[0].shape[1])
        method = "no item differs: exact binomial bound"
    stderr = math.sqrt(result.variance)
    if method != "two-level bootstrap":
        stderr = (high - low) / (2 * 1.959964)
    base_mean = float(np.mean([b.mean() for b in baseline]))
    per_seed = np.mean([r.mean(axis=1) for r in recipe], axis=0) - base_mean
    return Comparison(result.delta, low, high, stderr, p_value, stats.minimum_detectable_effect(stderr),
                      result.n, items_scored, method, result.seed_variance, result.item_variance,
                      per_seed=[float(x) for x in per_seed])


def _normal_compare(recipe: list[tuple[float, float]], baseline: list[tuple[float, float]]) -> Comparison:
    """A section with only per-run values and standard errors (AlpacaEval's LC win rate, a model-level
    fit): difference of seed means, SE from the between-seed spread and the runs' own SEs."""
    from statistics import NormalDist

    def side(values: list[tuple[float, float]]) -> tuple[float, float]:
        means = np.array([v for v, _ in values])
        within = float(np.mean([se**2 for _, se in values])) / len(values)
        between = float(means.var(ddof=1)) / len(values) if len(values) > 1 else 0.0
        return float(means.mean()), within + between

    (mean_r, var_r), (mean_b, var_b) = side(recipe), side(baseline)
    delta, stderr = mean_r - mean_b, math.sqrt(var_r + var_b)
    low, high = stats.normal_interval(delta, stderr)
    p_value = 1.0 if stderr == 0 else 2.0 * (1.0 - NormalDist().cdf(abs(delta) / stderr))
    return Comparison(delta, low, high, stderr, p_value, stats.minimum_detectable_effect(stderr), 0, 0,
                      "normal approx. (no per-item values)")


def summarise(runs: list[Any], suite: str, labels: dict[str, str], options: VerdictOptions | None = None,
              **overrides: Any) -> GroupSummary:
    """Verdicts for the runs of one comparable group (same model, suite, stack). `labels`: run id ->
    variant label (runs sharing a label are seeds of one variant)."""
    options = VerdictOptions(**{**vars(options or VerdictOptions()), **overrides})
    baseline, correction, alpha = options.baseline, options.correction, options.alpha
    margin, min_seeds, resamples = options.margin, options.min_seeds, options.resamples
    by_variant: dict[str, list[Any]] = {}
    for run in sorted(runs, key=lambda r: (labels[r.run_id], r.seed if r.seed is not None else -1, r.run_id)):
        by_variant.setdefault(labels[run.run_id], []).append(run)
    specs = task_specs(suite, runs)
    notes: list[str] = []
    settings = {"baseline": baseline, "correction": correction, "alpha": alpha, "margin": margin,
                "min_seeds": min_seeds, "resamples": resamples}
    base_runs = by_variant.get(baseline)
    variants, references = [], []
    for label, members in by_variant.items():
        summary = VariantSummary(label, [run.seed for run in members], None, None)
        summary.cost = {key: _mean_cost(members, key) for key in ("flops", "training_device_hours", "judge_cost_usd")}
        headline_per_seed = _headline_per_run(members, specs)
        if headline_per_seed is not None:
            summary.headline_mean = float(np.mean(headline_per_seed))
            summary.headline_seed_sd = float(np.std(headline_per_seed, ddof=1)) if len(members) > 1 else None
        if label in REFERENCE_ROWS or label == baseline:
            (references if label in REFERENCE_ROWS else variants).append(summary)
            continue
        variants.append(summary)
        if base_runs is None:
            continue
        summary.conditional = min(len(members), len(base_runs)) < min_seeds
        recipe_grids, base_grids, scored, complete = [], [], 0, True
        for spec in specs:
            scale = (1.0 - spec.chance) if spec.higher_is_better else -1.0
            paired = _items(members + base_runs, spec.task, spec.metric)
            if paired is None:
                complete = False  # a task without per-item results: no headline test
                continue
            keys, most = paired
            scored = max(scored, most)
            recipe_grids.append(_grid(members, spec.task, spec.metric, keys, scale, spec.chance))
            base_grids.append(_grid(base_runs, spec.task, spec.metric, keys, scale, spec.chance))
            raw_r = _grid(members, spec.task, spec.metric, keys, 1.0, 0.0)
            raw_b = _grid(base_runs, spec.task, spec.metric, keys, 1.0, 0.0)
            summary.tasks[spec.task] = _compare([raw_r], [raw_b], items_scored=most, resamples=resamples)
        if recipe_grids and complete:
            summary.headline = _compare(recipe_grids, base_grids, items_scored=scored, resamples=resamples)
        for section, (metric, _) in SIDE_METRICS.items():
            paired = _items(members + base_runs, section, metric)
            if paired is not None:
                keys, most = paired
                summary.tasks[section] = _compare([_grid(members, section, metric, keys, 1.0, 0.0)],
                                                  [_grid(base_runs, section, metric, keys, 1.0, 0.0)],
                                                  items_scored=most, resamples=resamples)
        lc = [[run.metrics.get((LC_SECTION, LC_METRIC)) for run in side] for side in (members, base_runs)]
        if all(cell is not None and cell[1] is not None for side in lc for cell in side):
            summary.lc = _normal_compare([(v, se) for v, se, _ in lc[0]], [(v, se) for v, se, _ in lc[1]])
    if base_runs is None:
        notes.append(f"no {baseline} run in this group: no differences or verdicts")
    else:
        base_flops = _mean_cost(base_runs, "flops")
        for summary in variants + references:
            flops = summary.cost.get("flops")
            summary.compute_ratio = flops / base_flops if flops is not None and base_flops else None
    _adjust_and_decide(variants, specs, correction=correction, alpha=alpha, margin=margin)
    return GroupSummary(baseline, specs, variants, references, settings, notes)


def _mean_cost(runs: list[Any], key: str) -> float | None:
    values = [run.cost.get(key) for run in runs]
    return None if any(value is None for value in values) else float(np.mean(values))


def _headline_per_run(runs: list[Any], specs: list[TaskSpec]) -> list[float] | None:
    values = []
    for run in runs:
        cells = [run.metrics.get((spec.task, spec.metric)) for spec in specs]
        if not specs or any(cell is None for cell in cells):
            return None
        values.append(float(np.mean([(cell[0] - spec.chance) / (1.0 - spec.chance)
                                     for cell, spec in zip(cells, specs, strict=True)])))
    return values


def _adjust_and_decide(variants: list[VariantSummary], specs: list[TaskSpec], *, correction: str, alpha: float,
                       margin: float) -> None:
    """Holm (or the chosen correction) over the main family, Benjamini-Hochberg over the per-benchmark
    cells (unless the correction is none), then each cell's verdict."""
    main = [c for v in variants for c in (v.headline, v.lc) if c is not None]
    for comparison, adjusted in zip(main, stats.adjust([c.p_value for c in main], correction), strict=True):
        comparison.adjusted_p = adjusted
    cells = [(v, task, c) for v in variants for task, c in v.tasks.items()]
    cell_method = "none" if correction == "none" else "bh"
    for (_, _, comparison), adjusted in zip(cells, stats.adjust([c.p_value for _, _, c in cells], cell_method), strict=True):
        comparison.adjusted_p = adjusted
    lower_is_better = {section for section, (_, higher) in SIDE_METRICS.items() if not higher}
    lower_is_better |= {spec.task for spec in specs if not spec.higher_is_better}
    for variant in variants:
        for comparison, scale in ((variant.headline, 1.0), (variant.lc, 100.0)):  # LC win rates are in percent
            if comparison is not None:
                comparison.verdict = stats.verdict(comparison.low, comparison.high, comparison.adjusted_p,
                                                   margin=margin * scale, alpha=alpha)
        for task, comparison in variant.tasks.items():
            comparison.verdict = stats.verdict(comparison.low, comparison.high, comparison.adjusted_p, margin=margin,
                                               alpha=alpha, higher_is_better=task not in lower_is_better)
