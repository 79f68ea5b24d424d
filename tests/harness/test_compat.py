"""harness/compat.py: per patch, the upstream behaviour it relies on is still there (these fail when an
upgrade changes it); the version guard; and a source scan that keeps every patch in compat.py."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from harness import compat
from harness.compat import PATCHES, Patch, UpstreamVersionWarning

HARNESS_DIR = Path(compat.__file__).resolve().parent
REPO_ROOT = HARNESS_DIR.parent

# ----------------------------------------------------------------------------- the version guard


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_each_patch_was_written_for_the_installed_version(name):
    """An upgrade outside a patch's range fails here (and warns at run time): re-check the patch, then its range."""
    from packaging.specifiers import SpecifierSet

    patch = PATCHES[name]
    installed = compat.installed_version(patch.package)
    assert installed is not None, f"{patch.package} is not installed"
    assert SpecifierSet(patch.versions).contains(installed, prereleases=True), f"{name}: {patch.package} {installed}"


def test_version_guard_warns_once_in_one_line(monkeypatch):
    monkeypatch.setitem(PATCHES, "test.outside", Patch("pytest", "<1", "a test patch"))
    monkeypatch.setattr(compat, "_checked", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.check_version("test.outside")
        compat.check_version("test.outside")
    assert len(caught) == 1 and caught[0].category is UpstreamVersionWarning
    message = str(caught[0].message)
    assert "\n" not in message
    assert "pytest" in message and compat.installed_version("pytest") in message and "test.outside" in message


def test_version_guard_is_silent_inside_the_range(monkeypatch):
    monkeypatch.setattr(compat, "_checked", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UpstreamVersionWarning)
        for name in PATCHES:
            compat.check_version(name)


# ----------------------------------------------------------------------------- lm-eval


def test_lm_eval_loggers_are_the_ones_lm_eval_logs_to():
    import lm_eval.utils

    assert 'getLogger("lm_eval")' in inspect.getsource(lm_eval.utils.setup_logging)  # the root it configures
    for name in compat.LM_EVAL_LOGGERS:
        if name != "lm-eval":  # task utilities' logger name, not a module
            assert importlib.util.find_spec(name) is not None, name
    before = logging.getLogger("lm_eval.evaluator").level
    with compat.quiet_lm_eval_loggers():
        assert all(logging.getLogger(name).level == logging.ERROR for name in compat.LM_EVAL_LOGGERS)
    assert logging.getLogger("lm_eval.evaluator").level == before  # restored


def test_lm_eval_still_asks_git_for_its_commit():
    import lm_eval.evaluator

    original = lm_eval.evaluator.get_git_commit_hash
    assert "get_git_commit_hash()" in inspect.getsource(lm_eval.evaluator.simple_evaluate)
    with compat.no_lm_eval_git_lookup():
        assert lm_eval.evaluator.get_git_commit_hash() is None
    assert lm_eval.evaluator.get_git_commit_hash is original


def test_lm_eval_still_collects_torch_env_info_and_the_block_skips_its_subprocesses(monkeypatch):
    import subprocess

    import lm_eval.evaluator
    import lm_eval.loggers.utils
    import torch.utils.collect_env

    assert "add_env_info(results)" in inspect.getsource(lm_eval.evaluator.simple_evaluate)
    assert "from torch.utils.collect_env import get_pretty_env_info" in inspect.getsource(lm_eval.loggers.utils.add_env_info)
    original = torch.utils.collect_env.get_pretty_env_info
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *args, **kwargs: started.append(args) or (_ for _ in ()).throw(OSError))
    storage: dict = {}
    with compat.no_lm_eval_env_info():
        lm_eval.loggers.utils.add_env_info(storage)
    assert storage["pretty_env_info"] == compat.ENV_INFO_NOT_COLLECTED and not started and "transformers_version" in storage
    assert torch.utils.collect_env.get_pretty_env_info is original


def test_lm_eval_cache_check_still_draws_its_bar_with_the_module_tqdm():
    import lm_eval.api.model
    from tqdm import tqdm

    assert lm_eval.api.model.tqdm is tqdm
    assert f'desc="{compat.CACHE_CHECK_DESC}"' in inspect.getsource(lm_eval.api.model.CachingLM)
    with compat.no_cache_check_bar():
        bar = lm_eval.api.model.tqdm([1], desc=compat.CACHE_CHECK_DESC)
        assert bar.disable
    assert lm_eval.api.model.tqdm is tqdm


def test_hflm_loglikelihood_tokens_keeps_its_signature_and_caller():
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.huggingface import HFLM

    from harness.lm_engine import EngineLM

    parameters = list(inspect.signature(HFLM._loglikelihood_tokens).parameters)
    assert parameters == ["self", "requests", "disable_tqdm", "override_bs"]
    assert "self._loglikelihood_tokens(" in inspect.getsource(TemplateLM.loglikelihood)
    assert "self._loglikelihood_tokens(" in inspect.getsource(HFLM.loglikelihood_rolling)
    assert EngineLM._loglikelihood_tokens is compat.TokenizedLoglikelihoodHook._loglikelihood_tokens


# ----------------------------------------------------------------------------- alpaca_eval


def test_alpaca_eval_still_loads_dotenv_and_pkg_resources_at_import():
    spec = importlib.util.find_spec("alpaca_eval")
    package = Path(spec.origin).parent
    init = (package / "__init__.py").read_text()
    assert "from dotenv import load_dotenv" in init and "load_dotenv()" in init
    assert "import pkg_resources" in (package / "utils.py").read_text()


def test_alpaca_eval_import_reads_no_dotenv_and_warns_nothing(tmp_path):
    """In a fresh process, in a folder with a .env: alpaca_eval imports without setting its variables and
    without the pkg_resources notice (the filter matches the warning actually emitted)."""
    (tmp_path / ".env").write_text("HARNESS_COMPAT_TEST_SECRET=leaked\n")
    script = (
        "import os, warnings\n"
        "warnings.simplefilter('default')\n"
        "from harness.compat import import_alpaca_eval\n"
        "import_alpaca_eval()\n"
        "print(os.environ.get('HARNESS_COMPAT_TEST_SECRET'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HARNESS_COMPAT_TEST_SECRET", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
    assert "Warning" not in done.stderr, done.stderr


def test_pkg_resources_warning_is_the_one_filtered():
    spec = importlib.util.find_spec("pkg_resources")
    if spec is None:  # setuptools >= 81: nothing to filter (and alpaca_eval 0.6.6 would not import)
        pytest.skip("no pkg_resources")
    source = Path(spec.origin).read_text()
    assert "pkg_resources is deprecated as an API" in source


def test_glm_still_downloads_df_gamed_with_hf_hub_download(tmp_path):
    compat.import_alpaca_eval()
    from alpaca_eval.metrics import glm_winrate

    assert 'filename="df_gamed.csv"' in inspect.getsource(glm_winrate._get_featurized_data)
    assert "hf_hub_download(" in inspect.getsource(glm_winrate._get_featurized_data)
    original = glm_winrate.hf_hub_download
    local = tmp_path / "df_gamed.csv"
    with compat.local_glm_hub_file(local):
        assert glm_winrate.hf_hub_download(repo_id="x", filename="df_gamed.csv") == str(local)
    assert glm_winrate.hf_hub_download is original


def _glm_frame(rows: int = 60):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "preference": rng.choice([1.0, 2.0], rows),
            "output_1": ["x" * int(n) for n in rng.integers(10, 200, rows)],
            "output_2": ["y" * int(n) for n in rng.integers(10, 200, rows)],
            "generator_1": "baseline",
            "generator_2": "model",
            "index": range(rows),
        }
    )


def test_glm_warnings_are_the_ones_scikit_learn_emits():
    """Each filtered FutureWarning is still emitted by a GLM fit; inside quiet_glm_warnings none is left."""
    from harness.alpaca import _local_hub_files

    compat.import_alpaca_eval()
    from alpaca_eval.metrics.glm_winrate import get_length_controlled_winrate

    def fit() -> list[warnings.WarningMessage]:
        with _local_hub_files(None, 60), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            get_length_controlled_winrate(
                _glm_frame(), glm_name="length_controlled_minimal", save_weights_dir=None, is_warn_extreme_changes=False
            )
        return [w for w in caught if issubclass(w.category, FutureWarning)]

    emitted = [str(w.message) for w in fit()]
    for pattern in compat.GLM_SKLEARN_WARNINGS:
        assert any(message.startswith(pattern.replace("\\", "")) for message in emitted), (pattern, emitted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with compat.quiet_glm_warnings():
            with _local_hub_files(None, 60):
                get_length_controlled_winrate(
                    _glm_frame(), glm_name="length_controlled_minimal", save_weights_dir=None, is_warn_extreme_changes=False
                )
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]


def test_glm_convergence_warning_is_still_the_one_liblinear_emits():
    import sklearn.svm._base

    assert compat.GLM_CONVERGENCE_WARNING in inspect.getsource(sklearn.svm._base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with compat.quiet_glm_warnings():
            from sklearn.exceptions import ConvergenceWarning

            warnings.warn_explicit(
                "Liblinear failed to converge, increase the number of iterations.", ConvergenceWarning,
                sklearn.svm._base.__file__, 1, module="sklearn.svm._base",
            )  # fmt: skip
    assert not caught


def test_client_config_warning_is_still_logged_to_the_root_logger_and_dropped(caplog):
    """The filter sits on the root logger, so it only sees records alpaca_eval logs there (logging.warning)."""
    import re

    spec = importlib.util.find_spec("alpaca_eval")
    source = (Path(spec.origin).parent / "utils.py").read_text()
    assert re.search(r"logging\.warning\(\s*f?\"[^\"]*" + re.escape(compat.CLIENT_CONFIG_WARNING), source)
    with caplog.at_level(logging.WARNING), compat.quiet_client_config_warning():
        logging.warning(f"x.yaml wasn't found. {compat.CLIENT_CONFIG_WARNING}.")
        logging.warning("kept")
    assert [record.getMessage() for record in caplog.records] == ["kept"]


def test_alpaca_eval_price_table_still_prices_openai_models_and_none_for_others(caplog):
    """The pairwise reviews price a gpt-4 judge as alpaca_eval's client did: by its private price table."""
    with caplog.at_level(logging.WARNING):
        assert compat.alpaca_eval_price_per_token("gpt-4-0613") == pytest.approx(0.03 / 1000)
        assert compat.alpaca_eval_price_per_token("gpt-4-1106-preview") == pytest.approx(0.01 / 1000)
        assert compat.alpaca_eval_price_per_token("my-local-judge") is None
    assert not [record for record in caplog.records if "price" in record.getMessage()]  # its warning is dropped


# ----------------------------------------------------------------------------- transformers


def test_attention_interface_registry_and_lookup():
    from transformers import AttentionInterface
    from transformers.models.llama import modeling_llama

    def attention(*args, **kwargs):
        return None

    name = "harness_compat_test"
    try:
        compat.register_attention(name, attention)
        assert AttentionInterface()[name] is attention
        assert AttentionInterface().get_interface(name, None) is attention
    finally:
        AttentionInterface._global_mapping.pop(name, None)
    source = inspect.getsource(modeling_llama)
    assert "ALL_ATTENTION_FUNCTIONS.get_interface(" in source and "self.config._attn_implementation" in source


def test_config_attn_implementation_is_a_settable_private_property():
    from transformers import LlamaConfig, PretrainedConfig

    prop = inspect.getattr_static(PretrainedConfig, "_attn_implementation")
    assert isinstance(prop, property) and prop.fset is not None
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    compat.set_attn_implementation(config, "harness_varlen")
    assert compat.attn_implementation(config) == "harness_varlen"
    compat.set_attn_implementation(config, "eager")
    assert compat.attn_implementation(config) == "eager"


def test_checkpointing_arguments_use_the_current_names(tmp_path):
    from transformers import TrainingArguments

    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    assert {"activation_checkpointing", "gradient_checkpointing"} <= fields
    arguments = compat.checkpointing_arguments(True, {"use_reentrant": False})
    assert set(arguments) == {"activation_checkpointing", "activation_checkpointing_kwargs"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **arguments)
    assert args.gradient_checkpointing is True and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    with pytest.warns(FutureWarning, match="gradient_checkpointing"):  # the warning the new names avoid
        TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], gradient_checkpointing=True)


def test_trainer_private_checkpoint_hooks_keep_their_shape():
    from transformers import Trainer

    from harness.training import ResponseOnlyTrainer

    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == ["self", "model", "trial"]
    assert list(inspect.signature(Trainer.save_model).parameters) == ["self", "output_dir", "_internal_call"]
    save = inspect.getsource(Trainer._save_checkpoint)
    assert "self.save_model(" in save and "_internal_call=True" in save
    source = inspect.getsource(Trainer)
    assert "self._save_checkpoint(" in source
    assert "self._total_loss_scalar +=" in source and "self._tr_loss" in source
    assert ResponseOnlyTrainer._save_checkpoint is compat.TrainerCheckpointHooks._save_checkpoint
    assert ResponseOnlyTrainer.save_model is compat.TrainerCheckpointHooks.save_model


def test_from_config_builds_the_class_given_with_a_dtype():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

    assert isinstance(inspect.getattr_static(PreTrainedModel, "_from_config"), classmethod)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    with torch.device("meta"):
        model = compat.model_from_config(LlamaForCausalLM, config, dtype=torch.bfloat16)
    assert type(model) is LlamaForCausalLM and next(model.parameters()).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- accelerate, torch


def test_accelerate_shared_state_and_its_fsdp_switch():
    from types import SimpleNamespace

    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    source = inspect.getsource(AcceleratorState.__init__)
    assert 'PartialState._shared_state["distributed_type"] = self.distributed_type' in source
    assert "self.distributed_type = DistributedType.FSDP" in source
    shared = PartialState._shared_state
    had, saved = "distributed_type" in shared, shared.get("distributed_type")
    state = SimpleNamespace(fsdp_plugin=None, distributed_type=DistributedType.MULTI_CPU)
    try:
        compat.force_fsdp_state(state, "plugin")
        assert state.distributed_type == DistributedType.FSDP and state.fsdp_plugin == "plugin"
        assert PartialState._shared_state["distributed_type"] == DistributedType.FSDP
    finally:
        if had:
            shared["distributed_type"] = saved
        else:
            shared.pop("distributed_type", None)


def test_elastic_launcher_logs_under_the_quietened_logger():
    from torch.distributed.elastic.multiprocessing import api, errors

    for module in (api, errors):
        assert module.logger.name.startswith("torch.distributed.elastic"), module.logger.name
    before = logging.getLogger("torch.distributed.elastic").level
    with compat.quiet_elastic_launcher():
        assert not api.logger.isEnabledFor(logging.ERROR)
    assert logging.getLogger("torch.distributed.elastic").level == before


# ----------------------------------------------------------------------------- source scan

STDLIB = set(sys.stdlib_module_names)
OWN = {"harness", "benchmarks"}
PRIVATE_UPSTREAM = ("_attn_implementation", "AttentionInterface", "_shared_state", "_from_config", "_tr_loss",
                    "_total_loss_scalar", "load_dotenv", "hf_hub_download", "get_git_commit_hash")  # fmt: skip


def _harness_files(include_compat: bool = False) -> list[Path]:
    files = sorted(HARNESS_DIR.rglob("*.py"))
    return [path for path in files if include_compat or path.name != "compat.py" or path.parent != HARNESS_DIR]


def _third_party_names(tree: ast.AST) -> set[str]:
    """Local names bound to third-party modules or their attributes by the file's imports."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top not in STDLIB and top not in OWN:
                    names.add(alias.asname or top)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top = node.module.split(".")[0]
            if top not in STDLIB and top not in OWN:
                names.update(alias.asname or alias.name for alias in node.names)
    return names


def _root(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute | ast.Subscript):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _offences(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    upstream = _third_party_names(tree)
    found = []
    for node in ast.walk(tree):
        targets: list[ast.AST] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        for target in targets:
            if isinstance(target, ast.Attribute | ast.Subscript) and _root(target) in upstream:
                found.append(f"{path.name}:{node.lineno}: assigns to {ast.unparse(target)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute):
            called = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            if called in ("setattr", "delattr") and node.args and _root(node.args[0]) in upstream:
                found.append(f"{path.name}:{node.lineno}: {called} on {ast.unparse(node.args[0])}")
            if called in ("filterwarnings", "simplefilter", "catch_warnings", "resetwarnings"):
                found.append(f"{path.name}:{node.lineno}: warnings.{called} (warning filters live in compat.py)")
            if called == "getLogger":
                logger = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
                argument = ast.unparse(node.args[0]) if node.args else ""
                if not (isinstance(logger, str) and logger.split(".")[0] in OWN) and argument != "__name__":
                    found.append(f"{path.name}:{node.lineno}: getLogger({argument}) of another package")
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_UPSTREAM:
            found.append(f"{path.name}:{node.lineno}: uses {node.attr}")
    return found


def test_no_unittest_mock_in_harness():
    for path in _harness_files(include_compat=True):
        text = path.read_text(encoding="utf-8")
        assert "unittest.mock" not in text and "from unittest import mock" not in text, path
        assert "mock.patch" not in text, path


def test_no_blanket_warning_filters_in_harness():
    import re

    blanket = re.compile(r"""(filterwarnings|simplefilter)\(\s*["']ignore["']\s*\)""")
    for path in _harness_files(include_compat=True):
        assert not blanket.search(path.read_text(encoding="utf-8")), f"{path}: a warning filter needs a message/category"


def test_no_patching_of_third_party_code_outside_compat():
    offences = [offence for path in _harness_files() for offence in _offences(path)]
    assert not offences, "patch third-party code in harness/compat.py:\n" + "\n".join(offences)


def test_the_scan_finds_patches(tmp_path):
    """The scan itself: each kind of patch it looks for is caught."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import logging, warnings\n"
        "import lm_eval.evaluator\n"
        "from alpaca_eval.metrics import glm_winrate\n"
        "from accelerate import PartialState\n"
        "lm_eval.evaluator.get_git_commit_hash = lambda: None\n"
        "glm_winrate.hf_hub_download = print\n"
        "PartialState._shared_state['x'] = 1\n"
        "setattr(glm_winrate, 'x', 1)\n"
        "warnings.filterwarnings('ignore', category=FutureWarning)\n"
        "logging.getLogger('lm_eval').setLevel(logging.ERROR)\n"
        "logging.getLogger().addFilter(None)\n"
        "config._attn_implementation = 'eager'\n"
    )
    found = "\n".join(_offences(sample))
    for line in range(5, 13):
        assert f"sample.py:{line}:" in found, (line, found)


def test_no_private_upstream_method_overridden_outside_compat():
    """A class in harness/ (outside compat.py) that defines an underscore method its third-party base has."""
    offences = []
    for path in _harness_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        private = {
            node.name: [
                item.name for item in node.body
                if isinstance(item, ast.FunctionDef) and item.name.startswith("_") and not item.name.startswith("__")
            ]
            for node in tree.body
            if isinstance(node, ast.ClassDef) and node.bases
        }  # fmt: skip
        private = {name: methods for name, methods in private.items() if methods}
        if not private:
            continue
        module = importlib.import_module(".".join(path.relative_to(REPO_ROOT).with_suffix("").parts))
        for name, methods in private.items():
            cls = getattr(module, name)
            for method in methods:
                upstream = [base for base in cls.__mro__[1:] if not base.__module__.startswith("harness") and method in vars(base)]
                if upstream:
                    offences.append(f"{cls.__module__}.{name}.{method} overrides {upstream[0].__module__}.{upstream[0].__name__}")
    assert not offences, "\n".join(offences)
