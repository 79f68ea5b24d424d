"""The run spec: a frozen, validated description of one run, whose hash is the run id.

Layers, lowest first: the defaults below (and each recipe's Params defaults), the user's --config
YAML, then --set key=value overrides, then the explicit CLI flags (--model, --data, --suite, --seed). Unknown keys
and wrong types are errors that name the key and the closest valid one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from harness.errors import HarnessError, closest, shown
from harness.io import atomic_write_text


class StrictModel(BaseModel):
    # allow_inf_nan=False: `.inf` epochs or a NaN learning rate would otherwise pass the range checks
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _usable_name(value: str) -> str:
    """Names and paths are looked up on disk: a NUL byte or an over-long name would crash that lookup."""
    if "\x00" in value:
        raise ValueError("contains a NUL byte")
    if not value.strip():
        raise ValueError("is empty")
    if len(value.encode()) > 4096 or any(len(part.encode()) > 255 for part in re.split(r"[/\\]", value)):
        raise ValueError("is too long for a name or path")
    return value


Name = Annotated[str, AfterValidator(_usable_name)]


class LoraSpec(StrictModel):
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class TrainingSpec(StrictModel):
    learning_rate: float | None = Field(None, gt=0, description="None: the model set's default for the model")
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="-1: train for `epochs`; >0 overrides epochs")
    batch_size: int = Field(8, gt=0, description="rows per device step (a row is one pack of examples)")
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_length: int = Field(512, gt=8, description="tokens per example and per packed row")
    packing: bool = Field(True, description="padding-free packing of several examples per row")
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, gt=0, lt=1)
    adam_beta2: float = Field(0.999, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    precision: Literal["auto", "fp32", "bf16", "bf16-mixed", "fp16-mixed"] = Field(
        "auto", description="auto: bf16-mixed on a bf16 GPU, fp32 on CPU; bf16 = pure bf16 weights, fp32 master copy"
    )
    template: Literal["auto", "chat", "alpaca", "user-assistant"] = Field(
        "auto", description="auto: the model set's template; user-assistant: Phased IFT's (harness.templates)"
    )
    neftune_alpha: float | None = Field(None, gt=0, description="per-sequence NEFTune noise (None: off)")
    save_steps: int = Field(200, ge=0, description="checkpoint every N optimizer steps (0: only at the end)")
    logging_steps: int = Field(10, gt=0)
    lora: LoraSpec | None = None
    gradient_checkpointing: bool = Field(
        False, description="recompute each layer's activations in the backward pass: activation memory of one layer "
        "plus every layer's input, for about a third more compute (harness/memory.py estimates both)",
    )
    # An observer, not an input: excluded from the spec's dump, so it changes neither the run id nor a cache key.
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] | list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        "none", exclude=True, description="experiment trackers (Trainer's integrations; keys from the environment)"
    )


class DataSpec(StrictModel):
    name: Name = Field("alpaca-sample", description="a shipped name, a file path, or a hub dataset id")
    limit: int | None = Field(None, gt=0, description="use only the first N records (after dedupe)")
    dedupe: bool = True


class EvalSpec(StrictModel):
    suite: Name = "smoke"
    limit: int | None = Field(None, gt=0, description="items per task; None: the suite's own limit")
    batch_size: int = Field(8, gt=0)
    chat_template: bool | None = Field(None, description="None: the suite's setting")
    online: bool | None = Field(None, description="lm-eval's hub-backed tasks instead of the shipped ones; None: the suite's setting")
    judge: str | None = Field(
        None, description="judge of the suite's alpaca_eval/pairwise sections (openai:<model>, local:<model>); None: the suite's"
    )
    model_class: Literal["engine", "hflm"] = Field(
        "engine", description="log-likelihood tasks through the scoring engine (harness/lm_engine.py) or lm-eval's HFLM"
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="dtype of the evaluated weights for lm-eval tasks (fp32: comparable with published numbers)"
    )
    backend: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="how the evaluated model generates (AlpacaEval, pairwise, lm-eval generate-until tasks): "
        "vllm (a vLLM server, harness/vllm_server.py), hf (transformers' generate); auto: vllm where installed and a GPU is present",
    )
    seed: int | None = Field(
        None, ge=0, lt=2**32,
        description="seed of lm-eval's few-shot draws and sampling; None: the suite's sample_seed. Never the training "
        "seed, so every training seed is scored on the same items with the same prompts",
    )


def parse_seeds(text: str) -> list[int]:
    """--seeds: a comma-separated list (0,1,2) or a count (3 = 0,1,2). Raises ValueError naming the value."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"'{text}' is neither a count (3) nor a list of seeds (0,1,2)") from None
    seeds = list(range(numbers[0])) if len(numbers) == 1 and "," not in text else numbers
    if not seeds:
        raise ValueError(f"'{text}' names no seed")
    if len(set(seeds)) != len(seeds) or any(not 0 <= seed < 2**32 for seed in seeds):
        raise ValueError(f"'{text}': seeds must be distinct and in [0, 2^32)")
    return seeds


# Options added after runs were recorded: at their default they are left out of the run id, so a spec that
# does not use them keeps the id (and the finished run) it had before they existed.
ADDED_AT_DEFAULT_KEEPS_ID = [("training", "gradient_checkpointing"), ("eval", "backend")]


class RunSpec(StrictModel):
    model: Name = Field("tiny", description="a model-set name, a local directory or .gguf file, or a hub id")
    model_path: Name | None = Field(None, description="local weights (directory or .gguf) for a model-set entry")
    recipe: Name = "one-off"
    params: dict[str, Any] = Field(default_factory=dict, description="the recipe's own parameters")
    data: DataSpec = DataSpec()
    training: TrainingSpec = TrainingSpec()
    eval: EvalSpec = EvalSpec()
    seed: int = Field(0, ge=0, lt=2**32, description="numpy's seeds are 32-bit")

    def content_hash(self) -> str:
        """sha256 of the canonical JSON of the spec: equal specs give equal run ids."""
        dumped = self.model_dump(mode="json")
        for section, key in ADDED_AT_DEFAULT_KEEPS_ID:  # options added later keep the ids of runs that leave them off
            if dumped[section][key] == type(type(self).model_fields[section].default).model_fields[key].default:
                del dumped[section][key]
        canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def run_id(self, salt: str = "") -> str:
        """<recipe>-<model>-<hash>; `salt` folds in what the spec names but does not contain (the data's content)."""
        model_slug = re.sub(r"[^a-z0-9.]+", "-", Path(self.model).name.lower()).strip("-")[:40]
        digest = hashlib.sha256((self.content_hash() + salt).encode()).hexdigest() if salt else self.content_hash()
        return f"{self.recipe}-{model_slug}-{digest[:10]}"


# ----------------------------------------------------------------------------- key paths


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.append(path)
        annotation = field.annotation
        for candidate in getattr(annotation, "__args__", (annotation,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                paths.extend(_field_paths(candidate, f"{path}."))
    return paths


SPEC_KEYS: list[str] = _field_paths(RunSpec)


def _format_validation_error(error: ValidationError, source: str, prefix: str = "", keys: list[str] | None = None) -> str:
    first = error.errors()[0]
    key = shown(prefix + ".".join(str(part) for part in first["loc"]))
    if first["type"] == "extra_forbidden":
        suggestion = closest(key, keys if keys is not None else SPEC_KEYS)
        hint = f"; did you mean '{suggestion}'?" if suggestion else ""
        return f"{source}: unknown config key '{key}'{hint}"
    value = first.get("input")
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    if len(text) > 80:
        text = text[:60] + f"... ({len(text)} characters)"
    return f"{source}: config key '{key}' = {text}: {first['msg'].lower()}"


def validate_spec(raw: dict[str, Any], source: str) -> RunSpec:
    try:
        return RunSpec.model_validate(raw)
    except ValidationError as error:
        raise HarnessError(_format_validation_error(error, source)) from None


def _non_finite(value: Any, path: str) -> str | None:
    """The key path of the first infinite or NaN number in a nested value, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _non_finite(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def validate_params(params_model: type[BaseModel], raw: dict[str, Any], source: str) -> BaseModel:
    """Validate a recipe's params against its own pydantic model, with the same error style."""
    bad = _non_finite(raw, "")
    if bad is not None:
        raise HarnessError(f"{source}: config key 'params.{bad}': input should be a finite number")
    try:
        return params_model.model_validate(raw)
    except ValidationError as error:
        keys = [f"params.{key}" for key in _field_paths(params_model)]
        raise HarnessError(_format_validation_error(error, source, prefix="params.", keys=keys)) from None


# ----------------------------------------------------------------------------- layering


def read_yaml_config(path: Path) -> dict[str, Any]:
    try:
        found = path.is_file()
    except (OSError, ValueError):  # a NUL byte or an over-long name
        found = False
    if not found:
        raise HarnessError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise HarnessError(f"config file {path}:{where}: invalid YAML ({getattr(error, 'problem', error)})") from None
    except UnicodeDecodeError:
        raise HarnessError(f"config file {path}: not UTF-8 text") from None
    except RecursionError:
        raise HarnessError(f"config file {path}: nested too deeply to be a run spec") from None
    except OSError as error:
        raise HarnessError(f"config file {path}: cannot read it ({error.strerror})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise HarnessError(f"config file {path}: top level must be a mapping of keys, got {type(loaded).__name__}")
    return loaded


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(assignment: str) -> dict[str, Any]:
    """'training.learning_rate=1e-4' -> {'training': {'learning_rate': 1e-4}} (value parsed as YAML)."""
    if "=" not in assignment:
        raise HarnessError(f"--set '{shown(assignment)}': expected key=value, e.g. training.learning_rate=1e-4")
    key, _, text = assignment.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise HarnessError(f"--set '{shown(assignment)}': empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    except RecursionError:
        raise HarnessError(f"--set {key}: value nested too deeply") from None
    nested: dict[str, Any] = {}
    cursor = nested
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


# ----------------------------------------------------------------------------- shipped paper configs

# Paper configurations (recipes/configs/<name>.yaml): run specs plus a `source:` block that documents
# them (paper, code files, and per key the value and where it was read); `--config NAME` finds them.
PAPER_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "recipes" / "configs"
DOCUMENTATION_KEYS = ("source",)  # in a config file only; not part of the spec or its hash


def paper_configs() -> dict[str, Path]:
    return {path.stem: path for path in sorted(PAPER_CONFIGS_DIR.glob("*.yaml"))}


def config_path(config_file: Path) -> Path:
    """A config file's path; a bare name that is not a file is looked up among the shipped configs."""
    try:
        exists = config_file.exists()
    except (OSError, ValueError):
        exists = False
    shipped = paper_configs()
    if not exists and config_file.suffix == "" and len(config_file.parts) == 1:
        if config_file.name in shipped:
            return shipped[config_file.name]
        suggestion = closest(config_file.name, list(shipped))
        if suggestion:
            raise HarnessError(f"config file not found: {config_file}; did you mean the shipped config '{suggestion}'?")
    return config_file


def config_source(config_file: Path) -> dict[str, Any]:
    """The `source:` block of a config file ({} when it has none)."""
    source = read_yaml_config(config_path(config_file)).get("source") or {}
    if not isinstance(source, dict):
        raise HarnessError(f"config file {config_file}: 'source' must be a mapping (paper, code, values)")
    return source


def build_spec(
    *,
    config_file: Path | None,
    overrides: list[str],
    flags: dict[str, Any],
) -> RunSpec:
    """Layer the defaults, the config file, --set and the flags, validating after each source."""
    raw: dict[str, Any] = {}
    if config_file is not None:
        config_file = config_path(config_file)
        loaded = read_yaml_config(config_file)
        raw = deep_merge(raw, {key: value for key, value in loaded.items() if key not in DOCUMENTATION_KEYS})
        validate_spec(raw, f"config file {config_file}")
    for assignment in overrides:
        raw = deep_merge(raw, parse_override(assignment))
        validate_spec(raw, f"--set {shown(assignment)}")
    for key, value in flags.items():
        if value is not None:
            raw = deep_merge(raw, _nest(key, value))
    return validate_spec(raw, "command line")


def _nest(key: str, value: Any) -> dict[str, Any]:
    parts = key.split(".")
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def spec_to_yaml(spec: RunSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


SPEC_FILES_DIR = ".specs"  # hidden: run folders' readers (leaderboard, sweep) skip it


def write_spec_file(spec: RunSpec, output: Path) -> Path:
    """The whole spec as a config file under `output`, named by its hash: Docker and --nproc re-run
    `harness run --config <this file>`, so the processes they start read exactly the spec the host
    validated (same run id) instead of re-parsing flags rebuilt from the command line."""
    path = output / SPEC_FILES_DIR / f"{spec.content_hash()[:16]}.yaml"
    atomic_write_text(path, spec_to_yaml(spec))
    return path


def rerun_argv(spec_file: str, output: str) -> list[str]:
    """`harness run` arguments that re-run a spec file written by `write_spec_file`."""
    return ["run", "--config", spec_file, "--output", output]
