"""The per-example scoring engine: batched forward passes over packed, length-sorted sequences that
return each example's mean response-token loss, and IFD on top of it.

IFD follows the Cherry LLM code (tianyi-lab/Cherry_LLM, cherry_seletion/data_analysis.py and
data_by_IFD.py): s(A|Q) is the mean loss of the answer tokens after template(instruction, input);
s(A) the mean loss of the answer tokens after the response tag alone, the text every prompt of the
template ends with ("### Response:" for the Alpaca template); IFD = s(A|Q) / s(A). The answer carries no
EOS. Each text is tokenized whole and the answer starts after len(tokenize(prefix)) tokens, as there.
Over-length examples are truncated as Cherry does (`overlength="truncate"`, the default): the conditioned
text is cut at max_length and the direct text at max_length - prompt tokens + tag tokens (Cherry's "+4" is
the tag's length with BOS under LLaMA's tokenizer), so both passes keep the same answer tokens; a record is
skipped only when its prompt leaves no token for the answer, or the answer is empty. `overlength="skip"`
skips every record whose prompt + answer exceeds max_length instead.

Speed: both passes of every example go through one packed stream (no padding work), the LM head is
applied only at answer positions, the template's preamble that every conditioned prompt starts with
is run once and its keys/values reused (`shared_prefix_plan`), and finished chunks are cached so a
killed job resumes. In a job of several processes (one per GPU) the chunks are dealt out among them
and the scores gathered, so every process gets all of them for a fraction of the work.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from harness import distributed
from harness.artifacts import ArtifactCache, content_key
from harness.batching import collate_rows, on_device, pack_best_fit
from harness.cpu_kernels import onednn_inference
from harness.data import InstructionRecord
from harness.errors import HarnessError
from harness.interrupts import kill_point_for_tests
from harness.losses import (
    final_hidden_states,
    per_example_mean_losses,
    response_token_losses,
    shared_prefix_states,
)
from harness.templates import TokenizedExample, adds_bos, render_prompt, response_tag, tokenize_example

# 2: shared-prefix keys/values; 3: oneDNN kernels on CPU (both: equal within float rounding);
# 4: Stanford Alpaca's prompt (no newline after "### Response:"), texts tokenized whole, truncation as Cherry's
SCORING_ENGINE_VERSION = "4"
OVERLENGTH_MODES = ("truncate", "skip")
Overlength = Literal["truncate", "skip"]
MIN_SHARED_PREFIX = 2  # tokens: a shorter common prefix saves nothing


@dataclass
class ScoringStats:
    sequences: int = 0
    computed: int = 0  # sequences run through the model in this process
    cached: int = 0  # sequences whose scores came from the artifact cache
    forward_tokens: int = 0  # tokens of all scored sequences (the method's cost, cached or not)
    shared_prefix_tokens: int = 0  # of those, tokens not recomputed: shared prefixes run once

    def add(self, other: ScoringStats) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_record(self) -> dict[str, int]:
        return dict(vars(self))


def scoring_progress(console: Console | None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
    )


def _batches(examples: Sequence[TokenizedExample], order: list[int], capacity: int, rows_per_batch: int) -> list[list[list[int]]]:
    """Pack a (length-sorted) slice of examples into rows, then group rows into batches."""
    rows = pack_best_fit([len(examples[i].input_ids) for i in order], capacity)
    rows = [[order[i] for i in row] for row in rows]
    rows.sort(key=lambda row: -sum(len(examples[i].input_ids) for i in row))
    return [rows[start : start + rows_per_batch] for start in range(0, len(rows), rows_per_batch)]


def _first_label(example: TokenizedExample) -> int:
    return next((i for i, label in enumerate(example.labels) if label != -100), len(example.labels))


def shared_prefix_plan(examples: Sequence[TokenizedExample], groups: Sequence[int]) -> tuple[list[list[int]], list[int]]:
    """(prefixes, the prefix index of each example or -1): per group, the longest token prefix all its
    members share, cut so it ends before every member's first labelled token (whose prediction needs
    the hidden state just before it). Group -1, single-member groups and short prefixes share nothing."""
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        if group >= 0:
            members.setdefault(group, []).append(index)
    prefixes: list[list[int]] = []
    assignment = [-1] * len(examples)
    for indices in members.values():
        if len(indices) < 2:
            continue
        prefix = examples[indices[0]].input_ids[: min(_first_label(examples[i]) for i in indices) - 1]
        for i in indices[1:]:
            ids = examples[i].input_ids
            common = next((n for n, (a, b) in enumerate(zip(prefix, ids, strict=False)) if a != b), min(len(prefix), len(ids)))
            prefix = prefix[:common]
        if len(prefix) >= MIN_SHARED_PREFIX:
            prefixes.append(list(prefix))
            for i in indices:
                assignment[i] = len(prefixes) - 1
    return prefixes, assignment


def shares_prefixes_on(device: torch.device) -> bool:
    """Whether scoring runs shared prompt prefixes once (their keys and values reused by every example). On
    the CPU that saves their tokens' compute; on a GPU it would take the eager per-segment attention loop
    instead of the flash varlen kernel (harness.losses.flash_varlen_applies), which costs more than the
    recomputed prefixes, so there it is off."""
    return device.type != "cuda"


@torch.no_grad()
def mean_response_losses(
    model: Any,
    examples: Sequence[TokenizedExample],
    *,
    pad_token_id: int,
    capacity: int = 1024,
    rows_per_batch: int = 4,
    chunk_size: int = 512,
    cache: ArtifactCache | None = None,
    cache_key: str | None = None,
    console: Console | None = None,
    description: str = "scoring",
    prefix_groups: Sequence[int] | None = None,
) -> tuple[np.ndarray, ScoringStats]:
    """Mean loss over the labelled tokens of each example, in input order (float64 array).

    Examples are sorted by length and processed in chunks; with a cache and key, each finished chunk is
    stored, so a rerun after a kill recomputes only unfinished chunks. `prefix_groups` (a group id per
    example, -1 for none) marks examples expected to share a prompt prefix: see shared_prefix_plan."""
    model.eval()
    device = next(model.parameters()).device
    full_tokens = sum(len(e.input_ids) for e in examples)
    if not shares_prefixes_on(device):
        prefix_groups = None
    prefixes, assignment = shared_prefix_plan(examples, prefix_groups) if prefix_groups is not None else ([], [])
    with onednn_inference(model):
        shared = shared_prefix_states(model, prefixes) if prefixes else None
    offsets = [0] * len(examples)
    if shared is not None:  # score only what follows each example's prefix, at positions after it
        offsets = [len(prefixes[p]) if p >= 0 else 0 for p in assignment]
        examples = [TokenizedExample(e.input_ids[n:], e.labels[n:]) for e, n in zip(examples, offsets, strict=True)]
    capacity = max(capacity, max(len(example.input_ids) for example in examples))
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    scores = np.full(len(examples), np.nan, dtype=np.float64)
    stats = ScoringStats(sequences=len(examples), forward_tokens=full_tokens)
    if shared is not None:
        stats.shared_prefix_tokens = sum(offsets) - sum(len(ids) for ids in prefixes)
    chunks = [order[start : start + chunk_size] for start in range(0, len(order), chunk_size)]
    # Chunks are dealt out across the processes of a job, unless the model is sharded (FSDP, e.g. SFTMix's
    # confidence passes during sharded training): every forward pass of a sharded model is a collective that
    # all processes must join, so then each process runs every chunk, in the same order.
    sharded = distributed.is_sharded(model)
    processes, rank = (1, 0) if sharded else (distributed.world_size(), distributed.rank())
    computed: dict[int, list[float]] = {}  # chunk index -> scores, of the chunks this process ran
    with scoring_progress(console) as progress, onednn_inference(model):
        task = progress.add_task(description, total=len(examples))
        to_run = []
        # What a killed run (or one with another process count) finished. In a job of several processes the
        # main process decides, then deals out the chunks to run: a list made by each would differ as soon
        # as one process has saved a chunk that another has not looked for yet.
        if distributed.is_main():
            for chunk_index, chunk in enumerate(chunks):
                saved = cache.load_chunk("scores", cache_key, chunk_index) if cache and cache_key else None
                if saved is not None and len(saved) == len(chunk):
                    scores[chunk] = saved
                    stats.cached += len(chunk)
                    progress.advance(task, len(chunk))
                else:
                    to_run.append(chunk_index)
        to_run = distributed.from_main(to_run)
        for chunk_index in to_run[rank::processes]:
            chunk = chunks[chunk_index]
            for batch_rows in _batches(examples, chunk, capacity, rows_per_batch):
                batch = collate_rows([[examples[i] for i in row] for row in batch_rows], pad_token_id)
                batch = on_device(batch, device)
                flat = [i for row in batch_rows for i in row]
                prefix_state = None
                if shared is not None:
                    seq_ids = batch["seq_ids"]
                    shift = torch.tensor([offsets[i] for i in flat], device=device)[seq_ids.clamp(min=0)]
                    batch["position_ids"] = batch["position_ids"] + shift * (seq_ids >= 0)
                    prefix_state = (shared, [assignment[i] for i in flat])
                compute = functools.partial(per_example_mean_losses, model, batch, len(flat), shared_prefixes=prefix_state)
                losses = distributed.inside_forward(model, compute) if sharded else compute()
                scores[flat] = losses.double().cpu().numpy()
                progress.advance(task, len(flat))
            stats.computed += len(chunk)
            computed[chunk_index] = scores[chunk].tolist()
            if cache and cache_key and (processes > 1 or distributed.is_main()):
                cache.save_chunk("scores", cache_key, chunk_index, computed[chunk_index])
                kill_point_for_tests("scoring", chunk_index + 1)
        if processes > 1:  # the main process collects every score and hands them all out
            for share in distributed.gather(computed):
                for chunk_index, values in share.items():
                    if chunk_index not in computed:
                        scores[chunks[chunk_index]] = values
                        progress.advance(task, len(values))
            scores = distributed.from_main(scores)
            (stats.computed,) = distributed.sum_over_processes([stats.computed])
            stats.cached = distributed.from_main(stats.cached)
        elif distributed.world_size() > 1:  # sharded: all computed the same chunks; the main one also has the cached
            scores = distributed.from_main(scores)
            stats.cached = distributed.from_main(stats.cached)
    return scores, stats


# ----------------------------------------------------------------------------- IFD


@dataclass
class IFDScores:
    """Per-record IFD; NaN where the record was skipped (no room for the answer, empty answer, or over-length
    under overlength="skip"). `truncated`: records scored on the first tokens of their answer."""

    conditioned_loss: np.ndarray  # s(A|Q)
    direct_loss: np.ndarray  # s(A)
    skipped: list[int] = field(default_factory=list)
    stats: ScoringStats = field(default_factory=ScoringStats)
    truncated: list[int] = field(default_factory=list)

    @property
    def ifd(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.conditioned_loss / self.direct_loss

    def to_json(self) -> dict[str, Any]:
        return {
            "conditioned_loss": [None if math.isnan(v) else v for v in self.conditioned_loss.tolist()],
            "direct_loss": [None if math.isnan(v) else v for v in self.direct_loss.tolist()],
            "skipped": self.skipped,
            "truncated": self.truncated,
        }

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> IFDScores:
        def array(values: list[float | None]) -> np.ndarray:
            return np.array([np.nan if v is None else v for v in values], dtype=np.float64)

        return cls(array(payload["conditioned_loss"]), array(payload["direct_loss"]), list(payload["skipped"]),
                   truncated=list(payload.get("truncated", [])))


class IFDPairs(NamedTuple):
    kept: list[int]  # record indices scored, in order
    conditioned: list[TokenizedExample]  # template(instruction, input) + answer
    direct: list[TokenizedExample]  # response tag + answer
    skipped: list[int]
    truncated: list[int]  # of the kept records, those whose answer was cut at max_length


def _cut(example: TokenizedExample, length: int) -> TokenizedExample:
    return TokenizedExample(example.input_ids[:length], example.labels[:length])


def ifd_pairs(
    records: Sequence[InstructionRecord], tokenizer: Any, template: str, max_length: int,
    overlength: Overlength = "truncate",
) -> IFDPairs:
    """The two texts of every record, tokenized as Cherry's data_analysis.py does (see the module docstring).

    Both texts end in the template's response tag, so the answer follows the same text in both passes and
    is tokenized the same; truncation keeps the same number of answer tokens in both."""
    if overlength not in OVERLENGTH_MODES:
        raise HarnessError(f"IFD overlength '{overlength}': must be one of {', '.join(OVERLENGTH_MODES)}")
    add_bos = adds_bos(template)
    tag = response_tag(template, tokenizer)
    tag_length = len(tokenizer(tag, add_special_tokens=add_bos).input_ids)
    pairs = IFDPairs([], [], [], [], [])
    for index, record in enumerate(records):
        prompt = render_prompt(record, template, tokenizer)
        prompt_length = len(tokenizer(prompt, add_special_tokens=add_bos).input_ids)
        conditioned = tokenize_example(prompt, record.output, tokenizer, template)
        direct = tokenize_example(tag, record.output, tokenizer, template)
        too_long = len(conditioned.input_ids) > max_length
        if too_long and overlength == "skip":
            pairs.skipped.append(index)
            continue
        room = max_length - prompt_length  # answer tokens the conditioned text can hold
        conditioned, direct = _cut(conditioned, max_length), _cut(direct, tag_length + room)
        if room <= 0 or not conditioned.response_tokens or not direct.response_tokens:
            pairs.skipped.append(index)
            continue
        pairs.kept.append(index)
        pairs.conditioned.append(conditioned)
        pairs.direct.append(direct)
        if too_long:
            pairs.truncated.append(index)
    return pairs


def compute_ifd(
    model: Any,
    tokenizer: Any,
    records: Sequence[InstructionRecord],
    *,
    template: str,
    max_length: int = 512,
    overlength: Overlength = "truncate",
    model_key: str,
    cache: ArtifactCache | None = None,
    console: Console | None = None,
    rows_per_batch: int = 4,
) -> IFDScores:
    """IFD of every record under `model`; cached under (model_key, data, template, max_length, overlength, dtype)."""
    dtype = str(next(model.parameters()).dtype)
    key = content_key(
        kind="ifd",
        engine=SCORING_ENGINE_VERSION,
        model=model_key,
        dtype=dtype,
        template=template,
        max_length=max_length,
        overlength=overlength,
        records=[record.id for record in records],
    )
    if cache is not None:
        # The main process decides for a job of several processes (their caches may be separate disks);
        # every process must call this function, as all of them join the scoring below.
        stored = distributed.from_main(cache.load("ifd", key) if distributed.is_main() else None)
        if stored is not None:
            result = IFDScores.from_json(stored)
            kept = len(records) - len(result.skipped)
            result.stats = ScoringStats(sequences=2 * kept, cached=2 * kept, forward_tokens=stored.get("forward_tokens", 0))
            return result
    kept, conditioned, direct, skipped, truncated = ifd_pairs(records, tokenizer, template, max_length, overlength)
    losses, stats = mean_response_losses(
        model,
        conditioned + direct,
        pad_token_id=tokenizer.pad_token_id,
        capacity=max_length,
        rows_per_batch=rows_per_batch,
        cache=cache,
        cache_key=key,
        console=console,
        description="IFD scoring",
        # conditioned prompts share the template's preamble (one variant with an input, one without)
        prefix_groups=[int(bool(records[k].input.strip())) for k in kept] + [2] * len(kept),
    )
    conditioned_loss = np.full(len(records), np.nan)
    direct_loss = np.full(len(records), np.nan)
    conditioned_loss[kept] = losses[: len(kept)]
    direct_loss[kept] = losses[len(kept) :]
    result = IFDScores(conditioned_loss, direct_loss, skipped, stats, truncated)
    if cache is not None:
        cache.save("ifd", key, result.to_json() | {"forward_tokens": stats.forward_tokens})
    return result


# ----------------------------------------------------------------------------- embeddings


@torch.no_grad()
def embeddings_and_perplexity(
    model: Any, examples: Sequence[TokenizedExample], *, pad_token_id: int, capacity: int = 1024, rows_per_batch: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pooled last hidden state and perplexity of each whole sequence (Cherry's "pre" pass).

    `examples` should carry labels on every token after the first (loss over the whole text)."""
    model.eval()
    device = next(model.parameters()).device
    capacity = max(capacity, max(len(example.input_ids) for example in examples))
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    hidden_size = model.config.hidden_size
    embeddings = np.zeros((len(examples), hidden_size), dtype=np.float32)
    perplexities = np.zeros(len(examples), dtype=np.float64)
    batches = _batches(examples, order, capacity, rows_per_batch)
    processes, rank = distributed.world_size(), distributed.rank()
    mine: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # batch number -> results: dealt out among processes
    with onednn_inference(model):
        for number in range(rank, len(batches), processes):
            batch_rows = batches[number]
            batch = collate_rows([[examples[i] for i in row] for row in batch_rows], pad_token_id)
            batch = on_device(batch, device)
            flat = [i for row in batch_rows for i in row]
            hidden = final_hidden_states(model, batch)
            seq = batch["seq_ids"]
            mask = seq >= 0
            ones = torch.ones(int(mask.sum()), device=device)
            counts = torch.zeros(len(flat), device=device).index_add_(0, seq[mask], ones)
            sums = torch.zeros(len(flat), hidden.shape[-1], device=device).index_add_(0, seq[mask], hidden[mask].float())
            token_losses, token_seq = response_token_losses(model, batch, hidden=hidden)
            loss_sums = torch.zeros(len(flat), device=device).index_add_(0, token_seq, token_losses)
            loss_counts = torch.zeros(len(flat), device=device).index_add_(0, token_seq, torch.ones_like(token_losses))
            mine[number] = (
                (sums / counts[:, None]).cpu().numpy(),
                torch.exp(loss_sums / loss_counts.clamp(min=1)).double().cpu().numpy(),
            )
    for share in distributed.gather(mine):  # [mine] with one process
        for number, (batch_embeddings, batch_perplexities) in share.items():
            flat = [i for row in batches[number] for i in row]
            embeddings[flat] = batch_embeddings
            perplexities[flat] = batch_perplexities
    return embeddings, perplexities


def ifd_range(ifd: np.ndarray, indices: list[int]) -> list[float] | None:
    """[min, max] IFD of the chosen records that were scored (a random control may choose unscored ones)."""
    values = ifd[indices] if indices else np.array([])
    values = values[~np.isnan(values)]
    return [float(values.min()), float(values.max())] if len(values) else None
