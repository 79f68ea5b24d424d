"""The artifact cache: content-addressed keys, atomic files carrying their own sha256, damaged files
recomputed instead of trusted."""

import json
from pathlib import Path

from harness.artifacts import ArtifactCache, content_key


def test_artifacts_and_chunks_round_trip_and_carry_their_hash(tmp_path: Path):
    cache = ArtifactCache(tmp_path)
    key = content_key(kind="ifd", records=["a", "b"])
    assert key == content_key(records=["a", "b"], kind="ifd") and key != content_key(kind="ifd", records=["b", "a"])
    payload = {"scores": [0.5, None, 1.25], "pair": (1, 2)}
    cache.save_chunk("ifd", key, 0, [1.0, 2.0])
    assert cache.load_chunk("ifd", key, 0) == [1.0, 2.0] and cache.completed_chunks("ifd", key) == 1
    path = cache.save("ifd", key, payload)
    assert cache.load("ifd", key) == {"scores": [0.5, None, 1.25], "pair": [1, 2]}
    assert not cache.partial_dir("ifd", key).exists()  # the finished artifact replaces its chunks
    stored = json.loads(path.read_text())
    assert set(stored) == {"sha256", "payload"} and len(stored["sha256"]) == 64
    assert not list(path.parent.glob(".*.tmp"))  # written atomically: no temporary file left


def test_a_damaged_or_edited_artifact_is_not_trusted(tmp_path: Path):
    cache = ArtifactCache(tmp_path)
    path = cache.save("ifd", "k", {"scores": [0.5, 0.75]})
    stored = json.loads(path.read_text())
    stored["payload"]["scores"][0] = 0.1  # edited by hand or rotted on disk: the hash no longer matches
    path.write_text(json.dumps(stored))
    assert cache.load("ifd", "k") is None
    path.write_text('{"sha256": "')  # cut short
    assert cache.load("ifd", "k") is None
    path.write_text(json.dumps({"scores": [0.5]}))  # written before hashes were added: still readable
    assert cache.load("ifd", "k") == {"scores": [0.5]}
    assert cache.load("ifd", "missing") is None
