"""`harness power`: the minimum detectable effect (MDE) of a study before it is paid for.

A recipe-minus-baseline difference on one task, both recipes trained with K seeds and scored on the
same N items, has a standard error of about sqrt(D / (K N) + 2 s^2 / K) (harness.stats.planned_stderr:
D = the share of items on which two checkpoints disagree, s = the seed-to-seed SD of a checkpoint's
score). The MDE at 80% power and two-sided level alpha is (z_{1-alpha/2} + z_0.8) times that. The
headline is the mean over tasks of the chance-normalised primary metric, (x - chance) / (1 - chance), as
the Open LLM Leaderboard v2 normalises; its standard error follows from the tasks' (independent items).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import yaml

from harness import stats
from harness.evaluation import TASKS_DIR, Suite, plan_suite


@dataclass(frozen=True)
class TaskPower:
    task: str
    metric: str | None
    items: int
    chance: float
    stderr: float  # of the difference, in the metric's own units (0-1)
    mde: float  # the same units
    normalised_mde: float  # in chance-normalised units


@dataclass(frozen=True)
class StudyPower:
    tasks: list[TaskPower]
    headline_stderr: float
    headline_mde: float
    seeds: int
    discordance: float
    seed_sd: float
    alpha: float
    power: float


def group_size(task: str) -> int:
    """Subtasks of a local task group (a YAML with `group: <task>` in benchmarks/tasks/), 1 for a task:
    lm-eval applies a limit, and the suite a sample, to each subtask of a group."""
    for path in TASKS_DIR.rglob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        if f"group: {task}\n" in text:
            config = yaml.safe_load(text)
            return len(config.get("task") or []) or 1
    return 1


def items_per_task(suite: Suite, limit: int | None) -> dict[str, int]:
    """Items each task is scored on: --limit, else the suite's sample or limit (per subtask of a group),
    else the whole task (which needs its data loaded; only then is lm-eval asked)."""
    counts: dict[str, int] = {}
    unknown = []
    for entry in suite.tasks:
        planned = limit if limit is not None else (entry.sample or entry.limit)
        if planned is None:
            unknown.append(entry.task)
        else:
            counts[entry.task] = planned * group_size(entry.task)
    if unknown:
        for plan in plan_suite(suite):
            if plan.entry.task in unknown:
                counts[plan.entry.task] = sum(plan.leaves.values())
    return counts


def study_power(suite: Suite, *, limit: int | None = None, seeds: int = 1, discordance: float = 0.15,
                seed_sd: float = 0.0, alpha: float = stats.ALPHA, power: float = stats.POWER) -> StudyPower:
    counts = items_per_task(suite, limit)
    rows = []
    for entry in suite.tasks:
        n = counts[entry.task]
        stderr = stats.planned_stderr(n, discordance=discordance, seeds=seeds, seed_sd=seed_sd)
        mde = stats.minimum_detectable_effect(stderr, alpha=alpha, power=power)
        rows.append(TaskPower(entry.task, entry.primary_metric, n, entry.chance, stderr, mde,
                              mde / (1.0 - entry.chance)))
    headline_stderr = math.sqrt(sum((row.stderr / (1.0 - row.chance)) ** 2 for row in rows)) / len(rows) if rows else 0.0
    headline_mde = stats.minimum_detectable_effect(headline_stderr, alpha=alpha, power=power)
    return StudyPower(rows, headline_stderr, headline_mde, seeds, discordance, seed_sd, alpha, power)
