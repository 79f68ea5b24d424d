"""IFEval scoring for local_ifeval.yaml: lm-eval's own checkers, with NLTK pointed at the punkt tables
shipped in benchmarks/data/nltk_data first (lm-eval's checker module otherwise downloads them on import)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

NLTK_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "nltk_data"


def use_shipped_nltk_data() -> None:
    """Put the shipped NLTK data first on NLTK's search path (also for an nltk imported earlier)."""
    existing = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p and p != str(NLTK_DATA_DIR)]
    os.environ["NLTK_DATA"] = os.pathsep.join([str(NLTK_DATA_DIR), *existing])
    import nltk

    if str(NLTK_DATA_DIR) not in nltk.data.path:
        nltk.data.path.insert(0, str(NLTK_DATA_DIR))


use_shipped_nltk_data()

from lm_eval.tasks.ifeval import utils as _ifeval  # noqa: E402  (needs the NLTK path set above)


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    return _ifeval.process_results(doc, results)


def agg_inst_level_acc(items: list[list[bool]]) -> float:
    return _ifeval.agg_inst_level_acc(items)
