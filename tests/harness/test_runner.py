import json
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.runner import check_resumable, prepare_run, run_lock
from harness.spec import build_spec


def prepared(overrides: list[str], data: str | None = None):
    return prepare_run(build_spec(config_file=None, overrides=overrides, flags={"data.name": data}))


def test_run_id_changes_with_config_and_with_data_content(tmp_path: Path):
    base = prepared([])
    assert prepared([]).run_id == base.run_id
    assert prepared(["training.epochs=2"]).run_id != base.run_id
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    first = prepared([], str(data)).run_id
    data.write_text('{"instruction": "a", "output": "c"}\n')  # same path, new content
    assert prepared([], str(data)).run_id != first


def test_a_second_process_cannot_run_into_the_same_directory(tmp_path: Path):
    with run_lock(tmp_path):
        with pytest.raises(HarnessError, match=r"is in use by pid \d+"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released
        pass


def test_resuming_with_other_code_is_refused(tmp_path: Path, monkeypatch):
    (tmp_path / "run.json").write_text(json.dumps({"git_commit": "0" * 40}))
    monkeypatch.setattr("harness.runner.git_commit", lambda: "1" * 40)
    with pytest.raises(HarnessError, match="was started by harness commit 0+, this is 1+"):
        check_resumable(tmp_path)
    monkeypatch.setenv("HARNESS_ALLOW_CODE_CHANGE", "1")
    check_resumable(tmp_path)
