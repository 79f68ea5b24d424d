"""Evaluation generation through vLLM (`eval.backend: vllm`): the evaluated weights served by `vllm serve`
in a process of its own, spoken to over vLLM's OpenAI-compatible completions endpoint.

Why a server and not `vllm.LLM` in this process: vLLM pins its own torch (vLLM 0.34 requires torch
2.14 and transformers < 5.23) while the harness's tested stack is torch 2.13 / transformers 5.23, so
vLLM lives in an environment (or image) of its own: `pip install vllm` in a second venv and point
HARNESS_VLLM at its `vllm` executable (or put one on PATH). The same server also gives lm-eval's
generative tasks (IFEval, GSM8K) continuous batching through lm-eval's own `local-completions` model,
and `--data-parallel-size` spreads it over the node's GPUs.

What goes through vLLM: the evaluated model's generation only (AlpacaEval and pairwise answers, and
lm-eval's generate-until tasks). Log-likelihood tasks stay on the scoring engine (harness/lm_engine.py,
one forward pass per prefix tree), which vLLM's echo-logprobs path would not beat.

Prompts are sent as token ids, encoded and truncated exactly as the HF path does, and decoding is
greedy (temperature 0) with the same stop tokens, so the two backends differ only by the kernels and
vLLM's bf16 weights. Which backend produced a set of outputs is part of its settings (and its cache key).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

VLLM_ENV = "HARNESS_VLLM"  # the command that starts vLLM's CLI (e.g. /opt/vllm/bin/vllm); default: `vllm` on PATH
VLLM_ARGS_ENV = "HARNESS_VLLM_ARGS"  # more `vllm serve` arguments (e.g. --gpu-memory-utilization 0.8)
START_TIMEOUT_ENV = "HARNESS_VLLM_START_TIMEOUT"  # seconds to wait for the server (a 70B model loads for minutes)
DEFAULT_START_TIMEOUT = 1800
SERVED_NAME = "harness-evaluated"
BACKENDS = ("auto", "hf", "vllm")
CONCURRENT_REQUESTS = 256  # vLLM batches what is in flight; more requests keep its scheduler full


def vllm_command() -> list[str] | None:
    """The command that runs vLLM's CLI: HARNESS_VLLM (split like a shell would), else `vllm` on PATH."""
    configured = os.environ.get(VLLM_ENV, "").strip()
    if configured:
        return shlex.split(configured)
    found = shutil.which("vllm")
    return [found] if found else None


def resolve_backend(requested: str, device_type: str, command: list[str] | None) -> str:
    """The generation backend a run uses: `auto` is vLLM where it is installed and the process has a GPU
    (vLLM's kernels are GPU kernels), HF generate otherwise; asking for vLLM without it is a one-line error."""
    if requested not in BACKENDS:
        raise HarnessError(f"eval.backend = {requested!r}: use one of {', '.join(BACKENDS)}")
    if requested == "hf":
        return "hf"
    if requested == "vllm" and command is None:
        raise HarnessError(
            "eval.backend=vllm but no vLLM was found: install it in an environment of its own (pip install vllm; it "
            f"pins its own torch) and set {VLLM_ENV}=/path/to/that/venv/bin/vllm, or use eval.backend=hf"
        )
    if requested == "vllm":
        return "vllm"
    return "vllm" if command is not None and device_type == "cuda" else "hf"


def serve_arguments(model_dir: Path, *, port: int, seed: int, dtype: str, data_parallel: int, extra: list[str]) -> list[str]:
    """`vllm serve` arguments: the weights, loopback only, a fixed name and seed, and the dtype."""
    arguments = [
        "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME,
        "--dtype", dtype, "--seed", str(seed),
    ]
    if data_parallel > 1:
        arguments += ["--data-parallel-size", str(data_parallel)]
    return arguments + extra


def start_timeout() -> float:
    """HARNESS_VLLM_START_TIMEOUT in seconds (default 1800), or a one-line error naming the value."""
    value = os.environ.get(START_TIMEOUT_ENV, str(DEFAULT_START_TIMEOUT))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise HarnessError(f"{START_TIMEOUT_ENV}={value!r}: give the wait for the vLLM server in seconds (a positive number)")
    return seconds


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


@dataclass
class ServedModel:
    """A model behind vLLM's completions endpoint: stands in for the HF model in `generate_from_prompts`."""

    base_url: str  # http://127.0.0.1:PORT/v1
    tokenizer: Any
    weights_dir: Path  # what the server serves (lm-eval's local-completions reads the tokenizer there)
    stop_token_ids: list[int] = field(default_factory=list)
    name: str = SERVED_NAME

    def complete(self, encoded: list[list[int]], *, max_new_tokens: int, repetition_penalty: float,
                 progress: Any = None) -> list[tuple[str, int, bool]]:
        """Greedy continuations of token-id prompts, in order: (text, new tokens before the stop token, ended
        with a stop token). Every prompt is one request; vLLM batches the ones in flight."""
        import openai

        client = openai.OpenAI(base_url=self.base_url, api_key="EMPTY", max_retries=3, timeout=3600)

        def one(prompt: list[int]) -> tuple[str, int, bool]:
            response = client.completions.create(
                model=self.name, prompt=prompt, max_tokens=max_new_tokens, temperature=0, seed=0,
                extra_body={
                    "repetition_penalty": repetition_penalty, "stop_token_ids": self.stop_token_ids,
                    "skip_special_tokens": True,
                },
            )
            choice = response.choices[0]
            finished = choice.finish_reason == "stop"
            generated = response.usage.completion_tokens if response.usage is not None else 0
            # the stop token is generated (and counted) but not shown; the HF path counts the tokens before it
            return choice.text.strip(), max(generated - int(finished), 0), finished

        results: list[tuple[str, int, bool]] = []
        with ThreadPoolExecutor(min(CONCURRENT_REQUESTS, max(len(encoded), 1))) as pool:
            for done, result in enumerate(pool.map(one, encoded), start=1):
                results.append(result)
                if progress is not None and (done % 16 == 0 or done == len(encoded)):
                    progress(done, len(encoded))
        return results


@contextlib.contextmanager
def off_the_gpu(model: Any) -> Iterator[None]:
    """The in-memory model moved to host memory while the block runs (vLLM takes most of the GPU) and
    back after; nothing moves on the CPU."""
    import torch

    device = next(model.parameters()).device
    if device.type != "cuda":
        yield
        return
    model.to("cpu")
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        model.to(device)


@contextlib.contextmanager
def serve_evaluated(
    model: Any, tokenizer: Any, stop_token_ids: list[int], *, output_dir: Path, weights_dir: Path | None, seed: int
) -> Iterator[ServedModel]:
    """The evaluated model behind a vLLM server for the block: its weights as saved in `weights_dir` (the
    run's saved model), or written to output_dir/.vllm-weights and deleted after; the model itself waits
    in host memory. With one process on a node of several GPUs the server spreads over all of them."""
    import torch

    from harness import distributed

    written = weights_dir is None
    directory = output_dir / ".vllm-weights" if weights_dir is None else weights_dir
    if written:
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    data_parallel = gpus if distributed.world_size() == 1 and gpus > 1 else 1
    try:
        with off_the_gpu(model), vllm_server(
            directory, tokenizer, stop_token_ids, log_path=output_dir / "vllm_server.log", seed=seed, data_parallel=data_parallel
        ) as served:
            yield served
    finally:
        if written:
            shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def vllm_server(
    model_dir: Path, tokenizer: Any, stop_token_ids: list[int], *, log_path: Path, seed: int = 0,
    dtype: str = "bfloat16", data_parallel: int = 1,
) -> Iterator[ServedModel]:
    """Start `vllm serve` on `model_dir`, wait until it answers /health, yield it as a ServedModel, and stop
    it (terminate, then kill) however the block ends. Its output goes to `log_path`; a server that exits
    or never gets healthy is a one-line error quoting the log's last line."""
    command = vllm_command()
    resolve_backend("vllm", "cuda", command)  # one line when there is no vLLM to start
    assert command is not None
    port = _free_port()
    extra = shlex.split(os.environ.get(VLLM_ARGS_ENV, ""))
    arguments = command + serve_arguments(model_dir, port=port, seed=seed, dtype=dtype, data_parallel=data_parallel, extra=extra)
    timeout = start_timeout()
    base = f"http://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(arguments, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(base):
            if process.poll() is not None:
                raise HarnessError(
                    f"vLLM server ({shlex.join(arguments[:2])}) exited with code {process.returncode} before it was ready: "
                    f"{_log_tail(log_path) or 'no output'} (full log: {log_path})"
                )
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"vLLM server not ready after {timeout:.0f} s ({START_TIMEOUT_ENV} sets the wait); log: {log_path}"
                )
            time.sleep(0.5)
        yield ServedModel(f"{base}/v1", tokenizer, model_dir, stop_token_ids)
    finally:  # the whole process group: vLLM's engine and data-parallel workers are its children
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
