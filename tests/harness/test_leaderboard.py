"""The leaderboard on synthetic run records with known per-example results: deltas, CIs and p-values
against an independent computation, every output format, corrupt input, --write/--check, and the
static page in headless Chromium."""

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from harness import leaderboard as board
from harness import stats
from tests.cli_helpers import run_cli
from tests.records import make_record

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "screenshot_leaderboard.py"


def write_run(root: Path, run_id: str, recipe: str, scores: dict[str, dict[int, float]], *, model: str = "tiny",
              suite: str = "smoke", seed: int = 0, cost: dict | None = None, samples: bool = True,
              versions: dict[str, str] | None = None, variant: str | None = None) -> Path:
    """A run directory as the runner writes it: record.json (metrics from the scores) + eval/samples_*.jsonl."""
    run_dir = root / run_id
    (run_dir / "eval").mkdir(parents=True)
    metrics = {}
    for task, by_doc in scores.items():
        values = np.array(list(by_doc.values()))
        metrics[task] = {"n": len(values), "num_fewshot": 0, "limit": None, "seconds": 1.0,
                         "acc": {"value": float(values.mean()), "stderr": float(scipy.stats.sem(values))}}
        if samples:
            lines = [json.dumps({"doc_id": doc, "doc_hash": f"h{doc}", "acc": value, "note": "text"})
                     for doc, value in by_doc.items()]
            (run_dir / "eval" / f"samples_{task}.jsonl").write_text("\n".join(lines) + "\n")
    record = make_record(run_id=run_id, seed=seed, recipe={"name": recipe}, model={"name": model},
                         suite={"name": suite}, metrics=metrics, cost=cost or {})
    if versions is not None:
        record["versions"] = versions
    if variant is not None:
        record["recipe"]["variant"] = variant
    (run_dir / "record.json").write_text(json.dumps(record, indent=2))
    return run_dir


def binary_scores(n: int, p: float, seed: int, start: int = 0) -> dict[int, float]:
    rng = np.random.default_rng(seed)
    return {start + i: float(v) for i, v in enumerate(rng.uniform(size=n) < p)}


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, dict, dict]:
    """one-off and ifd on task `arc` (ifd is scored on 10 extra items and lists its items in reverse order)
    and on task `hs` (same items)."""
    results = tmp_path / "results"
    base = {"arc": binary_scores(120, 0.45, seed=1), "hs": binary_scores(80, 0.30, seed=2)}
    other = {"arc": binary_scores(130, 0.60, seed=3), "hs": binary_scores(80, 0.32, seed=4)}
    other["arc"] = dict(reversed(list(other["arc"].items())))
    write_run(results, "one-off-tiny-aaaa", "one-off", base)
    write_run(results, "ifd-tiny-bbbb", "ifd", other, cost={
        "train_tokens": 2_000, "scoring_tokens": 30_000, "overhead_train_tokens": 5_000, "wall_seconds": 3_700.0,
        "device_hours": 1.03, "judge_cost_usd": 1.5})
    return results, base, other


def collect(roots: list[Path]) -> tuple[list[board.Group], list[str]]:
    warnings: list[str] = []
    return board.build_groups(board.load_runs(roots, warnings.append)), warnings


def test_deltas_cis_and_p_values_match_an_independent_computation(two_runs):
    results, base, other = two_runs
    (group,), warnings = collect([results])
    assert warnings == []
    assert [run.recipe for run in group.runs] == ["one-off", "ifd"]
    for task in ("arc", "hs"):
        column = board.Column(task, "acc")
        cell = group.cells[("ifd-tiny-bbbb", column)]
        # Independent: pair by doc id by hand, one (B, n) numpy draw with the documented seed.
        docs = sorted(set(base[task]) & set(other[task]))
        a = np.array([base[task][d] for d in docs])
        b = np.array([other[task][d] for d in docs])
        # the leaderboard pairs in the order of the recipe's own file; the mean does not depend on it,
        # the resampled replicates do, so reproduce that order for the exact comparison
        order = [d for d in other[task] if d in base[task]]
        a_ord = np.array([base[task][d] for d in order])
        b_ord = np.array([other[task][d] for d in order])
        diffs = b_ord - a_ord
        idx = np.random.default_rng(stats.SEED).integers(0, len(diffs), size=(stats.RESAMPLES, len(diffs)))
        reps = diffs[idx].mean(axis=1)
        low, high = np.quantile(reps, [0.025, 0.975])
        p_value = (np.sum(np.abs(reps - diffs.mean()) >= abs(diffs.mean()) - 1e-12) + 1) / (stats.RESAMPLES + 1)
        delta = cell.delta
        assert delta is not None and delta.method == "paired bootstrap" and delta.baseline == "one-off-tiny-aaaa"
        assert delta.n == len(docs) == (120 if task == "arc" else 80)
        assert delta.delta == pytest.approx(b.mean() - a.mean(), abs=1e-12)
        assert (delta.low, delta.high, delta.p_value) == pytest.approx((low, high, p_value), abs=1e-12)
        # ... and scipy's percentile bootstrap (another random stream) agrees to Monte Carlo error.
        ci = scipy.stats.bootstrap((a, b), lambda x, y, axis: y.mean(axis=axis) - x.mean(axis=axis), paired=True,
                                   vectorized=True, method="percentile", n_resamples=20_000,
                                   rng=np.random.default_rng(9)).confidence_interval
        # (mean differences of 0/1 scores sit on a grid of 1/n: allow one step besides the MC error)
        tolerance = 0.15 * np.std(b - a, ddof=1) / np.sqrt(len(a)) + 1 / len(a)
        assert delta.low == pytest.approx(ci.low, abs=tolerance)
        assert delta.high == pytest.approx(ci.high, abs=tolerance)
        # The value columns: the record's value and stderr, and a bootstrap CI of the run's own items.
        values = np.array(list(other[task].values()))
        assert cell.value == pytest.approx(values.mean()) and cell.stderr == pytest.approx(scipy.stats.sem(values))
        assert cell.ci_method == "bootstrap" and cell.low < cell.value < cell.high
    arc_delta = group.cells[("ifd-tiny-bbbb", board.Column("arc", "acc"))].delta
    assert arc_delta.p_value < 0.05 < group.cells[("ifd-tiny-bbbb", board.Column("hs", "acc"))].delta.p_value
    assert group.cells[("one-off-tiny-aaaa", board.Column("arc", "acc"))].delta is None
    assert group.cells[("ifd-tiny-bbbb", board.Column("arc", "acc"))].best


def test_markdown_csv_and_json_carry_the_same_figures(two_runs):
    results, _, _ = two_runs
    (group,), _ = collect([results])
    cell = group.cells[("ifd-tiny-bbbb", board.Column("arc", "acc"))]
    markdown = board.render_markdown([group], "results")
    ifd_row = next(line for line in markdown.splitlines() if line.startswith("| ifd |") and "<br>" in line)
    assert f"**{cell.value:.4f} ± {cell.stderr:.4f}**<br>Δ {cell.delta.delta:+.4f} " in ifd_row
    assert f"[{cell.delta.low:+.4f}, {cell.delta.high:+.4f}]" in ifd_row and "n=120" in ifd_row
    # cost: own tokens, overhead = scoring + reference training, wall time, device-hours, judge cost
    assert "| 2,000 | 35,000 | 1h 01m | 1.0300 | $1.50 |" in ifd_row
    assert "![Δ vs the baseline per benchmark (forest)](plots/tiny--smoke-forest.png)" in markdown
    rows = list(csv.DictReader(io.StringIO(board.render_csv([group]))))
    assert len(rows) == 4
    row = next(r for r in rows if r["recipe"] == "ifd" and r["task"] == "arc")
    assert float(row["delta"]) == pytest.approx(cell.delta.delta, abs=1e-6)
    assert float(row["p_value"]) == pytest.approx(cell.delta.p_value, abs=1e-6)
    assert row["n_paired"] == "120" and row["best"] == "True" and row["total_tokens"] == "37000"
    payload = json.loads(board.render_json([group]))
    assert payload["bootstrap"]["resamples"] == stats.RESAMPLES
    ifd = payload["groups"][0]["runs"][1]
    assert ifd["recipe"] == "ifd" and ifd["cost"]["overhead_tokens"] == 35_000
    assert ifd["metrics"][0]["delta_ci_low"] == pytest.approx(cell.delta.low, abs=1e-6)
    html = board.render_html([group], "results")
    assert '<td class="num best"><span class="value">' in html and "plots/tiny--smoke-pareto.svg" in html


def test_runs_without_per_example_results_fall_back_to_an_unpaired_normal_delta(tmp_path: Path):
    results = tmp_path / "results"
    write_run(results, "one-off-x", "one-off", {"arc": binary_scores(100, 0.4, 1)}, samples=False)
    write_run(results, "phased-x", "phased", {"arc": binary_scores(100, 0.5, 2)}, samples=False)
    write_run(results, "sftmix-y", "sftmix", {"arc": binary_scores(50, 0.5, 3)}, model="smollm2")
    groups, warnings = collect([results])
    assert warnings == [] and [g.model for g in groups] == ["smollm2", "tiny"]
    alone, tiny = groups
    assert "no one-off run" in alone.notes[0] and alone.cells[("sftmix-y", board.Column("arc", "acc"))].delta is None
    base, mine = (tiny.cells[(rid, board.Column("arc", "acc"))] for rid in ("one-off-x", "phased-x"))
    delta = mine.delta
    assert delta.method.startswith("normal") and delta.n is None
    se = np.hypot(base.stderr, mine.stderr)
    assert delta.delta == pytest.approx(mine.value - base.value)
    assert delta.high - delta.low == pytest.approx(2 * 1.959964 * se, rel=1e-5)
    assert delta.p_value == pytest.approx(2 * scipy.stats.norm.sf(abs(delta.delta) / se))
    assert "Δ ≈ " in board.render_markdown(groups, "results") and mine.ci_method == "normal"


def test_several_runs_of_a_recipe_compare_with_the_one_off_of_their_seed(tmp_path: Path):
    results = tmp_path / "results"
    for seed in (0, 1):
        write_run(results, f"one-off-s{seed}", "one-off", {"arc": binary_scores(60, 0.4, 10 + seed)}, seed=seed)
        write_run(results, f"ifd-s{seed}", "ifd", {"arc": binary_scores(60, 0.5, 20 + seed)}, seed=seed)
    (group,), _ = collect([results])
    assert [group.labels[r.run_id] for r in group.runs] == ["one-off (seed 0)", "one-off (seed 1)",
                                                            "ifd (seed 0)", "ifd (seed 1)"]
    for seed in (0, 1):
        assert group.cells[(f"ifd-s{seed}", board.Column("arc", "acc"))].delta.baseline == f"one-off-s{seed}"


def test_runs_on_different_library_versions_are_never_compared(tmp_path: Path):
    """A run made on a newer transformers lands in its own table, named by what differs, with no delta
    against the one-off of the other stack; runs on the same stack still pair."""
    results = tmp_path / "results"
    old = {"python": "3.11.7", "torch": "2.13.0", "transformers": "5.23.0", "accelerate": "1.15.0"}
    new = {**old, "python": "3.12.1", "transformers": "5.24.0"}
    write_run(results, "one-off-tiny-aaaa", "one-off", {"arc": binary_scores(60, 0.5, seed=1)}, versions=old)
    write_run(results, "ifd-tiny-bbbb", "ifd", {"arc": binary_scores(60, 0.6, seed=2)}, versions=old)
    write_run(results, "phased-tiny-cccc", "phased", {"arc": binary_scores(60, 0.7, seed=3)}, versions=new)
    groups, warnings = collect([results])
    assert warnings == []
    assert [[run.recipe for run in group.runs] for group in groups] == [["one-off", "ifd"], ["phased"]]
    assert [group.title for group in groups] == ["tiny · suite smoke · transformers 5.23.0",
                                                 "tiny · suite smoke · transformers 5.24.0"]
    assert len({group.slug for group in groups}) == 2
    column = board.Column("arc", "acc")
    assert groups[0].cells[("ifd-tiny-bbbb", column)].delta is not None
    assert groups[1].cells[("phased-tiny-cccc", column)].delta is None
    assert any("other library versions" in note for note in groups[1].notes)
    payload = json.loads(board.render_json(groups))
    assert [group["stack"]["transformers"] for group in payload["groups"]] == ["5.23.0", "5.24.0"]
    # python's version is not part of the stack: the same libraries on 3.11 and 3.12 compare
    write_run(results, "one-off-tiny-dddd", "one-off", {"arc": binary_scores(60, 0.5, seed=4)}, versions=new)
    groups, _ = collect([results])
    assert groups[1].cells[("phased-tiny-cccc", column)].delta.baseline == "one-off-tiny-dddd"

def test_recipe_variants_are_named_by_their_record_and_older_records_by_the_recipe(tmp_path: Path):
    results = tmp_path / "results"
    write_run(results, "one-off-a", "one-off", {"arc": binary_scores(60, 0.4, 10)}, variant="one-off")
    write_run(results, "phased-b", "phased", {"arc": binary_scores(60, 0.5, 11)},
              variant="phased[scorer=ifd-proxy, stage_order=1-2-3]")
    write_run(results, "phased-c", "phased", {"arc": binary_scores(60, 0.5, 12)},
              variant="phased[scorer=file, stage_order=1-2-3]")
    write_run(results, "sftmix-d", "sftmix", {"arc": binary_scores(60, 0.5, 13)})  # written before variants
    (group,), _ = collect([results])
    labels = [group.labels[r.run_id] for r in group.runs]
    assert labels == ["one-off", "phased[scorer=file, stage_order=1-2-3]",
                      "phased[scorer=ifd-proxy, stage_order=1-2-3]", "sftmix"]
    assert all(group.cells[(run, board.Column("arc", "acc"))].delta.baseline == "one-off-a"
               for run in ("phased-b", "phased-c", "sftmix-d"))
    markdown = board.render_markdown([group], "results")
    assert "phased[scorer=ifd-proxy, stage_order=1-2-3]" in markdown and "phased[scorer=file" in markdown
    rows = list(csv.DictReader(io.StringIO(board.render_csv([group]))))
    assert {(row["recipe"], row["label"]) for row in rows} >= {("phased", "phased[scorer=file, stage_order=1-2-3]")}


def test_corrupt_and_partial_records_are_skipped_with_a_warning_naming_the_file(two_runs, capsys):
    results, _, _ = two_runs
    no_recipe = make_record(run_id="y")
    del no_recipe["recipe"]
    bad = {
        "truncated": '{"run_id": "x", "recipe": {"na',
        "not-object": "[1, 2]",
        "no-recipe": json.dumps(no_recipe),
        "bad-value": json.dumps(make_record(run_id="z", recipe={"name": "ifd"},
                                            metrics={"arc": {"acc": {"value": "high"}}})),
        "bad-cost": json.dumps(make_record(run_id="w", recipe={"name": "ifd"}, cost={"train_tokens": "many"})),
        "old-version": json.dumps(make_record(run_id="v", schema_version=0)),
        "unknown-key": json.dumps(make_record(run_id="u", surprise=1)),
    }
    for name, text in bad.items():
        (results / name).mkdir()
        (results / name / "record.json").write_text(text)
    (results / "in-progress").mkdir()
    (results / "in-progress" / "spec.yaml").write_text("recipe: ifd\n")
    (results / "binary").mkdir()
    (results / "binary" / "record.json").write_bytes(b"\xff\xfe\x00garbage")
    # a readable run whose per-example file breaks on line 2, and one whose file disagrees with its record
    broken = write_run(results, "phased-tiny-cccc", "phased", {"arc": binary_scores(120, 0.5, 5)})
    lines = (broken / "eval" / "samples_arc.jsonl").read_text().splitlines()
    (broken / "eval" / "samples_arc.jsonl").write_text("\n".join([lines[0], "{oops", *lines[2:]]) + "\n")
    shifted = write_run(results, "unifit-tiny-dddd", "unifit", {"arc": binary_scores(120, 0.5, 6)})
    record = json.loads((shifted / "record.json").read_text())
    record["metrics"]["arc"]["acc"]["value"] += 0.1
    (shifted / "record.json").write_text(json.dumps(record))

    # NaN (what lm-eval gives for an undefined stderr) is "no value", not corruption
    nan_run = write_run(results, "sftmix-tiny-ffff", "sftmix", {"arc": binary_scores(120, 0.5, 7)}, samples=False)
    record = json.loads((nan_run / "record.json").read_text())
    record["metrics"]["arc"]["acc"]["stderr"] = float("nan")
    record["metrics"]["arc"]["acc_norm"] = {"value": float("nan"), "stderr": None}
    (nan_run / "record.json").write_text(json.dumps(record))

    (group,), warnings = collect([results])
    assert {r.run_id for r in group.runs} == {"one-off-tiny-aaaa", "ifd-tiny-bbbb", "phased-tiny-cccc",
                                              "unifit-tiny-dddd", "sftmix-tiny-ffff"}
    nan_cell = group.cells[("sftmix-tiny-ffff", board.Column("arc", "acc"))]
    assert nan_cell.stderr is None and nan_cell.delta is None and board.Column("arc", "acc_norm") not in group.columns
    text = "\n".join(warnings)
    for name in bad:
        assert f"{results / name / 'record.json'}: " in text
    assert f"{results / 'truncated' / 'record.json'}: invalid JSON (line 1" in text
    assert "missing key 'recipe'" in text and "'metrics.arc.acc.value' = 'high'" in text and "'cost.train_tokens'" in text
    assert "record schema version 0" in text and "unknown key 'surprise'" in text
    assert f"{results / 'in-progress' / 'record.json'}: missing (incomplete run?)" in text
    assert f"{results / 'binary' / 'record.json'}: unreadable" in text
    assert f"{broken / 'eval' / 'samples_arc.jsonl'}: line 2: invalid JSON" in text
    assert f"{shifted / 'eval' / 'samples_arc.jsonl'}: mean of 'acc'" in text
    # the damaged runs stay on the board, compared without pairing
    assert group.cells[("phased-tiny-cccc", board.Column("arc", "acc"))].delta.method.startswith("normal")
    assert group.cells[("unifit-tiny-dddd", board.Column("arc", "acc"))].delta.method.startswith("normal")
    assert ("phased-tiny-cccc", board.Column("hs", "acc")) not in group.cells  # no hs in that run
    # and the command prints the warnings (one line each) and the table, exit 0
    code, out, err = run_cli(["leaderboard", "--runs", str(results), "--format", "md"], capsys)
    assert code == 0 and "| unifit |" in out
    assert err.count("warning: ") == len(warnings) and "Traceback" not in err


def test_write_then_check_and_the_check_names_the_differing_file(two_runs, capsys, monkeypatch):
    results, _, _ = two_runs
    monkeypatch.chdir(results.parent)
    code, _, err = run_cli(["leaderboard", "--write"], capsys)  # defaults: results/ -> leaderboard/
    assert code == 0, err
    out_dir = results.parent / "leaderboard"
    expected = {"README.md", "index.html", "leaderboard.csv", "leaderboard.json"} | {
        f"plots/tiny--smoke-{kind}.{ext}" for kind in ("forest", "pareto") for ext in ("png", "svg")}
    assert {str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file()} == expected
    assert run_cli(["leaderboard", "--check"], capsys)[0] == 0
    # stdout printing of one format matches the written file
    code, out, _ = run_cli(["leaderboard", "--format", "md"], capsys)
    assert code == 0 and out == (out_dir / "README.md").read_text()

    (out_dir / "leaderboard.csv").write_text((out_dir / "leaderboard.csv").read_text().replace("ifd", "IFD"))
    code, _, err = run_cli(["leaderboard", "--check"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("error: leaderboard/leaderboard.csv differs from a fresh rendering")
    run_cli(["leaderboard", "--write"], capsys)
    (out_dir / "plots" / "old-model--smoke-benchmarks.png").write_bytes(b"stale")
    code, _, err = run_cli(["leaderboard", "--check"], capsys)
    assert code == 1 and "old-model--smoke-benchmarks.png is not part of a fresh rendering" in err
    run_cli(["leaderboard", "--write"], capsys)  # removes the stale plot
    assert run_cli(["leaderboard", "--check"], capsys)[0] == 0
    # a new run changes the board
    write_run(results, "sftmix-tiny-eeee", "sftmix", {"arc": binary_scores(120, 0.5, 8)})
    code, _, err = run_cli(["leaderboard", "--check"], capsys)
    assert code == 1 and "error: leaderboard/README.md differs" in err


def test_check_without_results_or_leaderboard_passes_and_bad_flags_are_one_line(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["leaderboard", "--check"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["leaderboard", "--format", "md"], capsys)
    assert code == 0 and "No run records yet." in out and "no run records under results" in err
    code, _, err = run_cli(["leaderboard", "--write", "--check"], capsys)
    assert code == 2 and err == "error: use one of --write, --check and --out at a time\n"
    (tmp_path / "results").write_text("not a folder")
    code, _, err = run_cli(["leaderboard"], capsys)
    assert code == 2 and err.startswith("error: --runs results: not a directory")


def test_out_writes_one_format_and_html_brings_its_plots(two_runs, tmp_path: Path, capsys):
    results, _, _ = two_runs
    page = tmp_path / "site" / "index.html"
    code, _, err = run_cli(["leaderboard", "--runs", str(results), "--format", "html", "--out", str(page)], capsys)
    assert code == 0, err
    assert page.is_file() and (page.parent / "plots" / "tiny--smoke-forest.svg").is_file()
    target = tmp_path / "board.json"
    assert run_cli(["leaderboard", "--runs", str(results), "-f", "json", "-o", str(target)], capsys)[0] == 0
    assert json.loads(target.read_text())["groups"][0]["suite"] == "smoke"


@pytest.mark.e2e
def test_rendering_is_byte_identical_across_processes(two_runs, tmp_path: Path):
    results, _, _ = two_runs
    outputs = []
    for name in ("first", "second"):
        out_dir = tmp_path / name
        subprocess.run([sys.executable, "-m", "harness.cli", "leaderboard", "--runs", str(results), "--write",
                        "--dir", str(out_dir)], check=True, capture_output=True, timeout=120,
                       env={**__import__("os").environ, "PYTHONHASHSEED": name == "first" and "1" or "2"})
        outputs.append({str(p.relative_to(out_dir)): p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()})
    assert outputs[0] == outputs[1] and len(outputs[0]) == 8


def test_the_page_renders_in_headless_chromium(two_runs, tmp_path: Path):
    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    results, _, _ = two_runs
    out_dir = tmp_path / "leaderboard"
    board.write_directory(board.render_all(collect([results])[0], "results"), out_dir)
    shot, dom = tmp_path / "shot.png", tmp_path / "dom.html"
    result = subprocess.run([sys.executable, str(SCRIPT), str(out_dir / "index.html"), "--png", str(shot),
                             "--dom", str(dom), "--height", "1200"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "3 table rows, 2 plots" in result.stdout
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from screenshot_leaderboard import table_cells
    finally:
        sys.path.remove(str(SCRIPT.parent))
    header, one_off, ifd = table_cells(dom.read_text())
    assert header[:3] == ["recipe", "arc acc", "hs acc"] and one_off[0] == "one-off" and ifd[0] == "ifd"
    (group,), _ = collect([results])
    cell = group.cells[("ifd-tiny-bbbb", board.Column("arc", "acc"))]
    assert ifd[1].startswith(f"{cell.value:.4f} ± {cell.stderr:.4f} Δ {cell.delta.delta:+.4f}")
    assert ifd[3:] == ["2,000", "35,000", "1h 01m", "1.0300", "$1.50"]
