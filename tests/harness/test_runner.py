import json
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.runner import check_resumable, prepare_run, recipe_variant, run_lock
from harness.spec import build_spec


def prepared(overrides: list[str], data: str | None = None):
    return prepare_run(build_spec(config_file=None, overrides=overrides, flags={"data.name": data}))


def test_run_id_changes_with_config_and_with_data_content(tmp_path: Path):
    base = prepared([])
    assert prepared([]).run_id == base.run_id
    assert prepared(["training.epochs=2"]).run_id != base.run_id
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    first = prepared([], str(data)).run_id
    data.write_text('{"instruction": "a", "output": "c"}\n')  # same path, new content
    assert prepared([], str(data)).run_id != first


def test_a_second_process_cannot_run_into_the_same_directory(tmp_path: Path):
    with run_lock(tmp_path):
        with pytest.raises(HarnessError, match=r"is in use by pid \d+"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released
        pass


def test_resuming_with_other_code_is_refused(tmp_path: Path, monkeypatch):
    (tmp_path / "run.json").write_text(json.dumps({"git_commit": "0" * 40}))
    monkeypatch.setattr("harness.runner.git_commit", lambda: "1" * 40)
    with pytest.raises(HarnessError, match="was started by harness commit 0+, this is 1+"):
        check_resumable(tmp_path)
    monkeypatch.setenv("HARNESS_ALLOW_CODE_CHANGE", "1")
    check_resumable(tmp_path)


def test_cached_training_artifacts_are_keyed_by_processes_and_sharding(monkeypatch):
    """Scores from a trained reference model (SFTMix, Cherry's brief experience) depend on the global batch
    and, under FSDP, on its rounding and bf16 scheme: each joins the artifact key; one process keeps the
    plain settings (caches made before stay valid)."""
    from harness.runner import RunContext
    from harness.spec import TrainingSpec

    settings = TrainingSpec()
    for name in ("WORLD_SIZE", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    assert RunContext.training_key(None, settings) == settings.model_dump(mode="json")  # type: ignore[arg-type]
    monkeypatch.setenv("WORLD_SIZE", "2")
    ddp = RunContext.training_key(None, settings)  # type: ignore[arg-type]
    assert ddp == settings.model_dump(mode="json") | {"processes": 2}
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert RunContext.training_key(None, settings) == ddp | {"distributed": "fsdp"}  # type: ignore[arg-type]


def test_the_recipe_variant_names_the_declared_parameters_with_resolved_values_first():
    phased = prepared(["recipe=phased", "params.stage_order=[3, 2, 1]"])
    assert recipe_variant(phased.recipe, phased.params) == "phased[scorer=auto, stage_order=3-2-1]"
    assert recipe_variant(phased.recipe, phased.params, {"scorer": "ifd-proxy"}) == (
        "phased[scorer=ifd-proxy, stage_order=3-2-1]")
    ifd = prepared(["recipe=ifd", "params.rate=0.05"])
    assert recipe_variant(ifd.recipe, ifd.params) == "ifd[rate=0.05, brief_experience=false]"
    one_off = prepared(["recipe=one-off"])
    assert recipe_variant(one_off.recipe, one_off.params) == "one-off"  # no VARIANT_PARAMS: the name alone


def test_a_model_without_a_chat_template_fails_before_training_when_the_suite_needs_one(tmp_path, capsys):
    """The tiny model with its chat template removed, a suite evaluated through the chat template: the run
    stops in one line before any training step and leaves no run directory."""
    import shutil

    from harness.models import build_tiny_model
    from tests.cli_helpers import run_cli

    plain = tmp_path / "tiny-without-chat-template"
    shutil.copytree(build_tiny_model(), plain)
    (plain / "chat_template.jinja").unlink()
    output = tmp_path / "runs"
    code, _, err = run_cli(["run", "--recipe", "one-off", "--model", str(plain), "--set", "eval.chat_template=true",
                            "--set", "training.template=alpaca", "--output", str(output)], capsys)
    assert code == 2 and "uses the chat template but the model's tokenizer has none" in err
    assert err.strip().splitlines()[-1].startswith("error: suite smoke: task") and "Traceback" not in err
    assert "train sft" not in err and (not output.exists() or not any(output.iterdir()))


def test_recipes_load_models_through_the_context_timed_and_in_the_runs_base_dtype_by_default(tmp_path: Path):
    """ctx.load_model: the base model's dtype unless a recipe asks for another (a local judge scores in the
    inference dtype), and every load a timed stage of its own."""
    import torch
    from rich.console import Console

    from harness.runner import RunContext

    run = prepared(["recipe=one-off"])
    ctx = RunContext(run, tmp_path, Console(quiet=True))
    model, _ = ctx.base_model()
    assert next(model.parameters()).dtype == ctx.base_dtype and "load_model" in ctx.timings
    judge, _ = ctx.load_model(run.model_info, dtype=torch.bfloat16, stage="load_model:judge")
    assert next(judge.parameters()).dtype == torch.bfloat16 and "load_model:judge" in ctx.timings


def test_ctx_cached_computes_once_then_reads_the_artifact(tmp_path: Path):
    from rich.console import Console

    from harness.artifacts import ArtifactCache
    from harness.runner import RunContext

    ctx = RunContext(prepared(["recipe=one-off"]), tmp_path / "run", Console(quiet=True))
    ctx.cache = ArtifactCache(tmp_path / "cache")
    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"scores": [0.25, 0.5]}

    assert ctx.cached("test-kind", "k1", compute) == ({"scores": [0.25, 0.5]}, False)
    assert ctx.cached("test-kind", "k1", compute) == ({"scores": [0.25, 0.5]}, True)  # from the cache, not recomputed
    assert len(calls) == 1 and ctx.cache.load("test-kind", "k1") == {"scores": [0.25, 0.5]}
    assert ctx.cached("test-kind", "k2", compute)[1] is False and len(calls) == 2  # another key is another artifact
