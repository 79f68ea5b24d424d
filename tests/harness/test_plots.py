"""Leaderboard plots: what they draw (the forest plot's Δ, CI and a dot per seed on two separate scales;
the Pareto plot's points and frontier) and byte-deterministic PNG/SVG without dates or version strings."""

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import LineCollection, PathCollection

from harness import leaderboard as board
from harness import plots
from tests.harness.report.test_summary import binary
from tests.harness.report.test_summary import write_run as write_seeded_run


@pytest.fixture
def group(tmp_path: Path) -> board.Group:
    rng = np.random.default_rng(4)
    difficulty = rng.uniform(0.2, 0.7, 80)
    for seed in range(3):
        write_seeded_run(tmp_path, f"one-off-{seed}", "one-off", seed, binary(rng, difficulty, 80))
        write_seeded_run(tmp_path, f"ifd-{seed}", "ifd", seed, binary(rng, difficulty + 0.2, 80))
    for path in tmp_path.glob("*/record.json"):  # compute: ifd spends twice one-off's FLOPs
        record = json.loads(path.read_text())
        record["cost"]["flops"] = 2e12 if "ifd" in path.parent.name else 1e12
        path.write_text(json.dumps(record))
    (only,) = board.build_groups(board.load_runs([tmp_path], print))
    return only


def test_forest_has_two_scales_a_ci_per_variant_and_a_dot_per_seed(group):
    figure = plots.forest(group, plots.recipe_colors(["one-off", "ifd"]))
    headline_ax, task_ax = figure.axes[:2]
    assert "normalised" in headline_ax.get_xlabel() and "points" in task_ax.get_xlabel()
    ifd = next(v for v in group.summary.variants if v.label == "ifd")
    segments = [segment for collection in headline_ax.collections if isinstance(collection, LineCollection)
                for segment in collection.get_segments()]
    expected = [100 * ifd.headline.low, 100 * ifd.headline.high]
    assert any(np.allclose(segment[:, 0], expected) for segment in segments)
    dots = [collection for collection in task_ax.collections if isinstance(collection, PathCollection)]
    assert len(dots[0].get_offsets()) == 3  # one per seed
    assert sorted(dots[0].get_offsets()[:, 0]) == pytest.approx(sorted(100 * d for d in ifd.tasks["local_arc_easy"].per_seed))


def test_pareto_places_variants_at_their_compute_ratio(group):
    figure = plots.pareto(group, plots.recipe_colors(["one-off", "ifd"]))
    (ax,) = figure.axes
    assert ax.get_xscale() == "log"
    points = sorted((float(c.lines[0].get_xdata()[0]), float(c.lines[0].get_ydata()[0])) for c in ax.containers)
    ifd = next(v for v in group.summary.variants if v.label == "ifd")
    assert points == [(1.0, 0.0), (2.0, pytest.approx(100 * ifd.headline.delta))]


def test_png_and_svg_are_deterministic_and_carry_no_dates_or_versions(group):
    colors = plots.recipe_colors(["one-off", "ifd"])
    first = plots.to_png_svg(plots.forest(group, colors))
    second = plots.to_png_svg(plots.forest(group, colors))
    assert first == second
    png, svg = first
    assert png.startswith(b"\x89PNG") and b"Software" not in png and b"Matplotlib" not in png
    assert svg.lstrip().startswith(b"<?xml") and b"<dc:date>" not in svg and b"Matplotlib v" not in svg


def test_svg_ids_hashed_from_coordinates_are_numbered_in_order():
    """The same drawing laid out with different last-bit rounding (another CPU) gives the same SVG bytes."""
    from harness.plots import numbered_svg_ids

    def drawing(clip: str, marker: str) -> bytes:
        return (f'<defs><path id="{marker}" d="M 0 0"/></defs><use xlink:href="#{marker}"/>'
                f'<g clip-path="url(#{clip})"/><clipPath id="{clip}"><rect/></clipPath>').encode()

    here, there = drawing("p016d2e44a1", "m8c3f00aa12"), drawing("p6b642193e6", "m0d9e1b2c3f")
    assert here != there and numbered_svg_ids(here) == numbered_svg_ids(there)
    assert numbered_svg_ids(here) == drawing("p1", "m0")
