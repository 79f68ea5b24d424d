"""The runner: validate everything first (nothing is written for bad input), then run the recipe's
stages in a run directory named by the spec hash, evaluate, and write one run record atomically.

A run directory holds spec.yaml (the resolved spec), checkpoints/<stage>/ (Trainer checkpoints, so
a rerun resumes), model/ (the final weights), eval/ (per-example results), artifacts/ (what a recipe
leaves for inspection, e.g. SFTMix's confidences) and record.json.

Several processes (harness run --nproc N, accelerate launch, torchrun) all run the recipe, since
training takes every one of them; only the main process writes the run directory and evaluates
(harness.distributed).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from pydantic import BaseModel
from rich.console import Console

from harness import __version__, accelerator, cpu_kernels, distributed, memory
from harness.artifacts import ArtifactCache, content_key, file_digest
from harness.data import InstructionRecord, LoadedData, load_instruction_data
from harness.errors import HarnessError
from harness.evaluation import (
    SectionContext,
    Suite,
    check_chat_template,
    check_sections,
    load_suite,
    plan_suite,
    run_suite,
)
from harness.io import atomic_write_json, atomic_write_text
from harness.models import ResolvedModel, load_model_and_tokenizer, load_tokenizer, resolve_model
from harness.record import RecordInvalid, RunRecord, record_digest
from harness.records import (
    RECORD_SCHEMA_VERSION,
    git_commit,
    host_info,
    library_versions,
    peak_memory,
)
from harness.scoring import IFDScores, Overlength, ScoringStats, compute_ifd
from harness.spec import RunSpec, spec_to_yaml, validate_params
from harness.templates import tokenize_for_training
from harness.training import (
    ExtraLoss,
    Tracking,
    TrainResult,
    base_weight_dtype,
    check_trackers,
    log_final_metrics,
    resolve_precision,
    train_sft,
    weight_dtype,
)
from harness.vllm_server import resolve_backend, vllm_command

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Overhead:
    """The method's cost that the runner cannot see for itself, added to the record's cost section.

    Training through ctx.train(overhead=True) and scoring through ctx.ifd are counted already; this is
    the rest, so that a recipe's cost is complete whether or not its artifacts came from the cache."""

    scoring_tokens: int = 0  # forward-only tokens beyond ctx.scoring (an embedding pass, a local judge)
    cached_train_tokens: int = 0  # overhead training a cached artifact spared this run: still the method's cost
    judge_cost_usd: float = 0.0  # the recipe's own API judge (the evaluation's judges are counted apart)


@dataclass
class RecipeOutput:
    model: Any
    tokenizer: Any
    # the recipe's own report, written into the record's recipe section as given (the runner reads none of it)
    details: dict[str, Any] = field(default_factory=dict)
    overhead: Overhead = field(default_factory=Overhead)
    # values of the recipe's VARIANT_PARAMS that only the run resolves (e.g. Phased IFT's scorer `auto`)
    variant_params: dict[str, Any] = field(default_factory=dict)


def _variant_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(_variant_value(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def recipe_variant(recipe: ModuleType, params: BaseModel, resolved: dict[str, Any] | None = None) -> str:
    """The recipe's name on the leaderboard: its name plus the parameters its module lists in
    VARIANT_PARAMS (resolved values first), e.g. `phased[scorer=ifd-proxy, stage_order=1-2-3]`, leaving out
    those that are None (e.g. no control); recipes without VARIANT_PARAMS are named by their name alone."""
    names = getattr(recipe, "VARIANT_PARAMS", ())
    if not names:
        return recipe.NAME
    resolved = resolved or {}
    chosen = {name: resolved.get(name, getattr(params, name)) for name in names}
    values = [f"{name}={_variant_value(value)}" for name, value in chosen.items() if value is not None]  # unset: not named
    return f"{recipe.NAME}[{', '.join(values)}]"


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
        """The spec's hash with the data's content and the harness version folded in: changing a config
        value, the data file's content or the harness version gives a new run directory."""
        return self.spec.run_id(salt=f"{self.data.content_hash()}|{__version__}")


def resolve_spec(spec: RunSpec) -> tuple[RunSpec, ModuleType, BaseModel, ResolvedModel]:
    """The spec as the run will use it: the recipe's params validated with their defaults filled in, and
    the model set's learning rate, template and precision where the spec says auto. Loads nothing (the
    dry run prints this)."""
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
    check_trackers(training)
    resolved = spec.model_copy(update={"params": params.model_dump(mode="json"), "training": training})
    return resolved, recipe, params, model_info


def prepare_run(spec: RunSpec) -> PreparedRun:
    resolved, recipe, params, model_info = resolve_spec(spec)
    data = load_instruction_data(spec.data.name, limit=spec.data.limit, dedupe=spec.data.dedupe)
    suite = load_suite(spec.eval.suite)
    plan_suite(suite, online=spec.eval.online)  # unknown tasks or missing data files fail before training
    check_sections(suite, limit=spec.eval.limit, judge=spec.eval.judge)  # judges and section keys, too
    if spec.eval.backend == "vllm":  # eval.backend=vllm without a vLLM to start fails now, not after training
        resolve_backend("vllm", accelerator.process_device().type, vllm_command())
    return PreparedRun(resolved, recipe, params, model_info, data, suite)


P = TypeVar("P", bound=BaseModel)


class RunContext(Generic[P]):
    """What a recipe gets: the resolved spec, its params, the data, the base model and the training core.

    Generic over the recipe's Params, so that `def run(ctx: RunContext[Params])` types `ctx.params`."""

    def __init__(self, prepared: PreparedRun, run_dir: Path, console: Console):
        self.spec = prepared.spec
        self.params = cast(P, prepared.params)  # validated against the recipe's Params by resolve_spec
        self.data = prepared.data
        self.model_info = prepared.model_info
        self.run_dir = run_dir
        self.console = console
        self.timings: dict[str, float] = {}
        self.suite = prepared.suite
        self.train_results: dict[str, TrainResult] = {}
        self.overhead_stages: set[str] = set()
        self.tokenize_stats: dict[str, dict[str, int]] = {}
        self.cache = ArtifactCache()
        self.scoring = ScoringStats()  # forward passes spent on scoring (the recipe's overhead)
        self.training_work: dict[str, dict[str, Any]] = {}  # per stage: steps this attempt ran, reused or resumed
        self.evaluation_work: dict[str, dict[str, int]] = {}  # per intermediate evaluation: tasks/requests computed
        precision = self.spec.training.precision
        self.base_dtype = base_weight_dtype(self.spec.training, accelerator.process_device().type)
        self.base_model_key = f"{self.model_info.entry.name}|{self.model_info.weights}|{precision}"
        if self.base_dtype != weight_dtype(precision):  # LoRA's bf16 base on a GPU scores differently
            self.base_model_key += "|bf16-base"
        self.eval_judge_cost_usd = 0.0  # judged suite sections of intermediate evaluations (evaluate())
        self.tracking = Tracking.for_run(self.spec, run_dir)  # training.report_to

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - started, 3)

    def training_key(self, settings: Any) -> dict[str, Any]:
        """Training settings as part of an artifact's cache key: with several processes the global batch is
        batch_size x processes, so the count joins the key (one process: unchanged, so caches stay valid);
        sharded training rounds differently (and bf16 keeps fp32 weights), so FSDP joins it too."""
        key = settings.model_dump(mode="json")
        if distributed.world_size() > 1:
            key |= {"processes": distributed.world_size()}
        if distributed.backend() == "fsdp":
            key |= {"distributed": "fsdp"}
        return key

    def load_model(
        self, model_info: ResolvedModel | None = None, *, dtype: torch.dtype | None = None, stage: str = "load_model"
    ) -> tuple[Any, Any]:
        """A fresh copy of a model (default: the run's base model) and its tokenizer, in `dtype` (default: the
        run's base weight dtype); timed as `stage`, and loaded by the main process first (the first load may
        build or convert the weights)."""
        with self.stage(stage), distributed.main_first():
            return load_model_and_tokenizer(model_info or self.model_info, dtype=self.base_dtype if dtype is None else dtype)

    def cached(self, kind: str, key: str, compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """(artifact, whether it came from the cache): the JSON artifact `kind`/`key` of the content-addressed
        cache (harness.artifacts), computed by `compute()` and saved when missing. In a job of several
        processes the main process decides, so all of them compute or none does (separate caches on
        several nodes must not split the job)."""
        found = distributed.from_main(self.cache.load(kind, key) if distributed.is_main() else None)
        if found is not None:
            return found, True
        artifact = compute()
        self.cache.save(kind, key, artifact)
        return artifact, False

    def checkpoint_path(self, name: str) -> Path:
        """A file of recipe state that a resumed attempt needs, beside the stages' checkpoints."""
        return self.run_dir / "checkpoints" / name

    def artifact_path(self, name: str) -> Path:
        """A file the recipe leaves in the run directory for inspection (not read by the harness)."""
        return self.run_dir / "artifacts" / name

    def base_model(self) -> tuple[Any, Any]:
        """A fresh copy of the base model and its tokenizer, in the run's weight dtype."""
        return self.load_model()

    def train(
        self,
        model: Any,
        tokenizer: Any,
        records: list[InstructionRecord],
        *,
        stage: str,
        overrides: dict[str, Any] | None = None,
        extra_loss: ExtraLoss | None = None,
        rows: list[list[int]] | None = None,
        callbacks: list[Any] | None = None,
        overhead: bool = False,
        epoch_rows: list[list[list[int]]] | None = None,
    ) -> tuple[Any, TrainResult]:
        """Tokenize with the run's template and train with the shared core; checkpoints under checkpoints/<stage>.

        Each call builds a new Trainer, so the optimizer and LR schedule start afresh (Phased IFT's stages).
        `overhead` marks training that is the method's cost rather than the result (SFTMix's reference
        model, Cherry's brief experience): the record counts it apart from the target training."""
        settings = self.spec.training.model_copy(update=overrides or {})
        examples, stats = tokenize_for_training(records, tokenizer, settings.template, settings.max_length)
        if (rows is not None or epoch_rows is not None) and len(examples) != len(records):
            raise HarnessError(f"stage {stage}: {len(records) - len(examples)} examples exceed training.max_length; raise it")
        self.tokenize_stats[stage] = stats.as_record()
        stage_dir = self.run_dir / "checkpoints" / stage
        key = content_key(
            stage=stage, settings=settings.model_dump(mode="json"), records=[record.id for record in records], rows=rows,
            **({"epoch_rows": epoch_rows} if epoch_rows is not None else {}),
            seed=self.spec.seed, extra_loss=repr(extra_loss), base=self.base_model_key,
        )
        with self.stage(f"train:{stage}"):
            # the main process checks the marker; every process then loads the same final model
            done = distributed.from_main(self._finished_result(stage_dir, key) if distributed.is_main() else None)
            if done is not None:
                trained, result = self._load_final(stage_dir), done
                self.console.print(f"stage {stage}: finished by an earlier attempt; loaded its final model")
                self.training_work[stage] = {"reused": True, "steps_run": 0, "resumed_from_step": result.steps}
            else:
                trained, result = train_sft(
                    model,
                    tokenizer,
                    examples,
                    settings,
                    stage_dir,
                    seed=self.spec.seed,
                    console=self.console,
                    description=f"train {stage}",
                    extra_loss=extra_loss,
                    rows=rows,
                    callbacks=callbacks,
                    epoch_rows=epoch_rows,
                    tracking=self.tracking,
                )
                if distributed.is_main():
                    self._mark_finished(stage_dir, key, trained, result)
                distributed.barrier()
                self.training_work[stage] = {
                    "reused": False, "steps_run": result.steps_run, "resumed_from_step": result.resumed_from_step,
                }
        self.train_results[stage] = result
        if overhead:
            self.overhead_stages.add(stage)
        return trained, result

    def _finished_result(self, stage_dir: Path, key: str) -> TrainResult | None:
        """The result of a stage an earlier attempt of this run finished, if its marker matches this stage's
        inputs and its saved final weights match their recorded hashes (else the stage is retrained)."""
        marker = stage_dir / "done.json"
        try:
            done = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        final = stage_dir / "final"
        if done.get("key") != key or not all(
            (final / name).is_file() and file_digest(final / name) == digest for name, digest in done.get("weights", {}).items()
        ):
            self.console.print(f"[yellow]stage {stage_dir.name}: the saved final model does not match; retraining[/]")
            marker.unlink(missing_ok=True)
            return None
        try:
            return TrainResult(**done["result"])
        except (TypeError, KeyError):  # a marker from another harness version
            return None

    def _load_final(self, stage_dir: Path) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(stage_dir / "final", dtype=weight_dtype(self.spec.training.precision))
        loaded.config.use_cache = False
        loaded.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        return loaded

    def _mark_finished(self, stage_dir: Path, key: str, trained: Any, result: TrainResult) -> None:
        """Save the stage's final model, then its marker (with the weights' sha256), then drop the Trainer
        checkpoints: a rerun loads the final model instead of retraining the stage."""
        final = stage_dir / "final"
        staging = stage_dir / ".final.partial"
        shutil.rmtree(staging, ignore_errors=True)
        trained.save_pretrained(staging)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        weights = {path.name: file_digest(path) for path in sorted(final.glob("*.safetensors"))}
        atomic_write_json(stage_dir / "done.json", {"key": key, "weights": weights, "result": result.as_record()})
        for checkpoint in stage_dir.glob("checkpoint-*"):
            shutil.rmtree(checkpoint, ignore_errors=True)

    def ifd(
        self, model: Any, tokenizer: Any, records: list[InstructionRecord], *, model_key: str, max_length: int,
        overlength: Overlength = "truncate",
    ) -> IFDScores:
        """IFD of the records under `model`, through the shared artifact cache (computed once per key);
        `overlength`: truncate over-length examples as Cherry LLM does, or skip them."""
        with self.stage("score:ifd"):
            scores = compute_ifd(
                model, tokenizer, records, template=self.spec.training.template, max_length=max_length,
                overlength=overlength, model_key=model_key, cache=self.cache, console=self.console,
            )
        self.scoring.add(scores.stats)
        return scores

    def section_context(self, generator: str) -> SectionContext:
        """What the suite's judged sections need from the run: its template and base model."""
        return SectionContext(
            template=self.spec.training.template, base_model=self.spec.model, base_model_path=self.spec.model_path,
            generator=generator,
        )

    def evaluate(self, model: Any, tokenizer: Any, name: str) -> dict[str, Any]:
        """Run the run's suite on an intermediate model (e.g. after each Phased IFT stage); with several
        processes the main one evaluates and the others get its results."""
        tasks = None
        with self.stage(f"evaluate:{name}"):
            if distributed.is_main():
                evaluation = run_suite(
                    model, tokenizer, self.suite, output_dir=self.run_dir / "eval" / name, limit=self.spec.eval.limit,
                    batch_size=self.spec.eval.batch_size, chat_template=self.spec.eval.chat_template,
                    seed=eval_seed(self.spec, self.suite), online=self.spec.eval.online, judge=self.spec.eval.judge,
                    context=self.section_context(f"{self.run_dir.name}:{name}"), resume=True,
                    model_class=self.spec.eval.model_class, precision=self.spec.eval.precision,
                    backend=self.spec.eval.backend,
                )
                self.eval_judge_cost_usd += evaluation.get("judge_cost_usd") or 0.0
                self.evaluation_work[name] = evaluation["work"]
                tasks = evaluation["tasks"]
            return distributed.from_main(tasks)


def phase_seconds(timings: dict[str, float], overhead_stages: set[str]) -> dict[str, float]:
    """The run's stage timings summed per phase: prepare (loading, saving), scoring, reference training
    (stages marked overhead), training and evaluation (final and intermediate)."""
    phases = dict.fromkeys(("prepare", "scoring", "reference_training", "training", "evaluation"), 0.0)
    for stage, seconds in timings.items():
        if stage.startswith("score:"):
            phase = "scoring"
        elif stage.startswith("train:"):
            phase = "reference_training" if stage.removeprefix("train:") in overhead_stages else "training"
        elif stage == "evaluate" or stage.startswith("evaluate:"):
            phase = "evaluation"
        else:
            phase = "prepare"
        phases[phase] = round(phases[phase] + seconds, 3)
    return phases


def eval_seed(spec: RunSpec, suite: Suite) -> int:
    """The evaluation's seed (few-shot examples, sampling): eval.seed, else the suite's sample seed; never
    the training seed, so runs that differ only in their training seed are scored identically."""
    return spec.eval.seed if spec.eval.seed is not None else suite.sample_seed


def find_record(run_dir: Path, run_id: str | None = None) -> RunRecord | None:
    """The run's finished record; None when there is none or it is damaged (not JSON, or its content hash
    does not match), so the run is finished again from its saved stages. A record of another run, or of
    another record schema version, is an error."""
    path = run_dir / "record.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    if "content_sha256" in data and data["content_sha256"] != record_digest(data):
        return None  # (records written before the hash was added have none and are trusted)
    if run_id is not None and data.get("run_id") != run_id:
        raise HarnessError(
            f"run directory {run_dir} holds the record of run {data.get('run_id')}, not {run_id}; "
            "move it away or use another --output"
        )
    try:
        return RunRecord.from_dict(data, source=path)
    except RecordInvalid as error:  # e.g. written by another schema version: never overwritten silently
        raise HarnessError(f"{error.source}: {error.problem}; move {run_dir} away to redo the run, or use another --output") from None


def execute_run(prepared: PreparedRun, output_root: Path, console: Console, *, save_model: bool = True) -> RunRecord:
    """Run (or resume) the prepared run and return its record; a finished run is not redone.

    In a job of several processes (accelerate launch, torchrun) every process trains; only the main one
    locks and writes the run directory, evaluates and writes the record, which all of them return."""
    accelerator.check_gpus_visible()  # a GPU box whose torch misses its GPUs stops here, not after days on the host
    slow_bf16 = cpu_kernels.bf16_warning(
        prepared.spec.training.precision, prepared.spec.eval.precision, accelerator.process_device().type
    )
    if slow_bf16 is not None:
        console.print(f"[yellow]warning[/]: {slow_bf16}", soft_wrap=True)
    distributed.init()
    run_dir = output_root / prepared.run_id
    existing, problem = None, None
    if distributed.is_main():
        try:
            existing = find_record(run_dir, prepared.run_id)
        except HarnessError as error:
            problem = str(error)
    existing, problem = distributed.from_main((existing, problem))
    if problem is not None:
        raise HarnessError(problem)
    if existing is not None:
        console.print(f"[green]run {prepared.run_id} is already complete[/]: {run_dir / 'record.json'}")
        return existing
    if prepared.spec.recipe != "base":  # a configuration that cannot fit stops here, not after loading the weights
        memory.check_training_fits(
            prepared.model_info.weights, prepared.spec.training, processes=distributed.world_size(),
            fsdp=distributed.backend() == "fsdp", device=accelerator.process_device().type,
        )
    # a suite prompting through a chat template the model lacks fails now, not after training
    with distributed.main_first():  # the first load may build or convert the weights: once, by the main process
        tokenizer = load_tokenizer(prepared.model_info)
    check_chat_template(prepared.suite, tokenizer, prepared.spec.eval.chat_template)
    if not distributed.is_main():
        _raise_main_error(None)  # the main process's checks below passed, or every process stops here
        return _execute(prepared, run_dir, console, save_model)
    if (run_dir / "record.json").exists():
        console.print(f"[yellow]run {prepared.run_id}: record.json is damaged; finishing the run again from its saved stages[/]")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise HarnessError(f"--output {output_root}: cannot create the run directory ({error.strerror})") from None
    try:
        with contextlib.ExitStack() as stack:
            attempts = 1
            try:
                stack.enter_context(run_lock(run_dir))
                attempts = check_resumable(run_dir, prepared.run_id)
            except HarnessError as error:
                _raise_main_error(str(error))  # tells the other processes, then raises here too
            _raise_main_error(None)
            return _execute(prepared, run_dir, console, save_model, attempts)
    except HarnessError:
        # a user-input problem found late: leave nothing half-written behind, unless the run got as far as
        # evaluating (e.g. a judge API outage): the trained model and cached answers and verdicts are kept,
        # and rerunning the command resumes from them (no record.json: the run counts as unfinished)
        if created and not (run_dir / "eval").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _raise_main_error(message: str | None) -> None:
    """Every process raises the main process's error (each then exits with the same one line)."""
    message = distributed.from_main(message)
    if message is not None:
        raise HarnessError(message)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One process per run directory: a second `harness run` into it fails at once instead of corrupting it."""
    import fcntl
    import os

    handle = open(run_dir / ".lock", "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise HarnessError(f"run directory {run_dir} is in use by {holder}; wait for it or use another --output") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()


def check_resumable(run_dir: Path, run_id: str | None = None) -> int:
    """Resuming an unfinished run with different harness code would mix versions in one result: refuse,
    and say what differs (HARNESS_ALLOW_CODE_CHANGE=1 overrides, e.g. after a docs-only change). A
    directory started for another run id (copied or renamed) is refused too. Returns the attempt number."""
    import os

    meta_path = run_dir / "run.json"
    commit = git_commit()
    meta: dict[str, Any] = {"git_commit": commit, "harness_version": __version__, "run_id": run_id, "attempts": 0}
    if meta_path.is_file():
        try:
            saved = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            saved = None
        meta = {**meta, **saved} if isinstance(saved, dict) else {**meta, "git_commit": "unknown"}
        started_with = meta.get("git_commit", "unknown")
        if started_with != commit and "unknown" not in (started_with, commit) and not os.environ.get("HARNESS_ALLOW_CODE_CHANGE"):
            raise HarnessError(
                f"run directory {run_dir} was started by harness commit {started_with}, this is {commit}: "
                "resuming would mix code versions; delete the directory to start over, or set HARNESS_ALLOW_CODE_CHANGE=1"
            )
        if run_id is not None and meta.get("run_id") not in (None, run_id):
            raise HarnessError(
                f"run directory {run_dir} was started for run {meta['run_id']}, not {run_id}; "
                "move it away or use another --output"
            )
    meta["run_id"] = run_id or meta.get("run_id")
    meta["attempts"] = int(meta.get("attempts") or 0) + 1
    atomic_write_json(meta_path, meta)
    return meta["attempts"]


def _execute(prepared: PreparedRun, run_dir: Path, console: Console, save_model: bool, attempts: int = 1) -> RunRecord:
    started_at = dt.datetime.now(dt.timezone.utc)
    wall_started = time.perf_counter()
    if not distributed.is_main():
        prepared.recipe.run(RunContext(prepared, run_dir, console))  # training takes every process
        return distributed.from_main(None)  # waits for the main process's record
    atomic_write_text(run_dir / "spec.yaml", spec_to_yaml(prepared.spec))
    ctx: RunContext[BaseModel] = RunContext(prepared, run_dir, console)
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
            seed=eval_seed(prepared.spec, prepared.suite),
            online=prepared.spec.eval.online,
            judge=prepared.spec.eval.judge,
            context=ctx.section_context(prepared.run_id),
            resume=True,  # the run directory belongs to this spec, so to this model
            model_class=prepared.spec.eval.model_class,
            precision=prepared.spec.eval.precision,
            backend=prepared.spec.eval.backend,
            weights_dir=run_dir / "model" if save_model else None,  # vLLM serves the saved weights
        )
    log_final_metrics(ctx.tracking, evaluation["tasks"])
    wall = time.perf_counter() - wall_started
    eval_judge_cost = round(ctx.eval_judge_cost_usd + (evaluation.get("judge_cost_usd") or 0.0), 6)
    target = {stage: result for stage, result in ctx.train_results.items() if stage not in ctx.overhead_stages}
    train_tokens = sum(result.real_tokens for result in target.values())
    overhead_train_tokens = sum(
        result.real_tokens for stage, result in ctx.train_results.items() if stage in ctx.overhead_stages
    ) + output.overhead.cached_train_tokens
    device_count = distributed.world_size()  # processes: one device each
    parameters = sum(parameter.numel() for parameter in output.model.parameters())
    scoring_tokens = ctx.scoring.forward_tokens + output.overhead.scoring_tokens
    phases = phase_seconds(ctx.timings, ctx.overhead_stages)
    recipe_judge_cost = round(output.overhead.judge_cost_usd, 6)
    payload = {
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
        "recipe": {"name": prepared.spec.recipe,
                   "variant": recipe_variant(prepared.recipe, prepared.params, output.variant_params),
                   "params": prepared.params.model_dump(mode="json"), **output.details},
        "training": {stage: result.as_record() for stage, result in ctx.train_results.items()},
        "tokenization": ctx.tokenize_stats,
        "scoring": ctx.scoring.as_record(),
        "suite": {
            "name": prepared.suite.name,
            "eval_seed": eval_seed(prepared.spec, prepared.suite),
            "chat_template": evaluation["chat_template"],
            "online": evaluation["online"],
            "limit": evaluation["limit"],
            "skipped": evaluation["skipped"],
            # lm-eval tasks: the evaluation model class and weight dtype (per task also in metrics.<task>)
            "model_class": evaluation["model_class"],
            "precision": evaluation["precision"],
            "backend": evaluation["backend"],
        },
        "metrics": evaluation["tasks"],
        "cost": {
            "train_tokens": train_tokens,
            "response_tokens": sum(result.response_tokens for result in target.values()),
            "overhead_train_tokens": overhead_train_tokens,
            "scoring_tokens": scoring_tokens,
            "wall_seconds": round(wall, 2),
            "device_count": device_count,
            "device_hours": round(wall * device_count / 3600, 5),
            # the method's cost without its evaluation: what a user pays to get the model
            "training_device_hours": round((wall - phases["evaluation"]) * device_count / 3600, 5),
            "parameters": parameters,
            # about 6N per trained token (forward + backward), 2N per forward-only scoring token (Kaplan et
            # al. 2020, "Scaling Laws for Neural Language Models", sec. 2.1); evaluation not counted
            "flops": 6 * parameters * (train_tokens + overhead_train_tokens) + 2 * parameters * scoring_tokens,
            "phase_seconds": phases,
            "cached": {
                "scoring": ctx.scoring.computed == 0 and ctx.scoring.cached > 0,
                "training": bool(ctx.training_work) and all(work.get("reused") for work in ctx.training_work.values()),
            },
            # the recipe's judge (e.g. Phased IFT's difficulty scorer) plus the evaluations' judges
            "judge_cost_usd": round(recipe_judge_cost + eval_judge_cost, 6),
            "recipe_judge_cost_usd": recipe_judge_cost,
            "eval_judge_cost_usd": eval_judge_cost,
        },
        "timings": ctx.timings,
        # The work the attempt that finished the run did: after a kill, less than a fresh run's.
        "resume": {
            "attempts": attempts,
            "scoring": {"sequences_computed": ctx.scoring.computed, "sequences_cached": ctx.scoring.cached},
            "training": ctx.training_work,
            "evaluation": evaluation["work"],
            **({"stage_evaluations": ctx.evaluation_work} if ctx.evaluation_work else {}),
        },
        "memory": peak_memory(),
        "versions": library_versions(),
        "host": host_info(),
    }
    # validated here, so a record that readers would refuse is never written
    record = RunRecord.from_dict(payload, source=run_dir / "record.json").with_digest()
    record.write(run_dir / "record.json")
    return distributed.from_main(record)
