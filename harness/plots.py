"""Leaderboard plots (matplotlib, object API, no pyplot state): quality against training tokens, and
per-benchmark bars, each with 95% confidence intervals. Output is byte-deterministic: fixed style and
font (matplotlib's bundled DejaVu Sans), a fixed SVG hash salt for element ids, and no date or
software-version metadata in the SVG or PNG files."""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless everywhere (CI, containers); we never open windows
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from harness import stats  # noqa: E402

if TYPE_CHECKING:
    from harness.leaderboard import Group

# Okabe & Ito's colour-blind-safe palette (https://jfly.uni-koeln.de/color/), one-off in black.
PALETTE = ["#000000", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#F0E442", "#999999"]
MARKERS = ["o", "s", "D", "^", "v", "P", "X", "<", ">"]
STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "svg.hashsalt": "sft-recipe-harness",
    "svg.fonttype": "path",
    "path.simplify": False,
}
DPI = 110


@contextlib.contextmanager
def _style() -> Iterator[None]:
    with matplotlib.rc_context(STYLE):
        yield


def recipe_colors(recipes: list[str]) -> dict[str, tuple[str, str]]:
    """(colour, marker) per recipe, one-off first, the same across every plot of a leaderboard."""
    ordered = sorted(recipes, key=lambda name: (name != "one-off", name))
    return {name: (PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)]) for i, name in enumerate(ordered)}


def _errors(value: float, low: float | None, high: float | None) -> tuple[float, float] | None:
    if low is None or high is None:
        return None
    return max(0.0, value - low), max(0.0, high - value)


def _legend_columns(entries: int, figure: Figure) -> int:
    """As many legend entries per row as the figure's width holds, rows balanced (no orphan)."""
    per_row = max(2, int(figure.get_figwidth() / 1.3))
    rows = math.ceil(entries / per_row)
    return math.ceil(entries / rows)


def _tokens(value: float, _position: float | None = None) -> str:
    """20k, 1.5M: readable token counts on an axis (instead of an offset like 1e4)."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def quality_vs_tokens(group: Group, colors: dict[str, tuple[str, str]]) -> Figure:
    """One panel per metric: score (95% CI) against the run's total training tokens (own + overhead);
    the dashed line is one-off's score."""
    with _style():
        count = max(1, len(group.columns))
        ncols = min(count, 3)
        nrows = math.ceil(count / ncols)
        figure = Figure(figsize=(4.4 * ncols, 3.3 * nrows + 0.7), dpi=DPI, layout="constrained")
        axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
        for ax in axes[count:]:
            ax.set_visible(False)
        handles: dict[str, Line2D] = {}
        for ax, column in zip(axes, group.columns, strict=False):
            xs = []
            baseline = next((r for r in group.runs if r.recipe == "one-off" and (r.run_id, column) in group.cells), None)
            if baseline is not None:
                ax.axhline(group.cells[(baseline.run_id, column)].value, color=colors[baseline.variant][0],
                           linewidth=0.8, linestyle="--", alpha=0.6)
            for run in group.runs:
                cell = group.cells.get((run.run_id, column))
                if cell is None or run.total_tokens is None:
                    continue
                color, marker = colors[run.variant]
                error = _errors(cell.value, cell.low, cell.high)
                ax.errorbar([run.total_tokens], [cell.value], yerr=None if error is None else [[error[0]], [error[1]]],
                            fmt=marker, color=color, markersize=6, capsize=3, elinewidth=1.2)
                handles.setdefault(group.labels[run.run_id],
                                   Line2D([], [], color=color, marker=marker, linestyle="none", markersize=6))
                xs.append(run.total_tokens)
            ax.margins(x=0.1)
            if xs and max(xs) > 0 and min(xs) > 0 and max(xs) / min(xs) > 5:
                ax.set_xscale("log")
            if not xs:
                ax.text(0.5, 0.5, "no token counts in the records", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
            ax.set_title(column.title + ("" if column.higher_is_better else " (lower is better)"))
            ax.set_xlabel("training tokens (own + overhead)")
            ax.set_ylabel(f"{column.metric} ({stats.CONFIDENCE:.0%} CI)")
            ax.xaxis.set_major_formatter(FuncFormatter(_tokens))
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda _v, _p: ""))
        figure.suptitle(f"{group.title}: quality vs training tokens")
        if handles and any(r.recipe == "one-off" for r in group.runs):
            handles["one-off level"] = Line2D([], [], color=colors["one-off"][0], linewidth=0.8, linestyle="--",
                                              alpha=0.6)
        if handles:
            figure.legend(list(handles.values()), list(handles), loc="outside lower center",
                          ncols=_legend_columns(len(handles), figure), frameon=False)
        return figure


def benchmark_bars(group: Group, colors: dict[str, tuple[str, str]]) -> Figure:
    """Grouped bars: one group per metric, one bar per run, 95% CI error bars."""
    with _style():
        runs = group.runs
        count = max(1, len(group.columns))
        width = 0.8 / max(1, len(runs))
        figure = Figure(figsize=(max(5.5, 1.5 + count * max(1.2, 0.45 * len(runs))), 4.2), dpi=DPI,
                        layout="constrained")
        ax = figure.subplots()
        for index, run in enumerate(runs):
            color, _ = colors[run.variant]
            xs, heights, lower, upper = [], [], [], []
            for position, column in enumerate(group.columns):
                cell = group.cells.get((run.run_id, column))
                if cell is None:
                    continue
                error = _errors(cell.value, cell.low, cell.high) or (0.0, 0.0)
                xs.append(position - 0.4 + width * (index + 0.5))
                heights.append(cell.value)
                lower.append(error[0])
                upper.append(error[1])
            ax.bar(xs, heights, width=width * 0.92, color=to_rgba(color, 0.55), edgecolor=color,
                   linewidth=1.2, label=group.labels[run.run_id], yerr=[lower, upper], capsize=3,
                   error_kw={"elinewidth": 1.0, "ecolor": "#222222"})
        ax.set_xticks(range(len(group.columns)),
                      [c.title.replace(" ", "\n", 1) for c in group.columns])
        ax.set_ylabel(f"score ({stats.CONFIDENCE:.0%} CI)")
        ax.grid(axis="x", visible=False)
        ax.set_title(f"{group.title}: per-benchmark scores")
        figure.legend(loc="outside lower center", ncols=_legend_columns(len(runs), figure), frameon=False)
        return figure


def to_png_svg(figure: Figure) -> tuple[bytes, bytes]:
    """PNG and SVG bytes of a figure, without dates or version strings (deterministic output)."""
    with _style():
        png, svg = io.BytesIO(), io.BytesIO()
        figure.savefig(png, format="png", dpi=DPI, metadata={"Software": None})
        figure.savefig(svg, format="svg", metadata={"Date": None, "Creator": None})
    return png.getvalue(), svg.getvalue()
