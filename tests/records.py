"""Complete run records for tests that write record.json by hand: readers go through the strict
RunRecord, so a synthetic record has every key the runner writes (values here are small and fixed)."""

from __future__ import annotations

import copy
from typing import Any

from harness.records import RECORD_SCHEMA_VERSION

_STAGE = {"steps": 2, "examples": 8, "rows": 8, "real_tokens": 400, "response_tokens": 200, "epoch_tokens": 400,
          "final_loss": None, "mean_loss": 2.5, "loss_curve": [], "wall_seconds": 1.0, "resumed_from_step": 0,
          "precision": "fp32", "steps_run": 2}

TEMPLATE: dict[str, Any] = {
    "schema_version": RECORD_SCHEMA_VERSION,
    "run_id": "one-off-tiny-0000000000",
    "spec_hash": "0" * 64,
    "started_at": "2025-01-01T00:00:00+00:00",
    "harness_version": "0.0.0",
    "git_commit": "abc123",
    "seed": 0,
    "spec": {"model": "tiny", "recipe": "one-off", "params": {}, "training": {"precision": "fp32"}},
    "model": {"name": "tiny", "source": "builtin:tiny", "description": "test model", "template": "chat",
              "context_length": 1024, "dtype": "float32", "learning_rate": 0.002, "params": "0.6M",
              "model_set_version": "1", "weights": "builtin:tiny"},
    "data": {"source": "shipped:alpaca-sample", "format": "alpaca", "raw_records": 200, "records": 200,
             "duplicates_dropped": 0, "empty_dropped": 0, "sha256": "d" * 64},
    "recipe": {"name": "one-off", "params": {}},
    "training": {"sft": _STAGE},
    "tokenization": {"sft": {"examples": 8, "truncated": 0, "dropped_prompt_too_long": 0}},
    "scoring": {"sequences": 0, "computed": 0, "cached": 0, "forward_tokens": 0, "shared_prefix_tokens": 0},
    "suite": {"name": "smoke", "chat_template": False, "online": False, "limit": None, "skipped": {}},
    "metrics": {},
    "cost": {"train_tokens": 20_000, "response_tokens": 9_000, "overhead_train_tokens": 0, "scoring_tokens": 0,
             "wall_seconds": 75.0, "device_hours": 0.0208, "judge_cost_usd": 0.0, "eval_judge_cost_usd": 0.0},
    "timings": {"train:sft": 1.0, "evaluate": 1.0},
    "resume": {"attempts": 1, "scoring": {"sequences_computed": 0, "sequences_cached": 0},
               "training": {"sft": {"reused": False, "steps_run": 2, "resumed_from_step": 0}},
               "evaluation": {"tasks_computed": 1, "tasks_reused": 0, "requests_computed": 10, "requests_cached": 0}},
    "memory": {"peak_rss_gib": 1.0},
    "versions": {"python": "3.11.0"},  # no library versions: the leaderboard groups these runs together
    "host": {"platform": "Linux", "cpu_count": 2},
}


def make_record(**sections: Any) -> dict[str, Any]:
    """A complete record; each keyword replaces a top-level key, except that dict values for `recipe`,
    `model`, `data`, `suite`, `cost` and `spec` update the template's section key by key."""
    record = copy.deepcopy(TEMPLATE)
    for key, value in sections.items():
        if key in ("recipe", "model", "data", "suite", "cost", "spec") and isinstance(value, dict):
            record[key] = {**record[key], **value}
        else:
            record[key] = value
    return record
