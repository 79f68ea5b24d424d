"""User-facing errors: one line, exit code 2, never a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class HarnessError(Exception):
    """An error caused by the user's input (a config, a data file, a name); the CLI prints it on one line."""

    exit_code = 2


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The closest valid name to a mistyped one, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> HarnessError:
    """An error for an unknown model/recipe/suite/key that suggests the closest valid one."""
    choices = sorted(choices)
    suggestion = closest(name, choices)
    hint = f"did you mean '{suggestion}'?" if suggestion else f"valid: {', '.join(choices)}"
    return HarnessError(f"unknown {kind} '{name}'; {hint}")
