import gzip
import json
from pathlib import Path

import pytest

from harness.data import load_instruction_data
from harness.errors import HarnessError


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_shipped_sample_loads():
    data = load_instruction_data("alpaca-sample")
    assert len(data.records) == 1500
    assert data.format == "alpaca"
    assert data.summary()["sha256"] == load_instruction_data("alpaca-sample").content_hash()


def test_all_formats_map_to_the_same_record(tmp_path: Path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2+2", "output": "4"}])
    sharegpt = write_jsonl(
        tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "Add"}, {"from": "gpt", "value": "4"}]}]
    )
    messages = write_jsonl(
        tmp_path / "m.jsonl",
        [{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "Add"}, {"role": "assistant", "content": "4"}]}],
    )
    phased = write_jsonl(tmp_path / "p.jsonl", [{"id": "7", "score": "4.125", "data": ["Add", "4"]}])
    loaded = {name: load_instruction_data(str(path)) for name, path in
              {"alpaca": alpaca, "sharegpt": sharegpt, "messages": messages, "phased-scored": phased}.items()}
    for name, data in loaded.items():
        assert data.format == name
        assert data.records[0].output == "4"
    assert loaded["alpaca"].records[0].input == "2+2"
    assert loaded["phased-scored"].records[0].metadata["difficulty"] == 4.125
    assert loaded["sharegpt"].records[0] == loaded["messages"].records[0]


def test_multi_turn_keeps_history(tmp_path: Path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}])
    record = load_instruction_data(str(path)).records[0]
    assert record.history == (("hi", "hello"),)
    assert (record.instruction, record.output) == ("2+2?", "4")


def test_dedupe_and_empty_outputs_are_counted(tmp_path: Path):
    row = {"instruction": "a", "input": "", "output": "b"}
    path = tmp_path / "d.json"
    path.write_text(json.dumps([row, row, {"instruction": "c", "output": "  "}]))
    data = load_instruction_data(str(path))
    assert len(data.records) == 1
    assert (data.duplicates_dropped, data.empty_dropped) == (1, 1)


def test_gzip_jsonl(tmp_path: Path):
    path = tmp_path / "g.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"instruction": "a", "output": "b"}\n'))
    assert load_instruction_data(str(path)).records[0].output == "b"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "outp', r"line 2: invalid JSON"),
        ('{"instruction": "a", "output": 3}\n', r"line 1: field 'output' must be a string, got int"),
        ('{"instruction": "a"}\n', r"line 1: missing field 'output'"),
        ('{"foo": 1}\n', r"line 1: unrecognised record"),
        ('[1, 2]', r"record 0: each record must be a JSON object"),
        ('{"id": 1, "score": "x", "data": ["a", "b"]}\n', r"field 'score' must be a number"),
    ],
)
def test_malformed_files_name_file_record_and_field(tmp_path: Path, content: str, message: str):
    path = tmp_path / ("bad.json" if content.startswith("[") else "bad.jsonl")
    path.write_text(content)
    with pytest.raises(HarnessError, match=message) as raised:
        load_instruction_data(str(path))
    assert str(path) in str(raised.value)
    assert "\n" not in str(raised.value)


def test_non_utf8_and_missing_files(tmp_path: Path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"instruction": "caf\xe9", "output": "b"}\n'.encode("latin-1"))
    with pytest.raises(HarnessError, match="not UTF-8"):
        load_instruction_data(str(path))
    with pytest.raises(HarnessError, match="data file not found"):
        load_instruction_data(str(tmp_path / "nope.json"))


def test_unknown_shipped_name_suggests():
    with pytest.raises(HarnessError, match="did you mean 'alpaca-sample'"):
        load_instruction_data("alpaca-sampel")
