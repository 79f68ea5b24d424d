import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, LlamaModel

from harness.batching import collate_rows
from harness.losses import (
    _NO_VARLEN,
    _padded_hidden_states,
    causal_lm_parts,
    final_hidden_states,
    head_cross_entropy,
    response_token_losses,
)
from harness.templates import tokenize_for_training


def _packed_batch(tiny, sample_records):
    model, tokenizer = tiny
    examples, _ = tokenize_for_training(sample_records[:9], tokenizer, "chat", 512)
    # Rows of different widths: the last row gets padding, which forms its own position run.
    return collate_rows([examples[:4], examples[4:7], examples[7:]], tokenizer.pad_token_id)


def test_padding_free_attention_matches_the_masked_path(tiny, sample_records):
    model, _ = tiny
    batch = _packed_batch(tiny, sample_records)
    assert (batch["seq_ids"] < 0).any()  # there is padding to drop
    implementation = model.config._attn_implementation
    decoder, _ = causal_lm_parts(model)
    with torch.no_grad():
        fast = final_hidden_states(model, batch)
        reference = _padded_hidden_states(decoder, batch, None)
    assert type(decoder) not in _NO_VARLEN  # the padding-free path ran, not the fallback
    assert model.config._attn_implementation == implementation  # restored after the call
    real = batch["seq_ids"] >= 0
    torch.testing.assert_close(fast[real], reference[real], atol=2e-5, rtol=1e-4)
    assert fast[~real].abs().sum() == 0  # padding is never computed


def test_padding_free_attention_handles_grouped_query_attention(tiny, sample_records):
    model, _ = tiny
    batch = _packed_batch(tiny, sample_records)
    config = copy.deepcopy(model.config)
    config.num_key_value_heads = config.num_attention_heads // 2  # SmolLM2 and Llama-3 use GQA
    torch.manual_seed(0)
    grouped = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        fast = final_hidden_states(grouped, batch)
        reference = _padded_hidden_states(causal_lm_parts(grouped)[0], batch, None)
    real = batch["seq_ids"] >= 0
    torch.testing.assert_close(fast[real], reference[real], atol=2e-5, rtol=1e-4)


def test_padding_free_gradients_match_the_masked_path(tiny, sample_records):
    model, _ = tiny
    batch = _packed_batch(tiny, sample_records)
    decoder, _ = causal_lm_parts(model)
    gradients = []
    for hidden_fn in (lambda m: final_hidden_states(m, batch), lambda m: _padded_hidden_states(causal_lm_parts(m)[0], batch, None)):
        trained = copy.deepcopy(model)
        losses, _ = response_token_losses(trained, batch, hidden=hidden_fn(trained))
        losses.mean().backward()
        gradients.append({name: p.grad for name, p in trained.named_parameters()})
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradient, gradients[1][name], atol=1e-5, rtol=1e-4, msg=name)


class _KwargDroppingModel(LlamaModel):
    """A decoder whose forward drops extra kwargs, as older transformers models do."""

    def forward(self, input_ids=None, position_ids=None, use_cache=None, inputs_embeds=None, **kwargs):
        return super().forward(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache, inputs_embeds=inputs_embeds)


def test_models_that_drop_attention_kwargs_fall_back_to_the_masked_path(tiny, sample_records):
    model, _ = tiny
    batch = _packed_batch(tiny, sample_records)
    dropping = LlamaForCausalLM(model.config)
    dropping.model = _KwargDroppingModel(model.config)
    dropping.load_state_dict(model.state_dict())
    dropping.eval()
    with torch.no_grad():
        fallback = final_hidden_states(dropping, batch)
        expected = final_hidden_states(model, batch)
    assert _KwargDroppingModel in _NO_VARLEN
    real = batch["seq_ids"] >= 0
    torch.testing.assert_close(fallback[real], expected[real], atol=2e-5, rtol=1e-4)


def test_fused_head_cross_entropy_matches_the_unfused_loss_and_gradients():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        head = torch.nn.Linear(16, 50, bias=True).to(dtype)
        hidden = torch.randn(37, 16, dtype=dtype)  # not a multiple of the chunk size
        targets = torch.randint(0, 50, (37,))
        weights = torch.rand(37)  # a non-uniform upstream gradient
        results = []
        for fused in (True, False):
            h = hidden.clone().requires_grad_(True)
            head.zero_grad()
            losses = head_cross_entropy(head, h, targets) if fused else F.cross_entropy(head(h).float(), targets, reduction="none")
            (losses * weights).sum().backward()
            results.append((losses.detach(), h.grad, head.weight.grad.clone(), head.bias.grad.clone()))
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        for ours, reference in zip(*results, strict=True):
            torch.testing.assert_close(ours.float(), reference.float(), atol=tolerance, rtol=tolerance)
        assert results[0][0].dtype == torch.float32


def test_gradient_checkpointing_gives_the_same_gradients(tiny, sample_records):
    """Checkpointed layers are recomputed in backward, after the attention implementation is restored:
    the padding-free path must not be used then, or the recomputation would attend across examples."""
    model, _ = tiny
    batch = _packed_batch(tiny, sample_records)
    gradients = []
    for checkpointing in (False, True):
        trained = copy.deepcopy(model).train()
        if checkpointing:
            if hasattr(trained, "activation_checkpointing_enable"):  # transformers >= 5.x
                trained.activation_checkpointing_enable({"use_reentrant": False})
            else:
                trained.gradient_checkpointing_enable({"use_reentrant": False})
        losses, _ = response_token_losses(trained, batch)
        losses.mean().backward()
        gradients.append({name: p.grad for name, p in trained.named_parameters()})
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradient, gradients[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_kept_per_example_attention_is_recomputed_in_backward(tiny, sample_records, monkeypatch):
    """Inside keep_varlen_attention (train_sft holds it for the whole run), checkpointed layers take the
    padding-free path forward and recompute with it in backward, giving the unchecked gradients."""
    from harness import losses as losses_module

    model, _ = tiny
    batch = _packed_batch(tiny, sample_records)
    calls = []
    real = losses_module.varlen_attention
    monkeypatch.setitem(
        __import__("transformers").AttentionInterface._global_mapping, losses_module.VARLEN_ATTENTION,
        lambda *args, **kwargs: calls.append(torch.is_grad_enabled()) or real(*args, **kwargs),
    )
    plain = copy.deepcopy(model).train()
    response_token_losses(plain, batch)[0].mean().backward()
    checkpointed = copy.deepcopy(model).train()
    if hasattr(checkpointed, "activation_checkpointing_enable"):  # transformers >= 5.x
        checkpointed.activation_checkpointing_enable({"use_reentrant": False})
    else:
        checkpointed.gradient_checkpointing_enable({"use_reentrant": False})
    calls.clear()
    with losses_module.keep_varlen_attention(checkpointed):
        loss = response_token_losses(checkpointed, batch)[0].mean()
        forward = len(calls)
        loss.backward()
    layers = checkpointed.config.num_hidden_layers
    assert forward == layers and len(calls) == 2 * layers  # each layer forward, then recomputed in backward
    assert checkpointed.config._attn_implementation != losses_module.VARLEN_ATTENTION  # restored on exit
    for (name, ours), (_, reference) in zip(checkpointed.named_parameters(), plain.named_parameters(), strict=True):
        torch.testing.assert_close(ours.grad, reference.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_causal_mask_cache_is_bounded_in_bytes(monkeypatch):
    from harness import losses

    monkeypatch.setattr(losses, "CAUSAL_BIAS_CACHE_BYTES", 64 * 1024)  # a 64 KiB budget: 100 x 100 fp32 masks are 40 KB
    losses._CAUSAL_BIASES.clear()
    like = torch.zeros(1)
    first = losses._causal_bias(100, 0, like)
    assert losses._causal_bias(100, 0, like) is first  # reused across layers and batches
    for length in range(50, 120):
        mask = losses._causal_bias(length, 3, like)
        assert mask.shape == (length, length + 3) and losses.causal_bias_cache_bytes() <= 64 * 1024
        assert torch.equal(torch.isinf(mask), torch.ones(length, length + 3).triu(1 + 3).bool())
    assert len(losses._CAUSAL_BIASES) >= 1
    losses._CAUSAL_BIASES.clear()


def test_the_flash_varlen_kernel_is_chosen_only_where_it_applies():
    """On CUDA in bf16/fp16 a packed row's attention is one flash varlen call; everywhere else (the CPU, fp32,
    dropout, oversized heads, scoring's prefix tricks) the eager per-segment loop runs."""
    import torch

    from harness.losses import flash_varlen_applies

    assert flash_varlen_applies("cuda", torch.bfloat16, 0.0, 128, extras=False)
    assert flash_varlen_applies("cuda", torch.float16, 0.0, 64, extras=False)
    assert not flash_varlen_applies("cpu", torch.bfloat16, 0.0, 128, extras=False)
    assert not flash_varlen_applies("cuda", torch.float32, 0.0, 128, extras=False)
    assert not flash_varlen_applies("cuda", torch.bfloat16, 0.1, 128, extras=False)
    assert not flash_varlen_applies("cuda", torch.bfloat16, 0.0, 512, extras=False)
    assert not flash_varlen_applies("cuda", torch.bfloat16, 0.0, 128, extras=True)


def test_on_the_cpu_the_kernel_boundaries_are_not_passed_and_the_loop_runs(tiny):
    """The CPU path is unchanged: no cu_seqlens kwarg reaches the attention, so it cannot pick the kernel."""
    import torch
    from transformers import AttentionInterface

    from harness import losses
    from harness.batching import collate_rows
    from harness.templates import TokenizedExample

    model, _ = tiny
    seen = []
    original = losses.varlen_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get(losses._CU_SEQLENS_KWARG))
        return original(*args, **kwargs)

    AttentionInterface.register(losses.VARLEN_ATTENTION, spy)  # replaces the registered one, for this test
    try:
        batch = collate_rows([[TokenizedExample([5, 6, 7], [-100, 6, 7]), TokenizedExample([8, 9], [-100, 9])]], 0)
        with torch.no_grad():
            losses.final_hidden_states(model, batch)
    finally:
        AttentionInterface.register(losses.VARLEN_ATTENTION, original)
    assert seen and all(bounds is None for bounds in seen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_gpu_cross_entropy_keeps_no_logits_and_gives_the_same_loss_and_gradients(dtype, with_bias):
    """_RecomputedHeadCrossEntropy (the GPU's fused linear cross entropy) against plain F.cross_entropy on the
    materialised logits: same losses and gradients for the hidden states, the head and its bias, in blocks
    of 3 rows (the last one short); its forward saves nothing of size [tokens, vocabulary]."""
    from harness.losses import _RecomputedHeadCrossEntropy, recomputes_logits

    generator = torch.Generator().manual_seed(0)
    tokens, dim, vocab = 25, 8, 50  # dim < tokens: the head itself is smaller than the logits
    hidden = torch.randn(tokens, dim, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=generator) / 4).to(dtype).requires_grad_()
    bias = torch.randn(vocab, generator=generator).to(dtype).requires_grad_() if with_bias else None
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    upstream = torch.rand(tokens, generator=generator)

    saved_sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_sizes.append(t.numel()) or t, lambda t: t):
        losses = _RecomputedHeadCrossEntropy.apply(hidden, weight, bias, targets, 3)
    assert max(saved_sizes) < tokens * vocab  # hidden, head, targets, log-normalizers: no logits
    (losses * upstream).sum().backward()
    ours = [hidden.grad, weight.grad] + ([bias.grad] if with_bias else [])

    leaves = [hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]
    leaves += [bias.detach().clone().requires_grad_()] if with_bias else []
    logits = torch.nn.functional.linear(leaves[0], leaves[1], leaves[2] if with_bias else None).float()
    reference = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    (reference * upstream).sum().backward()
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(losses, reference, **tolerance)
    for mine, theirs in zip(ours, [leaf.grad for leaf in leaves], strict=True):
        assert mine.dtype == dtype
        torch.testing.assert_close(mine.float(), theirs.float(), **tolerance)
    assert not recomputes_logits(hidden)  # the CPU keeps _HeadCrossEntropy
