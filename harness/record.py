"""The run record (record.json) as a typed, versioned model: the runner writes records only through
RunRecord, and every reader (leaderboard, comparison table, CLI summary, sweep) reads them through it,
so a record of another schema version or with a missing or unknown key is refused in one line naming
the file and the key instead of failing later with a KeyError.

Byte-identical round trip: fields are declared in the order the runner writes them, keys a record
does not have (ones added after it was written) stay absent on output (`exclude_unset`), numbers keep
their JSON type (an int stays an int), and the text is the project's one JSON format (harness.io).
Free-form maps are used only where the content is open: the spec (validated by RunSpec), per-task
metrics, a recipe's own details, timings and per-stage work counters.

The published JSON Schema is docs/record.schema.json (`harness record-schema` prints it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    ValidationError,
    WithJsonSchema,
)

from harness.errors import HarnessError, shown
from harness.io import atomic_write_json, json_text
from harness.records import RECORD_SCHEMA_VERSION

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "docs" / "record.schema.json"


def _number(value: Any) -> int | float:
    """A JSON number kept as it is (int or float, NaN allowed: lm-eval's undefined stderr); bools refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("not a number")
    return value


# int or float, unchanged (pydantic's float would turn 0 into 0.0 and break the byte-identical round trip)
Number = Annotated[int | float, PlainValidator(_number), WithJsonSchema({"type": "number"})]


class _Section(BaseModel):
    """A fixed part of the record: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    """The model-set entry the run trained (harness.models.ResolvedModel.as_record)."""

    name: str
    source: str
    description: str
    template: str
    context_length: StrictInt
    dtype: str
    learning_rate: Number
    params: str
    model_set_version: str
    weights: str


class DataSection(_Section):
    """The training data after loading (harness.data.LoadedData.summary)."""

    source: str
    format: str
    raw_records: StrictInt
    records: StrictInt
    duplicates_dropped: StrictInt
    empty_dropped: StrictInt
    sha256: str


class RecipeSection(BaseModel):
    """The recipe, its resolved parameters and, after them, the recipe's own details (open: each recipe
    reports what it selected or scored), kept in the order the recipe gave them."""

    model_config = ConfigDict(extra="allow")

    name: str
    variant: str | None = None  # records before variants were recorded have none
    params: dict[str, Any]

    @property
    def details(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def label(self) -> str:
        """The run's name on tables: its variant, else (older records) the recipe's name."""
        return self.variant or self.name


class TrainingStage(_Section):
    """One training stage (harness.training.TrainResult.as_record)."""

    steps: StrictInt
    examples: StrictInt
    rows: StrictInt
    real_tokens: StrictInt
    response_tokens: StrictInt
    epoch_tokens: StrictInt
    final_loss: Number | None
    mean_loss: Number | None
    loss_curve: list[Any]  # [step, loss] pairs
    wall_seconds: Number
    resumed_from_step: StrictInt
    precision: str
    steps_run: StrictInt
    processes: StrictInt | None = None
    distributed: str | None = None
    parameter_share: Number | None = None


class TokenizationStage(_Section):
    """Tokenization of one stage's examples (harness.templates.TokenizeStats)."""

    examples: StrictInt
    truncated: StrictInt
    dropped_prompt_too_long: StrictInt


class ScoringSection(_Section):
    """Scoring passes (harness.scoring.ScoringStats)."""

    sequences: StrictInt
    computed: StrictInt
    cached: StrictInt
    forward_tokens: StrictInt
    shared_prefix_tokens: StrictInt


class SuiteSection(_Section):
    name: str
    eval_seed: StrictInt | None = None
    chat_template: StrictBool | None
    online: StrictBool
    limit: StrictInt | None
    skipped: dict[str, Any]
    model_class: str | None = None
    precision: str | None = None
    backend: str | None = None  # how the evaluated model generated (hf, vllm); absent before eval.backend


class CachedWork(_Section):
    scoring: StrictBool
    training: StrictBool


class CostSection(_Section):
    """What the run cost; keys after `wall_seconds` other than device_hours and the judge costs were added
    later and are absent from older records."""

    train_tokens: StrictInt
    response_tokens: StrictInt
    overhead_train_tokens: StrictInt
    scoring_tokens: StrictInt
    wall_seconds: Number
    device_count: StrictInt | None = None
    device_hours: Number
    training_device_hours: Number | None = None
    parameters: StrictInt | None = None
    flops: Number | None = None
    phase_seconds: dict[str, Number] | None = None
    cached: CachedWork | None = None
    judge_cost_usd: Number
    recipe_judge_cost_usd: Number | None = None
    eval_judge_cost_usd: Number


class ScoringWork(_Section):
    sequences_computed: StrictInt
    sequences_cached: StrictInt


class ResumeSection(_Section):
    """The work the attempt that finished the run did (after a kill, less than a fresh run's)."""

    attempts: StrictInt
    scoring: ScoringWork
    training: dict[str, dict[str, Any]]
    evaluation: dict[str, Any]
    stage_evaluations: dict[str, dict[str, Any]] | None = None


class MemorySection(_Section):
    peak_rss_gib: Number
    peak_gpu_gib: Number | None = None


class HostSection(_Section):
    platform: str
    cpu_count: StrictInt | None
    torch_threads: StrictInt | None = None
    gpu: str | None = None
    gpu_count: StrictInt | None = None
    container: dict[str, Any] | None = None


class RunRecord(_Section):
    """One finished run: what ran (spec, model, data, recipe), what it measured (metrics) and cost, and
    where it ran. Schema version harness.records.RECORD_SCHEMA_VERSION."""

    model_config = ConfigDict(extra="forbid", title="RunRecord")

    schema_version: Annotated[StrictInt, Field(json_schema_extra={"const": RECORD_SCHEMA_VERSION})]
    run_id: str
    spec_hash: str
    started_at: str
    harness_version: str
    git_commit: str
    seed: StrictInt
    spec: dict[str, Any]  # RunSpec.model_dump(mode="json")
    model: ModelSection
    data: DataSection
    recipe: RecipeSection
    training: dict[str, TrainingStage]
    tokenization: dict[str, TokenizationStage]
    scoring: ScoringSection
    suite: SuiteSection
    metrics: dict[str, dict[str, Any]]  # task -> {metric: {value, stderr}, n, num_fewshot, ...}
    cost: CostSection
    timings: dict[str, Number]
    resume: ResumeSection
    memory: MemorySection
    versions: dict[str, str]
    host: HostSection
    content_sha256: str | None = None  # sha256 of the record without this key (see digest)

    # ------------------------------------------------------------------ reading

    @classmethod
    def from_dict(cls, data: Any, source: str | Path = "run record") -> RunRecord:
        """The record in `data` (parsed JSON); RecordInvalid names `source` and the first problem."""
        if not isinstance(data, dict):
            raise RecordInvalid(source, f"not a JSON object but {type(data).__name__}")
        if "schema_version" not in data:
            raise RecordInvalid(source, "missing key 'schema_version'", _RERUN)
        found = data["schema_version"]
        if found != RECORD_SCHEMA_VERSION or isinstance(found, bool):
            wrote = data.get("harness_version")
            by = f" (written by harness {shown(str(wrote))})" if isinstance(wrote, str) else ""
            raise RecordInvalid(
                source,
                f"record schema version {shown(repr(found))}{by}, this harness reads version {RECORD_SCHEMA_VERSION}",
                "rerun the run with this harness version, or read it with the harness version that wrote it",
            )
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise RecordInvalid(source, *_first_problem(error)) from None

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        """The record in the file at `path`; RecordInvalid (a HarnessError: one line) when it cannot be used."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RecordInvalid(path, "missing (incomplete run?)") from None
        except json.JSONDecodeError as error:
            raise RecordInvalid(path, f"invalid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
        except (OSError, UnicodeDecodeError) as error:
            raise RecordInvalid(path, f"unreadable ({error})") from None
        return cls.from_dict(data, source=path)

    # ------------------------------------------------------------------ writing

    def to_dict(self) -> dict[str, Any]:
        """The record as the runner writes it: declared order, recipe details after its params, keys the
        record never had left out."""
        return self.model_dump(mode="python", exclude_unset=True)

    def to_json(self) -> str:
        return json_text(self.to_dict())

    def write(self, path: Path) -> None:
        atomic_write_json(path, self.to_dict())

    def digest(self) -> str:
        """sha256 of the record's canonical JSON without its own `content_sha256` field."""
        return record_digest(self.to_dict())

    def with_digest(self) -> RunRecord:
        """This record with its `content_sha256` set (what the runner writes)."""
        sealed = self.model_copy()
        sealed.content_sha256 = self.digest()
        return sealed

    def is_intact(self) -> bool:
        """False when the content hash does not match (a hand-edited or damaged record); records written
        before the hash was added have none and are trusted."""
        return self.content_sha256 is None or self.content_sha256 == self.digest()


def record_digest(record: dict[str, Any]) -> str:
    """sha256 of a record dict's canonical JSON without its own `content_sha256` field."""
    body = json.loads(json.dumps({key: value for key, value in record.items() if key != "content_sha256"}, default=str))
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_RERUN = f"not a complete run record of schema version {RECORD_SCHEMA_VERSION}; rerun the run with this harness version"


class RecordInvalid(HarnessError):
    """A record that cannot be used. `problem` is the reason alone (the leaderboard's warnings name the
    file themselves); the message is one line: file, problem, what to do."""

    def __init__(self, source: str | Path, problem: str, hint: str = "") -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{source}: {problem}" + (f"; {hint}" if hint else ""))


def _first_problem(error: ValidationError) -> tuple[str, str]:
    """(problem, hint) for the first error pydantic found, naming the key by its dotted path."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    if first["type"] == "missing":
        return f"missing key '{key}'", _RERUN
    if first["type"] == "extra_forbidden":
        return (f"unknown key '{key}'",
                f"not in run record schema version {RECORD_SCHEMA_VERSION} (docs/record.schema.json); "
                "rerun the run with this harness version")
    value = json.dumps(first.get("input"), default=str)
    return f"key '{key}' = {shown(value)} is invalid ({first['msg'].lower()})", _RERUN


def json_schema() -> dict[str, Any]:
    """The published JSON Schema of RunRecord (docs/record.schema.json)."""
    schema = RunRecord.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_text() -> str:
    """The schema as committed: the project's JSON format (harness.io.json_text)."""
    return json_text(json_schema())
