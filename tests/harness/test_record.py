"""The typed run record: committed records round-trip byte for byte, records of another schema version
and records with a missing or unknown key are refused in one line naming the file and the key, the
published schema is current, and the runner's own records load and re-serialise unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.record import SCHEMA_FILE, RecordInvalid, RunRecord, schema_text
from harness.records import RECORD_SCHEMA_VERSION
from harness.runner import find_record
from harness.sweep import is_done
from tests.cli_helpers import run_cli
from tests.records import make_record

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = sorted((ROOT / "results").glob("*/record.json"))


def write(path: Path, record: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def test_there_are_committed_records():
    assert COMMITTED  # the round trip below must not pass vacuously


@pytest.mark.parametrize("path", COMMITTED, ids=lambda path: path.parent.name)
def test_committed_records_round_trip_byte_for_byte(path: Path, tmp_path: Path):
    record = RunRecord.load(path)
    assert record.to_json() == path.read_text()
    assert record.is_intact() and record.with_digest().to_json() == path.read_text()
    record.write(tmp_path / "record.json")
    assert (tmp_path / "record.json").read_bytes() == path.read_bytes()


def test_keys_added_later_stay_absent_and_numbers_keep_their_type():
    data = make_record(cost={"train_tokens": 5, "wall_seconds": 1, "judge_cost_usd": 0.0})
    record = RunRecord.from_dict(data)
    assert record.to_dict() == data and record.to_json() == json.dumps(data, indent=2) + "\n"
    assert "variant" not in record.to_dict()["recipe"] and "flops" not in record.to_dict()["cost"]
    assert isinstance(record.cost.wall_seconds, int) and isinstance(record.cost.judge_cost_usd, float)
    assert record.recipe.label == "one-off"
    # the recipe's own details follow its name, variant and params, as the runner writes them
    with_details = RunRecord.from_dict(make_record(recipe={"variant": "ifd[rate=0.05]", "selected": 3, "scorer": "ifd"}))
    assert list(with_details.to_dict()["recipe"]) == ["name", "variant", "params", "selected", "scorer"]
    assert with_details.recipe.details == {"selected": 3, "scorer": "ifd"}
    assert with_details.recipe.label == "ifd[rate=0.05]"


def test_another_schema_version_is_refused_in_one_line_naming_file_and_version(tmp_path: Path):
    path = write(tmp_path / "run" / "record.json", make_record(schema_version=RECORD_SCHEMA_VERSION + 1))
    with pytest.raises(HarnessError) as refused:
        RunRecord.load(path)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert f"record schema version {RECORD_SCHEMA_VERSION + 1}" in message and "rerun" in message
    # a run directory holding it: `harness run` stops with that line; a sweep counts the run as not done
    with pytest.raises(HarnessError, match=f"record schema version {RECORD_SCHEMA_VERSION + 1}.*move .* away"):
        find_record(path.parent, "one-off-tiny-0000000000")
    assert is_done(tmp_path, "run") is False


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda r: r.pop("cost"), "missing key 'cost'"),
        (lambda r: r["cost"].pop("train_tokens"), "missing key 'cost.train_tokens'"),
        (lambda r: r["training"]["sft"].pop("steps"), "missing key 'training.sft.steps'"),
        (lambda r: r.update(surprise=1), "unknown key 'surprise'"),
        (lambda r: r["suite"].update(colour="red"), "unknown key 'suite.colour'"),
        (lambda r: r["cost"].update(train_tokens="many"), "key 'cost.train_tokens' = \"many\" is invalid"),
        (lambda r: r["cost"].update(train_tokens=True), "key 'cost.train_tokens' = true is invalid"),
        (lambda r: r.pop("schema_version"), "missing key 'schema_version'"),
    ],
)
def test_a_missing_unknown_or_mistyped_key_is_refused_in_one_line_naming_it(tmp_path: Path, change, problem):
    record = make_record()
    change(record)
    path = write(tmp_path / "record.json", record)
    with pytest.raises(RecordInvalid) as refused:
        RunRecord.load(path)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{path}: {problem}")
    assert refused.value.problem.startswith(problem)


def test_unreadable_files_are_refused_in_one_line(tmp_path: Path):
    (tmp_path / "bad.json").write_text('{"run_id": ')
    (tmp_path / "list.json").write_text("[1]")
    for name, problem in [("bad.json", "invalid JSON (line 1"), ("list.json", "not a JSON object but list"),
                          ("none.json", "missing")]:
        with pytest.raises(RecordInvalid, match="^" + str(tmp_path / name).replace(".", r"\.") + ": " + problem.replace("(", r"\(")):
            RunRecord.load(tmp_path / name)


def test_the_leaderboard_skips_a_refused_record_with_one_warning_line(tmp_path: Path, capsys):
    write(tmp_path / "results" / "old" / "record.json", make_record(schema_version=0))
    code, _, err = run_cli(["leaderboard", "--runs", str(tmp_path / "results"), "--format", "md"], capsys)
    assert code == 0 and "Traceback" not in err
    expected = f"{tmp_path / 'results' / 'old' / 'record.json'}: record schema version 0"
    assert "".join(expected.split()) in "".join(err.split())  # (the console wraps long lines)


def test_the_published_schema_is_current(capsys):
    assert SCHEMA_FILE.read_text() == schema_text(), "docs/record.schema.json is stale: harness record-schema > docs/record.schema.json"
    code, out, _ = run_cli(["record-schema"], capsys)
    assert code == 0 and out == SCHEMA_FILE.read_text()
    schema = json.loads(out)
    assert schema["properties"]["schema_version"]["const"] == RECORD_SCHEMA_VERSION
    assert schema["additionalProperties"] is False


def test_the_runners_record_loads_and_reserialises_unchanged(tmp_path: Path):
    from tests.recipes.helpers import run_recipe

    returned = run_recipe("one-off", tmp_path, ["training.max_steps=2"])
    (path,) = tmp_path.glob("*/record.json")
    assert RunRecord.load(path).to_json() == path.read_text()
    assert json.loads(path.read_text()) == json.loads(json.dumps(returned))
    assert find_record(path.parent, returned["run_id"]).to_dict() == RunRecord.load(path).to_dict()
