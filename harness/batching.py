"""Padding-free packing: examples grouped into rows by best-fit-decreasing, collated with per-example
position_ids (transformers then masks attention block-diagonally, so no example sees another)."""

from __future__ import annotations

import bisect
import collections
import itertools
import random
from collections.abc import Sequence
from typing import Any

import torch

from harness.templates import TokenizedExample


def pack_best_fit(lengths: Sequence[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Group example indices into rows of at most `capacity` tokens (best-fit decreasing).

    The seed shuffles ties so that different seeds give different (equally tight) packings."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda index: -lengths[index])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row number)
    for index in order:
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"example {index} has {length} tokens > row capacity {capacity}")
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            remaining, row = free.pop(slot)
        else:
            remaining, row = capacity, len(rows)
            rows.append([])
        rows[row].append(index)
        remaining -= length
        if remaining > 0:
            bisect.insort(free, (remaining, row))
    return rows


def collate_rows(rows: Sequence[Sequence[TokenizedExample]], pad_token_id: int) -> dict[str, Any]:
    """Rows of examples -> a batch padded to the longest row, with position_ids and seq_ids.

    Padding gets its own position run (0, 1, ...) so it forms a separate block in the attention mask,
    label -100 and seq_id -1. `num_examples` is the number of examples in the batch. The examples' bounds
    in the flattened sequence of real tokens (row by row, padding left out) come with the batch, computed
    here once, as varlen attention kernels take them: `cu_seqlens` (int32, [examples + 1], cumulative
    lengths from 0) and `max_seqlen` (a Python int: it stays on the host when the batch moves to a GPU).

    Two index lists spare the loss any data-dependent selection on the device (a boolean mask or
    nonzero() waits for the GPU each micro-batch): `real_positions`, the flattened [rows x width]
    positions of real tokens, and `response_positions`, those whose next token is a labelled (response)
    token, where the LM head runs; its target is at the following position. `response_counts` (a host
    list) says how many of them belong to each example: they come example after example."""
    width = max(sum(len(example.input_ids) for example in row) for row in rows)
    lengths = [len(example.input_ids) for row in rows for example in row]
    input_ids, labels, positions, seq_ids = [], [], [], []
    example_number = 0
    for row in rows:
        row_ids, row_labels, row_positions, row_seq = [], [], [], []
        for example in row:
            length = len(example.input_ids)
            row_ids += example.input_ids
            row_labels += example.labels
            row_positions += list(range(length))
            row_seq += [example_number] * length
            example_number += 1
        pad = width - len(row_ids)
        input_ids.append(row_ids + [pad_token_id] * pad)
        labels.append(row_labels + [-100] * pad)
        positions.append(row_positions + list(range(pad)))
        seq_ids.append(row_seq + [-1] * pad)
    flat_labels = [label for row in labels for label in row]
    flat_seq = [seq for row in seq_ids for seq in row]
    responses = [i for i in range(len(flat_labels) - 1) if (i + 1) % width and flat_labels[i + 1] != -100]
    counts = collections.Counter(flat_seq[i + 1] for i in responses)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(positions, dtype=torch.long),
        "seq_ids": torch.tensor(seq_ids, dtype=torch.long),
        "num_examples": torch.tensor(example_number, dtype=torch.long),
        "cu_seqlens": torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32),
        "max_seqlen": max(lengths),
        "real_positions": torch.tensor([i for i, seq in enumerate(flat_seq) if seq >= 0], dtype=torch.long),
        "response_positions": torch.tensor(responses, dtype=torch.long),
        "response_counts": [counts.get(number, 0) for number in range(example_number)],
    }


def on_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device`; host values (max_seqlen) stay as they are."""
    return {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in batch.items()}


class RowDataset(torch.utils.data.Dataset):
    """Each item is one row: a list of examples (one example per row when packing is off)."""

    def __init__(
        self,
        examples: Sequence[TokenizedExample],
        capacity: int,
        packing: bool,
        seed: int,
        rows: list[list[int]] | None = None,
    ):
        """`rows` fixes the layout instead (e.g. SFTMix's confident/unconfident pairs, one pair per row)."""
        self.examples = list(examples)
        if rows is not None:
            self.rows = [list(row) for row in rows]
        elif packing:
            self.rows = pack_best_fit([len(example.input_ids) for example in self.examples], capacity, seed)
        else:
            self.rows = [[index] for index in range(len(self.examples))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> list[TokenizedExample]:
        return [self.examples[i] for i in self.rows[index]]

    def token_count(self) -> int:
        return sum(len(example.input_ids) for example in self.examples)
