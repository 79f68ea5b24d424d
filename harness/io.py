"""Atomic file writes, one policy for every file the harness writes (records, specs, caches, the
leaderboard): a temporary file in the same directory, fsync, then rename over the target, so a kill
leaves the old file or the new one, never half of one. The file gets the mode an ordinary open would
give it (0666 less the umask): mkstemp's private 0600 would make shared run folders unreadable to
collaborators. No secret is ever written to a file, so nothing needs the private mode."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_bytes(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(content)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_text(payload: Any) -> str:
    """The one JSON format of the files the harness writes (records, the record schema, caches)."""
    return json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n"


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json_text(payload))
