"""SFTMix's mechanisms (arXiv 2410.05248; no code released; details from recipes.md section 4):
confidence from training dynamics, the median split, random confident/unconfident pairs, and the
mixup loss on last-layer hidden states at response positions.

Unknowns of the paper are arguments with documented defaults: the states mixed (`post-norm`: the LM
head's input; `pre-norm`: before the final norm, then normed), lambda per pair or per batch (per
pair), and which tokens survive the truncation of the longer response (`first`).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from harness.batching import pack_best_fit
from harness.losses import causal_lm_parts, final_hidden_states

States = Literal["post-norm", "pre-norm"]
Truncation = Literal["first", "last"]


def confidence(perplexities: np.ndarray) -> np.ndarray:
    """Conf = -(1/C) sum_c perplexity_c over C reference checkpoints ([C, N] -> [N])."""
    return -np.asarray(perplexities, dtype=np.float64).mean(axis=0)


def split_at_median(conf: np.ndarray) -> tuple[list[int], list[int]]:
    """(confident, unconfident) indices: the top floor(N/2) confidences vs the rest (ties broken by index)."""
    order = sorted(range(len(conf)), key=lambda i: (-conf[i], i))
    half = len(order) // 2
    return sorted(order[:half]), sorted(order[half:])


def random_pairs(confident: list[int], unconfident: list[int], seed: int) -> list[tuple[int, int]]:
    """Pair every confident example with an unconfident one at random; a leftover of the larger half is
    paired with a random member of the other, so every example is trained on."""
    rng = random.Random(seed)
    c, u = confident[:], unconfident[:]
    rng.shuffle(c)
    rng.shuffle(u)
    pairs = list(zip(c, u, strict=False))
    for extra in c[len(u) :]:
        pairs.append((extra, rng.choice(unconfident)))
    for extra in u[len(c) :]:
        pairs.append((rng.choice(confident), extra))
    return pairs


def epoch_pairs(confident: list[int], unconfident: list[int], seed: int, epochs: int) -> list[list[tuple[int, int]]]:
    """Pairs drawn afresh for each epoch (the paper pairs at random per batch), seeded by (seed, epoch)."""
    return [random_pairs(confident, unconfident, seed * 1_000_003 + epoch) for epoch in range(epochs)]


def pack_pairs(pairs: Sequence[tuple[int, int]], lengths: Sequence[int], capacity: int, seed: int) -> list[list[int]]:
    """Rows of pair numbers: the pairs packed best-fit decreasing like one-off packs examples (a pair is
    one unit of both its examples' tokens); a pair longer than `capacity` gets a row of its own."""
    sizes = [lengths[c] + lengths[u] for c, u in pairs]
    fits = [k for k, size in enumerate(sizes) if size <= capacity]
    rows = [[fits[j] for j in row] for row in pack_best_fit([sizes[k] for k in fits], capacity, seed)]
    return rows + [[k] for k, size in enumerate(sizes) if size > capacity]


def split_rows(rows: list[list[int]], count: int) -> list[list[int]]:
    """`rows` split into `count` rows (count <= units): the row with the most units gives its last to a new row."""
    rows = [list(row) for row in rows]
    while len(rows) < count:
        fullest = max(range(len(rows)), key=lambda r: (len(rows[r]), -r))
        rows.append([rows[fullest].pop()])
    return rows


def matched_layouts(
    draws: Sequence[Sequence[tuple[int, int]]], lengths: Sequence[int], target_rows: int, capacity: int, seed: int
) -> list[list[list[int]]]:
    """One row layout (example indices, a row's pairs as c, u, c, u, ...) per draw of pairs, all with the
    same number of rows: `target_rows` (one-off's rows on the same data) unless some draw's packed pairs
    need more, then that many. Rows are split (never merged) to reach it, so no row exceeds `capacity`
    unless a single pair does."""
    packed = [pack_pairs(draw, lengths, capacity, seed) for draw in draws]
    count = min(max(target_rows, *(len(rows) for rows in packed)), len(draws[0]))
    return [
        [[i for k in row for i in draw[k]] for row in split_rows(rows, count)]
        for draw, rows in zip(draws, packed, strict=True)
    ]


def sample_lambdas(num_pairs: int, alpha: float, per: Literal["pair", "batch"], device: torch.device) -> torch.Tensor:
    beta = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))
    values = beta.sample((num_pairs,)) if per == "pair" else beta.sample().expand(num_pairs)
    return values.to(device)


def hidden_states_with_prenorm(model: Any, batch: dict[str, torch.Tensor], inputs_embeds: torch.Tensor | None = None):
    """(post-norm, pre-norm) last-layer hidden states in the batch's [rows, tokens, hidden] layout; the
    pre-norm ones are captured at the final norm's input (on the padding-free path that input is the
    flattened real tokens, scattered back here)."""
    decoder, _ = causal_lm_parts(model)
    captured: dict[str, torch.Tensor] = {}

    def keep_input(module: Any, args: tuple, output: torch.Tensor) -> None:  # returning None keeps the output
        captured["pre"] = args[0]

    handle = decoder.norm.register_forward_hook(keep_input)
    try:
        post = final_hidden_states(model, batch, inputs_embeds=inputs_embeds)
    finally:
        handle.remove()
    pre = captured["pre"]
    if pre.shape[:2] != post.shape[:2]:  # flattened real tokens [1, N, hidden]
        real = batch.get("real_positions")
        if real is None:
            real = (batch["seq_ids"].reshape(-1) >= 0).nonzero().squeeze(1)
        rows, width = post.shape[:2]
        pre = pre[0].new_zeros(rows * width, pre.shape[-1]).index_copy(0, real, pre[0]).view(rows, width, -1)
    return post, pre


def mixup_loss(
    model: Any,
    batch: dict[str, torch.Tensor],
    states: torch.Tensor,
    lambdas: torch.Tensor,
    *,
    state_kind: States = "post-norm",
    truncation: Truncation = "first",
) -> torch.Tensor:
    """Token-mean of lambda * CE(head(Z), Y_c) + (1 - lambda) * CE(head(Z), Y_u) over all pairs.

    Examples 2k (confident) and 2k+1 (unconfident) of the batch form pair k; `states` are the last
    layer's hidden states (post- or pre-norm as `state_kind` says) of the whole batch; Z = lambda * Z_c +
    (1 - lambda) * Z_u at the response positions, aligned by truncating the longer response."""
    decoder, head = causal_lm_parts(model)
    positions, counts = batch.get("response_positions"), batch.get("response_counts")
    if positions is None or counts is None:  # a batch not built by the collator: by mask (waits for the device)
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        selected, labels, owner = states[:, :-1][mask], targets[mask], batch["seq_ids"][:, 1:][mask]
        counts = torch.bincount(owner, minlength=2 * len(lambdas)).tolist()
    else:  # the collator's positions: the same tokens in the same order, and the counts are on the host
        selected = states.reshape(-1, states.shape[-1]).index_select(0, positions)
        labels = batch["labels"].reshape(-1).index_select(0, positions + 1)
    offsets = [0, *itertools.accumulate(counts)]
    mixed, labels_c, labels_u, weights = [], [], [], []
    for pair, lam in enumerate(lambdas):
        confident, unconfident = 2 * pair, 2 * pair + 1
        length = min(counts[confident], counts[unconfident]) if unconfident < len(counts) else 0
        if length == 0:
            continue
        if truncation == "first":  # examples' response tokens are contiguous: slices, not data-dependent selection
            c_rows = slice(offsets[confident], offsets[confident] + length)
            u_rows = slice(offsets[unconfident], offsets[unconfident] + length)
        else:
            c_rows = slice(offsets[confident + 1] - length, offsets[confident + 1])
            u_rows = slice(offsets[unconfident + 1] - length, offsets[unconfident + 1])
        mixed.append(lam * selected[c_rows] + (1 - lam) * selected[u_rows])
        labels_c.append(labels[c_rows])
        labels_u.append(labels[u_rows])
        weights.append(lam.expand(length))
    if not mixed:
        return states.sum() * 0.0
    z = torch.cat(mixed)
    if state_kind == "pre-norm":
        z = decoder.norm(z)
    logits = head(z).float()
    lam = torch.cat(weights).float()
    loss = lam * F.cross_entropy(logits, torch.cat(labels_c), reduction="none") + (1 - lam) * F.cross_entropy(
        logits, torch.cat(labels_u), reduction="none"
    )
    return loss.mean()
