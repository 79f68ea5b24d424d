"""The leaderboard: read run records, compare every recipe with one-off SFT on the same items, and
render tables (rich, Markdown, HTML, CSV, JSON) and plots.

One table per (model, suite, library stack): rows are runs, columns are metrics (value ± standard error, best per
column marked, and the difference from one-off with a paired bootstrap CI and p-value computed from
the per-example results), plus the cost of each run. Rendering is deterministic (fixed bootstrap
seed, no clock, sorted everything), so `harness leaderboard --check` can tell whether the committed
leaderboard/ still matches results/.

Records that cannot be read (corrupt JSON, missing keys, wrong types, a run without record.json) are
skipped with a warning naming the file; a bad per-example file only costs that task its paired test.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness import stats
from harness.errors import HarnessError
from harness.io import atomic_write_bytes
from harness.record import RecordInvalid, RunRecord
from harness.report.summary import LOWER_IS_BETTER

BASELINE_RECIPE = "one-off"
LEADERBOARD_SCHEMA_VERSION = 2  # 2: groups[].stack and groups[].summary (the verdicts)
DEFAULT_RESULTS = Path("results")
DEFAULT_DIR = Path("leaderboard")
# Metrics where smaller is better (lm-eval's perplexity-style metrics); everything else: larger is better.
# Files the leaderboard owns inside its directory; --write replaces them and --check compares them.
OWNED_TOP_LEVEL = ("README.md", "index.html", "leaderboard.csv", "leaderboard.json")
OWNED_PLOT_SUFFIXES = (".png", ".svg")

Warn = Callable[[str], None]


class LeaderboardStale(HarnessError):
    """The committed leaderboard differs from a fresh rendering (exit 1, like a failed check)."""

    exit_code = 1


class RecordError(ValueError):
    """A run record or per-example file that cannot be used; the message says why."""


# ----------------------------------------------------------------------------------------------
# Loading


@dataclass
class ItemScores:
    """Per-example results of one task: item keys (doc_id, doc_hash) and one array per numeric metric."""

    path: Path
    keys: list[tuple[str, str]]
    metrics: dict[str, np.ndarray]


@dataclass
class Run:
    run_id: str
    path: Path  # the record.json
    recipe: str
    variant: str  # the recipe's name with its distinguishing parameters (records before it: the recipe name)
    model: str
    suite: str
    seed: int | None
    data: str
    data_records: int | None
    data_sha256: str | None
    commit: str | None
    chat_template: bool | None
    stack: tuple[tuple[str, str], ...]  # (library, version) that ran, python aside; () for records without versions
    metrics: dict[tuple[str, str], tuple[float, float | None, int | None]]  # (task, metric) -> value, stderr, n
    cost: dict[str, float | None]
    samples: dict[str, ItemScores] = field(default_factory=dict)
    eval_precision: str = "fp32"  # dtype of the evaluated weights (record suite.precision)
    eval_model_class: str = "hflm"  # evaluation model class (record suite.model_class)

    @property
    def train_tokens(self) -> float | None:
        return self.cost.get("train_tokens")

    @property
    def overhead_tokens(self) -> float | None:
        """Tokens spent beyond the recipe's own training: scoring passes and reference-model training."""
        parts = [self.cost.get("scoring_tokens"), self.cost.get("overhead_train_tokens")]
        known = [p for p in parts if p is not None]
        return sum(known) if known else None

    @property
    def total_tokens(self) -> float | None:
        if self.train_tokens is None:
            return None
        return self.train_tokens + (self.overhead_tokens or 0)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


COST_KEYS = ("train_tokens", "response_tokens", "scoring_tokens", "overhead_train_tokens", "wall_seconds",
             "device_hours", "judge_cost_usd", "flops", "training_device_hours", "recipe_judge_cost_usd")


def parse_record(path: Path) -> Run:
    """A Run from record.json (read through RunRecord); raises RecordError naming the first problem."""
    try:
        record = RunRecord.load(path)
    except RecordInvalid as error:
        raise RecordError(error.problem) from None
    metrics: dict[tuple[str, str], tuple[float, float | None, int | None]] = {}
    for task, entry in record.metrics.items():
        n = entry.get("n")
        for metric, cell in entry.items():
            if not isinstance(cell, dict):
                continue  # n, num_fewshot, limit, seconds
            value, stderr = cell.get("value"), cell.get("stderr")
            value, stderr = (None if isinstance(x, float) and math.isnan(x) else x for x in (value, stderr))
            if value is None:  # no result (null or NaN): the metric is left out, the run is kept
                continue
            if not _number(value):
                raise RecordError(f"key 'metrics.{task}.{metric}.value' = {value!r} is not a finite number")
            if stderr is not None and not _number(stderr):
                raise RecordError(f"key 'metrics.{task}.{metric}.stderr' = {stderr!r} is not a finite number")
            metrics[(task, metric)] = (float(value), None if stderr is None else float(stderr),
                                       n if isinstance(n, int) and not isinstance(n, bool) else None)
    cost: dict[str, float | None] = {}
    for key in COST_KEYS:
        value = getattr(record.cost, key)
        if value is not None and not _number(value):
            raise RecordError(f"key 'cost.{key}' = {value!r} is not a finite number")
        cost[key] = value  # ints stay ints (token counts print as 19702, not 19702.0)
    precision, model_class = _evaluation_protocol(record)
    return Run(
        run_id=record.run_id,
        path=path,
        recipe=record.recipe.name,
        variant=record.recipe.label,
        model=record.model.name,
        suite=record.suite.name,
        seed=record.seed,
        data=record.data.source,
        data_records=record.data.records,
        data_sha256=record.data.sha256,
        commit=record.git_commit,
        chat_template=record.suite.chat_template,
        stack=tuple(sorted((name, version) for name, version in record.versions.items() if name != "python")),
        metrics=metrics,
        cost=cost,
        eval_precision=precision,
        eval_model_class=model_class,
    )


def _evaluation_protocol(record: RunRecord) -> tuple[str, str]:
    """(precision, model class) of the run's lm-eval tasks. Records written before these were recorded
    were evaluated by HFLM on the trained weights as they were: bf16 when trained in pure bf16."""
    precision, model_class = record.suite.precision, record.suite.model_class
    if precision is None:
        training = record.spec.get("training") if isinstance(record.spec.get("training"), dict) else {}
        precision = "bf16" if training.get("precision") == "bf16" else "fp32"
    return precision, model_class if model_class is not None else "hflm"


def parse_samples(path: Path) -> ItemScores:
    """Per-example results from a JSON-lines file: each line an object with `doc_id` and numeric metric
    fields (bools count as 0/1); `doc_hash`, when present, is part of the item key. A metric is kept
    only when every line has a number for it."""
    keys: list[tuple[str, str]] = []
    columns: dict[str, list[float | None]] = {}
    seen: set[tuple[str, str]] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise RecordError(f"unreadable ({error})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise RecordError(f"line {number}: invalid JSON ({error.msg})") from None
        if not isinstance(row, dict) or "doc_id" not in row:
            raise RecordError(f"line {number}: not an object with a 'doc_id'")
        doc_hash = row.get("doc_hash")
        key = (str(row["doc_id"]), doc_hash if isinstance(doc_hash, str) else "")
        if key in seen:
            raise RecordError(f"line {number}: duplicate item doc_id={row['doc_id']!r}")
        seen.add(key)
        index = len(keys)
        keys.append(key)
        for name, value in row.items():
            if name in ("doc_id", "doc_hash"):
                continue
            numeric = float(value) if isinstance(value, (bool, int, float)) and math.isfinite(float(value)) else None
            if name not in columns:
                columns[name] = [None] * index
            columns[name].append(numeric)
        for column in columns.values():
            if len(column) < len(keys):
                column.append(None)
    if not keys:
        raise RecordError("no items")
    metrics = {name: np.array(values, dtype=np.float64) for name, values in columns.items()
               if all(v is not None for v in values)}
    return ItemScores(path, keys, metrics)


def _task_name(path: Path) -> str:
    return path.stem.removeprefix("samples_")


def _attach_samples(run: Run, run_dir: Path, warn: Warn) -> None:
    """Per-example files directly under eval/ (subfolders hold intermediate evaluations, e.g. Phased IFT's
    stages). A file whose means do not reproduce the record's values is not used for that metric."""
    eval_dir = run_dir / "eval"
    if not eval_dir.is_dir():
        return
    for path in sorted(eval_dir.glob("*.jsonl")):
        try:
            scores = parse_samples(path)
        except RecordError as error:
            warn(f"{path}: {error}; no paired test for task '{_task_name(path)}' of run {run.run_id}")
            continue
        task = _task_name(path)
        for metric in list(scores.metrics):
            recorded = run.metrics.get((task, metric))
            if recorded is None:
                continue
            mean = float(scores.metrics[metric].mean())
            if not math.isclose(mean, recorded[0], rel_tol=1e-6, abs_tol=1e-9):
                warn(f"{path}: mean of '{metric}' over {len(scores.keys)} items is {mean:.6g} but record.json says "
                     f"{recorded[0]:.6g}; no paired test for {task} {metric} of run {run.run_id}")
                del scores.metrics[metric]
        run.samples[task] = scores


def _run_dirs(root: Path) -> Iterable[Path]:
    """`root` itself when it is a run directory, else its (non-hidden) subdirectories, sorted."""
    if (root / "record.json").exists() or (root / "spec.yaml").exists():
        yield root
        return
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            yield child


def load_runs(roots: Iterable[Path], warn: Warn) -> list[Run]:
    """Every readable run under the given folders; the rest are skipped with a warning naming the file."""
    runs: list[Run] = []
    seen: dict[str, Path] = {}
    for root in roots:
        if not root.exists():
            continue
        if not root.is_dir():
            raise HarnessError(f"--runs {root}: not a directory; pass a folder of run directories (e.g. results/)")
        for run_dir in _run_dirs(root):
            path = run_dir / "record.json"
            if not path.is_file():
                warn(f"{path}: missing (incomplete run?); skipped")
                continue
            try:
                run = parse_record(path)
            except RecordError as error:
                warn(f"{path}: {error}; skipped")
                continue
            if run.run_id in seen:
                warn(f"{path}: run {run.run_id} already read from {seen[run.run_id]}; skipped")
                continue
            seen[run.run_id] = path
            _attach_samples(run, run_dir, warn)
            runs.append(run)
    return runs


# ----------------------------------------------------------------------------------------------
# Comparison


@dataclass(frozen=True)
class Column:
    task: str
    metric: str

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in LOWER_IS_BETTER

    @property
    def title(self) -> str:
        return f"{self.task} {self.metric}"


@dataclass
class Delta:
    """Row minus baseline; `method` says how the CI and p-value were obtained."""

    baseline: str  # run id
    delta: float
    low: float
    high: float
    p_value: float
    n: int | None
    method: str  # "paired bootstrap" | "normal approx. (unpaired)"


@dataclass
class Cell:
    value: float
    stderr: float | None
    low: float | None
    high: float | None
    ci_method: str | None  # "bootstrap" | "normal" | None
    n: int | None
    best: bool = False
    delta: Delta | None = None


@dataclass
class Group:
    model: str
    suite: str
    runs: list[Run]
    labels: dict[str, str]  # run id -> row label
    columns: list[Column]
    cells: dict[tuple[str, Column], Cell]
    notes: list[str]
    precision: str | None = None  # the evaluation precision, named when the model and suite have several
    stack: tuple[tuple[str, str], ...] = ()  # the library versions every run of the group ran on
    stack_label: str = ""  # what sets this group's stack apart, when the same model and suite ran on several
    summary: Any = None  # harness.report.summary.GroupSummary: the verdicts

    @property
    def slug(self) -> str:
        precision = f"--{self.precision}" if self.precision else ""
        stack = f"--{self.stack_label}" if self.stack_label else ""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.model}--{self.suite}{precision}{stack}")

    @property
    def title(self) -> str:
        precision = f" · evaluated in {self.precision}" if self.precision else ""
        stack = f" · {self.stack_label}" if self.stack_label else ""
        return f"{self.model} · suite {self.suite}{precision}{stack}"

    def data_summary(self) -> str:
        sources = sorted({(r.data, r.data_records) for r in self.runs}, key=lambda x: (x[0], x[1] or 0))
        return "; ".join(f"{source} ({records} records)" if records is not None else source
                         for source, records in sources)


def _sort_key(run: Run) -> tuple[Any, ...]:
    return (run.recipe != BASELINE_RECIPE, run.variant, run.seed if run.seed is not None else -1, run.run_id)


def _labels(runs: list[Run]) -> dict[str, str]:
    """Recipe variants (e.g. `phased[scorer=ifd-proxy, ...]`), disambiguated by seed (or the run id's hash)
    when a variant has several runs."""
    labels: dict[str, str] = {}
    by_recipe: dict[str, list[Run]] = {}
    for run in runs:
        by_recipe.setdefault(run.variant, []).append(run)
    for recipe, group in by_recipe.items():
        seeds = [r.seed for r in group]
        for run in group:
            if len(group) == 1:
                labels[run.run_id] = recipe
            elif len(set(seeds)) == len(seeds) and None not in seeds:
                labels[run.run_id] = f"{recipe} (seed {run.seed})"
            else:
                labels[run.run_id] = f"{recipe} ({run.run_id.rsplit('-', 1)[-1]})"
    return labels


def _baseline(run: Run, runs: list[Run]) -> Run | None:
    """The one-off run to compare with: same seed and data if there is one, then same data, then any."""
    if run.recipe == BASELINE_RECIPE:
        return None
    candidates = [r for r in runs if r.recipe == BASELINE_RECIPE]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (r.data_sha256 != run.data_sha256 or r.seed != run.seed,
                                          r.data_sha256 != run.data_sha256, r.seed != run.seed, _sort_key(r)))


def _per_item(run: Run, column: Column) -> tuple[list[tuple[str, str]], np.ndarray] | None:
    scores = run.samples.get(column.task)
    if scores is None or column.metric not in scores.metrics:
        return None
    return scores.keys, scores.metrics[column.metric]


def _cell(run: Run, column: Column) -> Cell:
    value, stderr, n = run.metrics[(column.task, column.metric)]
    items = _per_item(run, column)
    if items is not None:
        interval = stats.mean_interval(items[1])
        return Cell(value, stderr if stderr is not None else interval.stderr, interval.low, interval.high,
                    "bootstrap", n if n is not None else interval.n)
    if stderr is not None:
        low, high = stats.normal_interval(value, stderr)
        return Cell(value, stderr, low, high, "normal", n)
    return Cell(value, None, None, None, None, n)


def _delta(run: Run, base: Run, column: Column, cell: Cell, base_cell: Cell) -> Delta | None:
    """Paired bootstrap over the items both runs were scored on; without per-example results, a normal
    approximation from the two standard errors (which ignores the pairing, so it is conservative)."""
    mine, theirs = _per_item(run, column), _per_item(base, column)
    if mine is not None and theirs is not None:
        base_index = {key: i for i, key in enumerate(theirs[0])}
        pairs = [(base_index[key], i) for i, key in enumerate(mine[0]) if key in base_index]
        if pairs:
            base_rows, my_rows = (np.array(side) for side in zip(*pairs, strict=True))
            test = stats.paired_bootstrap(theirs[1][base_rows], mine[1][my_rows])
            return Delta(base.run_id, test.delta, test.low, test.high, test.p_value, test.n, "paired bootstrap")
    if cell.stderr is None or base_cell.stderr is None:
        return None
    from statistics import NormalDist

    difference = cell.value - base_cell.value
    stderr = math.hypot(cell.stderr, base_cell.stderr)
    low, high = stats.normal_interval(difference, stderr)
    p_value = 1.0 if stderr == 0 else 2.0 * (1.0 - NormalDist().cdf(abs(difference) / stderr))
    return Delta(base.run_id, difference, low, high, p_value, None, "normal approx. (unpaired)")


def stack_labels(stacks: Iterable[tuple[tuple[str, str], ...]]) -> dict[tuple[tuple[str, str], ...], str]:
    """A short name per stack: the library versions in which it differs from the others ('' when alone)."""
    stacks = sorted(set(stacks))
    if len(stacks) < 2:
        return {stack: "" for stack in stacks}
    tables = [dict(stack) for stack in stacks]
    differing = sorted({name for table in tables for name in table if len({t.get(name) for t in tables}) > 1})
    return {stack: ", ".join(f"{name} {table.get(name, 'unknown')}" for name in differing)
            for stack, table in zip(stacks, tables, strict=True)}


def build_groups(runs: list[Run], verdicts: Any = None) -> list[Group]:
    """One group per (model, suite, evaluation precision, library stack), runs sorted one-off first,
    columns sorted by task and metric. Numbers evaluated in different precisions or made on different
    library versions are never compared (nor paired): separate tables, titled with what differs."""
    grouped: dict[tuple[str, str, str, tuple[tuple[str, str], ...]], list[Run]] = {}
    for run in runs:
        grouped.setdefault((run.model, run.suite, run.eval_precision, run.stack), []).append(run)
    precisions: dict[tuple[str, str], set[str]] = {}
    stacks: dict[tuple[str, str, str], list[tuple[tuple[str, str], ...]]] = {}
    for model, suite, precision, stack in grouped:
        precisions.setdefault((model, suite), set()).add(precision)
        stacks.setdefault((model, suite, precision), []).append(stack)
    stack_names = {protocol: stack_labels(found) for protocol, found in stacks.items()}
    groups = []
    for (model, suite, precision, stack), members in sorted(grouped.items()):
        members = sorted(members, key=_sort_key)
        columns = sorted({Column(task, metric) for run in members for task, metric in run.metrics},
                         key=lambda c: (c.task, c.metric))
        cells: dict[tuple[str, Column], Cell] = {}
        for run in members:
            for column in columns:
                if (column.task, column.metric) in run.metrics:
                    cells[(run.run_id, column)] = _cell(run, column)
        for column in columns:
            present = [cells[(r.run_id, column)] for r in members if (r.run_id, column) in cells]
            best = max(c.value for c in present) if column.higher_is_better else min(c.value for c in present)
            for cell in present:
                cell.best = len(present) > 1 and math.isclose(cell.value, best, rel_tol=0, abs_tol=1e-12)
        notes = []
        for run in members:
            base = _baseline(run, members)
            if base is None:
                continue
            for column in columns:
                mine, theirs = cells.get((run.run_id, column)), cells.get((base.run_id, column))
                if mine is not None and theirs is not None:
                    mine.delta = _delta(run, base, column, mine, theirs)
        if not any(r.recipe == BASELINE_RECIPE for r in members):
            notes.append(f"no {BASELINE_RECIPE} run for this model and suite: no differences shown")
        if len({r.data_sha256 for r in members}) > 1:
            notes.append("runs were trained on different data (see the runs table)")
        if len({r.chat_template for r in members}) > 1:
            notes.append("runs were evaluated with and without the chat template: not the same protocol")
        if len({r.eval_model_class for r in members}) > 1:
            notes.append("log-likelihoods from lm-eval's HFLM and from the scoring engine (equal within 1e-4 in fp32)")
        stack_label = stack_names[(model, suite, precision)][stack]
        if stack_label:
            notes.append(f"{model} on suite {suite} also ran on other library versions: those runs are in a "
                         "separate table, never compared with these")
        from harness.report.summary import summarise

        summary = summarise(members, suite, {run.run_id: run.variant for run in members}, verdicts)
        named = precision if len(precisions[(model, suite)]) > 1 else None
        groups.append(Group(model, suite, members, _labels(members), columns, cells, notes, named, stack, stack_label,
                            summary))
    return groups


# ----------------------------------------------------------------------------------------------
# Formatting helpers

METHOD_NOTE = (
    f"value ± standard error; bold = best in its column. Δ = the recipe minus {BASELINE_RECIPE} (same seed and "
    f"data where such a run exists) on the items both were scored on, with its {stats.CONFIDENCE:.0%} percentile "
    f"CI and two-sided p-value from a paired bootstrap over items ({stats.RESAMPLES:,} resamples, seed "
    f"{stats.SEED}); n = items paired. Δ marked ≈: no per-example results (or no common items), so a normal "
    "approximation from the two standard errors. Tokens: the recipe's own training tokens; overhead = scoring "
    "passes (e.g. IFD) plus reference-model training."
)


def fmt_value(value: float) -> str:
    return f"{value:.4f}"


def fmt_signed(value: float) -> str:
    text = f"{value:+.4f}"
    return "0.0000" if text in ("+0.0000", "-0.0000") else text


def fmt_p(p_value: float) -> str:
    return "p<0.001" if p_value < 0.001 else f"p={p_value:.3f}"


def fmt_int(value: float | None) -> str:
    return "n/a" if value is None else f"{int(round(value)):,}"


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    seconds = int(round(value))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def fmt_hours(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def fmt_usd(value: float | None) -> str:
    return "n/a" if value is None else f"${value:.2f}"


def value_text(cell: Cell) -> str:
    return fmt_value(cell.value) + (f" ± {cell.stderr:.4f}" if cell.stderr is not None else " (no SE)")


def delta_lines(delta: Delta) -> tuple[str, str]:
    """Two short lines (keeps table columns narrow): the difference with its CI, then p and n."""
    approx = "≈ " if delta.method != "paired bootstrap" else ""
    n = f" n={delta.n}" if delta.n is not None else ""
    return (f"Δ {approx}{fmt_signed(delta.delta)} [{fmt_signed(delta.low)}, {fmt_signed(delta.high)}]",
            f"{fmt_p(delta.p_value)}{n}")


COST_HEADERS = ("train tokens", "overhead tokens", "wall time", "device-hours", "judge cost")


def cost_cells(run: Run) -> list[str]:
    return [fmt_int(run.train_tokens), fmt_int(run.overhead_tokens), fmt_seconds(run.cost.get("wall_seconds")),
            fmt_hours(run.cost.get("device_hours")), fmt_usd(run.cost.get("judge_cost_usd"))]


def plot_files(group: Group) -> dict[str, str]:
    """Plot name -> file stem under plots/ for a group."""
    return {"Δ vs the baseline per benchmark (forest)": f"{group.slug}-forest",
            "headline Δ against compute (Pareto)": f"{group.slug}-pareto"}


# ----------------------------------------------------------------------------------------------
# Renderers


def render_rich(groups: list[Group]) -> list[Any]:
    """rich Tables, one per group (printed by the CLI)."""
    from rich.table import Table

    from harness.report import tables as summary_tables

    tables = []
    for group in groups:
        tables.append(summary_tables.render_rich(group.summary, group.title))
        table = Table(title=f"{group.title}\n[dim]{group.data_summary()}[/]", show_lines=True)
        table.add_column("recipe")
        for column in group.columns:
            table.add_column(column.title, justify="right")
        for header in COST_HEADERS:
            table.add_column(header, justify="right")
        for run in group.runs:
            row = [group.labels[run.run_id]]
            for column in group.columns:
                cell = group.cells.get((run.run_id, column))
                if cell is None:
                    row.append("-")
                    continue
                text = value_text(cell)
                text = f"[bold green]{text}[/]" if cell.best else text
                if cell.delta is not None:
                    text += "\n" + "\n".join(delta_lines(cell.delta))
                row.append(text)
            table.add_row(*row, *cost_cells(run))
        table.caption = "\n".join([*group.notes, METHOD_NOTE])
        tables.append(table)
    return tables


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(groups: list[Group], source: str) -> str:
    from harness.report import tables as summary_tables

    lines = ["# Leaderboard", "",
             f"Generated by `harness leaderboard` from {sum(len(g.runs) for g in groups)} run records under "
             f"`{source}`; do not edit by hand (CI regenerates it when results change). "
             "Static page with the same tables and plots: [index.html](index.html).", "",
             f"Keys of `leaderboard.json` (schema {LEADERBOARD_SCHEMA_VERSION}), per group: "
             f"{summary_tables.SUMMARY_KEYS}", ""]
    if not groups:
        lines.append("No run records yet.")
    for group in groups:
        lines += [f"## {_md_escape(group.title)}", "", f"Data: {_md_escape(group.data_summary())}", ""]
        lines += ["### Verdicts", "", *summary_tables.render_markdown(group.summary),
                  *summary_tables.render_benchmarks_markdown(group.summary), "### Every metric of every run", ""]
        lines.append("| recipe | " + " | ".join(_md_escape(c.title) for c in group.columns) + " | "
                     + " | ".join(COST_HEADERS) + " |")
        lines.append("|---|" + "---:|" * (len(group.columns) + len(COST_HEADERS)))
        for run in group.runs:
            row = [_md_escape(group.labels[run.run_id])]
            for column in group.columns:
                cell = group.cells.get((run.run_id, column))
                if cell is None:
                    row.append("–")
                    continue
                text = f"**{value_text(cell)}**" if cell.best else value_text(cell)
                if cell.delta is not None:
                    text += "<br>" + "<br>".join(delta_lines(cell.delta))
                row.append(text)
            lines.append("| " + " | ".join(row + cost_cells(run)) + " |")
        lines.append("")
        lines += [f"*{note}*" for note in group.notes]
        lines += [f"{METHOD_NOTE}", ""]
        for name, stem in plot_files(group).items():
            lines.append(f"![{name}](plots/{stem}.png)")
        lines += ["", "<details><summary>runs</summary>", "", "| recipe | run id | seed | data | commit |",
                  "|---|---|---:|---|---|"]
        for run in group.runs:
            lines.append(f"| {_md_escape(group.labels[run.run_id])} | `{run.run_id}` | "
                         f"{run.seed if run.seed is not None else 'n/a'} | {_md_escape(run.data)} "
                         f"({run.data_records if run.data_records is not None else '?'} records) | "
                         f"`{(run.commit or 'unknown')[:12]}` |")
        lines += ["", "</details>", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto; max-width: 1400px;
       padding: 0 1rem; color: #1f2328; box-sizing: border-box; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2.5rem; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 0.35rem 0.6rem; vertical-align: top; }
th { background: #f6f8fa; text-align: center; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.best .value { font-weight: 700; color: #1a7f37; }
.delta { display: block; font-size: 0.8rem; color: #57606a; }
.delta.sig { color: #0550ae; }
.note { color: #57606a; font-size: 0.85rem; max-width: 60rem; }
.scroll { overflow-x: auto; }
figure { display: inline-block; margin: 0.5rem 1rem 0.5rem 0; } img { max-width: 100%; }
code { font-size: 0.85rem; }
table.summary { font-size: 0.75rem; } table.summary th, table.summary td { padding: 0.3rem 0.4rem; }
table.summary .delta { white-space: normal; } table.summary td.better { background: #dafbe1; }
table.summary td.worse { background: #ffebe9; }
table.summary td.equivalent { background: #ddf4ff; }
"""


def render_html(groups: list[Group], source: str) -> str:
    from harness.report import tables as summary_tables

    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             "<title>sft-recipe-harness leaderboard</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
             "<h1>Leaderboard</h1>",
             f'<p class="note">Generated by <code>harness leaderboard</code> from '
             f"{sum(len(g.runs) for g in groups)} run records under <code>{esc(source)}</code>.</p>"]
    if not groups:
        parts.append("<p>No run records yet.</p>")
    for group in groups:
        parts += [f'<section id="{esc(group.slug)}">', f"<h2>{esc(group.title)}</h2>",
                  f'<p class="note">Data: {esc(group.data_summary())}</p>',
                  *summary_tables.render_html(group.summary),
                  *summary_tables.render_benchmarks_html(group.summary),
                  "<details><summary>every metric of every run (value ± SE, Δ vs the baseline run of its seed)</summary>",
                  '<div class="scroll"><table class="leaderboard">', "<thead><tr><th>recipe</th>"
                  + "".join(f"<th>{esc(c.title)}</th>" for c in group.columns)
                  + "".join(f"<th>{h}</th>" for h in COST_HEADERS) + "</tr></thead>", "<tbody>"]
        for run in group.runs:
            row = [f'<td title="{esc(run.run_id)}">{esc(group.labels[run.run_id])}</td>']
            for column in group.columns:
                cell = group.cells.get((run.run_id, column))
                if cell is None:
                    row.append('<td class="num">–</td>')
                    continue
                text = f'<span class="value">{esc(value_text(cell))}</span>'
                if cell.delta is not None:
                    significant = " sig" if cell.delta.p_value < 0.05 else ""
                    text += "".join(f'<span class="delta{significant}">{esc(line)}</span>'
                                    for line in delta_lines(cell.delta))
                row.append(f'<td class="num{" best" if cell.best else ""}">{text}</td>')
            row += [f'<td class="num">{esc(text)}</td>' for text in cost_cells(run)]
            parts.append("<tr>" + "".join(row) + "</tr>")
        parts += ["</tbody>", "</table></div>", "</details>"]
        parts += [f'<p class="note"><em>{esc(note)}</em></p>' for note in group.notes]
        parts.append(f'<p class="note">{esc(METHOD_NOTE)} Blue Δ: p &lt; 0.05.</p>')
        for name, stem in plot_files(group).items():
            parts.append(f'<figure><img src="plots/{esc(stem)}.svg" alt="{esc(name)}, {esc(group.title)}">'
                         f"<figcaption class=\"note\">{esc(name)}; error bars: {stats.CONFIDENCE:.0%} CI"
                         "</figcaption></figure>")
        parts += ['<table class="runs"><thead><tr><th>recipe</th><th>run id</th><th>seed</th><th>data</th>'
                  "<th>commit</th></tr></thead><tbody>"]
        for run in group.runs:
            parts.append(f"<tr><td>{esc(group.labels[run.run_id])}</td><td><code>{esc(run.run_id)}</code></td>"
                         f'<td class="num">{run.seed if run.seed is not None else "n/a"}</td>'
                         f"<td>{esc(run.data)}</td><td><code>{esc((run.commit or 'unknown')[:12])}</code></td></tr>")
        parts += ["</tbody></table>", "</section>"]
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _round(value: float | None, digits: int = 6) -> float | None:
    """Rounded so that last-bit differences between numpy builds never change the exported files."""
    return None if value is None else round(float(value), digits)


CSV_FIELDS = ("model", "suite", "recipe", "label", "run_id", "seed", "data", "task", "metric", "higher_is_better",
              "value", "stderr", "ci_low", "ci_high", "ci_method", "n", "best", "baseline_run_id", "delta",
              "delta_ci_low", "delta_ci_high", "p_value", "n_paired", "delta_method", "train_tokens",
              "overhead_tokens", "total_tokens", "wall_seconds", "device_hours", "judge_cost_usd")


def _rows(groups: list[Group]) -> Iterable[dict[str, Any]]:
    for group in groups:
        for run in group.runs:
            for column in group.columns:
                cell = group.cells.get((run.run_id, column))
                if cell is None:
                    continue
                delta = cell.delta
                yield {
                    "model": group.model, "suite": group.suite, "recipe": run.recipe,
                    "label": group.labels[run.run_id], "run_id": run.run_id, "seed": run.seed, "data": run.data,
                    "task": column.task, "metric": column.metric, "higher_is_better": column.higher_is_better,
                    "value": _round(cell.value), "stderr": _round(cell.stderr), "ci_low": _round(cell.low),
                    "ci_high": _round(cell.high), "ci_method": cell.ci_method, "n": cell.n, "best": cell.best,
                    "baseline_run_id": delta.baseline if delta else None,
                    "delta": _round(delta.delta) if delta else None,
                    "delta_ci_low": _round(delta.low) if delta else None,
                    "delta_ci_high": _round(delta.high) if delta else None,
                    "p_value": _round(delta.p_value) if delta else None,
                    "n_paired": delta.n if delta else None, "delta_method": delta.method if delta else None,
                    "train_tokens": run.train_tokens, "overhead_tokens": run.overhead_tokens,
                    "total_tokens": run.total_tokens, "wall_seconds": run.cost.get("wall_seconds"),
                    "device_hours": run.cost.get("device_hours"), "judge_cost_usd": run.cost.get("judge_cost_usd"),
                }


def render_csv(groups: list[Group]) -> str:
    """Long format: one row per (run, task, metric)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in _rows(groups):
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return buffer.getvalue()


JSON_METRIC_FIELDS = ("task", "metric", "value", "stderr", "ci_low", "ci_high", "ci_method", "n", "best",
                      "baseline_run_id", "delta", "delta_ci_low", "delta_ci_high", "p_value", "n_paired", "delta_method")


def render_json(groups: list[Group]) -> str:
    from harness.report import tables as summary_tables

    payload = {
        "schema_version": LEADERBOARD_SCHEMA_VERSION,
        "baseline_recipe": BASELINE_RECIPE,
        "bootstrap": {"resamples": stats.RESAMPLES, "seed": stats.SEED, "confidence": stats.CONFIDENCE,
                      "interval": "percentile", "p_value": "two-sided, centred replicates, (k+1)/(B+1)"},
        "groups": [],
    }
    rows = list(_rows(groups))
    for group in groups:
        payload["groups"].append({
            "model": group.model, "suite": group.suite, **({"precision": group.precision} if group.precision else {}),
            "stack": dict(group.stack), "data": group.data_summary(), "notes": group.notes,
            "summary": summary_tables.render_json(group.summary),
            "columns": [{"task": c.task, "metric": c.metric, "higher_is_better": c.higher_is_better}
                        for c in group.columns],
            "runs": [{"run_id": run.run_id, "recipe": run.recipe, "label": group.labels[run.run_id], "seed": run.seed,
                      "data": run.data, "data_records": run.data_records, "data_sha256": run.data_sha256,
                      "git_commit": run.commit,
                      "cost": {**{k: v for k, v in run.cost.items() if v is not None},
                               "overhead_tokens": run.overhead_tokens, "total_tokens": run.total_tokens},
                      "metrics": [{key: row[key] for key in JSON_METRIC_FIELDS}
                                  for row in rows if row["run_id"] == run.run_id and row["model"] == group.model
                                  and row["suite"] == group.suite]}
                     for run in group.runs],
        })
    return json.dumps(payload, indent=2, ensure_ascii=False) + "\n"


# ----------------------------------------------------------------------------------------------
# The leaderboard directory: render every file in memory, then write or compare


def render_all(groups: list[Group], source: str) -> dict[str, bytes]:
    """Relative path -> content of every file the leaderboard directory holds; empty without runs."""
    if not groups:
        return {}
    from harness import plots

    files = {
        "README.md": render_markdown(groups, source).encode(),
        "index.html": render_html(groups, source).encode(),
        "leaderboard.csv": render_csv(groups).encode(),
        "leaderboard.json": render_json(groups).encode(),
    }
    colors = plots.recipe_colors(sorted({run.variant for group in groups for run in group.runs}))
    for group in groups:
        stems = plot_files(group)
        figures = {stems["Δ vs the baseline per benchmark (forest)"]: plots.forest(group, colors),
                   stems["headline Δ against compute (Pareto)"]: plots.pareto(group, colors)}
        for stem, figure in figures.items():
            png, svg = plots.to_png_svg(figure)
            files[f"plots/{stem}.png"] = png
            files[f"plots/{stem}.svg"] = svg
    return files


def owned_files(directory: Path) -> set[str]:
    """The files in `directory` that the leaderboard owns (so --write may replace or remove them)."""
    found = {name for name in OWNED_TOP_LEVEL if (directory / name).is_file()}
    plots_dir = directory / "plots"
    if plots_dir.is_dir():
        found |= {f"plots/{p.name}" for p in plots_dir.iterdir() if p.is_file() and p.suffix in OWNED_PLOT_SUFFIXES}
    return found


def write_directory(files: dict[str, bytes], directory: Path) -> list[str]:
    """Write every rendered file atomically and remove owned files that are no longer rendered."""
    changed = []
    for name, content in sorted(files.items()):
        path = directory / name
        if path.is_file() and path.read_bytes() == content:
            continue
        atomic_write_bytes(path, content)
        changed.append(name)
    for name in sorted(owned_files(directory) - set(files)):
        (directory / name).unlink()
        changed.append(name)
    return changed


def first_difference(files: dict[str, bytes], directory: Path) -> str | None:
    """The first file (sorted) that differs between a fresh rendering and `directory`, or None."""
    for name in sorted(set(files) | owned_files(directory)):
        path = directory / name
        if name not in files:
            return f"{path} is not part of a fresh rendering (stale)"
        if not path.is_file():
            return f"{path} is missing"
        if path.read_bytes() != files[name]:
            return f"{path} differs from a fresh rendering"
    return None


# ----------------------------------------------------------------------------------------------
# The command


def leaderboard_command(
    roots: list[Path],
    fmt: str,
    out: Path | None,
    *,
    write_all: bool,
    check: bool,
    directory: Path,
    console: Any,
    stdout: Any,
    verdicts: Any = None,
) -> None:
    """`harness leaderboard`: print one format, write one file (--out), write the folder (--write) or
    compare it with a fresh rendering (--check). Warnings go to `console` (stderr)."""
    if sum([write_all, check, out is not None]) > 1:
        raise HarnessError("use one of --write, --check and --out at a time")
    if fmt == "rich" and out is not None:
        raise HarnessError("--format rich prints to the terminal; use md, html, csv or json with --out")
    roots = roots or [DEFAULT_RESULTS]
    source = ", ".join(str(root) for root in roots)
    runs = load_runs(roots, lambda message: console.print(f"warning: {message}", markup=False, highlight=False))
    groups = build_groups(runs, verdicts)
    if check:
        difference = first_difference(render_all(groups, source), directory)
        if difference:
            raise LeaderboardStale(f"{difference}; run `harness leaderboard --write` and commit {directory}/")
        console.print(f"{directory}/ is up to date ({len(runs)} runs)", markup=False)
        return
    if write_all:
        changed = write_directory(render_all(groups, source), directory)
        console.print(f"{directory}/: {len(changed)} files changed" + (f" ({', '.join(changed)})" if changed else ""),
                      markup=False)
        return
    if not groups:
        console.print(f"no run records under {source}", markup=False)
    if fmt == "rich":
        for table in render_rich(groups):
            stdout.print(table)
        return
    renderers: dict[str, Callable[[], str]] = {
        "md": lambda: render_markdown(groups, source),
        "html": lambda: render_html(groups, source),
        "csv": lambda: render_csv(groups),
        "json": lambda: render_json(groups),
    }
    if fmt not in renderers:
        raise HarnessError(f"unknown format '{fmt}'; valid: rich, {', '.join(renderers)}")
    rendered = renderers[fmt]()
    if out is None:
        sys.stdout.write(rendered)
        return
    if fmt == "html":  # the page links plots/*.svg next to it
        for name, content in render_all(groups, source).items():
            if name.startswith("plots/"):
                atomic_write_bytes(out.parent / name, content)
    atomic_write_bytes(out, rendered.encode())
    console.print(f"wrote {out}", markup=False)
