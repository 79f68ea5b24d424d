"""The judge behind the OpenAI chat-completions protocol (`openai:<model>`): api.openai.com, or a vLLM
server through `base_url`.

AlpacaEval annotations go through alpaca_eval's own annotator (the official config,
`weighted_alpaca_eval_gpt4_turbo` by default, with only the model name, the price and the endpoint
changed), so the prompt, the order randomisation and the log-probability parser are the official ones.
Pairwise reviews go through the harness's one chat client (harness.judge.endpoint). The key is read from
OPENAI_API_KEY at call time (harness.judge.endpoint.api_key), never stored or logged.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.compat import alpaca_eval_price_per_token, import_alpaca_eval, quiet_client_config_warning
from harness.errors import HarnessError, unknown_name
from harness.judge.base import DEFAULT_ANNOTATOR, JudgeOptions, Review, alpaca_eval_configs_dir, parse_score_pair
from harness.judge.endpoint import JudgeSettings, api_key, chat
from harness.judge.prompts import load_pairwise_prompt

DEFAULT_BASE_URL = "https://api.openai.com/v1"
API_KEY_ENV = "OPENAI_API_KEY"


@dataclass
class OpenAIJudge:
    """A judge behind the OpenAI chat-completions protocol: AlpacaEval through alpaca_eval's own annotator,
    pairwise reviews through harness.judge.endpoint."""

    model: str  # "" = the annotator config's own model (gpt-4-1106-preview for AlpacaEval 2)
    options: JudgeOptions = field(default_factory=JudgeOptions)

    def __post_init__(self) -> None:
        self.base_url = self.options.base_url or os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_BASE")
        self.config = self._official_config()
        self.model = self.model or self.config["completions_kwargs"]["model_name"]
        self.name = f"openai:{self.model}"
        self._api_key()  # fail early, before any generation, when a remote judge has no key

    def _official_config(self) -> dict[str, Any]:
        directory = alpaca_eval_configs_dir()
        path = directory / self.options.annotator_config / "configs.yaml"
        if not path.is_file():
            choices = [p.parent.name for p in directory.glob("*/configs.yaml")]
            raise unknown_name("alpaca_eval annotator config", self.options.annotator_config, choices)
        configs = yaml.safe_load(path.read_text(encoding="utf-8"))
        ((_, config),) = configs.items()
        if config.get("fn_completions") != "openai_completions":
            raise HarnessError(
                f"annotator config '{self.options.annotator_config}' does not use the OpenAI protocol "
                f"(fn_completions={config.get('fn_completions')}); pick one that does, e.g. {DEFAULT_ANNOTATOR}"
            )
        return config

    def _api_key(self) -> str:
        return api_key(API_KEY_ENV, self.base_url, f"judge '{self.name}'")

    def describe(self) -> dict[str, Any]:
        return {
            "judge": self.name,
            "kind": "openai",
            "model": self.model,
            "base_url": self.base_url or DEFAULT_BASE_URL,
            "annotator_config": self.options.annotator_config,
            "price_per_token": self.options.price_per_token,
        }

    def _client_kwargs(self, work_dir: Path) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "openai_api_keys": [self._api_key()],
            # a path that does not exist: alpaca_eval then builds the client from the arguments above,
            # whatever OPENAI_CLIENT_CONFIG_PATH says
            "client_config_path": str(work_dir / "no-client-config.yaml"),
        }
        if self.base_url:
            kwargs["openai_api_base"] = self.base_url
        return kwargs

    def _scrub(self, error: Exception) -> str:
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        key = os.environ.get(API_KEY_ENV)
        return text.replace(key, "***") if key else text

    def _fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:12]

    def write_annotator_config(self, directory: Path) -> Path:
        """The official config with only model, price and chat protocol changed, plus its prompt, in `directory`."""
        config = copy.deepcopy(self.config)
        name = self.options.annotator_config
        source_prompt = alpaca_eval_configs_dir() / config["prompt_template"]
        target = directory / name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source_prompt, target / source_prompt.name)
        config["prompt_template"] = f"{name}/{source_prompt.name}"
        completions = config.setdefault("completions_kwargs", {})
        completions["model_name"] = self.model
        completions["requires_chatml"] = True  # the chat-completions protocol, whatever the model is called
        if self.options.price_per_token is not None:
            completions["price_per_token"] = self.options.price_per_token
        (target / "configs.yaml").write_text(yaml.safe_dump({name: config}, sort_keys=False), encoding="utf-8")
        return target / "configs.yaml"

    def annotate_alpaca(self, rows: list[dict[str, Any]], work_dir: Path) -> list[dict[str, Any]]:
        import openai

        import_alpaca_eval()
        from alpaca_eval.annotators import PairwiseAnnotator

        config_path = self.write_annotator_config(work_dir / "annotator")
        annotator = PairwiseAnnotator(
            annotators_config=str(config_path),
            # resume after an interruption; one cache per judge (alpaca_eval keys it by config name only)
            caching_path=str(work_dir / f"annotator_cache_{self._fingerprint()}.json"),
            seed=0,
        )
        baseline = [{"instruction": r["instruction"], "output": r["output_1"], "generator": r["generator_1"]} for r in rows]
        candidate = [{"instruction": r["instruction"], "output": r["output_2"], "generator": r["generator_2"]} for r in rows]
        try:
            with quiet_client_config_warning():
                annotated = annotator.annotate_head2head(
                    outputs_1=baseline, outputs_2=candidate, is_ordered=True, **self._client_kwargs(work_dir)
                )
        except openai.OpenAIError as error:
            raise HarnessError(f"judge '{self.name}' at {self.describe()['base_url']}: {self._scrub(error)}") from None
        if len(annotated) != len(rows):
            raise HarnessError(f"judge '{self.name}': {len(annotated)} annotations for {len(rows)} examples")
        out = []
        for row, note in zip(rows, annotated, strict=True):
            preference = note.get("preference")
            out.append(
                row
                | {
                    "preference": float(preference) if preference is not None else math.nan,
                    "annotator": note.get("annotator"),
                    "price_per_example": _float_or_none(note.get("preference_price_per_example")),
                    "time_per_example": _float_or_none(note.get("preference_time_per_example")),
                    "raw_completion": note.get("preference_raw_completion"),
                    "judge_version": note.get("preference_version"),
                    "judge_date": note.get("preference_date"),
                }
            )
        return out

    def endpoint_settings(self) -> JudgeSettings:
        """The pairwise reviews' endpoint: the judge's model and base URL, the reply budget, and the price per
        token for both prompt and completion tokens (see `price_per_token`)."""
        price = (self.price_per_token() or 0.0) * 1000
        return JudgeSettings(
            base_url=self.describe()["base_url"],
            model=self.model,
            api_key_env=API_KEY_ENV,
            max_tokens=self.options.pairwise_max_tokens,
            timeout_seconds=120.0,  # replies of up to 1,024 tokens
            price_per_1k_prompt_tokens=price,
            price_per_1k_completion_tokens=price,
        )

    def price_per_token(self) -> float | None:
        """JudgeOptions.price_per_token when set, else alpaca_eval's list price for the model (None: unknown),
        as alpaca_eval's own client priced these reviews."""
        if self.options.price_per_token is not None:
            return self.options.price_per_token
        return alpaca_eval_price_per_token(self.model)

    def review_pairs(self, items: list[tuple[str, str, str]]) -> list[Review]:
        """Each (question, answer_1, answer_2) reviewed once at temperature 0 through the one chat client; a
        reply without two scores is kept (scores None), a request that fails after its retries is an error.
        price = the review's tokens x `price_per_token()` (None when that is unknown)."""
        prompt = load_pairwise_prompt(self.options.pairwise_prompt)
        # stripped, as alpaca_eval's ChatML conversion sent them before the client was shared
        conversations = [
            [{"role": "system", "content": prompt.system.strip()}, {"role": "user", "content": prompt.render(*item).strip()}]
            for item in items
        ]
        settings = self.endpoint_settings()
        replies = chat(settings, conversations, request={"top_p": 1.0}, who=f"judge '{self.name}'")
        failed = [reply.problem for reply in replies if reply.text is None]
        if failed:
            raise HarnessError(
                f"judge '{self.name}' at {settings.base_url}: {len(failed)} of {len(items)} reviews failed after "
                f"{settings.max_retries + 1} attempts ({', '.join(sorted(set(failed)))}); rerun to judge them again"
            )
        priced = self.price_per_token() is not None
        return [
            Review(parse_score_pair(reply.text or ""), reply.text or "", reply.cost(settings) if priced else None)
            for reply in replies
        ]


def _float_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
