"""lm-eval's log-likelihood requests through the harness's scoring engine: the same numbers as lm-eval's
HFLM (fp32: within 1e-4 + 2e-6 x |log-likelihood| per request, rounding), faster on CPU (BENCHMARKS.md).

`EngineLM` is HFLM (lm_eval/models/huggingface.py, lm-eval 0.4.13) with one method replaced:
`_loglikelihood_tokens` (through harness/compat.py's TokenizedLoglikelihoodHook), which receives
requests already tokenized by HFLM's own code (TemplateLM's
`loglikelihood` and `_encode_pair`: trailing whitespace of the context moved into the continuation,
the pair encoded whole and split, the prefix token for an empty context; HFLM's
`loglikelihood_rolling` windows). Generation (`generate_until`) is HFLM's, untouched. Per request it
computes exactly what HFLM computes: the model input is (context + continuation)[-(max_length + 1):][:-1]
(truncated from the left at the model's context length), the log-likelihood is the sum over the
continuation tokens of log_softmax(logits) (in fp32 here also for a bf16 model), and `is_greedy` says whether the argmax at every
continuation position is the continuation token.

How it is faster (the IFD scorer's mechanisms, harness/losses.py and harness/cpu_kernels.py):
- Requests with the same model input (a multiple-choice item's one-token answers, "A".."D") are one
  sequence, scored at the positions of the longest of their continuations (HFLM's logits cache does
  this too).
- Sequences that share their unscored part (the context of a multiple-choice item's choices) are
  grouped: that part runs once and each choice runs only its continuation's tokens.
- The tokens every sequence of a chunk starts with (a few-shot preamble such as TruthfulQA's six QA
  pairs, MMLU's subject header) run once per chunk.
- No padding: a chunk is one forward pass over one flattened sequence laid out as a prefix tree (the
  chunk's shared tokens, then per item its context and its choices); attention runs per item under a
  mask that lets each token see its ancestors only (harness.losses.AttentionBlock).
- The LM head is applied only at continuation positions (HFLM computes and log-softmaxes the logits of
  every position of every padded row), a few rows at a time, in fp32.
- On CPU in fp32 the linear layers run oneDNN's kernels.
Results equal HFLM's within float rounding (different kernels and summation orders; tests compare).

Models whose attention does not take the per-example path, or whose logits are not the plain LM
head's output (soft-capping, logit scales), fall back to HFLM's own method (`uses_engine` says which).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from harness import cpu_kernels
from harness.compat import TokenizedLoglikelihoodHook
from harness.errors import HarnessError
from harness.losses import (
    _BLOCKS_KWARG,
    _NO_VARLEN,
    AttentionBlock,
    _causal_bias,
    _plain_type,
    _run_varlen,
    causal_lm_parts,
)

ENGINE_MODEL_NAME = "harness-engine"  # the name registered with lm-eval's model registry
MODEL_CLASSES = ("engine", "hflm")  # eval.model_class
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}  # eval.precision
MIN_SHARED_PREFIX = 2  # tokens: a shorter shared part saves nothing
HEAD_ROWS = 64  # scored positions per block of fp32 logits (64 x 49k vocabulary = 12 MB)
CPU_TOKEN_BUDGET = 4096  # tokens per forward pass on CPU: the linear layers are at full speed well before this
GPU_TOKEN_BUDGET = 32768  # on a GPU a pass needs tens of thousands of tokens to fill the device
# Logit transforms after the LM head that the head-only path would skip (Gemma 2, Cohere, Granite).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

Answer = tuple[float, bool]


def token_budget_for(device: torch.device) -> int:
    """Tokens per forward pass of the engine on `device`."""
    return GPU_TOKEN_BUDGET if device.type == "cuda" else CPU_TOKEN_BUDGET


def precision_name(dtype: torch.dtype) -> str:
    """fp32 / bf16 / fp16: how records name a model's evaluation precision."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def model_in_precision(model: Any, precision: str) -> Any:
    """The model in the evaluation precision: itself when its weights already are, else a copy whose
    parameters are cast (buffers such as rotary frequencies stay as they are, as when transformers
    loads a model in a dtype). The caller's model is left untouched for what follows (other sections)."""
    if precision not in PRECISIONS:
        raise HarnessError(f"eval.precision = {precision!r}: use one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if next(model.parameters()).dtype == dtype:
        return model
    converted = copy.deepcopy(model)
    for parameter in converted.parameters():
        parameter.data = parameter.data.to(dtype)
    return converted.eval()


def engine_supports(model: Any) -> bool:
    """Whether the engine reproduces the model's logits: per-example attention and a plain LM head."""
    decoder, head = causal_lm_parts(model)
    config = getattr(decoder, "config", None)
    if config is None or type(decoder) in _NO_VARLEN or head is None:
        return False
    top_config = getattr(model, "config", config)
    if any(getattr(c, name, None) not in (None, 1, 1.0) for c in (config, top_config) for name in _LOGIT_TRANSFORMS):
        return False
    parameter = next(model.parameters())
    device = parameter.device
    probe = [AttentionBlock(0, 2, [(0, 2)], _causal_bias(2, 0, parameter))]
    with torch.no_grad():  # the decoder takes the per-example path: our attention gets the blocks
        output = _run_varlen(decoder, {"input_ids": torch.zeros(1, 2, dtype=torch.long, device=device)},
                             torch.arange(2, device=device).unsqueeze(0), [2], **{_BLOCKS_KWARG: probe})
    return output is not None


# ----------------------------------------------------------------------------- the scoring plan


@dataclass
class _Unit:
    """Sequences scored together: `prefix` (their shared unscored tokens, run once; empty: none) and,
    per sequence, the tokens it runs itself (after the prefix)."""

    prefix: tuple[int, ...]
    members: list[int]


def _plan(
    pairs: Sequence[tuple[list[int], list[int]]], max_length: int, token_budget: int
) -> tuple[list[tuple[int, ...]], list[int], list[tuple[int, int]], list[list[_Unit]]]:
    """(unique model inputs, scored positions per input, per request (input index, continuation length),
    chunks of units). A chunk holds about `token_budget` tokens (prefixes plus sequences)."""
    index: dict[tuple[int, ...], int] = {}
    inputs: list[tuple[int, ...]] = []
    tails: list[int] = []
    owners: list[tuple[int, int]] = []
    for context, continuation in pairs:
        tokens = tuple((context + continuation)[-(max_length + 1) :][:-1])  # HFLM's model input
        number = index.setdefault(tokens, len(inputs))
        if number == len(inputs):
            inputs.append(tokens)
            tails.append(0)
        tails[number] = max(tails[number], len(continuation))
        owners.append((number, len(continuation)))
    groups: dict[tuple[int, ...], list[int]] = {}
    for number, tokens in enumerate(inputs):
        groups.setdefault(tokens[: len(tokens) - tails[number]], []).append(number)
    units: list[_Unit] = []
    for prefix, members in groups.items():
        if len(members) < 2 or len(prefix) < MIN_SHARED_PREFIX:
            units.extend(_Unit((), [number]) for number in members)
            continue
        piece: list[int] = []  # a group too large for one chunk is split; each piece runs the prefix again
        for number in members:
            if piece and len(prefix) + sum(tails[m] for m in piece) + tails[number] > token_budget:
                units.append(_Unit(prefix, piece))
                piece = []
            piece.append(number)
        units.append(_Unit(prefix, piece))
    chunks: list[list[_Unit]] = []
    size = 0
    for unit in units:
        tokens = len(unit.prefix) + sum(len(inputs[m]) - len(unit.prefix) for m in unit.members)
        if chunks and size + tokens <= token_budget:
            chunks[-1].append(unit)
            size += tokens
        else:
            chunks.append([unit])
            size = tokens
    return inputs, tails, owners, chunks


def _head_logits(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    if _plain_type(head) is torch.nn.Linear:
        return cpu_kernels.linear(hidden, head.weight, head.bias)  # oneDNN inside onednn_inference
    return head(hidden)


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    shortest = min(len(sequence) for sequence in sequences)
    first = sequences[0]
    for position in range(shortest):
        token = first[position]
        if any(sequence[position] != token for sequence in sequences):
            return position
    return shortest


def _unit_bias(shared: int, prefix: int, members: list[int], like: torch.Tensor) -> torch.Tensor:
    """The additive mask of one unit's block: its queries are its prefix's tokens, then each member's; its
    keys are the chunk's `shared` tokens, then the same tokens as the queries. Every query sees the shared
    tokens; prefix tokens see the prefix causally; a member's tokens see the whole prefix and their own
    member causally, never another member."""
    size = prefix + sum(members)
    if not members or (prefix == 0 and len(members) == 1):
        return _causal_bias(size, shared, like)
    bias = torch.full((size, shared + size), float("-inf"), dtype=like.dtype, device=like.device)
    bias[:, :shared] = 0
    bias[prefix:, shared : shared + prefix] = 0  # every member sees the whole prefix
    start = 0
    for length in [prefix, *members]:  # the prefix, then each member: causal within itself
        bias[start : start + length, shared + start : shared + start + length] = _causal_bias(length, 0, like)
        start += length
    return bias


@torch.no_grad()
def score_continuations(
    model: Any,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    max_length: int,
    token_budget: int = CPU_TOKEN_BUDGET,
    on_done: Callable[[list[int], list[Answer]], None] | None = None,
) -> list[Answer]:
    """(log-likelihood, is_greedy) of each (context tokens, continuation tokens) pair, as HFLM's
    `_loglikelihood_tokens` computes them. `on_done(request indices, answers)` is called after each
    chunk (lm-eval's request cache stores answers as they come, so a killed evaluation resumes).

    Each chunk is one forward pass over a prefix tree: the tokens every sequence of the chunk starts with
    (a few-shot preamble, a subject header) once, then per unit its shared context once and each member's
    own tokens (AttentionBlock masks keep the branches apart)."""
    model.eval()
    device = next(model.parameters()).device
    decoder, head = causal_lm_parts(model)
    like = torch.empty(0, dtype=next(model.parameters()).dtype, device=device)
    inputs, tails, owners, chunks = _plan(pairs, max_length, token_budget)
    users: dict[int, list[int]] = {}
    for request, (number, _) in enumerate(owners):
        users.setdefault(number, []).append(request)
    answers: list[Answer | None] = [None] * len(pairs)
    with cpu_kernels.onednn_inference(model):
        for chunk in chunks:
            # the chunk's shared tokens: never a scored position, never beyond a unit's own context
            limits = [len(inputs[number]) - tails[number] for unit in chunk for number in unit.members]
            limits += [len(unit.prefix) for unit in chunk if unit.prefix]
            heads = [inputs[unit.members[0]] for unit in chunk]
            shared = min(_common_prefix_length(heads), *limits) if len(chunk) > 1 else 0
            shared = shared if shared >= MIN_SHARED_PREFIX else 0
            ids: list[int] = list(inputs[chunk[0].members[0]][:shared])
            positions: list[int] = list(range(shared))
            blocks = [AttentionBlock(0, shared, [(0, shared)], _causal_bias(shared, 0, like))] if shared else []
            scored_rows: list[int] = []  # flat positions of every scored token, sequence by sequence
            first_row: dict[int, int] = {}  # input index -> index of its first scored row
            for unit in chunk:
                unit_start = len(ids)
                context = max(len(unit.prefix), shared)
                if unit.prefix:
                    ids.extend(unit.prefix[shared:])
                    positions.extend(range(shared, len(unit.prefix)))
                members = []
                for number in unit.members:
                    tokens = inputs[number]
                    first_row[number] = len(scored_rows)
                    end = len(ids) + len(tokens) - context
                    scored_rows.extend(range(end - tails[number], end))
                    ids.extend(tokens[context:])
                    positions.extend(range(context, len(tokens)))
                    members.append(len(tokens) - context)
                key_ranges = [(0, shared), (unit_start, len(ids))] if shared else [(unit_start, len(ids))]
                bias = _unit_bias(shared, context - shared, members, like)
                blocks.append(AttentionBlock(unit_start, len(ids), key_ranges, bias))
            output = _run_varlen(
                decoder,
                {"input_ids": torch.tensor([ids], device=device)},
                torch.tensor([positions], device=device),
                [len(ids)],
                **{_BLOCKS_KWARG: blocks},
            )
            if output is None:
                raise RuntimeError(f"{type(model).__name__}: the scoring engine needs per-example attention")
            hidden = output.last_hidden_state[0, torch.tensor(scored_rows, device=device)]
            # every (request, continuation token): the scored row that predicts it
            requests = [request for number in first_row for request in users[number]]
            pair_rows: list[int] = []
            pair_tokens: list[int] = []
            for request in requests:
                number, length = owners[request]
                last = first_row[number] + tails[number]
                pair_rows.extend(range(last - length, last))
                pair_tokens.extend(pairs[request][1])
            rows = torch.tensor(pair_rows, device=device)
            tokens = torch.tensor(pair_tokens, device=device)
            logprobs = torch.empty(len(pair_rows), dtype=torch.float32, device=device)
            greedy = torch.empty(len(pair_rows), dtype=torch.bool, device=device)
            for start in range(0, hidden.shape[0], HEAD_ROWS):
                # HFLM's F.log_softmax (logits - logsumexp differs from it by up to 1e-5 per token)
                scores = torch.log_softmax(_head_logits(head, hidden[start : start + HEAD_ROWS]).float(), dim=-1)
                best = scores.argmax(dim=-1)
                here = ((rows >= start) & (rows < start + HEAD_ROWS)).nonzero().squeeze(1)
                local = rows[here] - start
                logprobs[here] = scores[local, tokens[here]]
                greedy[here] = best[local] == tokens[here]
            # per request, the fp32 sum HFLM takes (float(logits.sum()) over its continuation's log-probabilities)
            lengths = [owners[request][1] for request in requests]
            done = [
                (float(values.sum()), bool(hits.all()))
                for values, hits in zip(logprobs.split(lengths), greedy.split(lengths), strict=True)
            ]
            for request, answer in zip(requests, done, strict=True):
                answers[request] = answer
            if on_done is not None:
                on_done(requests, done)
    return answers  # type: ignore[return-value]


# ----------------------------------------------------------------------------- the lm-eval model


@register_model(ENGINE_MODEL_NAME)
class EngineLM(TokenizedLoglikelihoodHook, HFLM):
    """HFLM whose log-likelihood requests go through the scoring engine (see the module docstring).

    `token_budget`: tokens per forward pass (prefixes plus sequences); larger on GPUs."""

    def __init__(self, *args: Any, token_budget: int = CPU_TOKEN_BUDGET, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.token_budget = int(token_budget)
        self.uses_engine = self.backend == "causal" and engine_supports(self.model)

    def score_tokenized(  # HFLM's _loglikelihood_tokens (routed here by harness/compat.py)
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[Answer]:
        if not self.uses_engine:
            return self.upstream_loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        for _, context_enc, continuation_enc in requests:  # HFLM's checks
            assert len(context_enc) > 0
            assert len(continuation_enc) > 0
            assert len(continuation_enc) <= self.max_length
        progress = tqdm(total=len(requests), disable=(disable_tqdm or self.rank != 0), desc="Running loglikelihood requests")

        def report(indices: list[int], answers: list[Answer]) -> None:
            for index, answer in zip(indices, answers, strict=True):
                request_str = requests[index][0]
                if request_str is not None:  # rolling windows are reported per document by the caller
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
            progress.update(len(indices))

        try:
            return score_continuations(
                self.model,
                [(context_enc, continuation_enc) for _, context_enc, continuation_enc in requests],
                max_length=self.max_length,
                token_budget=self.token_budget,
                on_done=report,
            )
        finally:
            progress.close()
