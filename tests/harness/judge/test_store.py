"""The one verdict store: the journal survives kills, and CachedJudge resumes a killed job without asking twice."""

from __future__ import annotations

import json

import pytest

from harness.judge import CachedJudge, JudgeOptions, LocalJudge, VerdictJournal
from harness.judge.store import VERDICT_FORMAT


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


def test_cached_judge_resumes_a_killed_job_and_never_asks_twice(local_judge, tiny, tmp_path, monkeypatch):
    items = [(f"Question {k}?", f"Answer number {k}.", "No.") for k in range(5)]
    direct = local_judge.review_pairs(items)
    real = local_judge.review_pairs
    asked = []

    def killed_on_the_second_chunk(batch):
        asked.append(len(batch))
        if len(asked) == 2:
            raise KeyboardInterrupt
        return real(batch)

    path = tmp_path / "judge_cache.jsonl"
    monkeypatch.setattr(local_judge, "review_pairs", killed_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        CachedJudge(local_judge, path, chunk_size=2).review_pairs(items)
    monkeypatch.setattr(local_judge, "review_pairs", lambda batch: asked.append(len(batch)) or real(batch))
    cached = CachedJudge(local_judge, path, chunk_size=2)
    assert [(r.scores, r.raw) for r in cached.review_pairs(items)] == [(r.scores, r.raw) for r in direct]
    assert asked == [2, 2, 2, 1] and (cached.reused, cached.judged) == (2, 3)
    again = CachedJudge(local_judge, path, chunk_size=2)
    again.review_pairs(items[::-1])
    assert (again.reused, again.judged) == (5, 0) and len(asked) == 4
    # the judge is part of the key: the same model with another answer budget is another judge
    model, tokenizer = tiny
    other = CachedJudge(LocalJudge("local:tiny", model, tokenizer, JudgeOptions(max_answer_tokens=16)), path)
    assert other._key("pairwise", *items[0]) != again._key("pairwise", *items[0])
