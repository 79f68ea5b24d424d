"""Evaluation suites: named lists of lm-eval tasks over shipped data, run in-process on the trained model.

A suite is a small YAML in benchmarks/suites/. Tasks are lm-eval task YAMLs in benchmarks/tasks/ (loaded
with TaskManager(include_path=..., include_defaults=False), so nothing touches the hub). With `online`
(suite option or `--online`) each task maps to lm-eval's own registered task instead (ONLINE_TASKS), for
users with hub access. Suites may also name evaluations that are not lm-eval tasks (`alpaca_eval:`,
`pairwise:`); those run through the module named in EXTRA_SECTIONS, or are skipped with a recorded note.
A section returns metric cells in the lm-eval tasks' shape ({"value", "stderr", "ci_low", "ci_high"}),
so records, comparison tables and the leaderboard show them, and may return per-example rows
(`samples`) that are written to samples_<section>.jsonl for the leaderboard's paired tests.

lm-eval tasks are evaluated by EngineLM (harness/lm_engine.py: HFLM whose log-likelihood requests run
through the scoring engine, equal to HFLM's within float rounding; generation stays HFLM's) or, with
eval.model_class=hflm, by HFLM itself; eval.precision (fp32 default, or bf16) is the dtype of the
evaluated weights. Both are recorded per task (`model_class`, `precision`) and for the run.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from benchmarks.tasks.local_data import use_shipped_nltk_data
from harness.compat import quiet_lm_eval
from harness.errors import HarnessError, closest, unknown_name
from harness.io import atomic_write_json, atomic_write_text

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
SUITES_DIR = BENCHMARKS_DIR / "suites"
TASKS_DIR = BENCHMARKS_DIR / "tasks"
ONLINE_TASKS_DIR = BENCHMARKS_DIR / "tasks_online"

# Local task (or group) -> lm-eval's own registered name, used with `online: true`. MMLU subjects map by
# rule (local_mmlu_<subject> -> mmlu_<subject>); local_mmlu_small maps to a group over lm-eval's subject
# tasks defined in benchmarks/tasks_online/.
ONLINE_TASKS: dict[str, str] = {
    "local_arc_easy": "arc_easy",
    "local_arc_challenge": "arc_challenge",
    "local_hellaswag": "hellaswag",
    "local_mmlu": "mmlu",
    "local_mmlu_small": "harness_mmlu_small",
    "local_truthfulqa_mc1": "truthfulqa_mc1",
    "local_truthfulqa_mc2": "truthfulqa_mc2",
    "local_piqa": "piqa",
    "local_winogrande": "winogrande",
    "local_boolq": "boolq",
    "local_ifeval": "ifeval",
}

# Suite sections that are not lm-eval tasks -> the module that implements them. The module provides
# run_suite_section(model, tokenizer, config: dict, *, output_dir: Path, seed: int, context: SectionContext)
# -> dict of metrics, and optionally check_suite_section(config: dict) -> None, called before training.
EXTRA_SECTIONS: dict[str, str] = {
    "alpaca_eval": "harness.alpaca", "pairwise": "harness.pairwise", "heldout_nll": "harness.heldout_nll",
}
JUDGED_SECTIONS = {"alpaca_eval", "pairwise"}  # eval.judge applies to these
GENERATING_SECTIONS = {"alpaca_eval", "pairwise"}  # they generate with the evaluated model (vLLM with eval.backend vllm)


@dataclass(frozen=True)
class SectionContext:
    """What a section needs to know about the run that the model object does not tell."""

    template: str | None = None  # the run's training template (None: chat when the tokenizer has one, else alpaca)
    base_model: str | None = None  # the run's base model (spec.model) and weights (spec.model_path): the
    base_model_path: str | None = None  # pairwise section's `reference: base`
    generator: str = "model"  # names the run's outputs (the run id)
    backend: str = "hf"  # how the evaluated model generates: hf, or vllm (the model given is then a ServedModel)

    def template_for(self, tokenizer: Any) -> str:
        """Prompts are rendered as in training; without a run (tests, scripts) from the tokenizer."""
        if self.template is not None:
            return self.template
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


class SectionSettings(BaseModel):
    """Keys every judged section shares: the judge, generation settings and the subset size."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    judge: str = Field(description="openai:<model> or local:<model> (harness.judge); eval.judge overrides it")
    judge_options: dict[str, Any] = Field(default_factory=dict, description="harness.judge.JudgeOptions fields")
    limit: int | None = Field(None, gt=0, description="items (AlpacaEval) or questions per set (pairwise); eval.limit overrides it")
    max_new_tokens: int = Field(512, gt=0)
    repetition_penalty: float = Field(1.0, gt=0)
    batch_size: int = Field(8, gt=0)
    max_prompt_tokens: int = Field(2048, gt=0)
    chunk_size: int = Field(64, gt=0, description="generation and judging are saved after every chunk of this many items")

    def generation_settings(self, template: str, backend: str = "hf") -> Any:
        from harness.generation import GenerationSettings

        return GenerationSettings(
            backend=backend,
            max_new_tokens=self.max_new_tokens,
            repetition_penalty=self.repetition_penalty,
            template=template,
            batch_size=self.batch_size,
            max_prompt_tokens=self.max_prompt_tokens,
        )


def parse_section(model: type[BaseModel], config: dict[str, Any], section: str) -> Any:
    """A section's config validated against its settings model; unknown keys and bad values are one line."""
    from harness.spec import _field_paths

    try:
        return model.model_validate(config)
    except ValidationError as error:
        detail = error.errors()[0]
        where = ".".join(str(part) for part in detail["loc"])
        if detail["type"] == "extra_forbidden":
            suggestion = closest(where, _field_paths(model))
            hint = f"; did you mean '{suggestion}'?" if suggestion else ""
            raise HarnessError(f"section {section}: unknown key '{where}'{hint}") from None
        value = detail.get("input")
        shown = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
        raise HarnessError(f"section {section}: key '{where}' = {shown}: {detail['msg'].lower()}") from None


def metric_cell(
    value: float | None, stderr: float | None, *, bounds: tuple[float, float] | None = None, **extra: Any
) -> dict[str, Any]:
    """{"value", "stderr", "ci_low", "ci_high"} as the leaderboard reads it: a 95% normal interval,
    clipped to the metric's range when given (a win rate near 100% cannot go above it)."""
    from harness.stats import normal_interval

    cell: dict[str, Any] = {"value": value, "stderr": stderr}
    if value is not None and stderr is not None:
        low, high = normal_interval(value, stderr)
        if bounds is not None:
            low, high = max(low, bounds[0]), min(high, bounds[1])
        cell["ci_low"], cell["ci_high"] = low, high
    return cell | extra


class SuiteTask(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    task: str = Field(description="a local lm-eval task or group in benchmarks/tasks/")
    num_fewshot: int = Field(0, ge=0)
    limit: int | None = Field(None, gt=0, description="the first N items (lm-eval's limit)")
    sample: int | None = Field(None, gt=0, description="N items drawn at random (fixed seed) per task")
    metrics: list[str] | None = Field(None, description="metrics to record; None: all that lm-eval reports")
    chat_template: bool | None = Field(None, description="None: the suite's setting")
    gen_kwargs: dict[str, Any] | None = Field(None, description="generation overrides, e.g. max_gen_toks")
    primary: str | None = Field(None, description="the metric the headline uses; None: the first of `metrics`")
    chance: float = Field(0.0, ge=0.0, lt=1.0, description="a random guesser's score of the primary metric")

    @property
    def primary_metric(self) -> str | None:
        return self.primary or (self.metrics[0] if self.metrics else None)

    @model_validator(mode="after")
    def _limit_or_sample(self) -> SuiteTask:
        if self.limit is not None and self.sample is not None:
            raise ValueError(f"task {self.task}: give either limit or sample, not both")
        if self.primary is not None and self.metrics is not None and self.primary not in self.metrics:
            raise ValueError(f"task {self.task}: primary metric '{self.primary}' is not one of its metrics {self.metrics}")
        return self


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    description: str
    chat_template: bool = False
    online: bool = Field(False, description="use lm-eval's registered (hub) tasks instead of the local ones")
    sample_seed: int = Field(1234, description="seed of the fixed random subsets (`sample:`)")
    tasks: list[SuiteTask] = []
    alpaca_eval: dict[str, Any] | None = None
    pairwise: dict[str, Any] | None = None
    heldout_nll: dict[str, Any] | None = None


def list_suites() -> dict[str, str]:
    return {path.stem: _read_suite(path).description for path in sorted(SUITES_DIR.glob("*.yaml"))}


def _read_suite(path: Path) -> Suite:
    try:
        return Suite.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except ValidationError as error:
        detail = error.errors()[0]
        where = ".".join(str(part) for part in detail["loc"])
        raise HarnessError(f"suite file {path}: {where}: {detail['msg']}") from None
    except yaml.YAMLError as error:
        raise HarnessError(f"suite file {path}: invalid YAML ({str(error).splitlines()[0]})") from None


def load_suite(name: str) -> Suite:
    path = SUITES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise unknown_name("suite", name, [p.stem for p in SUITES_DIR.glob("*.yaml")])
    return _read_suite(path)


def online_task_name(local: str) -> str:
    """lm-eval's registered name for a local task, subject task or group."""
    if local in ONLINE_TASKS:
        return ONLINE_TASKS[local]
    if local.startswith("local_mmlu_"):
        return local.removeprefix("local_")
    raise HarnessError(f"task '{local}' has no lm-eval counterpart for online mode; add it to ONLINE_TASKS")


def sample_key(task_name: str) -> str:
    """Seed key of a task's random subset: the same for a local task and its online counterpart."""
    return task_name.removeprefix("local_")


def sample_indices(task_name: str, total: int, k: int, seed: int) -> list[int]:
    """A fixed random subset of doc indices, recorded in the run record (k >= total: all docs)."""
    if k >= total:
        return list(range(total))
    return sorted(random.Random(f"{seed}:{sample_key(task_name)}").sample(range(total), k))


@functools.lru_cache(maxsize=2)
def task_manager(online: bool = False) -> Any:
    """The local tasks only (offline), or lm-eval's registered tasks plus benchmarks/tasks_online/."""
    from lm_eval.tasks import TaskManager

    with quiet_lm_eval():
        if online:
            return TaskManager(include_path=str(ONLINE_TASKS_DIR), include_defaults=True)
        return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def _missing_data(error: BaseException) -> BaseException | None:
    """The MissingTaskData (a FileNotFoundError) anywhere in an exception chain lm-eval may have wrapped."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, FileNotFoundError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@dataclass
class PlannedTask:
    """One suite entry resolved against lm-eval: the name to run and its leaf tasks with their sizes."""

    entry: SuiteTask
    name: str
    leaves: dict[str, int]
    is_group: bool
    max_gen_toks: int | None = None  # the largest generation budget of its leaves (generative tasks)
    generative: bool = False  # some leaf generates text (generate_until)


@quiet_lm_eval()
def plan_suite(suite: Suite, *, online: bool | None = None) -> list[PlannedTask]:
    """Resolve every lm-eval task of the suite and build its documents, before anything is evaluated:
    an unknown task or a missing data file is a one-line error, not a failure halfway through."""
    use_online = suite.online if online is None else online
    use_shipped_nltk_data()  # IFEval's checkers (inside lm-eval) need NLTK's punkt tables: never download
    manager = task_manager(use_online)
    planned = []
    for entry in suite.tasks:
        name = online_task_name(entry.task) if use_online else entry.task
        if name not in manager.all_tasks:
            raise unknown_name("lm-eval task", name, manager.all_tasks)
        try:
            loaded = manager.load(name)
        except Exception as error:  # lm-eval wraps loader errors; report them on one line
            if use_online:
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise HarnessError(
                    f"task {name} (online): could not load it from the hub ({reason}); "
                    "without --online the suite runs on the shipped data"
                ) from None
            missing = _missing_data(error)
            if missing is None:
                raise
            raise HarnessError(f"task {name}: {missing}") from None
        leaves = {task_name: len(list(task.eval_docs)) for task_name, task in loaded["tasks"].items()}
        budgets = [
            int((task.config.generation_kwargs or {}).get("max_gen_toks", 0) or 0)
            for task in loaded["tasks"].values()
            if task.config.output_type == "generate_until"
        ]
        max_gen_toks = max(budgets) if budgets and max(budgets) > 0 else None
        generative = any(task.config.output_type == "generate_until" for task in loaded["tasks"].values())
        planned.append(PlannedTask(entry, name, leaves, is_group=bool(loaded["groups"]), max_gen_toks=max_gen_toks,
                                   generative=generative))
    return planned


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and not math.isnan(value):
        return float(value)
    return None


def stderr_from_samples(value: float, per_sample: list[Any]) -> float | None:
    """A standard error when lm-eval reports none: the mean's (sd/sqrt(n)) for scalar per-item scores,
    or the ratio estimator's (delta method, items as clusters) for list-valued ones that lm-eval
    flattens (IFEval's instruction-level accuracy). None unless it reproduces lm-eval's value."""
    n = len(per_sample)
    if n < 2:
        return None
    if all(isinstance(v, (list, tuple)) for v in per_sample):
        totals = [sum(float(x) for x in v) for v in per_sample]
        counts = [len(v) for v in per_sample]
        ratio = sum(totals) / sum(counts)
        if abs(ratio - value) > 1e-9:
            return None
        residual_ss = sum((t - ratio * c) ** 2 for t, c in zip(totals, counts, strict=True))
        return math.sqrt(n / (n - 1) * residual_ss) / sum(counts)
    values = [float(v) for v in per_sample]
    mean = sum(values) / n
    if abs(mean - value) > 1e-9:
        return None
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _metric_names(task_results: dict[str, Any]) -> list[str]:
    names = []
    for key in task_results:
        metric, _, filter_name = key.partition(",")
        if filter_name == "none" and not metric.endswith("_stderr"):
            names.append(metric)
    return names


def _metrics_entry(task_results: dict[str, Any], samples: list[dict[str, Any]], metrics: list[str] | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"n": len(samples)}
    for metric in metrics or _metric_names(task_results):
        value = _number(task_results.get(f"{metric},none"))
        stderr = _number(task_results.get(f"{metric}_stderr,none"))
        if value is not None and stderr is None:
            stderr = stderr_from_samples(value, [s[metric] for s in samples if metric in s])
        entry[metric] = {"value": value, "stderr": stderr}
    return entry


def _sample_row(task_name: str, sample: dict[str, Any]) -> dict[str, Any]:
    """One evaluated item, for paired statistics across runs: every metric lm-eval scored it on, plus the
    model's output (generated text, or the log-likelihood of each choice)."""
    row: dict[str, Any] = {
        "task": task_name,
        "doc_id": sample["doc_id"],
        "doc_hash": sample.get("doc_hash"),
        "prompt_hash": sample.get("prompt_hash"),
        "target": sample.get("target"),
    }
    for metric in sample.get("metrics", []):
        row[metric] = sample.get(metric)
    responses = sample.get("filtered_resps") or []
    if responses and isinstance(responses[0], str):
        row["response"] = responses[0]
    elif responses and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in responses):
        row["loglikelihoods"] = [float(r[0]) for r in responses]
    return row


def check_chat_template(suite: Suite, tokenizer: Any, chat_template: bool | None) -> None:
    """A suite task that prompts through the chat template needs a tokenizer that has one. The runner checks
    this before training too, so a model without one fails in seconds, not after the training it came for."""
    chat = {entry.task: _uses_chat_template(entry, suite, chat_template) for entry in suite.tasks}
    if any(chat.values()) and not getattr(tokenizer, "chat_template", None):
        task = next(name for name, used in chat.items() if used)
        raise HarnessError(
            f"suite {suite.name}: task {task} uses the chat template but the model's tokenizer has none; "
            "set eval.chat_template=false"
        )


def _uses_chat_template(entry: SuiteTask, suite: Suite, override: bool | None) -> bool:
    """The run's setting (eval.chat_template) wins, then the task's, then the suite's."""
    if override is not None:
        return override
    return entry.chat_template if entry.chat_template is not None else suite.chat_template


def _fit_generation_budget(plan: PlannedTask, context: int) -> tuple[dict[str, Any] | None, str | None]:
    """The task's gen_kwargs, with max_gen_toks capped to half the model's context when the task's budget
    would leave no room for the prompt (lm-eval refuses then; e.g. IFEval's 1280 on a 1024-token model).
    Models with a long enough context run the task exactly as configured."""
    gen_kwargs = plan.entry.gen_kwargs
    budget = (gen_kwargs or {}).get("max_gen_toks", plan.max_gen_toks)
    if budget is None or int(budget) < context:
        return gen_kwargs, None
    capped = context // 2
    note = f"max_gen_toks capped from {budget} to {capped}: the model's context is {context} tokens"
    return {**(gen_kwargs or {}), "max_gen_toks": capped}, note


REQUEST_CACHE_DIR = "request_cache"  # lm-eval's request cache (one SQLite file per task) under an eval folder


def _task_settings(entry: SuiteTask, limit: int | None, indices: Any, use_chat: bool, online: bool, seed: int,
                   batch_size: int | str, produced_by: dict[str, str]) -> dict[str, Any]:
    """Everything besides the model (fixed by the run directory) that determines a task's result."""
    from importlib.metadata import version

    return {
        "entry": entry.model_dump(mode="json"), "limit": limit, "samples": indices, "chat_template": use_chat,
        "online": online, "seed": seed, "batch_size": batch_size, "lm_eval": version("lm_eval"), **produced_by,
    }


def _saved_task_result(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """A task result saved by an earlier, interrupted attempt of this run, if it was for the same settings."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(saved, dict) or saved.get("settings") != json.loads(json.dumps(settings)):
        return None
    return saved.get("result")


def _counting_lm_class(model_class: str = "engine") -> type:
    """The evaluation model (EngineLM: log-likelihoods through the scoring engine, harness/lm_engine.py;
    or lm-eval's HFLM), counting the requests it computes (lm-eval reports each one to its cache hook,
    which simple_evaluate(use_cache=...) points at the SQLite request cache)."""
    from lm_eval.models.huggingface import HFLM

    from harness.interrupts import KILL_AT_ENV, kill_point_for_tests
    from harness.lm_engine import MODEL_CLASSES, EngineLM

    if model_class == "vllm":
        from lm_eval.models.openai_completions import LocalCompletionsAPI

        base = LocalCompletionsAPI
    elif model_class not in MODEL_CLASSES:
        raise HarnessError(f"eval.model_class = {model_class!r}: use one of {', '.join(MODEL_CLASSES)}")
    else:
        base = EngineLM if model_class == "engine" else HFLM

    class CountingHook:
        def __init__(self, inner: Any, owner: Any):
            self.inner, self.owner = inner, owner

        def add_partial(self, attr: str, req: Any, res: Any) -> None:
            self.inner.add_partial(attr, req, res)
            self.owner.requests_computed += 1
            if os.environ.get(KILL_AT_ENV) and getattr(self.inner, "dbdict", None) is not None:
                self.inner.dbdict.commit()  # what a real kill finds on disk: the requests committed so far
                kill_point_for_tests(f"eval/{self.owner.current_task}", self.owner.requests_computed)

    class CountingLM(base):  # type: ignore[valid-type, misc]
        requests_computed = 0
        current_task = ""

        def set_cache_hook(self, cache_hook: Any) -> None:
            super().set_cache_hook(CountingHook(cache_hook, self))

    return CountingLM


def _task_model(plan: PlannedTask, lm: Any, precision: str) -> dict[str, str]:
    """Which evaluation model class and precision produced a task's numbers (recorded per task):
    log-likelihood tasks go through the engine when the run uses it, generation is HFLM's or vLLM's."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    if isinstance(lm, LocalCompletionsAPI):
        return {"model_class": "vllm", "precision": precision}
    engine = getattr(lm, "uses_engine", False) and not plan.generative
    return {"model_class": "engine" if engine else "hflm", "precision": precision}


def _max_length(model: Any, tokenizer: Any) -> int:
    """The context length lm-eval's HFLM would use for this model (its _max_length rule)."""
    for attribute in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, attribute, None)
        if value:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 1e9 else 2048


def served_lm_arguments(served: Any, model: Any, tokenizer: Any) -> dict[str, Any]:
    """lm-eval's local-completions model pointed at the vLLM server: token-id requests (the evaluated
    model's own tokenizer), many in flight, the same context length HFLM would use."""
    return {
        "model": served.name, "base_url": f"{served.base_url}/completions", "tokenizer": str(served.weights_dir),
        "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": 64, "max_retries": 3,
        "max_length": _max_length(model, tokenizer) + 1, "timeout": 3600,  # it keeps max_length - 1
    }


@quiet_lm_eval()  # lm-eval's logging, git lookup and cache-check bar (harness/compat.py)
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
    online: bool | None = None,
    resume: bool = False,
    model_class: str = "engine",
    precision: str = "fp32",
    generative: bool | None = None,
    served: Any = None,
) -> dict[str, Any]:
    """Run every lm-eval task of the suite on an in-memory model.

    `generative` (None: all tasks) runs only the generate-until tasks (True) or only the others (False);
    `served` (a harness.vllm_server.ServedModel of the same weights) runs them through vLLM, with lm-eval's
    local-completions model, instead of on `model`.

    `model_class`: "engine" (log-likelihood requests through the scoring engine, harness/lm_engine.py;
    generation through HFLM) or "hflm" (lm-eval's HFLM for everything). `precision`: the dtype of the
    evaluated weights, fp32 (default: comparable with published lm-eval numbers) or bf16; a copy is
    made when the model's own differs, so what follows (other sections) sees the model unchanged.

    Returns {"tasks": {task: {metric: {"value", "stderr"}, "n", "num_fewshot", "limit", "sample", ...}},
    "work": counters, ...} and writes per-example results to output_dir/samples_<task>.jsonl (for paired
    statistics later). `limit` (first N items per task) overrides the suite's limits and random subsets.
    `resume` (the runner: output_dir belongs to one run, so to one model) keeps each finished task's
    result in output_dir/result_<task>.json and lm-eval's request cache in output_dir/request_cache/,
    and reuses both; off, nothing is reused (the same folder may see another model)."""
    from lm_eval import simple_evaluate

    use_online = suite.online if online is None else online
    planned = [plan for plan in plan_suite(suite, online=use_online) if generative is None or plan.generative == generative]
    check_chat_template(suite, tokenizer, chat_template)
    chat = {plan.entry.task: _uses_chat_template(plan.entry, suite, chat_template) for plan in planned}
    from harness.accelerator import process_device
    from harness.lm_engine import model_in_precision, token_budget_for

    device = process_device()
    model.eval()
    if served is not None:
        lm = _counting_lm_class("vllm")(**served_lm_arguments(served, model, tokenizer))
        lm_batch_size: int | str = "served"
        precision = "bf16"  # vLLM serves the weights in bf16 (vllm_server.vllm_server's dtype)
    else:
        lm_class = _counting_lm_class(model_class)
        evaluated = model_in_precision(model, precision)
        budget = {"token_budget": token_budget_for(device)} if model_class == "engine" else {}
        # on a GPU lm-eval finds the largest batch that fits (its batch_size "auto") for what HFLM computes itself
        # (generation; log-likelihoods too with model_class hflm); on the CPU the fixed size keeps numbers put
        lm_batch_size = "auto" if device.type == "cuda" else batch_size
        lm = lm_class(pretrained=evaluated, tokenizer=tokenizer, device=str(device), batch_size=lm_batch_size, **budget)
    manager = task_manager(use_online)
    output_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    work = {"tasks_computed": 0, "tasks_reused": 0, "requests_computed": 0, "requests_cached": 0}
    for plan in planned:
        entry = plan.entry
        use_chat = chat[entry.task]
        task_limit = limit if limit is not None else entry.limit
        indices = None
        if limit is None and entry.sample is not None:
            indices = {leaf: sample_indices(leaf, total, entry.sample, suite.sample_seed) for leaf, total in plan.leaves.items()}
        gen_kwargs, capped = _fit_generation_budget(plan, lm.max_length)
        # Resume: a task finished by an earlier attempt is reused; a task cut short replays the requests
        # its attempt computed from lm-eval's request cache (per task, per evaluated model folder).
        produced_by = _task_model(plan, lm, precision)
        settings = _task_settings(entry, task_limit, indices, use_chat, use_online, seed, lm_batch_size, produced_by)
        result_path = output_dir / f"result_{entry.task}.json"
        saved = _saved_task_result(result_path, settings) if resume else None
        if saved is not None and (output_dir / f"samples_{entry.task}.jsonl").is_file():
            results[entry.task] = saved
            work["tasks_reused"] += 1
            continue
        cache_path = output_dir / REQUEST_CACHE_DIR / entry.task
        lm.requests_computed, lm.current_task = 0, entry.task
        started = time.perf_counter()
        output = simple_evaluate(
            model=lm,
            use_cache=str(cache_path) if resume else None,
            tasks=[plan.name],
            num_fewshot=entry.num_fewshot,
            limit=task_limit,
            samples=indices,
            task_manager=manager,
            apply_chat_template=use_chat,
            fewshot_as_multiturn=use_chat,
            gen_kwargs=gen_kwargs,
            bootstrap_iters=1000,
            log_samples=True,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        seconds = time.perf_counter() - started
        samples = [(leaf, s) for leaf in plan.leaves for s in output["samples"].get(leaf, [])]
        record = _metrics_entry(output["results"][plan.name], [s for _, s in samples], entry.metrics)
        record.update(
            {
                "lm_eval_task": plan.name,
                "num_fewshot": entry.num_fewshot,
                "limit": task_limit,
                "sample": None
                if indices is None
                else {"per_task": entry.sample, "seed": suite.sample_seed, "doc_ids": indices},
                "chat_template": use_chat,
                "gen_kwargs": gen_kwargs,
                **produced_by,
                "seconds": round(seconds, 2),
            }
        )
        if capped:
            record["note"] = capped
        if plan.is_group:
            record["subtasks"] = {
                leaf: _metrics_entry(output["results"][leaf], output["samples"].get(leaf, []), entry.metrics)
                for leaf in plan.leaves
            }
        results[entry.task] = record
        lines = [json.dumps(_sample_row(leaf, s), sort_keys=True, default=str) for leaf, s in samples]
        atomic_write_text(output_dir / f"samples_{entry.task}.jsonl", "\n".join(lines) + "\n")
        requests = sum(len(sample.get("resps") or []) for _, sample in samples)
        computed = lm.requests_computed if resume else requests  # (without the cache no hook counts them)
        work["tasks_computed"] += 1
        work["requests_computed"] += computed
        work["requests_cached"] += max(requests - computed, 0)  # replayed from the request cache
        if resume:
            atomic_write_json(result_path, {"settings": settings, "result": record})
    return {
        "tasks": results,
        "work": work,
        "online": use_online,
        "chat_template": suite.chat_template if chat_template is None else chat_template,
        "limit": limit,
        "model_class": model_class,
        "precision": precision,
    }


def _section_configs(suite: Suite, *, limit: int | None, judge: str | None) -> dict[str, dict[str, Any]]:
    """Each configured section's keys, with the run's eval.limit and eval.judge laid over the suite's."""
    configs = {}
    for key in EXTRA_SECTIONS:
        config = getattr(suite, key)
        if config is None:
            continue
        config = dict(config)
        if limit is not None:
            config["limit"] = limit
        if judge is not None and key in JUDGED_SECTIONS:
            config["judge"] = judge
        configs[key] = config
    return configs


def _section_function(module_name: str, function: str) -> tuple[Any, str | None]:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        return None, f"not implemented yet ({module_name} is absent)"
    found = getattr(module, function, None)
    if found is None and function == "run_suite_section":
        return None, f"not implemented yet ({module_name} has no run_suite_section)"
    return found, None


def check_sections(suite: Suite, *, limit: int | None = None, judge: str | None = None) -> None:
    """Validate the sections' configs and judges before anything is trained: a mistyped key, an unknown
    judge or a missing OPENAI_API_KEY is a one-line error now, not after hours of training."""
    for key, config in _section_configs(suite, limit=limit, judge=judge).items():
        check, _ = _section_function(EXTRA_SECTIONS[key], "check_suite_section")
        if check is None:
            continue
        try:
            check(config)
        except HarnessError as error:
            raise HarnessError(f"suite {suite.name}: {error}") from None


def run_extra_sections(
    model: Any,
    tokenizer: Any,
    suite: Suite,
    *,
    output_dir: Path,
    seed: int = 0,
    limit: int | None = None,
    judge: str | None = None,
    context: SectionContext | None = None,
    keys: set[str] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Suite sections that are not lm-eval tasks: run through their module's run_suite_section, or skip
    with a note (returned, and recorded by the runner) when that module is not there yet. `limit` and
    `judge` (the run's eval.limit and eval.judge) override the sections' own. Per-example rows a section
    returns under `samples` go to output_dir/samples_<section>.jsonl, like the lm-eval tasks' rows."""
    metrics: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for key, config in _section_configs(suite, limit=limit, judge=judge).items():
        if keys is not None and key not in keys:
            continue
        section, reason = _section_function(EXTRA_SECTIONS[key], "run_suite_section")
        if section is None:
            skipped[key] = reason or "not implemented"
            continue
        result = section(model, tokenizer, config, output_dir=output_dir / key, seed=seed, context=context or SectionContext())
        samples = result.pop("samples", None)
        if samples:
            lines = [json.dumps(row, sort_keys=True, default=str) for row in samples]
            atomic_write_text(output_dir / f"samples_{key}.jsonl", "\n".join(lines) + "\n")
        metrics[key] = result
    return metrics, skipped


def run_suite(
    model: Any,
    tokenizer: Any,
    suite: Suite,
    *,
    output_dir: Path,
    limit: int | None = None,
    batch_size: int = 8,
    chat_template: bool | None = None,
    seed: int = 0,
    online: bool | None = None,
    judge: str | None = None,
    context: SectionContext | None = None,
    resume: bool = False,
    model_class: str = "engine",
    precision: str = "fp32",
    backend: str = "hf",
    weights_dir: Path | None = None,
) -> dict[str, Any]:
    """The whole suite: its lm-eval tasks, then its other sections. Returns {"tasks": metrics by task or
    section, "work", "online", "skipped": {section: why}, "judge_cost_usd": what the sections' judges
    cost, "backend"}. `resume`, `model_class`, `precision`: see run_lm_eval (the sections keep their own
    generation and verdict caches, and run on the model as given).

    `backend` (eval.backend: auto, hf or vllm; see harness.vllm_server) decides how the evaluated model
    generates. With vLLM the passes that score run first on the model as given (log-likelihood tasks,
    heldout_nll), then the model steps off the GPU and a vLLM server of the same weights (`weights_dir`
    when they are saved there) answers the generate-until tasks and the AlpacaEval and pairwise sections."""
    from harness.accelerator import process_device
    from harness.generation import _stop_token_ids
    from harness.vllm_server import resolve_backend, serve_evaluated, vllm_command

    context = context or SectionContext()
    resolved = resolve_backend(backend, process_device().type, vllm_command() if backend != "hf" else None)
    common = {"limit": limit, "batch_size": batch_size, "chat_template": chat_template, "seed": seed, "online": online,
              "resume": resume, "model_class": model_class, "precision": precision}
    sections = {"limit": limit, "judge": judge, "seed": seed}
    if resolved == "hf":
        evaluation = run_lm_eval(model, tokenizer, suite, output_dir=output_dir, **common)
        extra, skipped = run_extra_sections(model, tokenizer, suite, output_dir=output_dir, context=context, **sections)
    else:
        scored = run_lm_eval(model, tokenizer, suite, output_dir=output_dir, generative=False, **common)
        extra, skipped = run_extra_sections(
            model, tokenizer, suite, output_dir=output_dir, context=context, keys=set(EXTRA_SECTIONS) - GENERATING_SECTIONS,
            **sections,
        )
        with serve_evaluated(
            model, tokenizer, _stop_token_ids(model, tokenizer), output_dir=output_dir, weights_dir=weights_dir, seed=seed
        ) as served:
            generated = run_lm_eval(model, tokenizer, suite, output_dir=output_dir, generative=True, served=served, **common)
            extra_served, skipped_served = run_extra_sections(
                served, tokenizer, suite, output_dir=output_dir, context=dataclasses.replace(context, backend="vllm"),
                keys=GENERATING_SECTIONS, **sections,
            )
        order = [plan.entry.task for plan in plan_suite(suite, online=scored["online"])]
        tasks = scored["tasks"] | generated["tasks"]
        evaluation = scored | {
            "tasks": {task: tasks[task] for task in order if task in tasks},
            "work": {key: scored["work"][key] + generated["work"][key] for key in scored["work"]},
        }
        extra = {key: (extra | extra_served)[key] for key in EXTRA_SECTIONS if key in extra or key in extra_served}
        skipped |= skipped_served
    evaluation["tasks"].update(extra)
    evaluation["skipped"] = skipped
    evaluation["backend"] = resolved
    costs = [entry.get("judge_cost_usd") for entry in extra.values()]
    known = [c for c in costs if isinstance(c, (int, float))]
    evaluation["judge_cost_usd"] = round(sum(known), 6) if known else None
    return evaluation
