"""Leaderboard plots (matplotlib, object API, no pyplot state): a forest plot of each variant's Δ vs the
baseline per benchmark (95% CI, a dot per seed) and a Pareto plot of the headline Δ against compute.
Output is byte-deterministic: fixed style and font (matplotlib's bundled DejaVu Sans), a fixed SVG hash salt for element ids, and no date or
software-version metadata in the SVG or PNG files."""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless everywhere (CI, containers); we never open windows
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

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


def _legend_columns(entries: int, figure: Figure) -> int:
    """As many legend entries per row as the figure's width holds, rows balanced (no orphan)."""
    per_row = max(2, int(figure.get_figwidth() / 1.3))
    rows = math.ceil(entries / per_row)
    return math.ceil(entries / rows)


HASHED_SVG_ID = re.compile(rb'id="([a-z][0-9a-f]{10})"')


def numbered_svg_ids(svg: bytes) -> bytes:
    """matplotlib names clip paths and markers by a hash of their coordinates at full precision, which
    differ in the last bits between CPUs (AVX2 and AVX-512 lay the axes out with different rounding) even
    where the drawing is the same: number them in order of appearance instead, so the committed SVGs are
    the same on every machine."""
    names = {found: f"{found[:1].decode()}{number}".encode() for number, found in enumerate(
        dict.fromkeys(match.group(1) for match in HASHED_SVG_ID.finditer(svg)))}
    if not names:
        return svg
    return re.sub(b"|".join(re.escape(name) for name in names), lambda match: names[match.group(0)], svg)


def to_png_svg(figure: Figure) -> tuple[bytes, bytes]:
    """PNG and SVG bytes of a figure, without dates, version strings or coordinate-hashed ids (the same
    bytes on every machine)."""
    with _style():
        png, svg = io.BytesIO(), io.BytesIO()
        figure.savefig(png, format="png", dpi=DPI, metadata={"Software": None})
        figure.savefig(svg, format="svg", metadata={"Date": None, "Creator": None})
    return png.getvalue(), numbered_svg_ids(svg.getvalue())


def forest(group: Group, colors: dict[str, tuple[str, str]]) -> Figure:
    """Δ vs the baseline with its 95% CI per benchmark (rows) and recipe variant (one line each), a dot per
    training seed. Two panels, never one scale for both: the chance-normalised headline, and each task's
    primary metric in points. The shaded band is the equivalence margin."""
    summary = group.summary
    compared = [v for v in sorted(summary.variants, key=lambda v: v.label) if v.label != summary.baseline]
    tasks = [spec.task for spec in summary.tasks]
    margin = 100 * summary.settings["margin"]
    with _style():
        per_block = max(1, len(compared)) + 1
        figure = Figure(figsize=(8.0, 1.8 + 0.22 * per_block * (len(tasks) + 1)), dpi=DPI, layout="constrained")
        headline_ax, task_ax = figure.subplots(2, 1, height_ratios=[per_block, per_block * max(1, len(tasks))])
        panels = ((headline_ax, ["headline"], "headline Δ (normalised points)"),
                  (task_ax, tasks, "Δ on the primary metric (points)"))
        handles: dict[str, Line2D] = {}
        for ax, rows, label in panels:
            ax.axvspan(-margin, margin, color="#dddddd", alpha=0.5, linewidth=0)
            ax.axvline(0.0, color="#000000", linewidth=0.8)
            ticks = []
            for row_index, row in enumerate(rows):
                for variant_index, variant in enumerate(compared):
                    comparison = variant.headline if row == "headline" else variant.tasks.get(row)
                    if comparison is None:
                        continue
                    y = -(row_index * (len(compared) + 1) + variant_index)
                    color, marker = colors.get(variant.label, ("#555555", "o"))
                    ax.errorbar([100 * comparison.delta], [y], xerr=[[100 * (comparison.delta - comparison.low)],
                                                                     [100 * (comparison.high - comparison.delta)]],
                                fmt=marker, color=color, markersize=5, capsize=2, elinewidth=1.2)
                    ax.scatter([100 * d for d in comparison.per_seed], [y] * len(comparison.per_seed), s=9,
                               color=color, alpha=0.5, linewidths=0)
                    handles.setdefault(variant.label, Line2D([], [], color=color, marker=marker, linestyle="none"))
                ticks.append((-(row_index * (len(compared) + 1) + (len(compared) - 1) / 2), row.removeprefix("local_")))
            ax.set_yticks([t for t, _ in ticks], [name for _, name in ticks])
            ax.set_xlabel(label)
            ax.grid(axis="y", visible=False)
        if not compared:
            task_ax.text(0.5, 0.5, f"no variant to compare with {summary.baseline}", ha="center", va="center",
                         transform=task_ax.transAxes)
        figure.suptitle(f"{group.title}: Δ vs {summary.baseline} ({stats.CONFIDENCE:.0%} CI; dots: seeds; "
                        f"band: ±{margin:g} equivalence margin)")
        if handles:
            figure.legend(list(handles.values()), list(handles), loc="outside lower center",
                          ncols=_legend_columns(len(handles), figure), frameon=False)
        return figure


def pareto(group: Group, colors: dict[str, tuple[str, str]]) -> Figure:
    """Headline Δ (95% CI) against compute relative to the baseline (log axis), with the frontier: the
    variants no other beats on both (more Δ for no more compute)."""
    summary = group.summary
    points = [(v.compute_ratio, v.headline.delta if v.headline else 0.0, v) for v in summary.variants
              if v.compute_ratio is not None and (v.headline is not None or v.label == summary.baseline)]
    with _style():
        figure = Figure(figsize=(6.4, 4.4), dpi=DPI, layout="constrained")
        ax = figure.subplots()
        ax.axhline(0.0, color="#000000", linewidth=0.8)
        for ratio, delta, variant in points:
            color, marker = colors.get(variant.label, ("#555555", "o"))
            comparison = variant.headline
            error = None if comparison is None else [[100 * (delta - comparison.low)], [100 * (comparison.high - delta)]]
            ax.errorbar([ratio], [100 * delta], yerr=error, fmt=marker, color=color, markersize=6, capsize=3,
                        label=variant.label)
        frontier, best = [], -math.inf
        for ratio, delta, _ in sorted(points, key=lambda p: (p[0], -p[1])):
            if delta > best:
                frontier.append((ratio, 100 * delta))
                best = delta
        if len(frontier) > 1:
            ax.plot(*zip(*frontier, strict=True), color="#888888", linewidth=1.0, linestyle="--", drawstyle="steps-post",
                    label="frontier")
        if points:
            ax.set_xscale("log")
        else:
            ax.text(0.5, 0.5, "no compute (FLOPs) in the records", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(f"compute: FLOPs of training and scoring × {summary.baseline}'s (log)")
        ax.set_ylabel("headline Δ (normalised points, 95% CI)")
        ax.set_title(f"{group.title}: quality against compute")
        if points:
            figure.legend(loc="outside lower center", ncols=_legend_columns(len(points) + 1, figure), frameon=False)
        return figure
