"""IFEval scoring for local_ifeval.yaml: lm-eval's own checkers, with NLTK pointed at the punkt tables
shipped in benchmarks/data/nltk_data first (lm-eval's checker module otherwise downloads them on import)."""

from __future__ import annotations

from typing import Any

from benchmarks.tasks.local_data import use_shipped_nltk_data

use_shipped_nltk_data()

from lm_eval.tasks.ifeval import utils as _ifeval  # noqa: E402  (needs the NLTK path set above)


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    return _ifeval.process_results(doc, results)


def agg_inst_level_acc(items: list[list[bool]]) -> float:
    return _ifeval.agg_inst_level_acc(items)
