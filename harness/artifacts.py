"""A content-addressed artifact cache for scores and selections.

An artifact is stored under the sha256 of everything that determines it (scorer model, data, template,
parameters, engine version), so `harness run --recipe all` computes each score once, and long jobs
store finished chunks under `<key>.partial/` so a killed job resumes from what it finished.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from harness.records import atomic_write_json


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
        path = self.path(kind, key)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a damaged artifact is recomputed, never trusted

    def save(self, kind: str, key: str, payload: Any) -> Path:
        path = self.path(kind, key)
        atomic_write_json(path, payload)
        shutil.rmtree(self.partial_dir(kind, key), ignore_errors=True)
        return path

    def partial_dir(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.partial"

    def load_chunk(self, kind: str, key: str, index: int) -> Any | None:
        path = self.partial_dir(kind, key) / f"chunk_{index:06d}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def save_chunk(self, kind: str, key: str, index: int, payload: Any) -> None:
        directory = self.partial_dir(kind, key)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(directory / f"chunk_{index:06d}.json", payload)

    def completed_chunks(self, kind: str, key: str) -> int:
        directory = self.partial_dir(kind, key)
        return len(list(directory.glob("chunk_*.json"))) if directory.is_dir() else 0


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
