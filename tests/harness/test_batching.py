from harness.batching import collate_rows, pack_best_fit
from harness.templates import TokenizedExample


def test_best_fit_respects_capacity_and_keeps_every_example():
    lengths = [5, 9, 3, 7, 1, 10, 2, 8, 4, 6] * 7
    rows = pack_best_fit(lengths, capacity=16, seed=1)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 16 for row in rows)
    assert len(rows) <= -(-sum(lengths) // 16) + 2  # near the lower bound


def test_collate_restarts_positions_and_marks_padding():
    a = TokenizedExample([1, 2, 3], [-100, 2, 3])
    b = TokenizedExample([4, 5], [-100, 5])
    c = TokenizedExample([6], [-100])
    batch = collate_rows([[a, b], [c]], pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert batch["seq_ids"].tolist() == [[0, 0, 0, 1, 1], [2, -1, -1, -1, -1]]
    assert batch["labels"].tolist()[1] == [-100] * 5
    assert int(batch["num_examples"]) == 3
