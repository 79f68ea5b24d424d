"""Response-token losses on packed or padded batches, shared by the training core and the scorers.

A batch is a dict of (rows, tokens) tensors: input_ids, labels (-100 where no loss), position_ids
(restarting at 0 for every example), and seq_ids (the example index of each token within the batch,
-1 on padding). Three things make this fast on CPU:

- Padding-free, per-example attention: the real tokens of the whole batch are flattened into one
  sequence and attention runs separately over each example (`varlen` attention). Transformers' own
  packed-sequence path instead builds a block-diagonal mask and computes full attention over every
  row, most of it masked away; padding tokens would also go through every layer.
- The LM head is applied only at positions whose next token carries a label: at 49k-token
  vocabularies it is a large share of the FLOPs.
- The cross entropy is fused with the LM head and computed a few rows at a time, so no fp32
  [tokens, vocabulary] tensor is ever written out.

For scoring (no gradients) a prompt prefix shared by many examples (the template's preamble) can be
run once: its keys and values are captured per layer (`shared_prefix_states`) and every example
that starts with it attends to them instead of recomputing them (`SharedPrefixes`).
"""

from __future__ import annotations

import contextlib
import itertools
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import FSDPModule

from harness import cpu_kernels
from harness.compat import attn_implementation, register_attention, set_attn_implementation

VARLEN_ATTENTION = "harness_varlen"
_SEGMENTS_KWARG = "harness_segment_lengths"
_PREFIX_KWARG = "harness_shared_prefixes"  # (SharedPrefixes, prefix index of each segment or -1)
_CAPTURE_KWARG = "harness_capture_kv"  # dict filled with each layer's (key, value)
_BLOCKS_KWARG = "harness_attention_blocks"  # list[AttentionBlock]: scoring's prefix-tree attention (lm_engine)
_CU_SEQLENS_KWARG = "harness_cu_seqlens"  # (int32 cumulative segment lengths on the device, longest segment)
FLASH_VARLEN_DTYPES = (torch.bfloat16, torch.float16)
FLASH_MAX_HEAD_DIM = 256
_NO_VARLEN: set[type] = set()  # model classes whose attention does not receive our kwargs


class _VarlenUnsupported(RuntimeError):
    """The model's attention was called without the segment lengths (its layers drop extra kwargs)."""


@dataclass
class SharedPrefixes:
    """Keys and values of token prefixes shared by many sequences, per attention layer.

    layers[layer_index][prefix] = (key, value), each [heads, prefix length, head dim] after the
    rotary embedding and the grouped-query repeat, exactly as the layer computed them."""

    token_ids: list[list[int]]
    layers: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def length(self, prefix: int) -> int:
        return len(self.token_ids[prefix])


@dataclass
class AttentionBlock:
    """Queries [start, end) of the flattened sequence attend to the keys of `key_ranges` (concatenated in that
    order) under the additive mask `bias` [end - start, keys]. A list of blocks covering the sequence in order
    is a prefix tree: shared tokens run once, in the same pass, and every branch sees them (lm_engine)."""

    start: int
    end: int
    key_ranges: list[tuple[int, int]]
    bias: torch.Tensor


def _block_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: list[AttentionBlock], scale: float
) -> torch.Tensor:
    """Eager attention per block (inference only): [1, heads, tokens, dim] in, [1, tokens, heads, dim] out."""
    outputs = []
    for block in blocks:
        keys = [key[0, :, start:end] for start, end in block.key_ranges]
        values = [value[0, :, start:end] for start, end in block.key_ranges]
        k = keys[0] if len(keys) == 1 else torch.cat(keys, dim=1)
        v = values[0] if len(values) == 1 else torch.cat(values, dim=1)
        q = query[0, :, block.start : block.end]
        probabilities = torch.baddbmm(block.bias, q, k.transpose(1, 2), alpha=scale).softmax(dim=-1)
        outputs.append(torch.bmm(probabilities, v).transpose(0, 1))
    return torch.cat(outputs, dim=0).unsqueeze(0)


_CAUSAL_BIASES: OrderedDict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = OrderedDict()
# The masks kept for reuse across layers and batches, in bytes: a packed row of 4096 tokens has one mask of
# 4096^2 x 4 bytes = 64 MiB in fp32, so a cache counted in entries could hold gigabytes on a long-context run.
CAUSAL_BIAS_CACHE_BYTES = 256 * 2**20


def _causal_bias(length: int, seen: int, like: torch.Tensor) -> torch.Tensor:
    """[length, seen + length] additive mask: all `seen` (shared-prefix) keys visible, then causal.
    Kept across layers and batches, least recently used dropped first beyond CAUSAL_BIAS_CACHE_BYTES."""
    key = (length, seen, like.dtype, like.device)
    bias = _CAUSAL_BIASES.get(key)
    if bias is not None:
        _CAUSAL_BIASES.move_to_end(key)
        return bias
    bias = torch.full((length, length + seen), float("-inf"), dtype=like.dtype, device=like.device).triu_(1 + seen)
    _CAUSAL_BIASES[key] = bias
    while len(_CAUSAL_BIASES) > 1 and causal_bias_cache_bytes() > CAUSAL_BIAS_CACHE_BYTES:
        _CAUSAL_BIASES.popitem(last=False)
    return bias


def causal_bias_cache_bytes() -> int:
    return sum(bias.numel() * bias.element_size() for bias in _CAUSAL_BIASES.values())


def flash_varlen_applies(device_type: str, dtype: torch.dtype, dropout: float, head_dim: int, extras: bool) -> bool:
    """Whether a packed row's attention runs through torch's flash varlen kernel: on CUDA, in a half
    precision (flash kernels have no fp32), without dropout (the kernel takes none) and for head sizes it
    supports; scoring's shared prefixes, prefix trees and key/value capture keep the eager loop."""
    return (
        device_type == "cuda" and dtype in FLASH_VARLEN_DTYPES and dropout == 0.0 and head_dim <= FLASH_MAX_HEAD_DIM
        and not extras
    )  # fmt: skip


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each segment of one flattened sequence ([1, heads, tokens, dim]).

    Registered as a transformers attention implementation; the segment lengths come in as a kwarg.
    Per segment it is eager attention in the model dtype (scale and causal mask fused into one
    baddbmm; torch's softmax accumulates in fp32 and is bit-identical to an fp32 softmax rounded
    to bf16): at these lengths (tens to hundreds of tokens) that is
    faster on CPU, forward plus backward, than torch's flash-attention kernel (about 2x in our
    measurements). torch.split keeps the backward to one concatenation.

    On a GPU in bf16/fp16 the same attention runs as one call of torch's flash varlen kernel over the
    whole flattened sequence (the segments' `cu_seqlens` come in as a kwarg; grouped-query heads are not
    repeated): see `flash_varlen_applies`. perf/gpu_acceptance.sh measures it against this loop."""
    lengths = kwargs.get(_SEGMENTS_KWARG)
    if lengths is None:
        raise _VarlenUnsupported(type(module).__name__)
    dropout = dropout if module.training else 0.0
    bounds = kwargs.get(_CU_SEQLENS_KWARG)
    extras = any(kwargs.get(name) is not None for name in (_CAPTURE_KWARG, _PREFIX_KWARG, _BLOCKS_KWARG))
    if bounds is not None and flash_varlen_applies(query.device.type, query.dtype, dropout, query.shape[-1], extras):
        from torch.nn.attention.varlen import varlen_attn

        cu_seqlens, longest = bounds
        output = varlen_attn(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu_seqlens, cu_seqlens,
            longest, longest, scale=scaling, window_size=(-1, 0), enable_gqa=query.shape[1] != key.shape[1],
        )  # fmt: skip
        return output.unsqueeze(0), None  # [tokens, heads, dim] -> [1, tokens, heads, dim]
    if isinstance(lengths, SegmentLengths):
        lengths = lengths.values()
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: one repeat for the whole sequence, not one per segment
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    capture = kwargs.get(_CAPTURE_KWARG)
    if capture is not None:
        capture[module.layer_idx] = (key[0], value[0])
    shared, segment_prefixes = kwargs.get(_PREFIX_KWARG) or (None, None)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    blocks = kwargs.get(_BLOCKS_KWARG)
    if blocks is not None:
        return _block_attention(query, key, value, blocks, scale), None
    outputs = []
    segments = zip(query[0].split(lengths, dim=1), key[0].split(lengths, dim=1), value[0].split(lengths, dim=1), strict=True)
    for number, (q, k, v) in enumerate(segments):
        length = q.shape[1]  # q, k, v: [heads, length, dim]
        prefix = segment_prefixes[number] if segment_prefixes is not None else -1
        seen = 0
        if prefix >= 0:  # the segment continues a shared prefix: attend to its stored keys and values too
            prefix_key, prefix_value = shared.layers[module.layer_idx][prefix]
            k, v, seen = torch.cat([prefix_key, k], dim=1), torch.cat([prefix_value, v], dim=1), prefix_key.shape[1]
        probabilities = torch.baddbmm(_causal_bias(length, seen, q), q, k.transpose(1, 2), alpha=scale).softmax(dim=-1)
        if dropout > 0:
            probabilities = F.dropout(probabilities, p=dropout, training=True)
        outputs.append(torch.bmm(probabilities, v).transpose(0, 1))
    return torch.cat(outputs, dim=0).unsqueeze(0), None  # [1, tokens, heads, dim], as transformers expects


def causal_lm_parts(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder stack, LM head) of a causal LM, also through a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    return decoder, base.get_output_embeddings()


def _recomputes_in_backward(module: torch.nn.Module) -> bool:
    return getattr(module, "gradient_checkpointing", False) or isinstance(module, CheckpointWrapper)


def _plain_type(module: torch.nn.Module) -> type:
    """The module's own class: FSDP2 (fully_shard) swaps it for a subclass FSDP<name>."""
    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def _padded_hidden_states(
    decoder: torch.nn.Module, batch: dict[str, torch.Tensor], inputs_embeds: torch.Tensor | None
) -> torch.Tensor:
    """Transformers' own packed path (block-diagonal mask from position_ids): the fallback."""
    if inputs_embeds is not None:
        output = decoder(inputs_embeds=inputs_embeds, position_ids=batch["position_ids"], use_cache=False)
    else:
        output = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    return output.last_hidden_state


class SegmentLengths:
    """The segments' lengths behind `cu_seqlens` on the GPU, copied to the host only when asked: the flash
    kernel takes the bounds as they are, only the per-segment loop needs the lengths as numbers."""

    def __init__(self, cu_seqlens: torch.Tensor):
        self.cu_seqlens = cu_seqlens
        self._values: list[int] | None = None

    def values(self) -> list[int]:
        if self._values is None:
            self._values = self.cu_seqlens.diff().tolist()
        return self._values


def _segment_lengths(seq_ids: torch.Tensor, positions: torch.Tensor) -> list[int]:
    """Lengths of the consecutive examples in a flattened sequence of real tokens."""
    starts = positions == 0
    starts[1:] |= seq_ids[1:] != seq_ids[:-1]
    starts[0] = True
    bounds = starts.nonzero().squeeze(1).tolist() + [int(seq_ids.numel())]
    return [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


def _run_varlen(
    decoder: torch.nn.Module, inputs: dict[str, torch.Tensor], positions: torch.Tensor, lengths: list[int], **extra: Any
) -> Any:
    """The decoder's output with per-segment attention, or None when its layers drop our kwargs."""
    config = decoder.config
    register_attention(VARLEN_ATTENTION, varlen_attention)
    previous = attn_implementation(config)
    set_attn_implementation(config, VARLEN_ATTENTION)
    try:
        return decoder(**inputs, position_ids=positions, use_cache=False, **{_SEGMENTS_KWARG: lengths}, **extra)
    except _VarlenUnsupported:
        _NO_VARLEN.add(type(decoder))
        previous = getattr(config, _OUTSIDE_ATTR, previous)  # inside keep_varlen_attention: the model's own, for good
        return None
    finally:
        set_attn_implementation(config, previous)


_OUTSIDE_ATTR = "_harness_attn_outside"  # the model's own attention implementation, while keep_varlen_attention holds


@contextlib.contextmanager
def keep_varlen_attention(model: Any) -> Iterator[None]:
    """Keep the per-example attention selected for a whole training run.

    Outside this block it is selected only while the loss's forward runs. Layers that are recomputed in
    the backward pass (gradient checkpointing; FSDP's activation checkpointing) would then recompute with
    the model's own attention over the whole flattened sequence, across examples, so without this block
    checkpointed training takes the padded path (correct, slower). Inside it they recompute exactly as
    they ran forward. The model's own implementation is restored on exit."""
    decoder, _ = causal_lm_parts(model)
    config = getattr(decoder, "config", None)
    if config is None or type(decoder) in _NO_VARLEN or attn_implementation(config) == VARLEN_ATTENTION:
        yield
        return
    register_attention(VARLEN_ATTENTION, varlen_attention)
    outside = attn_implementation(config)
    setattr(config, _OUTSIDE_ATTR, outside)
    set_attn_implementation(config, VARLEN_ATTENTION)
    try:
        yield
    finally:
        if attn_implementation(config) == VARLEN_ATTENTION:
            set_attn_implementation(config, outside)
        delattr(config, _OUTSIDE_ATTR)


@torch.no_grad()
def shared_prefix_states(model: Any, token_ids: list[list[int]]) -> SharedPrefixes | None:
    """Run each shared prefix once and keep every layer's keys and values (None: not supported here)."""
    decoder, _ = causal_lm_parts(model)
    if type(decoder) in _NO_VARLEN or not hasattr(decoder, "config"):
        return None
    device = next(model.parameters()).device
    shared = SharedPrefixes([list(ids) for ids in token_ids])
    for ids in shared.token_ids:
        captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        inputs = {"input_ids": torch.tensor([ids], device=device)}
        positions = torch.arange(len(ids), device=device).unsqueeze(0)
        if _run_varlen(decoder, inputs, positions, [len(ids)], **{_CAPTURE_KWARG: captured}) is None:
            return None
        for layer, key_value in captured.items():
            shared.layers.setdefault(layer, []).append(key_value)
    return shared


def final_hidden_states(
    model: Any,
    batch: dict[str, torch.Tensor],
    inputs_embeds: torch.Tensor | None = None,
    shared_prefixes: tuple[SharedPrefixes, list[int]] | None = None,
) -> torch.Tensor:
    """Last hidden states [rows, tokens, hidden]; zeros at padding (seq_ids -1).

    Runs padding-free with per-example attention when the model's layers pass attention kwargs
    through (Llama, Mistral, Qwen2, ... in transformers 5), else falls back to the masked path.
    With `shared_prefixes` (the prefixes and, per example in batch order, the index of the prefix
    it continues or -1), each example's tokens are the ones after its prefix and its position_ids
    start at the prefix length."""
    decoder, _ = causal_lm_parts(model)
    # Gradient checkpointing (transformers', or FSDP's activation checkpointing, which wraps the layers)
    # would recompute the layers after the attention implementation is restored, unless
    # keep_varlen_attention holds it for the whole run.
    checkpointing = decoder.training and any(_recomputes_in_backward(m) for m in decoder.modules())
    kept = hasattr(decoder, "config") and attn_implementation(decoder.config) == VARLEN_ATTENTION
    if type(decoder) in _NO_VARLEN or (checkpointing and not kept) or not hasattr(decoder, "config"):
        if shared_prefixes is not None:
            raise RuntimeError(f"{type(decoder).__name__} cannot run with shared prefixes (no varlen attention)")
        return _padded_hidden_states(decoder, batch, inputs_embeds)
    rows, width = batch["input_ids"].shape
    if "seq_ids" in batch:
        seq_ids = batch["seq_ids"].reshape(-1)
    else:
        seq_ids = torch.zeros(rows * width, dtype=torch.long, device=batch["input_ids"].device)
    # the collator's positions and bounds (harness.batching.collate_rows): nothing here waits for the device;
    # batches built elsewhere get them computed here
    real = batch.get("real_positions")
    if real is None:
        real = (seq_ids >= 0).nonzero().squeeze(1)
    positions = batch["position_ids"].reshape(-1)[real]
    cu_seqlens = batch.get("cu_seqlens")
    lengths: list[int] | SegmentLengths
    if cu_seqlens is None:
        lengths = _segment_lengths(seq_ids[real], positions)
    elif cu_seqlens.device.type == "cuda":
        lengths = SegmentLengths(cu_seqlens)  # read back only if the per-segment loop runs (fp32 on a GPU)
    else:
        lengths = cu_seqlens.diff().tolist()
    inputs: dict[str, torch.Tensor] = (
        {"inputs_embeds": inputs_embeds.reshape(rows * width, -1)[real].unsqueeze(0)}
        if inputs_embeds is not None
        else {"input_ids": batch["input_ids"].reshape(-1)[real].unsqueeze(0)}
    )
    extra: dict[str, Any] = {_PREFIX_KWARG: shared_prefixes} if shared_prefixes is not None else {}
    if positions.device.type == "cuda":  # the flash varlen kernel's boundaries, on the device once per forward
        if isinstance(lengths, SegmentLengths):
            longest = batch["max_seqlen"] if isinstance(batch.get("max_seqlen"), int) else max(lengths.values())
        else:
            longest = max(lengths)
            cu_seqlens = cu_seqlens if cu_seqlens is not None else torch.tensor([0, *itertools.accumulate(lengths)])
        extra[_CU_SEQLENS_KWARG] = (cu_seqlens.to(positions.device, torch.int32, non_blocking=True), longest)
    flat = _run_varlen(decoder, inputs, positions.unsqueeze(0), lengths, **extra)
    if flat is None:
        if shared_prefixes is not None:
            raise RuntimeError(f"{type(decoder).__name__} cannot run with shared prefixes (no varlen attention)")
        return _padded_hidden_states(decoder, batch, inputs_embeds)
    flat_hidden = flat.last_hidden_state[0]
    if real.numel() == rows * width:
        return flat_hidden.view(rows, width, -1)
    hidden = flat_hidden.new_zeros(rows * width, flat_hidden.shape[-1]).index_copy(0, real, flat_hidden)
    return hidden.view(rows, width, -1)


class _HeadCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy of hidden @ weight.T (+ bias) against targets.

    Numerically the same as F.cross_entropy(head(hidden).float(), targets) (logsumexp in fp32), but
    the fp32 [tokens, vocab] tensors only ever exist a few rows at a time: the unfused version writes
    and rereads several of them (upcast logits, log-probabilities, their gradient), which on CPU costs
    a large fraction of the LM head's own matmul time and hundreds of MB."""

    CHUNK = 16  # rows per fp32 block: small enough to stay in cache

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):  # type: ignore[override]
        logits = cpu_kernels.linear(hidden, weight, bias)  # model dtype (or the autocast dtype)
        log_normalizers = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        losses = torch.empty_like(log_normalizers)
        for start in range(0, logits.shape[0], _HeadCrossEntropy.CHUNK):
            rows = slice(start, start + _HeadCrossEntropy.CHUNK)
            block = logits[rows].float()
            log_normalizers[rows] = torch.logsumexp(block, dim=-1)
            losses[rows] = log_normalizers[rows] - block.gather(1, targets[rows, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, targets, logits, log_normalizers)
        ctx.has_bias = bias is not None
        return losses

    @staticmethod
    def backward(ctx, grad_losses):  # type: ignore[override]
        hidden, weight, targets, logits, log_normalizers = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], _HeadCrossEntropy.CHUNK):
            rows = slice(start, start + _HeadCrossEntropy.CHUNK)
            block = logits[rows].float().sub_(log_normalizers[rows, None]).exp_()  # softmax
            block.scatter_add_(1, targets[rows, None], block.new_full((block.shape[0], 1), -1.0))
            grad_logits[rows] = block.mul_(grad_losses[rows, None])
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_logits @ weight.to(grad_logits.dtype)).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_logits.t() @ hidden.to(grad_logits.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_logits.sum(0).to(weight.dtype)
        return grad_hidden, grad_weight, grad_bias, None


class _RecomputedHeadCrossEntropy(torch.autograd.Function):
    """The GPU's fused linear cross entropy (the scheme of Liger's and Apple's cut-cross-entropy kernels, in
    plain torch): no [tokens, vocabulary] tensor outlives a block of rows. The forward keeps only each row's
    log-normalizer; the backward recomputes a block's logits, turns them into the gradient and folds it into
    the hidden states' and the head's gradients. A Llama-3 batch of 16k response tokens would otherwise keep
    4 GB of bf16 logits for the backward. One extra head matmul per block is the price: on the CPU, where
    memory is not the limit, _HeadCrossEntropy keeps the logits instead."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows_per_block):  # type: ignore[override]
        log_normalizers = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        losses = torch.empty_like(log_normalizers)
        compute_dtype = hidden.dtype
        for start in range(0, hidden.shape[0], rows_per_block):
            rows = slice(start, start + rows_per_block)
            block = F.linear(hidden[rows], weight, bias)
            compute_dtype = block.dtype  # the autocast dtype under mixed precision
            block = block.float()
            log_normalizers[rows] = torch.logsumexp(block, dim=-1)
            losses[rows] = log_normalizers[rows] - block.gather(1, targets[rows, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, bias, targets, log_normalizers)
        ctx.rows_per_block, ctx.compute_dtype = rows_per_block, compute_dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):  # type: ignore[override]
        hidden, weight, bias, targets, log_normalizers = ctx.saved_tensors
        dtype = ctx.compute_dtype
        weight_c = weight.to(dtype)
        bias_c = bias.to(dtype) if bias is not None else None
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_bias = None
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        for start in range(0, hidden.shape[0], ctx.rows_per_block):
            rows = slice(start, start + ctx.rows_per_block)
            block_hidden = hidden[rows].to(dtype)
            block = F.linear(block_hidden, weight_c, bias_c).float().sub_(log_normalizers[rows, None]).exp_()  # softmax
            block.scatter_add_(1, targets[rows, None], block.new_full((block.shape[0], 1), -1.0))
            grad_logits = block.mul_(grad_losses[rows, None]).to(dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits @ weight_c).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ block_hidden).float()
            if grad_bias is not None:
                grad_bias += grad_logits.float().sum(0)
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            None,
            None,
        )


RECOMPUTE_BLOCK_ELEMENTS = 1 << 26  # fp32 logits per block on a GPU: 256 MB (about 520 rows at 128k vocabulary)


def recomputes_logits(hidden: torch.Tensor) -> bool:
    """GPU batches take the fused linear cross entropy that keeps no logits; the CPU keeps them (faster there)."""
    return hidden.device.type == "cuda"


def head_cross_entropy(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy (float32) of the LM head's logits at `hidden` [N, dim] against `targets` [N]."""
    if _plain_type(head) is torch.nn.Linear:
        if recomputes_logits(hidden):
            rows_per_block = max(16, RECOMPUTE_BLOCK_ELEMENTS // head.weight.shape[0])
            return _RecomputedHeadCrossEntropy.apply(hidden, head.weight, head.bias, targets, rows_per_block)
        return _HeadCrossEntropy.apply(hidden, head.weight, head.bias, targets)
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")  # e.g. a LoRA-wrapped head


def response_token_losses(
    model: Any, batch: dict[str, torch.Tensor], hidden: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross entropy at every labelled position, and the batch-local example index of each.

    Returns (losses [N] float32, seq_index [N]) for the N labelled target tokens of the batch."""
    if hidden is None:
        hidden = final_hidden_states(model, batch)
    _, head = causal_lm_parts(model)
    selected = batch.get("response_positions")
    if selected is None:  # a batch not built by the collator: select by mask (waits for the device)
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        return head_cross_entropy(head, hidden[:, :-1][mask], targets[mask]), batch["seq_ids"][:, 1:][mask]
    # the same tokens in the same order, by index: position p predicts the label at p + 1
    following = selected + 1
    losses = head_cross_entropy(
        head, hidden.reshape(-1, hidden.shape[-1]).index_select(0, selected), batch["labels"].reshape(-1).index_select(0, following)
    )
    return losses, batch["seq_ids"].reshape(-1).index_select(0, following)


def per_example_mean_losses(
    model: Any,
    batch: dict[str, torch.Tensor],
    num_examples: int,
    shared_prefixes: tuple[SharedPrefixes, list[int]] | None = None,
) -> torch.Tensor:
    """Mean response-token loss of each example in the batch (float32, [num_examples])."""
    hidden = final_hidden_states(model, batch, shared_prefixes=shared_prefixes) if shared_prefixes is not None else None
    losses, seq_index = response_token_losses(model, batch, hidden=hidden)
    totals = torch.zeros(num_examples, dtype=torch.float32, device=losses.device).index_add_(0, seq_index, losses)
    counts = torch.zeros(num_examples, dtype=torch.float32, device=losses.device).index_add_(
        0, seq_index, torch.ones_like(losses)
    )
    return totals / counts.clamp(min=1)
