"""Secrets come from the environment only. A run whose recipe really uses an API key (Phased IFT scored by
the OpenAI-compatible judge, here a local server that checks the key) with canary values in
OPENAI_API_KEY and HF_TOKEN must write neither value to any file of the run directory or the harness
cache (scores, judge journal), nor to its own output; a judge that rejects the key must give a one-line
error without it. With the image tests/test_docker_integration.py builds present on a reachable Docker
daemon, the image's layer history is checked too (that module checks its own build and run as well).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.harness.openai_server import send_json

REPO_ROOT = Path(__file__).resolve().parents[1]
CANARIES = {"OPENAI_API_KEY": "sk-canary-5e0c7b1f92d4", "HF_TOKEN": "hf_canary3d9a41c6b8e0"}
IMAGE = "harness-it:latest"  # tests/test_docker_integration.py's image tag


class JudgeServer(ThreadingHTTPServer):
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that records the Authorization headers it gets
    and answers "Score: N" (N from the prompt's length), or 401 when `reject` is set."""

    daemon_threads = True

    def __init__(self) -> None:
        self.authorizations: list[str] = []
        self.reject = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.authorizations.append(self.headers.get("Authorization", ""))
                prompt = body["messages"][-1]["content"]
                if server.reject:
                    status, payload = 401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}
                else:
                    status, payload = 200, {
                        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": f"Score: {1 + len(prompt) % 5}"}}],
                        "usage": {"prompt_tokens": 50, "completion_tokens": 3, "total_tokens": 53},
                    }  # fmt: skip
                send_json(self, status, payload)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


@pytest.fixture()
def judge() -> Iterator[JudgeServer]:
    server = JudgeServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def files_under(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file() and not path.is_symlink()]


@pytest.mark.e2e
def test_canary_secrets_reach_no_file_log_or_error(judge: JudgeServer, tmp_path: Path):
    from harness.models import build_tiny_model

    cache, fresh_cache = tmp_path / "cache", tmp_path / "cache2"  # private: no judgments cached by other tests
    for folder in (cache, fresh_cache):
        folder.mkdir()
        (folder / "models").symlink_to(build_tiny_model().parent, target_is_directory=True)
    env = {**os.environ, **CANARIES, "HARNESS_CACHE": str(cache), "PYTHONPATH": str(REPO_ROOT)}
    output = tmp_path / "runs"
    command = [
        sys.executable, "-m", "harness.cli", "run", "--recipe", "phased", "--set", "params.scorer=judge",
        "--set", f"params.judge.base_url={judge.base_url}", "--set", "params.judge.model=judge",
        "--set", "data.limit=40", "--limit", "10", "--output", str(output),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    # The key was really used: every request carried it.
    assert judge.authorizations and set(judge.authorizations) == {f"Bearer {CANARIES['OPENAI_API_KEY']}"}
    (run_dir,) = output.iterdir()
    record = json.loads((run_dir / "record.json").read_text())
    assert record["recipe"]["scorer"] == "judge"
    journal = list((cache / "artifacts" / "judge").glob("*.jsonl"))
    assert journal, "the judge journal (its annotation cache) was written"
    scanned = files_under(run_dir) + files_under(cache / "artifacts")
    assert len(scanned) > 10
    for path in scanned:
        content = path.read_bytes()
        for name, canary in CANARIES.items():
            assert canary.encode() not in content, f"{name} found in {path}"
    for canary in CANARIES.values():
        assert canary not in result.stdout + result.stderr

    # A judge that rejects the key: one line that names the variable, never its value; nothing left behind.
    judge.reject = True
    rejected = subprocess.run([*command[:-1], str(tmp_path / "rejected")], capture_output=True, text=True,
                              env={**env, "HARNESS_CACHE": str(fresh_cache)}, timeout=600, cwd=REPO_ROOT)
    assert rejected.returncode == 2, rejected.stderr[-3000:]
    last = rejected.stderr.strip().splitlines()[-1]
    assert last.startswith("error: judge at") and "OPENAI_API_KEY" in last
    assert all(canary not in rejected.stdout + rejected.stderr for canary in CANARIES.values())
    assert not (tmp_path / "rejected").exists() or not any((tmp_path / "rejected").iterdir())
    print(f"\nscanned {len(scanned)} files for {len(CANARIES)} canaries; judge requests: {len(judge.authorizations)}")

    docker = shutil.which("docker")
    probe = subprocess.run([docker, "image", "inspect", IMAGE], capture_output=True, text=True, timeout=60) if docker else None
    if probe is None or probe.returncode != 0:
        print(f"image history not checked: no docker CLI or no {IMAGE} on a reachable daemon")
        return
    history = subprocess.run([docker, "history", "--no-trunc", IMAGE], capture_output=True, text=True, timeout=60, check=True)
    for canary in CANARIES.values():
        assert canary not in history.stdout + probe.stdout
