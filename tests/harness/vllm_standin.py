"""A stand-in for `vllm serve` on machines without vLLM (it pins a CUDA torch): a real HTTP server that
takes vLLM's command line and answers its /health and OpenAI completions endpoint, decoding greedily
with transformers' generate on the served weights (one prompt at a time, no padding).

The harness starts it exactly as it starts vLLM (HARNESS_VLLM="python tests/harness/vllm_standin.py"),
so tests cover the whole path: arguments, readiness, token-id prompts, stop tokens and strings
(lm-eval's `until`), finish reasons, token counts, shutdown. What it cannot show is vLLM's own speed
and bf16 kernels; perf/gpu_acceptance.py measures those on a GPU.

Besides serving, every request is appended to <weights>/../standin_requests.jsonl so tests can see what
the harness sent.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repository's packages

from tests.harness.openai_server import send_json  # noqa: E402


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve")
    serve.add_argument("model")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--served-model-name", required=True)
    serve.add_argument("--dtype", default="auto")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--data-parallel-size", type=int, default=1)
    return parser.parse_args(argv)


class Engine:
    """Greedy decoding of one token-id prompt with transformers, as vLLM's completions endpoint reports it."""

    def __init__(self, model_dir: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.lock = threading.Lock()  # one generation at a time: the model is shared

    def complete(self, prompt: list[int], body: dict[str, Any]) -> dict[str, Any]:
        stop_ids = set(body.get("stop_token_ids") or []) | {self.tokenizer.eos_token_id}
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        stop_ids |= set(configured if isinstance(configured, list) else [configured])
        stop_ids.discard(None)
        stop_strings = body.get("stop") or []
        stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        with self.lock, self.torch.no_grad():
            output = self.model.generate(
                input_ids=self.torch.tensor([prompt]), attention_mask=self.torch.ones(1, len(prompt), dtype=self.torch.long),
                do_sample=False, num_beams=1, max_new_tokens=int(body.get("max_tokens") or 16),
                repetition_penalty=float(body.get("repetition_penalty", 1.0)), eos_token_id=sorted(stop_ids),
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id, temperature=None, top_p=None, top_k=None,
            )
        new = output[0, len(prompt):].tolist()
        finish = "length"
        shown = new
        stopped_at = next((index for index, token in enumerate(new) if token in stop_ids), None)
        if stopped_at is not None:
            new, shown, finish = new[: stopped_at + 1], new[:stopped_at], "stop"
        text = self.tokenizer.decode(shown, skip_special_tokens=bool(body.get("skip_special_tokens", True)))
        cuts = [text.index(stop) for stop in stop_strings if stop and stop in text]
        if cuts:
            text, finish = text[: min(cuts)], "stop"
        return {"text": text, "finish_reason": finish, "completion_tokens": len(new)}


def serve(arguments: argparse.Namespace) -> None:
    engine = Engine(arguments.model)
    log = Path(arguments.model).resolve().parent / "standin_requests.jsonl"
    name = arguments.served_model_name

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/health":
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/v1/models":
                send_json(self, 200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            else:
                send_json(self, 404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
            if self.path != "/v1/completions":
                send_json(self, 404, {"error": {"message": f"no route {self.path}"}})
                return
            if body.get("model") != name:
                send_json(self, 404, {"error": {"message": f"model {body.get('model')!r} does not exist"}})
                return
            prompts = body["prompt"]
            if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
                prompts = [prompts]
            if any(isinstance(prompt, str) for prompt in prompts):
                prompts = [engine.tokenizer(p, add_special_tokens=False).input_ids if isinstance(p, str) else p for p in prompts]
            with open(log, "a", encoding="utf-8") as requests:
                requests.write(json.dumps({key: value for key, value in body.items() if key != "prompt"} | {"prompts": prompts}) + "\n")
            choices, generated = [], 0
            for index, prompt in enumerate(prompts):
                done = engine.complete(prompt, body)
                generated += done["completion_tokens"]
                choices.append({"index": index, "text": done["text"], "finish_reason": done["finish_reason"], "logprobs": None})
            usage = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": generated}
            usage["total_tokens"] = usage["prompt_tokens"] + generated
            send_json(self, 200, {"id": "cmpl-standin", "object": "text_completion", "model": name, "choices": choices, "usage": usage})

    server = ThreadingHTTPServer((arguments.host, arguments.port), Handler)
    server.serve_forever()


if __name__ == "__main__":
    serve(parse_arguments(sys.argv[1:]))
