"""Helpers shared by the tests that drive the CLI in-process and read the run it wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `harness ARGS` run in this process."""
    with pytest.raises(SystemExit) as exited:
        main(args)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exited.value.code or 0, captured.out, captured.err


def load_run(output: Path) -> tuple[Path, dict[str, Any]]:
    """The only run directory under `output` (hidden entries aside: `.specs/` holds the spec files Docker and
    --nproc runs execute) and its record."""
    (run_dir,) = (path for path in output.iterdir() if not path.name.startswith("."))
    return run_dir, json.loads((run_dir / "record.json").read_text())


def without(entry: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {key: value for key, value in entry.items() if key not in keys}
