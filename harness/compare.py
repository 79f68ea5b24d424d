"""`harness run --recipe all`: every recipe on one (model, data, suite) under one protocol, then a
comparison table. In this mode `params` maps recipe names to their own parameters, e.g.
`--set params.ifd.rate=0.05`."""

from __future__ import annotations

from rich.table import Table

from harness.errors import HarnessError, unknown_name
from harness.record import RunRecord
from harness.report.summary import LOWER_IS_BETTER
from harness.spec import RunSpec


def specs_for_all(spec: RunSpec) -> list[RunSpec]:
    from recipes import ALL_RECIPES

    for name in spec.params:
        if name not in ALL_RECIPES:
            raise unknown_name("recipe in params (with --recipe all, params.<recipe>.<key>)", name, ALL_RECIPES)
        if not isinstance(spec.params[name], dict):
            raise HarnessError(f"with --recipe all, params.{name} must be a mapping of that recipe's parameters")
    return [spec.model_copy(update={"recipe": name, "params": dict(spec.params.get(name, {}))}) for name in ALL_RECIPES]


def _metric_cells(record: RunRecord) -> dict[str, tuple[float, float | None]]:
    cells = {}
    for task, entry in record.metrics.items():
        for metric, value in entry.items():
            if isinstance(value, dict) and value.get("value") is not None:
                cells[f"{task} {metric}"] = (value["value"], value.get("stderr"))
    return cells


def recipe_label(record: RunRecord) -> str:
    """The run's recipe variant (e.g. `phased[scorer=ifd-proxy, stage_order=1-2-3]`); records written before
    variants were recorded fall back to the recipe's name."""
    return record.recipe.label


def comparison_table(records: list[RunRecord]) -> Table:
    """Rows = recipes, columns = metrics (value ± stderr, delta vs one-off) and cost."""
    columns = sorted({name for record in records for name in _metric_cells(record)})
    several_seeds = len({record.seed for record in records}) > 1
    baselines = {r.seed: r for r in records if r.recipe.name == "one-off"}  # each seed: its own one-off
    first = records[0]
    table = Table(title=f"recipes on {first.model.name} / {first.data.source} / suite {first.suite.name}")
    table.add_column("recipe")
    for column in columns:
        table.add_column(column, justify="right")
    for column in ("train tokens", "scoring tokens", "wall s"):
        table.add_column(column, justify="right")
    best = {}
    for column in columns:
        values = [cells[column][0] for cells in map(_metric_cells, records) if column in cells]
        best[column] = min(values) if column.rsplit(" ", 1)[-1] in LOWER_IS_BETTER else max(values)
    for record in records:
        cells = _metric_cells(record)
        baseline = baselines.get(record.seed)
        base_cells = _metric_cells(baseline) if baseline else {}
        row = [recipe_label(record) + (f" (seed {record.seed})" if several_seeds else "")]
        for column in columns:
            if column not in cells:
                row.append("-")
                continue
            value, stderr = cells[column]
            text = f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
            if column in base_cells and record is not baseline:
                text += f" ({value - base_cells[column][0]:+.4f})"
            row.append(f"[bold]{text}[/]" if value == best[column] else text)
        cost = record.cost
        row += [f"{cost.train_tokens:,}", f"{cost.scoring_tokens:,}", f"{cost.wall_seconds:.0f}"]
        table.add_row(*row)
    table.caption = "bold = best per column; (±x) = difference from one-off; paired tests: harness leaderboard"
    return table
