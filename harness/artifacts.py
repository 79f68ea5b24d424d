"""A content-addressed artifact cache for scores and selections.

An artifact is stored under the sha256 of everything that determines it (scorer model, data, template,
parameters, engine version), so `harness run --recipe all` computes each score once, and long jobs
store finished chunks under `<key>.partial/` so a killed job resumes from what it finished. Every file
is written atomically with the sha256 of its content; one that fails it is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from harness.io import atomic_write_json


def content_key(**parts: Any) -> str:
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def default_cache_root() -> Path:
    from harness.models import cache_dir

    return cache_dir() / "artifacts"


class ArtifactCache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else default_cache_root()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.json"

    def load(self, kind: str, key: str) -> Any | None:
        return _read_checked(self.path(kind, key))

    def save(self, kind: str, key: str, payload: Any) -> Path:
        path = self.path(kind, key)
        _write_checked(path, payload)
        shutil.rmtree(self.partial_dir(kind, key), ignore_errors=True)
        return path

    def partial_dir(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.partial"

    def load_chunk(self, kind: str, key: str, index: int) -> Any | None:
        return _read_checked(self.partial_dir(kind, key) / f"chunk_{index:06d}.json")

    def save_chunk(self, kind: str, key: str, index: int, payload: Any) -> None:
        directory = self.partial_dir(kind, key)
        directory.mkdir(parents=True, exist_ok=True)
        _write_checked(directory / f"chunk_{index:06d}.json", payload)

    def completed_chunks(self, kind: str, key: str) -> int:
        directory = self.partial_dir(kind, key)
        return len(list(directory.glob("chunk_*.json"))) if directory.is_dir() else 0


def payload_digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_checked(path: Path, payload: Any) -> None:
    """Atomically, with the sha256 of the payload's canonical JSON next to it in the same file."""
    payload = json.loads(json.dumps(payload))  # what a reader will get back (tuples -> lists, ...)
    atomic_write_json(path, {"sha256": payload_digest(payload), "payload": payload})


def _read_checked(path: Path) -> Any | None:
    """The payload, or None when the file is missing, unreadable or fails its hash: a damaged artifact
    is recomputed, never trusted. (Files written before the hash was added hold the bare payload.)"""
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(stored, dict) and set(stored) == {"sha256", "payload"}:
        return stored["payload"] if stored["sha256"] == payload_digest(stored["payload"]) else None
    return stored


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
