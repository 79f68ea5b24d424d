"""Judges for AlpacaEval and pairwise evaluation, selected by name.

- `openai:<model>`: any server speaking the OpenAI chat-completions protocol (api.openai.com, or a
  vLLM server through `base_url`). AlpacaEval annotations go through alpaca_eval's own annotator
  (the official config, `weighted_alpaca_eval_gpt4_turbo` by default, with only the model name, the
  price and the endpoint changed), so its prompt, order randomisation and log-probability parser are
  the official ones. The key is read from OPENAI_API_KEY at call time, never stored or logged.
- `local:<model>`: an in-process Hugging Face model (a model-set name, a directory or a .gguf). It
  reads its preference from the next-token probabilities of the two labels of the official prompt,
  in BOTH orders (small judges mostly prefer one position whatever the content), and reports that
  bias. Pairwise 1-10 scores are read by greedy decoding restricted to the grammar "<1-10> <1-10>".
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import ipaddress
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import yaml

from harness.compat import import_alpaca_eval, quiet_client_config_warning
from harness.errors import HarnessError, closest, unknown_name
from harness.verdicts import VerdictJournal, json_safe

JUDGE_KINDS = ("openai", "local")
DEFAULT_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
# The official AlpacaEval 2 prompt; the local judge uses it for every AlpacaEval version.
LOCAL_ALPACA_PROMPT = "alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt"
LOCAL_ALPACA_LABELS = ("m", "M")  # first output, second output (as in the official config)

# Pairwise review prompts, versioned data files benchmarks/pairwise/judge_prompt_<name>.json (system message,
# template, criteria and the source they were copied from): `cherry` is the Vicuna evaluation's prompt
# (lm-sys/FastChat) as Cherry LLM sends it (tianyi-lab/Cherry_LLM evaluation/generation/eval.py): two 1-10
# scores on the first line, then an explanation; `phasedsft` is PhasedSFT's active prompt (xubuvd/PhasedSFT
# evaluation/eval.py): the same with "Do not explain for your scores." JudgeOptions.pairwise_prompt picks one.
PAIRWISE_PROMPT_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "pairwise"
PAIRWISE_PROMPTS = ("cherry", "phasedsft")
DEFAULT_PAIRWISE_PROMPT = "cherry"
LOOPBACK_HOSTS = {"localhost", "ip6-localhost"}


def alpaca_eval_configs_dir() -> Path:
    import_alpaca_eval()
    from alpaca_eval import constants

    return Path(constants.EVALUATORS_CONFIG_DIR)


# ----------------------------------------------------------------------------- interface


@dataclass
class Review:
    """One pairwise review: the two 1-10 scores (None when the reply could not be parsed)."""

    scores: tuple[float, float] | None
    raw: str
    price: float | None = None


class Judge(Protocol):
    name: str

    def describe(self) -> dict[str, Any]: ...

    def annotate_alpaca(self, rows: list[dict[str, Any]], work_dir: Path) -> list[dict[str, Any]]:
        """rows have instruction, output_1 (baseline), output_2 (model), generator_1, generator_2; the result
        adds `preference` (1 = baseline wins, 2 = model wins, fractional for soft judges, NaN = failed)."""
        ...

    def review_pairs(self, items: list[tuple[str, str, str]]) -> list[Review]:
        """(question, answer_1, answer_2) -> scores for Assistant 1 and Assistant 2 as shown."""
        ...


@dataclass(frozen=True)
class JudgeOptions:
    base_url: str | None = None  # openai: an OpenAI-compatible endpoint (default api.openai.com or OPENAI_BASE_URL)
    annotator_config: str = DEFAULT_ANNOTATOR  # openai: the official alpaca_eval annotator config to run
    price_per_token: float | None = None  # openai: USD per token when alpaca_eval does not know the model
    pairwise_max_tokens: int = 1024  # openai: reply budget for a pairwise review (Cherry LLM used 1024)
    pairwise_prompt: str = DEFAULT_PAIRWISE_PROMPT  # the review prompt, one of PAIRWISE_PROMPTS (a data file)
    model_path: str | None = None  # local: weights (.gguf or directory) for a model-set name
    max_answer_tokens: int = 1024  # local: each answer is cut to this many judge tokens (counted)
    batch_size: int = 4  # local


def judge_options(raw: dict[str, Any], where: str = "judge_options") -> JudgeOptions:
    """JudgeOptions from a config mapping; an unknown key or a wrong type is a one-line error naming it."""
    from pydantic import TypeAdapter, ValidationError

    names = [f.name for f in dataclasses.fields(JudgeOptions)]
    for key in raw:
        if key not in names:
            suggestion = closest(key, names)
            hint = f"did you mean '{suggestion}'?" if suggestion else f"valid: {', '.join(names)}"
            raise HarnessError(f"{where}: unknown key '{key}'; {hint}")
    try:
        return TypeAdapter(JudgeOptions).validate_python(dict(raw))
    except ValidationError as error:
        detail = error.errors()[0]
        key = ".".join(str(part) for part in detail["loc"])
        raise HarnessError(f"{where}.{key} = {detail.get('input')!r}: {detail['msg'].lower()}") from None


def check_judge(name: str, options: JudgeOptions | None = None) -> None:
    """Everything make_judge would reject, without loading a local judge's weights: run before training."""
    options = options or JudgeOptions()
    kind, _, target = name.partition(":")
    if kind not in JUDGE_KINDS:
        raise unknown_name("judge kind", kind, JUDGE_KINDS)
    load_pairwise_prompt(options.pairwise_prompt)  # a bad prompt name fails before any generation
    if kind == "openai":
        OpenAIJudge(target, options)  # checks the annotator config and that a remote judge has its key
        return
    if not target:
        raise HarnessError(f"judge '{name}': name the local model, e.g. local:smollm2-135m-instruct")
    from harness.models import resolve_model

    resolve_model(target, options.model_path)


def make_judge(name: str, options: JudgeOptions | None = None, *, model: Any = None, tokenizer: Any = None) -> Judge:
    """`openai:<model>` or `local:<model>`; a local judge may be given an already loaded (model, tokenizer)."""
    options = options or JudgeOptions()
    kind, _, target = name.partition(":")
    if kind not in JUDGE_KINDS:
        raise unknown_name("judge kind", kind, JUDGE_KINDS)
    load_pairwise_prompt(options.pairwise_prompt)  # a bad prompt name fails before any generation
    if kind == "openai":
        return OpenAIJudge(target, options)
    if not target:
        raise HarnessError(f"judge '{name}': name the local model, e.g. local:smollm2-135m-instruct")
    if model is None:
        from harness.accelerator import process_inference_dtype
        from harness.models import load_model_and_tokenizer, resolve_model

        model, tokenizer = load_model_and_tokenizer(resolve_model(target, options.model_path), dtype=process_inference_dtype())
    return LocalJudge(f"local:{target}", model, tokenizer, options)


def parse_score_pair(reply: str) -> tuple[float, float] | None:
    """The two scores on the reply's first line ("8 6" or "8, 6"); None unless both are in 1..10."""
    first = reply.strip().split("\n")[0].replace(",", " ").split()
    if len(first) != 2:
        return None
    try:
        scores = (float(first[0]), float(first[1]))
    except ValueError:
        return None
    if not all(1 <= s <= 10 and math.isfinite(s) for s in scores):
        return None
    return scores


@dataclass(frozen=True)
class PairwisePrompt:
    """A pairwise review prompt as shipped: the system message, the user message's template and criteria."""

    name: str
    version: int
    source: str
    system: str
    template: str
    criteria: str

    def render(self, question: str, answer_1: str, answer_2: str) -> str:
        return self.template.format(question=question, answer_1=answer_1, answer_2=answer_2, criteria=self.criteria)

    def digest(self) -> str:
        """What decides the judge's reply: part of the verdict cache key."""
        text = json.dumps([self.system, self.template, self.criteria])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_pairwise_prompt(name: str) -> PairwisePrompt:
    """The shipped prompt file benchmarks/pairwise/judge_prompt_<name>.json."""
    if name not in PAIRWISE_PROMPTS:
        raise unknown_name("pairwise judge prompt", name, PAIRWISE_PROMPTS)
    path = PAIRWISE_PROMPT_DIR / f"judge_prompt_{name}.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return PairwisePrompt(
            name, int(raw["version"]), raw["source"], raw["system"], raw["template"], raw["criteria"]
        )
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise HarnessError(f"pairwise judge prompt file {path}: unreadable ({type(error).__name__}: {error})") from None


def pairwise_prompt(question: str, answer_1: str, answer_2: str, prompt: str = DEFAULT_PAIRWISE_PROMPT) -> str:
    return load_pairwise_prompt(prompt).render(question, answer_1, answer_2)


# ----------------------------------------------------------------------------- OpenAI-compatible judge


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class OpenAIJudge:
    """A judge behind the OpenAI chat-completions protocol, driven through alpaca_eval's own code."""

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
        key = os.environ.get("OPENAI_API_KEY")
        if key:
            return key
        if self.base_url and _is_loopback(self.base_url):
            return "EMPTY"  # a local vLLM server without --api-key accepts any key
        where = self.base_url or "api.openai.com"
        raise HarnessError(
            f"judge '{self.name}': OPENAI_API_KEY is not set for {where}; export it (it is read from the environment only)"
        )

    def describe(self) -> dict[str, Any]:
        return {
            "judge": self.name,
            "kind": "openai",
            "model": self.model,
            "base_url": self.base_url or "https://api.openai.com/v1",
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
        key = os.environ.get("OPENAI_API_KEY")
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

    def review_pairs(self, items: list[tuple[str, str, str]]) -> list[Review]:
        import openai

        import_alpaca_eval()
        from alpaca_eval.decoders.openai import openai_completions

        prompt = load_pairwise_prompt(self.options.pairwise_prompt)
        prompts = [
            f"<|im_start|>system\n{prompt.system}\n<|im_end|>\n<|im_start|>user\n{prompt.render(*item)}\n<|im_end|>"
            for item in items
        ]
        with tempfile.TemporaryDirectory() as scratch, quiet_client_config_warning():
            try:
                result = openai_completions(
                    prompts,
                    model_name=self.model,
                    max_tokens=self.options.pairwise_max_tokens,
                    temperature=0.0,
                    top_p=1.0,
                    requires_chatml=True,
                    price_per_token=self.options.price_per_token,
                    **self._client_kwargs(Path(scratch)),
                )
            except openai.OpenAIError as error:
                raise HarnessError(f"judge '{self.name}' at {self.describe()['base_url']}: {self._scrub(error)}") from None
        return [
            Review(parse_score_pair(text), text, _float_or_none(price))
            for text, price in zip(result["completions"], result["price_per_example"], strict=True)
        ]


def _float_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# ----------------------------------------------------------------------------- local Hugging Face judge


class LocalJudge:
    """An in-process judge: label probabilities for AlpacaEval, constrained score decoding for pairwise."""

    def __init__(self, name: str, model: Any, tokenizer: Any, options: JudgeOptions | None = None) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.options = options or JudgeOptions()
        self.label_ids = [self._single_token(label) for label in LOCAL_ALPACA_LABELS]
        if self.label_ids[0] == self.label_ids[1]:
            raise HarnessError(f"judge '{name}': labels {LOCAL_ALPACA_LABELS} share their first token")
        self.answers_truncated = 0

    def describe(self) -> dict[str, Any]:
        return {
            "judge": self.name,
            "kind": "local",
            "alpaca_prompt": f"alpaca_eval {LOCAL_ALPACA_PROMPT}",
            "labels": list(LOCAL_ALPACA_LABELS),
            "orders": "both (baseline first, then model first); preference = mean P(model better)",
            "pairwise": "scores read by greedy decoding restricted to the grammar '<1-10> <1-10>'",
            "max_answer_tokens": self.options.max_answer_tokens,
            "answers_truncated": self.answers_truncated,
        }

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            raise HarnessError(f"judge '{self.name}': label {text!r} encodes to no token")
        return ids[0]

    def _cut(self, answer: str) -> str:
        ids = self.tokenizer(answer, add_special_tokens=False).input_ids
        if len(ids) <= self.options.max_answer_tokens:
            return answer
        self.answers_truncated += 1
        return self.tokenizer.decode(ids[: self.options.max_answer_tokens])

    def _render(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages) + "\n\n"

    def alpaca_prompts(self, rows: list[dict[str, Any]]) -> list[str]:
        """The official AlpacaEval 2 judge prompt for each (instruction, output_1, output_2), as chat text."""
        import_alpaca_eval()
        import pandas as pd
        from alpaca_eval import utils

        template = (alpaca_eval_configs_dir() / LOCAL_ALPACA_PROMPT).read_text(encoding="utf-8")
        frame = pd.DataFrame(
            [{"instruction": r["instruction"], "output_1": self._cut(r["output_1"]), "output_2": self._cut(r["output_2"])} for r in rows]
        )
        prompts, _ = utils.make_prompts(frame, template)
        return [self._render(utils.prompt_to_chatml(p)) for p in prompts]

    def label_probabilities(self, prompts: list[str], progress: Any = None) -> list[float]:
        """P(first label) / (P(first) + P(second)) for the token after each prompt."""
        import torch

        from harness.generation import left_padded_batch

        encoded = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        device = next(self.model.parameters()).device
        result = [math.nan] * len(encoded)
        self.model.eval()
        for start in range(0, len(order), self.options.batch_size):
            batch = order[start : start + self.options.batch_size]
            input_ids, attention = left_padded_batch([encoded[i] for i in batch], pad_id)
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = self.model(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    position_ids=positions.to(device),
                    logits_to_keep=1,
                    use_cache=False,
                ).logits[:, -1, :]
            pair = torch.softmax(logits.float()[:, self.label_ids], dim=-1)[:, 0]
            for row, index in enumerate(batch):
                result[index] = float(pair[row])
            if progress is not None:
                progress(min(start + self.options.batch_size, len(order)), len(order))
        return result

    def annotate_alpaca(self, rows: list[dict[str, Any]], work_dir: Path | None = None, progress: Any = None) -> list[dict[str, Any]]:
        """Judge each pair in both orders; preference = 1 + mean P(model better); identical outputs tie (1.5)."""
        swapped = [r | {"output_1": r["output_2"], "output_2": r["output_1"]} for r in rows]
        prompts = self.alpaca_prompts(rows) + self.alpaca_prompts(swapped)
        first = self.label_probabilities(prompts, progress)
        out = []
        n = len(rows)
        for i, row in enumerate(rows):
            p_first_baseline_first = first[i]  # order 1: baseline shown first
            p_first_model_first = first[n + i]  # order 2: model shown first
            p_model = 0.5 * ((1 - p_first_baseline_first) + p_first_model_first)
            same = row["output_1"] == row["output_2"]
            out.append(
                row
                | {
                    "preference": 1.5 if same else 1.0 + p_model,
                    "annotator": self.name,
                    "p_model_baseline_first": 1 - p_first_baseline_first,
                    "p_model_model_first": p_first_model_first,
                }
            )
        return out

    def _exact_token(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise HarnessError(f"judge '{self.name}': {text!r} is not one token in its tokenizer; it cannot read scores")
        return ids[0]

    def score_grammar(self) -> Callable[[list[int]], list[int]]:
        """Next allowed tokens so that the reply's first line is '<1..10> <1..10>' then newline or EOS."""
        digits = {self._exact_token(str(d)): str(d) for d in range(10)}
        space, newline = self._exact_token(" "), self._exact_token("\n")
        ends = [newline] + ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])
        by_char = {char: token for token, char in digits.items()}
        nonzero = [by_char[str(d)] for d in range(1, 10)]
        text_of = digits | {space: " ", newline: "\n"}

        def allowed(new_ids: list[int]) -> list[int]:
            text = "".join(text_of.get(token, "") for token in new_ids)
            if "\n" in text:
                return ends[-1:]
            parts = text.split(" ")
            current, separator = parts[-1], ([space] if len(parts) == 1 else ends)
            if current == "":
                return nonzero
            if current == "1":
                return [by_char["0"], *separator]
            return separator

        return allowed

    def review_pairs(self, items: list[tuple[str, str, str]], progress: Any = None) -> list[Review]:
        """Read 'score_1 score_2' by greedy decoding restricted to the grammar of two scores in 1..10."""
        from harness.generation import generate_from_prompts

        prompt = load_pairwise_prompt(self.options.pairwise_prompt)
        prompts = [
            self._render(
                [
                    {"role": "system", "content": prompt.system},
                    {"role": "user", "content": prompt.render(q, self._cut(a1), self._cut(a2))},
                ]
            )
            for q, a1, a2 in items
        ]
        generations = generate_from_prompts(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=6,  # "10 10\n"
            batch_size=self.options.batch_size,
            max_prompt_tokens=8192,
            allowed_tokens=self.score_grammar(),
            progress=progress,
        )
        return [Review(parse_score_pair(g.text), g.text, None) for g in generations]


# ----------------------------------------------------------------------------- cached verdicts

def _prompt_identity(options: JudgeOptions) -> dict[str, Any]:
    """The pairwise prompt's part of a cache key; empty for the default prompt, so verdicts saved before
    prompts became selectable (all with that prompt) keep their keys."""
    if options.pairwise_prompt == DEFAULT_PAIRWISE_PROMPT:
        return {}
    return {"pairwise_prompt": f"{options.pairwise_prompt}:{load_pairwise_prompt(options.pairwise_prompt).digest()}"}


def judge_identity(judge: Any) -> dict[str, Any]:
    """What decides a judge's verdicts (not its counters or its price): the judge part of a cache key."""
    inner = judge.judge if isinstance(judge, CachedJudge) else judge
    if isinstance(inner, OpenAIJudge):
        return {
            "kind": "openai",
            "model": inner.model,
            "base_url": inner.describe()["base_url"],
            "annotator_config": inner.options.annotator_config,
            "pairwise_max_tokens": inner.options.pairwise_max_tokens,
        } | _prompt_identity(inner.options)
    if isinstance(inner, LocalJudge):
        return {
            "kind": "local",
            "judge": inner.name,
            "model_path": inner.options.model_path,
            "alpaca_prompt": LOCAL_ALPACA_PROMPT,
            "labels": list(LOCAL_ALPACA_LABELS),
            "max_answer_tokens": inner.options.max_answer_tokens,
        } | _prompt_identity(inner.options)
    return {"judge": inner.name}


class CachedJudge:
    """A judge whose verdicts are kept in a verdict journal (harness.verdicts), keyed by (judge identity,
    task, instruction, both answers as shown): a killed evaluation resumes where it stopped, and a rerun
    asks the judge nothing it has answered. Work goes to the judge in chunks; each finished chunk is
    appended to the journal."""

    def __init__(self, judge: Judge, path: Path, *, chunk_size: int = 64) -> None:
        if chunk_size < 1:
            raise HarnessError(f"judge cache chunk_size={chunk_size}: must be >= 1")
        self.judge = judge
        self.name = judge.name
        self.path = path
        self.chunk_size = chunk_size
        self.identity = judge_identity(judge)
        self.journal = VerdictJournal(path)
        self.entries = self.journal.entries
        self.reused = 0  # verdicts read from the cache in this process
        self.judged = 0  # verdicts asked of the judge in this process

    def _key(self, task: str, *texts: str) -> str:
        canonical = json.dumps([self.identity, task, *texts], ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def _missing(self, keys: list[str]) -> list[int]:
        """Positions to ask the judge about: not cached, first occurrence only (equal items are asked once)."""
        missing, seen = [], set()
        for position, key in enumerate(keys):
            if key not in self.entries and key not in seen:
                missing.append(position)
                seen.add(key)
        self.reused += sum(key in self.entries for key in keys)
        self.judged += len(missing)
        return missing

    def describe(self) -> dict[str, Any]:
        return self.judge.describe() | {"cache": {"file": self.path.name, "reused": self.reused, "judged": self.judged}}

    def annotate_alpaca(self, rows: list[dict[str, Any]], work_dir: Path) -> list[dict[str, Any]]:
        keys = [self._key("alpaca_eval", r["instruction"], r["output_1"], r["output_2"]) for r in rows]
        missing = self._missing(keys)
        for start in range(0, len(missing), self.chunk_size):
            chunk = missing[start : start + self.chunk_size]
            notes = self.judge.annotate_alpaca([rows[i] for i in chunk], work_dir)
            self.journal.add({
                keys[position]: {k: json_safe(v) for k, v in note.items() if k not in rows[position]}
                for position, note in zip(chunk, notes, strict=True)
            })
        out = []
        for row, key in zip(rows, keys, strict=True):
            added = dict(self.entries[key])
            if added.get("preference") is None:
                added["preference"] = math.nan
            out.append(row | added)
        return out

    def review_pairs(self, items: list[tuple[str, str, str]]) -> list[Review]:
        keys = [self._key("pairwise", *item) for item in items]
        missing = self._missing(keys)
        for start in range(0, len(missing), self.chunk_size):
            chunk = missing[start : start + self.chunk_size]
            reviews = self.judge.review_pairs([items[i] for i in chunk])
            self.journal.add({
                keys[position]: {
                    "scores": list(review.scores) if review.scores is not None else None,
                    "raw": review.raw,
                    "price": json_safe(review.price),
                }
                for position, review in zip(chunk, reviews, strict=True)
            })
        out = []
        for key in keys:
            entry = self.entries[key]
            scores = tuple(entry["scores"]) if entry["scores"] is not None else None
            out.append(Review(scores, entry["raw"], entry["price"]))  # type: ignore[arg-type]
        return out


def position_bias(annotations: list[dict[str, Any]]) -> dict[str, Any]:
    """How much a two-order local judge favours the first position, with standard errors.

    first_position_preference: mean P(first shown wins) over all 2N judgments (0.5 = unbiased).
    Standard errors are over examples.
    order_consistency: share of examples whose winner is the same in both orders."""
    import numpy as np

    rows = [a for a in annotations if "p_model_baseline_first" in a]
    if not rows:
        return {}
    # per example, the mean over its two orders: the two judgments of one example are not independent
    first = np.array([0.5 * ((1 - a["p_model_baseline_first"]) + a["p_model_model_first"]) for a in rows])
    consistent = np.array([(a["p_model_baseline_first"] > 0.5) == (a["p_model_model_first"] > 0.5) for a in rows], dtype=float)
    return {
        "first_position_preference": {"value": float(first.mean()), "stderr": _sem(first)},
        "order_consistency": {"value": float(consistent.mean()), "stderr": _sem(consistent)},
        "n": len(rows),
    }


def _sem(values: Any) -> float | None:
    import numpy as np

    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
