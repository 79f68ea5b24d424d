"""Leaderboard plots: what they draw (one point or bar per run and metric, CI error bars, shared colours)
and byte-deterministic PNG/SVG without dates or version strings."""

from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import LineCollection
from matplotlib.patches import Rectangle

from harness import leaderboard as board
from harness import plots
from tests.harness.test_leaderboard import binary_scores, write_run


@pytest.fixture
def group(tmp_path: Path) -> board.Group:
    results = tmp_path / "results"
    write_run(results, "one-off-a", "one-off", {"arc": binary_scores(60, 0.4, 1), "hs": binary_scores(40, 0.3, 2)})
    write_run(results, "ifd-b", "ifd", {"arc": binary_scores(60, 0.6, 3), "hs": binary_scores(40, 0.3, 4)},
              cost={"train_tokens": 2_000, "scoring_tokens": 500_000})
    write_run(results, "phased-c", "phased", {"arc": binary_scores(60, 0.5, 5)})  # no hs
    (only,) = board.build_groups(board.load_runs([results], print))
    return only


def test_quality_vs_tokens_has_a_panel_per_metric_and_a_point_per_run(group):
    colors = plots.recipe_colors(["phased", "ifd", "one-off"])
    assert colors["one-off"][0] == "#000000"
    figure = plots.quality_vs_tokens(group, colors)
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["arc acc", "hs acc"]
    arc = panels[0]
    points = sorted((float(container.lines[0].get_xdata()[0]), float(container.lines[0].get_ydata()[0]))
                    for container in arc.containers)
    assert points == [(20_000, pytest.approx(group.cells[("one-off-a", board.Column("arc", "acc"))].value)),
                      (20_000, pytest.approx(group.cells[("phased-c", board.Column("arc", "acc"))].value)),
                      (502_000, pytest.approx(group.cells[("ifd-b", board.Column("arc", "acc"))].value))]
    assert arc.get_xscale() == "log"  # 25x range of tokens
    # error bars span the cells' 95% CIs
    cell = group.cells[("ifd-b", board.Column("arc", "acc"))]
    spans = [segment for collection in arc.collections if isinstance(collection, LineCollection)
             for segment in collection.get_segments()]
    assert any(np.allclose(segment, [[502_000, cell.low], [502_000, cell.high]]) for segment in spans)
    assert len(panels[1].containers) == 2  # phased has no hs: two runs there


def test_benchmark_bars_have_one_bar_per_run_and_metric(group):
    figure = plots.benchmark_bars(group, plots.recipe_colors(["one-off", "ifd", "phased"]))
    (ax,) = figure.axes
    bars = [patch for patch in ax.patches if isinstance(patch, Rectangle)]
    assert len(bars) == 5  # 3 runs on arc, 2 on hs
    heights = sorted(round(bar.get_height(), 6) for bar in bars)
    assert heights == sorted(round(cell.value, 6) for cell in group.cells.values())


def test_png_and_svg_are_deterministic_and_carry_no_dates_or_versions(group):
    colors = plots.recipe_colors(["one-off", "ifd", "phased"])
    first = plots.to_png_svg(plots.benchmark_bars(group, colors))
    second = plots.to_png_svg(plots.benchmark_bars(group, colors))
    assert first == second
    png, svg = first
    assert png.startswith(b"\x89PNG") and b"Software" not in png and b"Matplotlib" not in png
    assert svg.lstrip().startswith(b"<?xml") and b"<dc:date>" not in svg and b"Matplotlib v" not in svg
