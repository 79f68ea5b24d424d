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


def test_the_collator_gives_each_examples_bounds_once_as_varlen_kernels_take_them(tiny):
    """cu_seqlens / max_seqlen: the examples' bounds in the flattened real tokens (row by row, padding out),
    equal to the segment lengths the attention would otherwise derive from seq_ids and position_ids; the
    hidden states are the same either way."""
    import torch

    from harness.losses import _segment_lengths, final_hidden_states

    rows = [
        [TokenizedExample([5, 6, 7], [-100, 6, 7]), TokenizedExample([8, 9], [-100, 9])],
        [TokenizedExample([10, 11, 12, 13, 14, 15], [-100] * 3 + [13, 14, 15])],
        [TokenizedExample([16], [-100])],
    ]
    batch = collate_rows(rows, pad_token_id=0)
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"].tolist() == [0, 3, 5, 11, 12]
    assert batch["max_seqlen"] == 6 and isinstance(batch["max_seqlen"], int)  # stays on the host
    seq_ids = batch["seq_ids"].reshape(-1)
    real = (seq_ids >= 0).nonzero().squeeze(1)
    assert batch["cu_seqlens"].diff().tolist() == _segment_lengths(seq_ids[real], batch["position_ids"].reshape(-1)[real])
    model, _ = tiny
    derived = {name: value for name, value in batch.items() if name not in ("cu_seqlens", "max_seqlen", "real_positions")}
    with torch.no_grad():
        assert torch.equal(final_hidden_states(model, batch), final_hidden_states(model, derived))


def test_the_collators_positions_select_what_the_masks_select_and_the_loss_needs_no_mask(tiny):
    """real_positions / response_positions equal the mask-derived selections, and with them the loss (the
    same values, bit for bit, as the mask path) runs without any data-dependent selection: no nonzero()
    and no boolean-mask index, each of which makes a GPU wait for the host every micro-batch."""
    import torch

    from harness.losses import response_token_losses

    rows = [
        [TokenizedExample([5, 6, 7], [-100, 6, 7]), TokenizedExample([8, 9], [-100, 9])],
        [TokenizedExample([10, 11, 12, 13, 14, 15], [-100] * 3 + [13, 14, 15])],
        [TokenizedExample([16, 17], [-100, 17])],
    ]
    batch = collate_rows(rows, pad_token_id=0)
    seq_ids, labels = batch["seq_ids"], batch["labels"]
    width = labels.shape[1]
    assert batch["real_positions"].tolist() == (seq_ids.reshape(-1) >= 0).nonzero().squeeze(1).tolist()
    mask = labels[:, 1:] != -100
    rows_, cols = mask.nonzero(as_tuple=True)
    assert batch["response_positions"].tolist() == (rows_ * width + cols).tolist()
    assert batch["response_positions"].tolist() == [0, 1, 3, 8, 9, 10, 12]
    assert batch["response_counts"] == [2, 1, 3, 1]  # per example, in order (a host list)

    model, _ = tiny
    masked = {name: value for name, value in batch.items() if name not in ("real_positions", "response_positions", "response_counts")}
    with torch.no_grad():
        with data_dependent_selection_watch() as watched:
            losses, owners = response_token_losses(model, batch)
        with data_dependent_selection_watch() as watched_masked:
            expected, expected_owners = response_token_losses(model, masked)
    assert watched.seen == [] and watched_masked.seen  # the detector sees the mask path's selections
    assert torch.equal(losses, expected) and torch.equal(owners, expected_owners)
    assert owners.tolist() == [0, 0, 1, 2, 2, 2, 3]


def data_dependent_selection_watch():
    """A dispatch mode listing the operations whose result size depends on the data (nonzero, a boolean
    index): on a GPU each makes the host wait for the device."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class DataDependentSelections(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.nonzero.default:
                self.seen.append("nonzero")
            if func is torch.ops.aten.index.Tensor and any(index is not None and index.dtype == torch.bool for index in args[1]):
                self.seen.append("boolean index")
            if func is torch.ops.aten._local_scalar_dense.default:
                self.seen.append("item")
            return func(*args, **(kwargs or {}))

    return DataDependentSelections()
