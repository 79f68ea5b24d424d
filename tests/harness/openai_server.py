"""A real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions protocol, for judge tests.

It stands in for a paid judge API: responses are canned but protocol-correct (message, logprobs with
top_logprobs, usage), and decided by a visible rule so tests can check that alpaca_eval's own client,
order randomisation and parsers carry the decision through:
- AlpacaEval classifier prompts (model identifiers "m"/"M"): the longer output wins, with
  log-probabilities WINNER_LOGPROB / LOSER_LOGPROB;
- pairwise review prompts: "<score 1> <score 2>" where a score grows with the answer's length, or a
  malformed reply when the question contains MALFORMED;
- replay mode: for an AlpacaEval prompt whose instruction is in `replay`, the recorded completion of
  the official judge (its message, logprobs and token count), so official annotations and their
  price can be re-derived end to end.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

WINNER_LOGPROB = -0.1
LOSER_LOGPROB = -2.4
ALPACA_INSTRUCTION = re.compile(r'"instruction": """(.*?)""",\n\}\n\n## Model Outputs', re.DOTALL)
ALPACA_OUTPUT = re.compile(r'"model_identifier": "(m|M)",\s*"output": """(.*?)"""', re.DOTALL)
PAIRWISE_ANSWER = re.compile(r"\[The Start of Assistant (\d)'s Answer\]\n(.*?)\n\n\[The End of Assistant \1's Answer\]", re.DOTALL)


def score_for(answer: str) -> int:
    return min(10, 1 + len(answer) // 20)


def send_json(handler: BaseHTTPRequestHandler, status: int, payload: dict[str, Any]) -> None:
    """Reply to the handler's request with `payload` as JSON (what every test judge server answers)."""
    body = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


class _Handler(BaseHTTPRequestHandler):
    server: OpenAIServer

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        send_json(self, status, payload)

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        with self.server.lock:
            self.server.requests.append({"path": self.path, "authorization": self.headers.get("Authorization"), "body": body})
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"unknown path {self.path}", "type": "invalid_request_error"}})
            return
        prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
        logprobs = None
        usage_total = 0
        outputs = dict(ALPACA_OUTPUT.findall(prompt))
        answers = dict(PAIRWISE_ANSWER.findall(prompt))
        instruction = ALPACA_INSTRUCTION.search(prompt)
        if instruction and instruction.group(1) in self.server.replay:
            recorded = self.server.replay[instruction.group(1)]
            content, logprobs = recorded["message"]["content"], recorded["logprobs"]
            usage_total = int(recorded["total_tokens"])  # the official run's token count, for its price
        elif set(outputs) == {"m", "M"}:
            winner = "m" if len(outputs["m"]) > len(outputs["M"]) else "M"
            loser = "M" if winner == "m" else "m"
            content = winner
            if body.get("logprobs"):
                top = [_token(winner, WINNER_LOGPROB), _token(loser, LOSER_LOGPROB), _token("The", -9.0)]
                logprobs = {"content": [_token(winner, WINNER_LOGPROB) | {"top_logprobs": top[: body.get("top_logprobs", 5)]}]}
        elif set(answers) == {"1", "2"}:
            if "MALFORMED" in prompt:
                content = "Both answers have merits.\nI cannot give numbers."
            else:
                content = f"{score_for(answers['1'])} {score_for(answers['2'])}\nThe longer answer is more detailed."
        else:
            self._send(400, {"error": {"message": "unrecognised judge prompt", "type": "invalid_request_error"}})
            return
        completion_tokens = len(content.split())
        prompt_tokens = usage_total - completion_tokens if usage_total else len(prompt.split())
        self._send(
            200,
            {
                "id": f"chatcmpl-{len(self.server.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "unknown"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "logprobs": logprobs,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )


class OpenAIServer(ThreadingHTTPServer):
    """Start with `with OpenAIServer() as server:`; `server.base_url` ends in /v1."""

    daemon_threads = True

    def __init__(self, replay: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.replay = replay or {}
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> OpenAIServer:
        self.thread.start()
        return self

    def __exit__(self, *args: Any) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)
