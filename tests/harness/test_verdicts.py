import json

from harness.verdicts import VERDICT_FORMAT, VerdictJournal


def test_verdicts_survive_a_reload_and_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "judge" / "verdicts.jsonl"
    journal = VerdictJournal(path)
    journal.add({"a": {"score": 3.0}, "b": {"scores": [7, 2], "raw": "7 2", "price": None}})
    assert VerdictJournal(path).entries == {"a": {"score": 3.0}, "b": {"scores": [7, 2], "raw": "7 2", "price": None}}

    with open(path, "a", encoding="utf-8") as handle:  # a kill in the middle of the next write
        handle.write(f'{{"format": {VERDICT_FORMAT}, "key": "c", "val')
    resumed = VerdictJournal(path)
    assert set(resumed.entries) == {"a", "b"} and "c" not in resumed  # c is judged again
    resumed.add({"c": {"score": 1.5}})
    assert VerdictJournal(path).entries["c"] == {"score": 1.5}  # the new line did not join the cut one


def test_lines_of_another_format_are_judged_again(tmp_path):
    path = tmp_path / "verdicts.jsonl"
    path.write_text(json.dumps({"id": "old", "score": 2.0}) + "\n" + json.dumps({"format": 1, "key": "x", "value": 1}) + "\n")
    assert VerdictJournal(path).entries == {}
