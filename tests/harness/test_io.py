"""harness.io: one atomic-write policy. Every writer gives the file the mode an ordinary open would
(0666 less the umask), a failed write leaves the old file and no temporary behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from harness.io import atomic_write_bytes, atomic_write_json, atomic_write_text


def test_every_writer_gives_the_umask_mode_and_replaces_whole(tmp_path: Path):
    previous = os.umask(0o022)
    try:
        for name, write in (("a.bin", lambda p: atomic_write_bytes(p, b"x")), ("b.txt", lambda p: atomic_write_text(p, "x")),
                            ("c.json", lambda p: atomic_write_json(p, {"x": 1}))):
            path = tmp_path / "sub" / name
            write(path)
            write(path)  # over an existing file
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, name
            plain = tmp_path / f"plain-{name}"
            plain.write_bytes(b"")
            assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    finally:
        os.umask(previous)
    assert (tmp_path / "sub" / "c.json").read_text() == '{\n  "x": 1\n}\n'


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path):
    path = tmp_path / "record.json"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["record.json"]
