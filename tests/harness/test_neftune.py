import math

import torch

from harness.batching import collate_rows
from harness.neftune import neftune_scale, noisy_input_embeddings
from harness.templates import TokenizedExample


def test_noise_scales_per_sequence_inside_packed_rows_and_skips_padding(tiny):
    model, tokenizer = tiny
    short = TokenizedExample(list(range(5, 15)), [-100] * 10)  # L = 10
    long = TokenizedExample(list(range(20, 110)), [-100] * 90)  # L = 90
    alone = TokenizedExample(list(range(30, 70)), [-100] * 40)  # L = 40, padded to 100 in its row
    batch = collate_rows([[short, long], [alone]], tokenizer.pad_token_id)
    alpha, d = 5.0, model.config.hidden_size
    torch.manual_seed(0)
    clean = model.get_input_embeddings()(batch["input_ids"])
    noise = noisy_input_embeddings(model, batch, alpha) - clean
    magnitude = noise.abs().amax(-1)  # per token: max |noise| over d dims -> close to the scale (Uniform(-s, s))
    for (row, start, length) in [(0, 0, 10), (0, 10, 90), (1, 0, 40)]:
        expected = alpha / math.sqrt(length * d)
        tokens = magnitude[row, start : start + length]
        assert torch.all(tokens <= expected * (1 + 1e-5)), (length, tokens.max(), expected)
        assert torch.all(tokens > expected * 0.9)  # the max of 128 uniform draws is near the bound
        # Uniform(-s, s) has standard deviation s / sqrt(3).
        std = noise[row, start : start + length].std().item()
        assert abs(std / (expected / math.sqrt(3)) - 1) < 0.1
    assert torch.all(noise[1, 40:] == 0)  # padding gets no noise
    row_length_scale = alpha / math.sqrt(100 * d)  # what the built-in hook would use for row 0
    assert magnitude[0, :10].min() > 2 * row_length_scale


def test_scale_function_exactly():
    seq_ids = torch.tensor([[0, 0, 1, 1, 1, 1, -1]])
    scale = neftune_scale(seq_ids, hidden_size=4, alpha=2.0)
    expected = [2 / math.sqrt(2 * 4)] * 2 + [2 / math.sqrt(4 * 4)] * 4 + [0.0]
    torch.testing.assert_close(scale[0], torch.tensor(expected))


def test_training_loss_has_noise_only_in_training_mode(tiny, sample_records):
    from harness.templates import tokenize_for_training
    from harness.training import sft_loss

    model, tokenizer = tiny
    examples, _ = tokenize_for_training(sample_records[:3], tokenizer, "chat", 512)
    batch = collate_rows([[examples[0], examples[1]], [examples[2]]], tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        clean, _ = sft_loss(model, batch)
        eval_noisy, _ = sft_loss(model, batch, neftune_alpha=50.0)
        model.train()
        try:
            train_noisy, _ = sft_loss(model, batch, neftune_alpha=50.0)
            train_clean, _ = sft_loss(model, batch)
        finally:
            model.eval()
    assert eval_noisy.item() == clean.item()  # eval mode: no noise at all
    assert abs(train_clean.item() - clean.item()) < 1e-6  # the tiny model has no dropout
    assert abs(train_noisy.item() - clean.item()) > 1e-4  # training mode: the noise changes the loss
