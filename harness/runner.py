"""The runner: validate everything first (nothing is written for bad input), then run the recipe's
stages in a run directory named by the spec hash, evaluate, and write one run record atomically.

A run directory holds spec.yaml (the resolved spec), checkpoints/<stage>/ (Trainer checkpoints, so
a rerun resumes), model/ (the final weights), eval/ (per-example results) and record.json.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel
from rich.console import Console

from harness import __version__
from harness.data import InstructionRecord, LoadedData, load_instruction_data
from harness.errors import HarnessError
from harness.evaluation import Suite, load_suite, plan_suite, run_suite
from harness.models import ResolvedModel, load_model_and_tokenizer, resolve_model
from harness.records import (
    RECORD_SCHEMA_VERSION,
    atomic_write_json,
    atomic_write_text,
    git_commit,
    host_info,
    library_versions,
    peak_memory,
)
from harness.spec import RunSpec, spec_to_yaml, validate_params
from harness.templates import tokenize_for_training
from harness.training import TrainResult, resolve_precision, train_sft, weight_dtype


@dataclass
class RecipeOutput:
    model: Any
    tokenizer: Any
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparedRun:
    """Everything validated and loaded before anything is written."""

    spec: RunSpec  # resolved: learning rate, template and recipe params filled in
    recipe: ModuleType
    params: BaseModel
    model_info: ResolvedModel
    data: LoadedData
    suite: Suite

    @property
    def run_id(self) -> str:
        return self.spec.run_id()


def prepare_run(spec: RunSpec) -> PreparedRun:
    from recipes import get_recipe

    recipe = get_recipe(spec.recipe)
    params = validate_params(recipe.Params, spec.params, "recipe params")
    model_info = resolve_model(spec.model, spec.model_path)
    training = spec.training.model_copy(
        update={
            "learning_rate": spec.training.learning_rate or model_info.entry.learning_rate,
            "template": model_info.entry.template if spec.training.template == "auto" else spec.training.template,
            "precision": resolve_precision(spec.training.precision),
        }
    )
    resolved = spec.model_copy(update={"params": params.model_dump(mode="json"), "training": training})
    suite = load_suite(spec.eval.suite)
    plan_suite(suite, online=spec.eval.online)  # unknown tasks or missing data files fail before training
    data = load_instruction_data(spec.data.name, limit=spec.data.limit, dedupe=spec.data.dedupe)
    return PreparedRun(resolved, recipe, params, model_info, data, suite)


class RunContext:
    """What a recipe gets: the resolved spec, its params, the data, the base model and the training core."""

    def __init__(self, prepared: PreparedRun, run_dir: Path, console: Console):
        self.spec = prepared.spec
        self.params = prepared.params
        self.data = prepared.data
        self.model_info = prepared.model_info
        self.run_dir = run_dir
        self.console = console
        self.timings: dict[str, float] = {}
        self.train_results: dict[str, TrainResult] = {}
        self.tokenize_stats: dict[str, dict[str, int]] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - started, 3)

    def base_model(self) -> tuple[Any, Any]:
        """A fresh copy of the base model and its tokenizer, in the run's weight dtype."""
        with self.stage("load_model"):
            return load_model_and_tokenizer(self.model_info, dtype=weight_dtype(self.spec.training.precision))

    def train(self, model: Any, tokenizer: Any, records: list[InstructionRecord], *, stage: str) -> tuple[Any, TrainResult]:
        """Tokenize with the run's template and train with the shared core; checkpoints under checkpoints/<stage>."""
        settings = self.spec.training
        examples, stats = tokenize_for_training(records, tokenizer, settings.template, settings.max_length)
        self.tokenize_stats[stage] = stats.as_record()
        with self.stage(f"train:{stage}"):
            trained, result = train_sft(
                model,
                tokenizer,
                examples,
                settings,
                self.run_dir / "checkpoints" / stage,
                seed=self.spec.seed,
                console=self.console,
                description=f"train {stage}",
            )
        self.train_results[stage] = result
        return trained, result


def find_record(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "record.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def execute_run(prepared: PreparedRun, output_root: Path, console: Console, *, save_model: bool = True) -> dict[str, Any]:
    """Run (or resume) the prepared run and return its record; a finished run is not redone."""
    run_dir = output_root / prepared.run_id
    existing = find_record(run_dir)
    if existing is not None:
        console.print(f"[green]run {prepared.run_id} is already complete[/]: {run_dir / 'record.json'}")
        return existing
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _execute(prepared, run_dir, console, save_model)
    except HarnessError:
        if created:  # a user-input problem found late: leave nothing half-written behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _execute(prepared: PreparedRun, run_dir: Path, console: Console, save_model: bool) -> dict[str, Any]:
    started_at = dt.datetime.now(dt.timezone.utc)
    wall_started = time.perf_counter()
    atomic_write_text(run_dir / "spec.yaml", spec_to_yaml(prepared.spec))
    ctx = RunContext(prepared, run_dir, console)
    console.print(
        f"[bold]run {prepared.run_id}[/]: recipe {prepared.spec.recipe}, model {prepared.model_info.entry.name}, "
        f"{len(prepared.data.records)} records, suite {prepared.suite.name}"
    )
    output = prepared.recipe.run(ctx)
    if save_model:
        with ctx.stage("save_model"):
            output.model.save_pretrained(run_dir / "model")
            output.tokenizer.save_pretrained(run_dir / "model")
    with ctx.stage("evaluate"):
        evaluation = run_suite(
            output.model,
            output.tokenizer,
            prepared.suite,
            output_dir=run_dir / "eval",
            limit=prepared.spec.eval.limit,
            batch_size=prepared.spec.eval.batch_size,
            chat_template=prepared.spec.eval.chat_template,
            seed=prepared.spec.seed,
            online=prepared.spec.eval.online,
        )
    wall = time.perf_counter() - wall_started
    train_tokens = sum(result.real_tokens for result in ctx.train_results.values())
    device_count = 1
    record = {
        "schema_version": RECORD_SCHEMA_VERSION,
        "run_id": prepared.run_id,
        "spec_hash": prepared.spec.content_hash(),
        "started_at": started_at.isoformat(timespec="seconds"),
        "harness_version": __version__,
        "git_commit": git_commit(),
        "seed": prepared.spec.seed,
        "spec": prepared.spec.model_dump(mode="json"),
        "model": prepared.model_info.as_record(),
        "data": prepared.data.summary(),
        "recipe": {"name": prepared.spec.recipe, "params": prepared.params.model_dump(mode="json"), **output.details},
        "training": {stage: result.as_record() for stage, result in ctx.train_results.items()},
        "tokenization": ctx.tokenize_stats,
        "suite": {
            "name": prepared.suite.name,
            "chat_template": evaluation["chat_template"],
            "online": evaluation["online"],
            "limit": evaluation["limit"],
            "skipped": evaluation["skipped"],
        },
        "metrics": evaluation["tasks"],
        "cost": {
            "train_tokens": train_tokens,
            "response_tokens": sum(result.response_tokens for result in ctx.train_results.values()),
            "overhead_tokens": output.details.get("overhead_tokens", 0),
            "wall_seconds": round(wall, 2),
            "device_hours": round(wall * device_count / 3600, 5),
            "judge_cost_usd": 0.0,
        },
        "timings": ctx.timings,
        "memory": peak_memory(),
        "versions": library_versions(),
        "host": host_info(),
    }
    atomic_write_json(run_dir / "record.json", record)
    return record
