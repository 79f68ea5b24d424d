"""The one client for judges behind an OpenAI-compatible chat endpoint (api.openai.com, a vLLM or
llama.cpp server): settings, the loopback check, the key lookup, and `chat`, which sends many chat
requests concurrently with retries and exponential backoff, stops all work with a one-line error on
a 401, counts prompt and completion tokens, and optionally retries replies a `parse` callback rejects.

Used by Phased IFT's remote difficulty judge (harness.difficulty.score_with_judge) and by the pairwise
reviews of OpenAIJudge. AlpacaEval annotations do not come through here: they go through alpaca_eval's
own annotator (harness.judge.openai_judge).
"""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field

from harness.errors import HarnessError

LOOPBACK_HOSTS = {"localhost", "ip6-localhost"}
MALFORMED = "malformed reply"


class JudgeSettings(BaseModel):
    """An OpenAI-compatible chat endpoint. The key is read from the environment variable named here."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4-0613"  # the paper's judge
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = Field(4, gt=0, le=64)
    max_retries: int = Field(4, ge=0)
    backoff_seconds: float = Field(1.0, ge=0)
    timeout_seconds: float = Field(60.0, gt=0)
    max_tokens: int = Field(64, gt=0)
    price_per_1k_prompt_tokens: float = Field(0.03, ge=0)  # gpt-4-0613 list price, USD
    price_per_1k_completion_tokens: float = Field(0.06, ge=0)


def is_loopback(url: str | None) -> bool:
    """Whether the URL's host is this machine: localhost, ip6-localhost or a loopback address (127.x, ::1)."""
    host = (urlparse(url).hostname or "") if url else ""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key(env_var: str, base_url: str | None, who: str = "judge") -> str:
    """The key from the environment variable `env_var` (never a file, never logged); "EMPTY" for a loopback
    server without one (local vLLM / llama.cpp servers accept any key); else a one-line error naming it."""
    key = os.environ.get(env_var, "")
    if key:
        return key
    if is_loopback(base_url):
        return "EMPTY"
    raise HarnessError(
        f"{who}: {env_var} is not set for {base_url or 'https://api.openai.com/v1'}; export it (it is read from the "
        f"environment only), or point base_url at a local OpenAI-compatible server"
    )


@dataclass
class Reply:
    """One request's outcome: the last reply's text, what `parse` made of it (None: no usable reply, see
    `problem`), the tokens every attempt used and the number of attempts."""

    text: str | None
    value: Any = None
    problem: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return not self.problem

    def cost(self, settings: JudgeSettings) -> float:
        return (
            self.prompt_tokens / 1000 * settings.price_per_1k_prompt_tokens
            + self.completion_tokens / 1000 * settings.price_per_1k_completion_tokens
        )


class _KeyRejected(Exception):
    """The endpoint answered 401: raised in the worker threads, reported once by `chat`."""


def _ask(
    client: Any,
    settings: JudgeSettings,
    messages: list[dict[str, str]],
    parse: Callable[[str], Any] | None,
    request: dict[str, Any],
    rejected: threading.Event,
) -> Reply:
    """One request with retries and exponential backoff; replies `parse` rejects (None) are retried too.
    Once the endpoint has rejected the key (`rejected`), no worker sends another request."""
    import openai

    reply = Reply(None)
    for attempt in range(settings.max_retries + 1):
        if attempt:
            time.sleep(settings.backoff_seconds * 2 ** (attempt - 1))
        if rejected.is_set():
            raise _KeyRejected
        reply.attempts = attempt + 1
        try:
            response = client.chat.completions.create(
                model=settings.model, messages=messages, temperature=0, max_tokens=settings.max_tokens, **request
            )
        except openai.AuthenticationError:
            rejected.set()
            raise _KeyRejected from None
        except (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError, openai.InternalServerError) as error:
            reply.problem = type(error).__name__
            continue
        except openai.APIStatusError as error:
            reply.problem = f"HTTP {error.status_code}"
            continue
        if response.usage is not None:
            reply.prompt_tokens += response.usage.prompt_tokens or 0
            reply.completion_tokens += response.usage.completion_tokens or 0
        reply.text = (response.choices[0].message.content or "") if response.choices else ""
        reply.value = parse(reply.text) if parse is not None else reply.text
        if reply.value is not None:
            reply.problem = ""
            return reply
        reply.problem = MALFORMED
    return reply


def chat(
    settings: JudgeSettings,
    conversations: Sequence[list[dict[str, str]]],
    *,
    parse: Callable[[str], Any] | None = None,
    on_reply: Callable[[int, Reply], None] | None = None,
    request: dict[str, Any] | None = None,
    who: str = "judge",
) -> list[Reply]:
    """Send every conversation (a list of chat messages) at temperature 0, `settings.concurrency` at a time.

    `parse(text)` turns a reply into its value; None marks it malformed and the request is asked again
    (up to settings.max_retries more times, as for failed requests). `on_reply(index, reply)` runs in the
    calling thread as each request finishes (for a journal or progress). A 401 cancels everything and
    raises a one-line HarnessError. `request` adds fields to every request (e.g. top_p)."""
    import openai

    key = api_key(settings.api_key_env, settings.base_url, who)
    client = openai.OpenAI(base_url=settings.base_url, api_key=key, max_retries=0, timeout=settings.timeout_seconds)
    replies: list[Reply | None] = [None] * len(conversations)
    rejected = threading.Event()
    with ThreadPoolExecutor(settings.concurrency) as pool:
        futures = {
            pool.submit(_ask, client, settings, list(messages), parse, dict(request or {}), rejected): index
            for index, messages in enumerate(conversations)
        }
        for future in as_completed(futures):
            try:
                reply = future.result()
            except _KeyRejected:  # every other request would fail the same way: stop them all
                for queued in futures:
                    queued.cancel()
                raise HarnessError(f"{who} at {settings.base_url} rejected the key in {settings.api_key_env} (401); check it") from None
            replies[futures[future]] = reply
            if on_reply is not None:
                on_reply(futures[future], reply)
    return replies  # type: ignore[return-value]


def spent(replies: Sequence[Reply]) -> dict[str, int]:
    """Prompt and completion tokens over all attempts of all replies."""
    return {
        "prompt_tokens": sum(reply.prompt_tokens for reply in replies),
        "completion_tokens": sum(reply.completion_tokens for reply in replies),
    }
