"""The one store for judge verdicts: Phased IFT's difficulty scores (harness.difficulty) and the suite
sections' AlpacaEval and pairwise verdicts (harness.judges.CachedJudge).

An append-only JSONL journal, one line per finished verdict, flushed and fsynced as it is written: a
killed job keeps everything judged before the kill, and a rerun asks the judge nothing it has
answered. A line cut short by a kill, or written in another format, is ignored and that item is
judged again. The journal holds verdicts and raw replies only, never a key.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any

VERDICT_FORMAT = 2  # 1: the judge caches before they were merged (a JSON file / a per-id JSONL)


def json_safe(value: Any) -> Any:
    """NaN (a failed verdict) as null: the journal stays strict JSON; readers coerce null back to NaN."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class VerdictJournal:
    """Verdicts by key (`entries`), loaded from `path` and extended with `add` (thread-safe)."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.cut_line = False  # the file ends inside a line (a kill mid-write): start the next on a new one
        self.entries: dict[str, Any] = self._load()

    def _load(self) -> dict[str, Any]:
        entries: dict[str, Any] = {}
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return entries  # absent (or unreadable): everything is judged
        self.cut_line = bool(text) and not text.endswith("\n")
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and entry.get("format") == VERDICT_FORMAT and isinstance(entry.get("key"), str):
                entries[entry["key"]] = entry.get("value")
        return entries

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def add(self, items: dict[str, Any]) -> None:
        """Append verdicts (key -> JSON value) with one fsync."""
        if not items:
            return
        lines = "".join(
            json.dumps({"format": VERDICT_FORMAT, "key": key, "value": value}, ensure_ascii=False) + "\n"
            for key, value in items.items()
        )
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write("\n" * self.cut_line + lines)
                self.cut_line = False
                handle.flush()
                os.fsync(handle.fileno())
            self.entries.update(items)
