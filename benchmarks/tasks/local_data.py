"""Loaders that lm-eval calls (`custom_dataset: !function local_data.<name>`) for shipped task data.

Paths in the task YAMLs are relative to benchmarks/data, so the tasks work offline from any directory."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import datasets

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


class MissingTaskData(FileNotFoundError):
    pass


def read_jsonl(relative_path: str) -> list[dict[str, Any]]:
    path = DATA_DIR / relative_path
    if not path.is_file():
        raise MissingTaskData(f"benchmark data file missing: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_multiple_choice(file: str, **_: Any) -> datasets.DatasetDict:
    """llm-foundry multiple-choice format: {query, choices, gold (0-based)} -> a `test` split."""
    rows = read_jsonl(file)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
