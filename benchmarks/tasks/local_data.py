"""Loaders that lm-eval calls (`custom_dataset: !function local_data.<name>`) for shipped task data,
plus the few document functions the task YAMLs need.

Paths in the task YAMLs are relative to benchmarks/data, so the tasks work offline from any directory.
The data files are built by scripts/make_benchmark_data.py in the field layout of the hub dataset that
lm-eval's own task reads, so the YAMLs keep lm-eval's prompts and metrics."""

from __future__ import annotations

import functools
import gzip
import json
import os
from pathlib import Path
from typing import Any

import datasets

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
NLTK_DATA_DIR = DATA_DIR / "nltk_data"


class MissingTaskData(FileNotFoundError):
    """A shipped data file is absent; the harness turns this into a one-line error naming the file."""


@functools.lru_cache(maxsize=16)
def _read_rows(path: Path) -> tuple[dict[str, Any], ...]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return tuple(json.loads(line) for line in handle if line.strip())


def read_jsonl(relative_path: str) -> list[dict[str, Any]]:
    """Rows of a (gzipped) JSONL file under benchmarks/data; cached, since MMLU's 57 tasks share two files."""
    path = DATA_DIR / relative_path
    if not path.is_file():
        raise MissingTaskData(f"benchmark data file missing: {path} (rebuild it with scripts/make_benchmark_data.py)")
    return [dict(row) for row in _read_rows(path)]


def load_jsonl(file: str, split: str = "test", **_: Any) -> datasets.DatasetDict:
    """One JSONL file as one split (`test`, or `validation` where lm-eval evaluates on validation)."""
    return datasets.DatasetDict({split: datasets.Dataset.from_list(read_jsonl(file))})


def load_multiple_choice(file: str, **_: Any) -> datasets.DatasetDict:
    """llm-foundry multiple-choice format: {query, choices, gold (0-based)} -> a `test` split."""
    return load_jsonl(file, "test")


def load_mmlu(
    subject: str, test_file: str = "mmlu/mmlu_test.jsonl.gz", dev_file: str = "mmlu/mmlu_dev.jsonl.gz", **_: Any
) -> datasets.DatasetDict:
    """One MMLU subject: `test` to evaluate, `dev` (5 per subject) for few-shot examples, as in cais/mmlu."""
    splits = {}
    for split, file in (("test", test_file), ("dev", dev_file)):
        rows = [row for row in read_jsonl(file) if row["subject"] == subject]
        if not rows:
            raise MissingTaskData(f"no MMLU {split} rows for subject '{subject}' in {DATA_DIR / file}")
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)


def winogrande_gold(doc: dict[str, Any]) -> int:
    """Partial scoring (lm-eval's winogrande): the "text" is the index of the correct context."""
    return int(doc["gold"])


def use_shipped_nltk_data() -> None:
    """Put the shipped NLTK punkt tables first on NLTK's search path (also for an nltk imported earlier),
    so IFEval's checkers inside lm-eval find them instead of downloading them on import."""
    existing = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p and p != str(NLTK_DATA_DIR)]
    os.environ["NLTK_DATA"] = os.pathsep.join([str(NLTK_DATA_DIR), *existing])
    import nltk

    if str(NLTK_DATA_DIR) not in nltk.data.path:
        nltk.data.path.insert(0, str(NLTK_DATA_DIR))
