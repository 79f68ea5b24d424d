"""eval.backend vllm: the backend decision, the server's start and failure, and generation through the
server equal to HF generate. vLLM itself cannot be installed here (it pins a CUDA torch), so the server
is tests/harness/vllm_standin.py, started by the harness exactly as it starts `vllm serve`."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.evaluation import Suite, run_suite
from harness.generation import GenerationSettings, _stop_token_ids, generate
from harness.vllm_server import resolve_backend, serve_arguments, serve_evaluated, vllm_command
from harness.vllm_server import vllm_server as start_server

STANDIN = f"{sys.executable} {Path(__file__).with_name('vllm_standin.py')}"
PROMPTS = ["Name a colour.", "Write one sentence about the sea and the sky.", "Add two and two.", "Hi"]


def test_backend_decision_follows_what_is_installed_and_the_device():
    found = ["/opt/vllm/bin/vllm"]
    assert resolve_backend("hf", "cuda", found) == "hf"
    assert resolve_backend("auto", "cuda", found) == "vllm"
    assert resolve_backend("auto", "cpu", found) == "hf"  # vLLM's kernels are GPU kernels
    assert resolve_backend("auto", "cuda", None) == "hf"
    assert resolve_backend("vllm", "cpu", found) == "vllm"  # asked for: tried (the stand-in serves on CPU)
    with pytest.raises(HarnessError, match=r"eval.backend=vllm but no vLLM was found: .* set HARNESS_VLLM="):
        resolve_backend("vllm", "cuda", None)
    with pytest.raises(HarnessError, match="eval.backend = 'tgi': use one of auto, hf, vllm"):
        resolve_backend("tgi", "cuda", found)


def test_vllm_command_comes_from_the_environment_or_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_VLLM", "/opt/venv vllm/bin/python -m vllm.entrypoints.cli.main")
    assert vllm_command() == ["/opt/venv", "vllm/bin/python", "-m", "vllm.entrypoints.cli.main"]
    monkeypatch.setenv("HARNESS_VLLM", "'/opt/venv vllm/bin/vllm'")
    assert vllm_command() == ["/opt/venv vllm/bin/vllm"]
    monkeypatch.delenv("HARNESS_VLLM")
    executable = tmp_path / "vllm"
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert vllm_command() == [str(executable)]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert vllm_command() is None


def test_serve_arguments_bind_loopback_with_the_seed_and_spread_over_gpus():
    arguments = serve_arguments(Path("/w"), port=8123, seed=7, dtype="bfloat16", data_parallel=8, extra=["--max-model-len", "4096"])
    assert arguments[:2] == ["serve", "/w"]
    pairs = dict(zip(arguments[2::2], arguments[3::2], strict=False))
    assert pairs["--host"] == "127.0.0.1" and pairs["--port"] == "8123" and pairs["--seed"] == "7"
    assert pairs["--dtype"] == "bfloat16" and pairs["--data-parallel-size"] == "8" and pairs["--max-model-len"] == "4096"
    assert "--data-parallel-size" not in serve_arguments(Path("/w"), port=1, seed=0, dtype="bfloat16", data_parallel=1, extra=[])


def test_a_server_that_dies_at_start_is_a_one_line_error_quoting_its_log(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_VLLM", f"{sys.executable} -c \"import sys; print('RuntimeError: no CUDA device'); sys.exit(3)\"")
    with pytest.raises(HarnessError) as failed:
        with start_server(tmp_path, None, [], log_path=tmp_path / "server.log"):
            pass
    message = str(failed.value)
    assert "\n" not in message and "exited with code 3" in message and "RuntimeError: no CUDA device" in message


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_a_bad_start_timeout_is_a_one_line_error(monkeypatch, tmp_path, value):
    monkeypatch.setenv("HARNESS_VLLM", STANDIN)
    monkeypatch.setenv("HARNESS_VLLM_START_TIMEOUT", value)
    with pytest.raises(HarnessError, match=f"HARNESS_VLLM_START_TIMEOUT='{value}': give the wait for the vLLM server in seconds"):
        with start_server(tmp_path, None, [], log_path=tmp_path / "server.log"):
            pass


def _port_open(url: str) -> bool:
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    with socket.socket() as probe:
        return probe.connect_ex((host, int(port))) == 0


def test_generation_through_the_server_equals_hf_generate(tiny, tmp_path, monkeypatch):
    """The same token ids, stop tokens, limits and counts as the HF path (batch 1, so no padding differs):
    texts, token counts, finish flags and truncation flags are equal, in the caller's order. The server
    is gone and the written weights deleted after the block."""
    model, tokenizer = tiny
    monkeypatch.setenv("HARNESS_VLLM", STANDIN)
    hf = GenerationSettings(max_new_tokens=12, batch_size=1, template="alpaca", max_prompt_tokens=12, repetition_penalty=1.1)
    expected = generate(model, tokenizer, PROMPTS, hf)
    assert any(g.prompt_truncated for g in expected) and any(not g.finished for g in expected)
    served_settings = GenerationSettings(**{**hf.__dict__, "backend": "vllm"})
    with serve_evaluated(model, tokenizer, _stop_token_ids(model, tokenizer), output_dir=tmp_path, weights_dir=None, seed=0) as served:
        assert (tmp_path / ".vllm-weights" / "config.json").is_file()
        assert generate(served, tokenizer, PROMPTS, served_settings) == expected
        url = served.base_url
        with pytest.raises(HarnessError, match="generation backend hf does not match the model given"):
            generate(served, tokenizer, PROMPTS, hf)
    assert not _port_open(url) and not (tmp_path / ".vllm-weights").exists()
    requests = [json.loads(line) for line in (tmp_path / "standin_requests.jsonl").read_text().splitlines()]
    assert all(r["temperature"] == 0 and r["max_tokens"] == 12 and r["repetition_penalty"] == 1.1 for r in requests)
    assert all(len(prompt) <= 12 for r in requests for prompt in r["prompts"])  # token ids, truncated like the HF path
    assert served_settings.as_record()["backend"] == "vllm" and "backend" not in hf.as_record()  # keys: old outputs keep theirs


GENERATIVE_SUITE = {
    "name": "gen",
    "description": "one log-likelihood and one generate-until task",
    "tasks": [
        {"task": "local_arc_easy", "limit": 4, "metrics": ["acc"]},
        {"task": "local_ifeval", "limit": 3, "chat_template": True, "gen_kwargs": {"max_gen_toks": 16}},
    ],
    "heldout_nll": {"limit": 3},
    "alpaca_eval": {"version": 2, "judge": "local:tiny", "max_new_tokens": 12, "lc_bootstrap": 0, "limit": 2},
}


@pytest.fixture(scope="module")
def smollm2(harness_cache):
    """SmolLM2-135M-Instruct: real answers (the tiny model's are blank lines), so equal responses mean something."""
    from harness.models import load_model_and_tokenizer, resolve_model
    from tests.conftest import require_smollm2

    return load_model_and_tokenizer(resolve_model("smollm2-135m-instruct", str(require_smollm2())))


@pytest.mark.e2e
@pytest.mark.slow
def test_suite_through_vllm_equals_hf_and_records_who_produced_what(smollm2, tmp_path, monkeypatch):
    """run_suite with backend vllm: the log-likelihood task and heldout_nll run on the model as given,
    lm-eval's generate-until task goes through the server with lm-eval's local-completions model; every
    response and metric equals the HF backend's (greedy, fp32 stand-in), and each task records its backend."""
    model, tokenizer = smollm2
    suite = Suite.model_validate(GENERATIVE_SUITE)
    monkeypatch.setenv("HARNESS_VLLM", STANDIN)
    with_hf = run_suite(model, tokenizer, suite, output_dir=tmp_path / "hf", backend="hf", batch_size=1)  # no padding
    with_vllm = run_suite(model, tokenizer, suite, output_dir=tmp_path / "vllm", backend="vllm")
    assert with_hf["backend"] == "hf" and with_vllm["backend"] == "vllm"
    assert list(with_vllm["tasks"]) == list(with_hf["tasks"])  # the suite's order
    assert with_vllm["tasks"]["local_ifeval"]["model_class"] == "vllm"
    assert with_vllm["tasks"]["local_arc_easy"]["model_class"] == with_hf["tasks"]["local_arc_easy"]["model_class"] == "engine"

    def responses(folder: Path) -> list:
        rows = [json.loads(line) for line in (folder / "samples_local_ifeval.jsonl").read_text().splitlines()]
        return [(row["doc_id"], row["prompt_hash"], row["response"]) for row in rows]

    assert responses(tmp_path / "vllm") == responses(tmp_path / "hf")
    texts = [text for _, _, text in responses(tmp_path / "hf")]
    assert all(len(text.strip()) >= 20 for text in texts), texts  # real answers, not blank lines
    for task in ("local_ifeval", "local_arc_easy", "heldout_nll", "alpaca_eval"):
        hf_values = {name: cell["value"] for name, cell in with_hf["tasks"][task].items() if isinstance(cell, dict) and "value" in cell}
        vllm_values = {name: cell["value"] for name, cell in with_vllm["tasks"][task].items() if isinstance(cell, dict) and "value" in cell}
        assert hf_values and vllm_values == hf_values, task
    assert with_vllm["work"]["tasks_computed"] == 2

    def answers(folder: Path) -> tuple[list, dict]:
        saved = json.loads((folder / "alpaca_eval" / "model_outputs.json").read_text())
        return [(o["instruction"], o["output"], o["new_tokens"]) for o in saved["outputs"]], saved["generation"]

    (hf_answers, hf_generation), (vllm_answers, vllm_generation) = answers(tmp_path / "hf"), answers(tmp_path / "vllm")
    assert vllm_answers == hf_answers and all(text for _, text, _ in hf_answers)
    assert vllm_generation["backend"] == "vllm" and "backend" not in hf_generation
    sent = (tmp_path / "vllm" / "standin_requests.jsonl").read_text().splitlines()
    assert len(sent) == 3 + 2  # one request per IFEval prompt and per AlpacaEval item; arc_easy never reached it


def test_asking_for_vllm_without_it_fails_before_training(monkeypatch, tmp_path):
    from harness.runner import prepare_run
    from harness.spec import RunSpec

    monkeypatch.delenv("HARNESS_VLLM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(HarnessError, match="eval.backend=vllm but no vLLM was found"):
        prepare_run(RunSpec.model_validate({"eval": {"backend": "vllm"}}))


def test_backend_at_its_default_keeps_run_ids():
    from harness.spec import RunSpec

    assert RunSpec().content_hash() == RunSpec.model_validate({"eval": {"backend": "auto"}}).content_hash()
    assert RunSpec().content_hash() != RunSpec.model_validate({"eval": {"backend": "hf"}}).content_hash()


GENERATION_SUITE = """\
name: gen
description: one generate-until task and AlpacaEval, for the vLLM backend's CLI test
tasks:
  - {task: local_ifeval, limit: 2, chat_template: true, gen_kwargs: {max_gen_toks: 8}}
alpaca_eval: {version: 2, judge: "local:tiny", max_new_tokens: 8, lc_bootstrap: 0, limit: 2}
"""


@pytest.mark.e2e
def test_harness_run_with_backend_vllm_serves_the_saved_model_and_records_it(tmp_path, monkeypatch, capsys):
    """`harness run --set eval.backend=vllm`: after training, the server serves the run's saved model
    (no second copy of the weights), the record names the backend, IFEval says it was produced by vLLM,
    AlpacaEval's generation settings carry it, and the server's log is in the run directory."""
    from tests.cli_helpers import load_run, run_cli

    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "gen.yaml").write_text(GENERATION_SUITE)
    monkeypatch.setattr("harness.evaluation.SUITES_DIR", suites)
    monkeypatch.setenv("HARNESS_VLLM", STANDIN)
    output = tmp_path / "runs"
    code, _, err = run_cli(["run", "--suite", "gen", "--output", str(output), "--set", "data.limit=16",
                            "--set", "training.max_steps=2", "--set", "eval.backend=vllm"], capsys)
    assert code == 0, err
    run_dir, record = load_run(output)
    assert record["suite"]["backend"] == "vllm" and record["spec"]["eval"]["backend"] == "vllm"
    assert record["metrics"]["local_ifeval"]["model_class"] == "vllm"
    generation = json.loads((run_dir / "eval" / "alpaca_eval" / "model_outputs.json").read_text())["generation"]
    assert generation["backend"] == "vllm" and generation["n"] == 2
    served = {json.loads(line)["model"] for line in (run_dir / "standin_requests.jsonl").read_text().splitlines()}
    assert served == {"harness-evaluated"}  # the stand-in logs beside what it served: run_dir/model
    assert (run_dir / "eval" / "vllm_server.log").is_file() and not (run_dir / "eval" / ".vllm-weights").exists()
