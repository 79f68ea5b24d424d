"""Evaluation suites: named lists of lm-eval tasks over shipped data, run in-process on the trained model.

A suite is a small YAML in benchmarks/suites/. Tasks are lm-eval task YAMLs in benchmarks/tasks/
(loaded with TaskManager(include_path=..., include_defaults=False), so nothing touches the hub)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.errors import HarnessError, unknown_name
from harness.records import atomic_write_text

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
SUITES_DIR = BENCHMARKS_DIR / "suites"
TASKS_DIR = BENCHMARKS_DIR / "tasks"


class SuiteTask(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    task: str
    num_fewshot: int = Field(0, ge=0)
    limit: int | None = Field(None, gt=0)
    metrics: list[str] = ["acc"]


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    description: str
    chat_template: bool = False
    tasks: list[SuiteTask]


def list_suites() -> dict[str, str]:
    return {path.stem: _read_suite(path).description for path in sorted(SUITES_DIR.glob("*.yaml"))}


def _read_suite(path: Path) -> Suite:
    try:
        return Suite.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (yaml.YAMLError, ValidationError) as error:
        raise HarnessError(f"suite file {path}: invalid ({str(error).splitlines()[0]})") from None


def load_suite(name: str) -> Suite:
    path = SUITES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise unknown_name("suite", name, [p.stem for p in SUITES_DIR.glob("*.yaml")])
    return _read_suite(path)


def _quiet_lm_eval() -> None:
    for name in ("lm-eval", "lm_eval", "lm_eval.evaluator", "lm_eval.api.task", "lm_eval.models.huggingface"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    suite: Suite,
    *,
    output_dir: Path,
    limit: int | None = None,
    batch_size: int = 8,
    chat_template: bool | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run every lm-eval task of the suite on an in-memory model.

    Returns {task: {metric: {"value", "stderr"}, "n": items, "num_fewshot", "limit", "seconds"}} and
    writes per-example results to output_dir/samples_<task>.jsonl (for paired statistics later)."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    use_chat = suite.chat_template if chat_template is None else chat_template
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    output_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for suite_task in suite.tasks:
        if suite_task.task not in task_manager.all_tasks:
            raise unknown_name("lm-eval task", suite_task.task, task_manager.all_tasks)
        task_limit = limit if limit is not None else suite_task.limit
        started = time.perf_counter()
        try:
            output = simple_evaluate(
                model=lm,
                tasks=[suite_task.task],
                num_fewshot=suite_task.num_fewshot,
                limit=task_limit,
                task_manager=task_manager,
                apply_chat_template=use_chat,
                fewshot_as_multiturn=use_chat,
                bootstrap_iters=1000,
                log_samples=True,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except FileNotFoundError as error:
            raise HarnessError(f"task {suite_task.task}: {error}") from None
        seconds = time.perf_counter() - started
        task_results = output["results"][suite_task.task]
        samples = output["samples"][suite_task.task]
        entry: dict[str, Any] = {
            "n": len(samples),
            "num_fewshot": suite_task.num_fewshot,
            "limit": task_limit,
            "seconds": round(seconds, 2),
        }
        for metric in suite_task.metrics:
            value = task_results.get(f"{metric},none")
            stderr = task_results.get(f"{metric}_stderr,none")
            entry[metric] = {
                "value": float(value) if value is not None else None,
                "stderr": float(stderr) if isinstance(stderr, (int, float)) and not math.isnan(stderr) else None,
            }
        results[suite_task.task] = entry
        lines = [
            json.dumps(
                {"doc_id": s["doc_id"], "doc_hash": s["doc_hash"], **{m: s.get(m) for m in suite_task.metrics}},
                sort_keys=True,
            )
            for s in samples
        ]
        atomic_write_text(output_dir / f"samples_{suite_task.task}.jsonl", "\n".join(lines) + "\n")
    return {"tasks": results, "chat_template": use_chat}
