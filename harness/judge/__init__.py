"""The one judge stack: AlpacaEval and pairwise judges (`openai:<model>`, `local:<model>`) and Phased IFT's
difficulty judges (harness.difficulty) share its client, local forward pass, verdict store and prompts.

- base.py: the Judge interface, Review, JudgeOptions (`judge_options`), the pairwise score parser and
  `position_bias`.
- factory.py: `make_judge` / `check_judge` by name.
- endpoint.py: the one OpenAI-compatible chat client (JudgeSettings, `is_loopback`, `api_key`, `chat`:
  concurrency, retries with backoff, one-line 401, token and cost accounting, malformed-reply retries).
- openai_judge.py: OpenAIJudge. AlpacaEval annotations go through alpaca_eval's official
  PairwiseAnnotator (the official prompt, order randomisation and log-probability parser: AlpacaEval is
  that library's protocol); pairwise reviews go through endpoint.py.
- local.py: LocalJudge and `label_probabilities`, the one model-forward loop of the local judges (label
  distributions right after each prompt; batches dealt out across the processes of a job on request).
- store.py: VerdictJournal (the one verdict store, also the remote difficulty judge's cache),
  `json_safe`, CachedJudge and `judge_identity`.
- prompts.py and prompts/*.json: the versioned prompts (pairwise `cherry` / `phasedsft`, Phased IFT's
  difficulty prompt) and their one loader.
"""

from harness.judge.base import (
    DEFAULT_ANNOTATOR,
    JUDGE_KINDS,
    LOCAL_ALPACA_LABELS,
    LOCAL_ALPACA_PROMPT,
    Judge,
    JudgeOptions,
    Review,
    judge_options,
    parse_score_pair,
    position_bias,
)
from harness.judge.endpoint import JudgeSettings, Reply, api_key, chat, is_loopback
from harness.judge.factory import check_judge, make_judge
from harness.judge.local import LocalJudge, label_probabilities
from harness.judge.openai_judge import OpenAIJudge
from harness.judge.prompts import (
    DEFAULT_PAIRWISE_PROMPT,
    PAIRWISE_PROMPTS,
    DifficultyPrompt,
    PairwisePrompt,
    load_difficulty_prompt,
    load_pairwise_prompt,
    pairwise_prompt,
)
from harness.judge.store import VERDICT_FORMAT, CachedJudge, VerdictJournal, json_safe, judge_identity

__all__ = [
    "DEFAULT_ANNOTATOR",
    "DEFAULT_PAIRWISE_PROMPT",
    "JUDGE_KINDS",
    "LOCAL_ALPACA_LABELS",
    "LOCAL_ALPACA_PROMPT",
    "PAIRWISE_PROMPTS",
    "VERDICT_FORMAT",
    "CachedJudge",
    "DifficultyPrompt",
    "Judge",
    "JudgeOptions",
    "JudgeSettings",
    "LocalJudge",
    "OpenAIJudge",
    "PairwisePrompt",
    "Reply",
    "Review",
    "VerdictJournal",
    "api_key",
    "chat",
    "check_judge",
    "is_loopback",
    "judge_identity",
    "judge_options",
    "json_safe",
    "label_probabilities",
    "load_difficulty_prompt",
    "load_pairwise_prompt",
    "make_judge",
    "pairwise_prompt",
    "parse_score_pair",
    "position_bias",
]
