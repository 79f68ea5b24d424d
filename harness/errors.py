"""User-facing errors: one line, exit code 2, never a traceback."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from pathlib import Path


class HarnessError(Exception):
    """An error caused by the user's input (a config, a data file, a name); the CLI prints it on one line."""

    exit_code = 2


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The closest valid name to a mistyped one, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def shown(text: str, limit: int = 80) -> str:
    """User text quoted in an error: as typed when short and printable, else escaped (no control
    characters reach the terminal) and shortened."""
    if len(text) <= limit and text.isprintable():
        return text
    escaped = json.dumps(text)[1:-1]
    return escaped if len(escaped) <= limit else f"{escaped[: limit - 20]}... ({len(text)} characters)"


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> HarnessError:
    """An error for an unknown model/recipe/suite/key that suggests the closest valid one."""
    choices = sorted(choices)
    suggestion = closest(name, choices)
    hint = f"did you mean '{suggestion}'?" if suggestion else f"valid: {', '.join(choices)}"
    return HarnessError(f"unknown {kind} '{shown(name)}'; {hint}")


def user_path(name: str) -> Path:
    """`~/x` expanded; a `~name` whose user does not exist stays literal (it is then simply not found)
    instead of raising from expanduser."""
    try:
        return Path(name).expanduser()
    except RuntimeError:
        return Path(name)
