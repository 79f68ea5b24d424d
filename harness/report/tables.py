"""The summary table a researcher reads first: one row per recipe variant with its headline difference
from the baseline, CI, adjusted p-value, verdict and minimum detectable effect; rendered for the
terminal (rich), Markdown, HTML and JSON (stable keys, documented in SUMMARY_KEYS)."""

from __future__ import annotations

import html
from typing import Any

from harness.report.summary import Comparison, GroupSummary, VariantSummary

HEADERS = ("recipe", "seeds", "headline ± seed SD", "Δ headline [95% CI]", "adj. p", "verdict", "MDE",
           "AlpacaEval LC Δ", "held-out NLL Δ", "compute × baseline", "train device-h", "judge $")

SUMMARY_KEYS = (
    "summary.baseline: the variant every other is compared with; summary.settings: correction, alpha, margin, "
    "min_seeds, resamples; summary.tasks: [task, metric, chance] the headline averages; summary.variants[] and "
    "summary.references[]: label, seeds, conditional (fewer than min_seeds seeds on a side), headline_mean and "
    "headline_seed_sd (normalised score, over seeds), and for the comparisons headline, alpaca_eval_lc and "
    "tasks.<task>: delta, ci_low, ci_high, stderr, p_value, adjusted_p, mde, verdict, method, items (paired), "
    "items_scored, seed_variance, item_variance; cost (flops, training_device_hours, judge_cost_usd: means over "
    "seeds) and compute_ratio (FLOPs relative to the baseline). Headline units: chance-normalised points (0-1); task units: the "
    "metric's own; LC: percentage points."
)


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def verdict_text(comparison: Comparison, scale: float = 100.0) -> str:
    if comparison.verdict == "inconclusive":
        return f"inconclusive: underpowered (MDE {scale * comparison.mde:.1f})"
    return comparison.verdict


def comparison_text(comparison: Comparison | None, scale: float = 100.0, digits: int = 1) -> str:
    """Δ [95% CI]; `digits` after the point (held-out NLL differences are hundredths of a nat)."""
    if comparison is None:
        return "–"
    d = digits
    return (f"{scale * comparison.delta:+.{d}f} [{scale * comparison.low:+.{d}f}, {scale * comparison.high:+.{d}f}]"
            + (" (paired on fewer items than scored)" if comparison.items_scored > comparison.items > 0 else ""))


def _seeds_text(variant: VariantSummary, summary: GroupSummary) -> str:
    count = len(variant.seeds)
    if variant in summary.references:
        return f"{count} (untrained)"
    return f"{count}" + (" (conditional on one checkpoint)" if count == 1 else
                         f" (< {summary.settings['min_seeds']}: conditional)" if count < summary.settings["min_seeds"] else "")


def rows(summary: GroupSummary) -> list[list[str]]:
    """The summary table's cells: the baseline first, then the variants, then the references (base)."""
    # the baseline, the recipes, their random controls, then the references (base)
    ordered = sorted(summary.variants, key=lambda v: (v.label != summary.baseline, "control=" in v.label, v.label))
    ordered += summary.references
    table = []
    for variant in ordered:
        headline = "–" if variant.headline_mean is None else f"{100 * variant.headline_mean:.1f}" + (
            f" ± {100 * variant.headline_seed_sd:.1f}" if variant.headline_seed_sd is not None else "")
        comparison = variant.headline
        nll = variant.tasks.get("heldout_nll")
        if variant.label == summary.baseline:
            cells = ["baseline", "", "", "", "", ""]
        elif variant in summary.references:
            cells = ["reference (not compared)", "", "", "", "", ""]
        elif comparison is None:
            cells = ["no per-item results", "", "", "", comparison_text(variant.lc, 1.0), comparison_text(nll, 1.0, digits=3)]
        else:
            cells = [comparison_text(comparison), f"{comparison.adjusted_p:.3g}",
                     verdict_text(comparison), f"{100 * comparison.mde:.1f}",
                     comparison_text(variant.lc, 1.0), comparison_text(nll, 1.0, digits=3)]
        cost = variant.cost
        costs = ["–" if variant.compute_ratio is None else f"{variant.compute_ratio:.2f}",
                 "–" if cost.get("training_device_hours") is None else f"{cost['training_device_hours']:.3f}",
                 "–" if cost.get("judge_cost_usd") is None else f"{cost['judge_cost_usd']:.2f}"]
        table.append([variant.label, _seeds_text(variant, summary), headline, *cells, *costs])
    return table


def caption(summary: GroupSummary) -> str:
    settings = summary.settings
    tasks = ", ".join(f"{spec.task} {spec.metric} (chance {spec.chance:g})" for spec in summary.tasks)
    return (f"Headline: mean over tasks of (primary - chance) / (1 - chance), in points: {tasks}. Δ vs "
            f"{summary.baseline} from a two-level bootstrap (items drawn once per task for all runs, seeds drawn "
            f"within each variant; {settings['resamples']:,} resamples); p: paired sign-flip test, {settings['correction']}-"
            f"adjusted over variants × {{headline, AlpacaEval LC}}; verdict at alpha {settings['alpha']:g} with an "
            f"equivalence margin of ±{100 * settings['margin']:g} points; MDE: the difference detectable with 80% "
            "power at this size. Held-out NLL: nats per token, lower is better (a proxy). Compute: estimated FLOPs of "
            "training and scoring (6N per trained token, 2N per scored token; evaluation excluded) relative to the "
            "baseline's; device-hours without evaluation. "
            + " ".join(summary.notes))


def render_rich(summary: GroupSummary, title: str) -> Any:
    from rich.table import Table

    table = Table(title=f"{title}: verdicts", show_lines=False)
    for header in HEADERS:
        table.add_column(header, justify="left" if header in ("recipe", "verdict") else "right")
    for row in rows(summary):
        table.add_row(*row)
    table.caption = caption(summary)
    return table


def render_markdown(summary: GroupSummary) -> list[str]:
    lines = ["| " + " | ".join(HEADERS) + " |", "|---|" + "---:|" * 4 + "---|" + "---:|" * 6]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows(summary)]
    return [*lines, "", f"*{caption(summary)}*", ""]


VERDICT_CLASS = {"better": "better", "worse": "worse", "equivalent": "equivalent"}


def render_html(summary: GroupSummary) -> list[str]:
    esc = html.escape
    parts = ['<table class="summary"><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in HEADERS) + "</tr></thead><tbody>"]
    for row in rows(summary):
        verdict = row[5].split(":")[0]
        css = VERDICT_CLASS.get(verdict, "")
        cells = [f"<td>{esc(row[0])}</td>"] + [
            f'<td class="num{(" " + css) if index == 5 and css else ""}">{esc(cell)}</td>' for index, cell in enumerate(row[1:], 1)
        ]
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts += ["</tbody></table>", f'<p class="note">{esc(caption(summary))}</p>']
    return parts


def _comparison_json(comparison: Comparison | None) -> dict[str, Any] | None:
    if comparison is None:
        return None
    return {"delta": comparison.delta, "ci_low": comparison.low, "ci_high": comparison.high,
            "stderr": comparison.stderr, "p_value": comparison.p_value, "adjusted_p": comparison.adjusted_p,
            "mde": comparison.mde, "verdict": comparison.verdict, "method": comparison.method,
            "items": comparison.items, "items_scored": comparison.items_scored,
            "seed_variance": comparison.seed_variance, "item_variance": comparison.item_variance}


def _variant_json(variant: VariantSummary) -> dict[str, Any]:
    return {"label": variant.label, "seeds": variant.seeds, "conditional": variant.conditional,
            "headline_mean": variant.headline_mean, "headline_seed_sd": variant.headline_seed_sd,
            "headline": _comparison_json(variant.headline), "alpaca_eval_lc": _comparison_json(variant.lc),
            "tasks": {task: _comparison_json(c) for task, c in sorted(variant.tasks.items())},
            "cost": variant.cost, "compute_ratio": variant.compute_ratio}


def render_json(summary: GroupSummary) -> dict[str, Any]:
    return {"baseline": summary.baseline, "settings": summary.settings,
            "tasks": [[spec.task, spec.metric, spec.chance] for spec in summary.tasks],
            "variants": [_variant_json(v) for v in sorted(summary.variants, key=lambda v: v.label)],
            "references": [_variant_json(v) for v in summary.references], "notes": summary.notes}


def benchmark_rows(summary: GroupSummary) -> tuple[list[str], list[list[tuple[str, str]]]]:
    """Per-benchmark Δ vs the baseline on each task's primary metric (and the side metrics): headers and,
    per variant, (cell text, verdict) pairs. Accuracy-like metrics in points; NLL in nats."""
    compared = [v for v in sorted(summary.variants, key=lambda v: v.label) if v.label != summary.baseline and v.tasks]
    tasks = [spec.task for spec in summary.tasks] + sorted({t for v in compared for t in v.tasks} - {s.task for s in summary.tasks})
    metric = {spec.task: spec.metric for spec in summary.tasks}
    headers = ["recipe"] + [f"{task.removeprefix('local_')} {metric.get(task, 'nll')}" for task in tasks]
    table = []
    for variant in compared:
        row = [(variant.label, "")]
        for task in tasks:
            comparison = variant.tasks.get(task)
            scale = 100.0 if task in metric else 1.0
            row.append(("–", "") if comparison is None else (
                comparison_text(comparison, scale, 1 if task in metric else 3) + f" p={comparison.adjusted_p:.2g}",
                comparison.verdict))
        table.append(row)
    return headers, table


def render_benchmarks_markdown(summary: GroupSummary) -> list[str]:
    headers, table = benchmark_rows(summary)
    if not table:
        return []
    lines = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    for row in table:
        lines.append("| " + " | ".join(f"**{text}**" if verdict in VERDICT_CLASS else text for text, verdict in row) + " |")
    return [*lines, "", "*Δ vs the baseline per benchmark [95% CI], p Benjamini-Hochberg-adjusted over all cells; "
            "bold: better, worse or equivalent (the rest inconclusive).*", ""]


def render_benchmarks_html(summary: GroupSummary) -> list[str]:
    esc = html.escape
    headers, table = benchmark_rows(summary)
    if not table:
        return []
    parts = ['<table class="summary benchmarks"><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in headers)
             + "</tr></thead><tbody>"]
    for row in table:
        cells = [f"<td>{esc(row[0][0])}</td>"]
        for text, verdict in row[1:]:
            delta, _, rest = text.partition(" ")  # "+0.9 [-0.2, +2.1] p=1": the Δ, then its CI and p below it
            cells.append(f'<td class="num {VERDICT_CLASS.get(verdict, "")}" title="{esc(verdict)}">{esc(delta)}'
                         f'<span class="delta">{esc(rest)}</span></td>')
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts += ["</tbody></table>", '<p class="note">Δ vs the baseline per benchmark on its primary metric (points; '
              "held-out NLL in nats) [95% CI], p Benjamini-Hochberg-adjusted over all cells; green better, red worse, "
              "blue equivalent, white inconclusive.</p>"]
    return parts
