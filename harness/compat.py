"""Every patch of third-party code (lm-eval, alpaca_eval, transformers, accelerate, and the library warnings
the command line filters) in one module.

Each patch works around one upstream behaviour, says which in its docstring, and is scoped where that is
possible: a context manager around the code that needs it, restored on exit, rather than an import-time
side effect. Each is listed in PATCHES with the versions of its package it was written for (the ones the
harness is tested with); on first use check_version() warns once with an UpstreamVersionWarning, not an
error, when the installed version is outside that range. tests/harness/test_compat.py checks, per patch,
that the upstream behaviour it relies on is still there, and that no patch lives elsewhere in harness/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


class UpstreamVersionWarning(UserWarning):
    """A patch in harness/compat.py runs against a version of its package it was not written for."""


@dataclass(frozen=True)
class Patch:
    package: str  # the distribution whose behaviour it works around
    versions: str  # PEP 440 specifier: the versions it was written and tested for
    what: str  # one line, for the warning


PATCHES: dict[str, Patch] = {
    "lm_eval.quiet_loggers": Patch("lm_eval", "~=0.4.13", "lm-eval's loggers held at ERROR"),
    "lm_eval.no_git_lookup": Patch("lm_eval", "~=0.4.13", "lm_eval.evaluator.get_git_commit_hash replaced"),
    "lm_eval.no_env_info": Patch("lm_eval", "~=0.4.13", "torch.utils.collect_env.get_pretty_env_info replaced"),
    "lm_eval.no_cache_check_bar": Patch("lm_eval", "~=0.4.13", "lm_eval.api.model.tqdm wrapped"),
    "lm_eval.loglikelihood_tokens": Patch("lm_eval", "~=0.4.13", "HFLM._loglikelihood_tokens overridden"),
    "alpaca_eval.import_quietly": Patch("alpaca_eval", "~=0.6.6", "alpaca_eval imported without load_dotenv()"),
    "alpaca_eval.glm_local_hub_file": Patch("alpaca_eval", "~=0.6.6", "glm_winrate.hf_hub_download replaced"),
    "alpaca_eval.glm_sklearn_warnings": Patch("scikit-learn", "~=1.9.1", "LogisticRegressionCV warnings filtered"),
    "alpaca_eval.client_config_warning": Patch("alpaca_eval", "~=0.6.6", "client-config log warning dropped"),
    "alpaca_eval.price_table": Patch("alpaca_eval", "~=0.6.6", "decoders.openai._get_price_per_token read"),
    "transformers.varlen_attention": Patch("transformers", "~=5.23.0", "attention registered with AttentionInterface"),
    "transformers.attn_implementation": Patch("transformers", "~=5.23.0", "config._attn_implementation read and set"),
    "transformers.checkpointing_args": Patch("transformers", "~=5.23.0", "activation_checkpointing argument names"),
    "transformers.trainer_checkpoint_hooks": Patch("transformers", "~=5.23.0", "Trainer._save_checkpoint overridden"),
    "transformers.from_config": Patch("transformers", "~=5.23.0", "PreTrainedModel._from_config called"),
    "accelerate.fsdp_on_cpu": Patch("accelerate", "~=1.15.0", "PartialState._shared_state set to FSDP"),
    "torch.quiet_elastic_launcher": Patch("torch", "~=2.13.0", "torch.distributed.elastic logger held at CRITICAL"),
}

_checked: set[str] = set()


def installed_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def check_version(name: str) -> None:
    """Warn once per patch when its package's installed version is outside the range it was written for."""
    if name in _checked:
        return
    _checked.add(name)
    from packaging.specifiers import SpecifierSet

    patch = PATCHES[name]
    installed = installed_version(patch.package)
    if installed is None or SpecifierSet(patch.versions).contains(installed, prereleases=True):
        return
    warnings.warn(
        f"{patch.package} {installed} is outside {patch.versions}, the versions harness.compat's patch {name} "
        f"({patch.what}) was written for; check that it still applies",
        UpstreamVersionWarning,
        stacklevel=3,
    )


@contextlib.contextmanager
def _swapped(owner: Any, name: str, value: Any) -> Iterator[None]:
    """owner.name = value inside the block, the original back on exit (nothing when owner has no such name)."""
    if not hasattr(owner, name):
        yield
        return
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def logger_levels(names: tuple[str, ...], level: int) -> Iterator[None]:
    """The named loggers at `level` inside the block, their own levels back on exit."""
    loggers = [logging.getLogger(name) for name in names]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, previous, strict=True):
            logger.setLevel(old)


@contextlib.contextmanager
def dropped_log_records(containing: str) -> Iterator[None]:
    """Drop log records whose message contains `containing` (a root-logger filter, removed on exit)."""

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return containing not in record.getMessage()

    root, dropper = logging.getLogger(), Drop()
    root.addFilter(dropper)
    try:
        yield
    finally:
        root.removeFilter(dropper)


# ----------------------------------------------------------------------------- lm-eval

# "lm-eval" (task utilities) and "lm_eval" are the package's roots; the children get their own level
# because simple_evaluate(verbosity=...) resets the root "lm_eval" logger.
LM_EVAL_LOGGERS = (
    "lm-eval", "lm_eval", "lm_eval.evaluator", "lm_eval.api.task", "lm_eval.models.huggingface",
    "lm_eval.tasks", "lm_eval.tasks._index", "lm_eval.tasks.manager", "lm_eval.evaluator_utils",
)  # fmt: skip
CACHE_CHECK_DESC = "Checking cached requests"


@contextlib.contextmanager
def quiet_lm_eval_loggers() -> Iterator[None]:
    """lm-eval (0.4.13) logs INFO/WARNING lines (task loading, "assuming single device", ...) into the
    terminal; the harness reports what matters itself. Held at ERROR inside the block."""
    check_version("lm_eval.quiet_loggers")
    with logger_levels(LM_EVAL_LOGGERS, logging.ERROR):
        yield


@contextlib.contextmanager
def no_lm_eval_git_lookup() -> Iterator[None]:
    """simple_evaluate (lm-eval 0.4.13) runs `git describe` in the working directory and lets git print
    "fatal: not a git repository" into the run's output when it is none; the record carries the
    harness's own commit. lm_eval.evaluator.get_git_commit_hash returns None inside the block."""
    check_version("lm_eval.no_git_lookup")
    import lm_eval.evaluator

    with _swapped(lm_eval.evaluator, "get_git_commit_hash", lambda: None):
        yield


ENV_INFO_NOT_COLLECTED = "not collected by the harness (its run record names the environment)"


@contextlib.contextmanager
def no_lm_eval_env_info() -> Iterator[None]:
    """simple_evaluate (lm-eval 0.4.13) ends every call with add_env_info, whose torch.utils.collect_env
    runs about a dozen subprocesses (pip, conda, nvidia-smi, lscpu, ...): half a second per task on a CPU
    box, for text the harness never reads (the record carries its own environment). Inside the block
    get_pretty_env_info returns ENV_INFO_NOT_COLLECTED instead."""
    check_version("lm_eval.no_env_info")
    import torch.utils.collect_env

    with _swapped(torch.utils.collect_env, "get_pretty_env_info", lambda: ENV_INFO_NOT_COLLECTED):
        yield


def _tqdm_without_cache_check(*args: Any, **kwargs: Any) -> Any:
    from tqdm import tqdm

    if kwargs.get("desc") == CACHE_CHECK_DESC:
        kwargs["disable"] = True
    return tqdm(*args, **kwargs)


@contextlib.contextmanager
def no_cache_check_bar() -> Iterator[None]:
    """CachingLM (lm-eval 0.4.13) draws a progress bar per task for its request-cache lookup, a dictionary
    check per request. lm_eval.api.model.tqdm hides that one bar inside the block."""
    check_version("lm_eval.no_cache_check_bar")
    import lm_eval.api.model

    with _swapped(lm_eval.api.model, "tqdm", _tqdm_without_cache_check):
        yield


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """All four lm-eval patches: wrap task loading and evaluation (nesting is fine)."""
    with quiet_lm_eval_loggers(), no_lm_eval_git_lookup(), no_lm_eval_env_info(), no_cache_check_bar():
        yield


class TokenizedLoglikelihoodHook:
    """Mixin for an lm-eval HFLM subclass (first among its bases). lm-eval (0.4.13) has no public hook for
    log-likelihood requests after HFLM has tokenized them: TemplateLM.loglikelihood hands them to the private
    HFLM._loglikelihood_tokens(requests, disable_tqdm, override_bs). That method is routed here to
    score_tokenized(); upstream_loglikelihood_tokens() is HFLM's own."""

    def _loglikelihood_tokens(
        self, requests: list[Any], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        check_version("lm_eval.loglikelihood_tokens")
        return self.score_tokenized(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def upstream_loglikelihood_tokens(
        self, requests: list[Any], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)  # type: ignore[misc]

    def score_tokenized(
        self, requests: list[Any], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        raise NotImplementedError


# ----------------------------------------------------------------------------- alpaca_eval

PKG_RESOURCES_WARNING = r"pkg_resources is deprecated as an API"
CLIENT_CONFIG_WARNING = "We are using environment variables to construct the client configs"
# scikit-learn 1.9 deprecates options alpaca_eval's GLM passes to LogisticRegressionCV (removed in 1.10)
GLM_SKLEARN_WARNINGS = (
    r"'penalty' was deprecated",
    r"The default value for l1_ratios will change",
    r"The fitted attributes of LogisticRegressionCV will be simplified",
)
GLM_CONVERGENCE_WARNING = r"Liblinear failed to converge"  # on a few hundred rows or a bootstrap resample


def import_alpaca_eval() -> Any:
    """alpaca_eval (0.6.6) calls dotenv's load_dotenv() when imported, so a stray .env in the working
    directory would inject secrets (API keys, base URLs) into the process; and it imports pkg_resources,
    whose deprecation UserWarning (setuptools >= 80) is not the user's concern. The first import here runs
    with load_dotenv a no-op and that one warning filtered; later calls return the module."""
    import sys

    if "alpaca_eval" not in sys.modules:
        check_version("alpaca_eval.import_quietly")
        import dotenv

        with _swapped(dotenv, "load_dotenv", lambda *args, **kwargs: False), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=PKG_RESOURCES_WARNING, category=UserWarning)
            import alpaca_eval  # noqa: F401
    import alpaca_eval

    return alpaca_eval


@contextlib.contextmanager
def local_glm_hub_file(path: Path) -> Iterator[None]:
    """alpaca_eval's length-controlled GLM (0.6.6) downloads df_gamed.csv from the hub with
    glm_winrate.hf_hub_download; inside the block it gets the local `path` instead (any other file asked
    for is an error: it has no local replacement)."""
    from harness.errors import HarnessError

    check_version("alpaca_eval.glm_local_hub_file")
    import_alpaca_eval()
    from alpaca_eval.metrics import glm_winrate

    if not hasattr(glm_winrate, "hf_hub_download"):
        raise HarnessError("alpaca_eval's GLM no longer downloads with hf_hub_download; harness/compat.py needs updating")

    def download(*args: Any, filename: str = "", **kwargs: Any) -> str:
        if filename != "df_gamed.csv":
            raise HarnessError(f"AlpacaEval GLM asked for hub file {filename!r}, which has no local replacement")
        return str(path)

    with _swapped(glm_winrate, "hf_hub_download", download):
        yield


@contextlib.contextmanager
def quiet_glm_warnings() -> Iterator[None]:
    """alpaca_eval's GLM (0.6.6) passes scikit-learn (1.9) LogisticRegressionCV options deprecated for 1.10,
    and scikit-learn warns on every fit (FutureWarning); on small samples liblinear may also stop at
    its iteration limit (ConvergenceWarning; the GLM's cross-validation picks among the fits regardless).
    Those warnings are ignored inside the block."""
    check_version("alpaca_eval.glm_sklearn_warnings")
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        for message in GLM_SKLEARN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning, module=r"sklearn\.")
        warnings.filterwarnings("ignore", message=GLM_CONVERGENCE_WARNING, category=ConvergenceWarning, module=r"sklearn\.")
        yield


@contextlib.contextmanager
def quiet_client_config_warning() -> Iterator[None]:
    """alpaca_eval (0.6.6) logs a warning on every request that no client-config file exists; the harness
    passes the client on purpose. That log record is dropped inside the block."""
    check_version("alpaca_eval.client_config_warning")
    with dropped_log_records(CLIENT_CONFIG_WARNING):
        yield


def alpaca_eval_price_per_token(model: str) -> float | None:
    """alpaca_eval's list price per token (USD) for an OpenAI model, None when it does not know the model.
    alpaca_eval (0.6.6) keeps its price table in a private function of its OpenAI decoder; the pairwise
    reviews, sent through the harness's own client, read it so a gpt-4 judge reports the cost alpaca_eval
    would have reported."""
    import math

    check_version("alpaca_eval.price_table")
    import_alpaca_eval()
    from alpaca_eval.decoders import openai as openai_decoder

    with dropped_log_records("for computing price per token"):  # its warning for a model it does not know
        price = float(openai_decoder._get_price_per_token(model))
    return price if math.isfinite(price) else None


# ----------------------------------------------------------------------------- transformers


def register_attention(name: str, function: Callable[..., Any]) -> None:
    """transformers (5.23) finds attention functions by config._attn_implementation in AttentionInterface's
    global registry; the per-example (varlen) attention is registered there under `name`, once, on first
    use rather than at import. A function already registered under the name is kept (tests replace it)."""
    check_version("transformers.varlen_attention")
    from transformers import AttentionInterface

    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, function)


def attn_implementation(config: Any) -> str | None:
    """The attention implementation a transformers (5.23) model's layers use: the private
    config._attn_implementation, read by every attention layer on every forward."""
    check_version("transformers.attn_implementation")
    return config._attn_implementation


def set_attn_implementation(config: Any, name: str | None) -> None:
    """Switch the layers' attention implementation for the next forwards. transformers' public
    model.set_attn_implementation() validates against its own kernels and reloads them; the private
    property's setter (5.23) only records the name, which is what a temporary switch needs."""
    check_version("transformers.attn_implementation")
    config._attn_implementation = name


def checkpointing_arguments(enabled: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments' keyword names for gradient (activation) checkpointing: transformers 5.23 renamed
    gradient_checkpointing(_kwargs) to activation_checkpointing(_kwargs) and warns (FutureWarning) on the old
    names; older versions know only those."""
    check_version("transformers.checkpointing_args")
    from transformers import TrainingArguments

    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": kwargs}


class TrainerCheckpointHooks:
    """Mixin for a transformers Trainer subclass (first among its bases). Trainer (5.23) has no public hook
    around writing a checkpoint: it is the private _save_checkpoint(model, trial), which writes
    trainer_state.json; save_model(output_dir, _internal_call) also writes the weights when called from
    there; the loss sum so far is the private _total_loss_scalar plus _tr_loss. Subclasses override
    before_checkpoint_save, after_checkpoint_save and skips_checkpoint_weights, and call running_loss_sum."""

    def before_checkpoint_save(self) -> None:
        """Just before a checkpoint (and its trainer_state.json) is written."""

    def after_checkpoint_save(self) -> None:
        """Once the checkpoint is written."""

    def skips_checkpoint_weights(self) -> bool:
        """True: Trainer's own save_model call while checkpointing writes nothing."""
        return False

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        check_version("transformers.trainer_checkpoint_hooks")
        self.before_checkpoint_save()
        super()._save_checkpoint(model, trial)  # type: ignore[misc]
        self.after_checkpoint_save()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if _internal_call and self.skips_checkpoint_weights():
            return
        super().save_model(output_dir, _internal_call)  # type: ignore[misc]

    def running_loss_sum(self) -> float:
        """Trainer's sum of the step losses so far (logged plus not yet logged)."""
        return self._total_loss_scalar + float(self._tr_loss.item())  # type: ignore[attr-defined]


def model_from_config(model_class: Any, config: Any, **kwargs: Any) -> Any:
    """A model of `model_class` built from `config` without loading weights. The classmethod that
    honours the class itself (a subclass, or the class behind an FSDP wrapper) with dtype is the private
    PreTrainedModel._from_config (5.23); the public AutoModel.from_config maps the config to its class."""
    check_version("transformers.from_config")
    return model_class._from_config(config, **kwargs)


# ----------------------------------------------------------------------------- accelerate


def force_fsdp_state(state: Any, plugin: Any) -> None:
    """accelerate (1.15) switches to FSDP only on accelerators (AcceleratorState's MULTI_GPU branch); on CPU
    (gloo processes) it would silently train DDP. Set FSDP on the AcceleratorState and, as AcceleratorState
    does on GPUs, in PartialState's private shared state, so the CPU run takes the same code as a GPU run."""
    check_version("accelerate.fsdp_on_cpu")
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


# ----------------------------------------------------------------------------- torch


@contextlib.contextmanager
def quiet_elastic_launcher() -> Iterator[None]:
    """torch's elastic launcher (2.13, under accelerate launch) logs a failed child's traceback and error
    file; the harness reports the failure in one line itself. Held at CRITICAL inside the block."""
    check_version("torch.quiet_elastic_launcher")
    with logger_levels(("torch.distributed.elastic",), logging.CRITICAL):
        yield


# ----------------------------------------------------------------------------- the command line


def quiet_libraries() -> None:
    """For the command line (process-wide, called once at start): keep the terminal for the harness's own
    progress bars and tables. transformers' and datasets' logging at ERROR without progress bars;
    tokenizers' fork warning off. No blanket warning filter: the library warnings a run emits are
    fixed at their source or filtered where they arise (the context managers above)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.utils.logging.disable_progress_bar()
