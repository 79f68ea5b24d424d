import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.batching import collate_rows
from harness.losses import final_hidden_states
from harness.mixup import confidence, hidden_states_with_prenorm, mixup_loss, random_pairs, split_at_median
from harness.templates import tokenize_for_training


def response_states(model, example):
    """Independent path: one example alone, full forward, states at positions that predict response tokens."""
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    labels = torch.tensor(example.labels)
    positions = [p for p in range(len(labels) - 1) if labels[p + 1] != -100]
    return hidden[positions], labels[[p + 1 for p in positions]]


def test_mixup_loss_matches_an_independent_computation(tiny, sample_records):
    model, tokenizer = tiny
    examples, _ = tokenize_for_training(sample_records[:4], tokenizer, "chat", 512)
    batch = collate_rows([[examples[0], examples[1]], [examples[2], examples[3]]], tokenizer.pad_token_id)
    lambdas = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        states = final_hidden_states(model, batch)
        got = mixup_loss(model, batch, states, lambdas)
    total, count = 0.0, 0
    for pair, lam in enumerate(lambdas.tolist()):
        zc, yc = response_states(model, examples[2 * pair])
        zu, yu = response_states(model, examples[2 * pair + 1])
        m = min(len(yc), len(yu))
        logits = model.lm_head(lam * zc[:m] + (1 - lam) * zu[:m])
        total += (lam * F.cross_entropy(logits, yc[:m], reduction="sum")
                  + (1 - lam) * F.cross_entropy(logits, yu[:m], reduction="sum")).item()
        count += m
    assert abs(got.item() - total / count) < 1e-5


@pytest.mark.parametrize("truncation", ["first", "last"])
def test_the_mixup_loss_selects_by_the_collators_positions_without_waiting_for_the_device(tiny, sample_records, truncation):
    """With the collator's positions and counts the loss and its gradient are bit-identical to the mask path
    (a batch without them), and the forward and loss select nothing by data-dependent size (no nonzero, no
    boolean index, no item): nothing waits for a GPU."""
    from tests.harness.test_batching import data_dependent_selection_watch

    model, tokenizer = tiny
    examples, _ = tokenize_for_training(sample_records[:6], tokenizer, "chat", 512)
    batch = collate_rows([[examples[0], examples[1]], [examples[2], examples[3]], [examples[4], examples[5]]], tokenizer.pad_token_id)
    masked = {k: v for k, v in batch.items() if k not in ("real_positions", "response_positions", "response_counts")}
    lambdas = torch.tensor([0.3, 0.8, 0.55])

    def loss_and_gradient(chosen):
        model.zero_grad()
        loss = mixup_loss(model, chosen, final_hidden_states(model, chosen), lambdas, truncation=truncation)
        loss.backward()
        return loss.detach(), model.lm_head.weight.grad.clone()

    with data_dependent_selection_watch() as watched:
        loss, gradient = loss_and_gradient(batch)
    expected_loss, expected_gradient = loss_and_gradient(masked)
    model.zero_grad()
    assert watched.seen == []
    assert torch.equal(loss, expected_loss) and torch.equal(gradient, expected_gradient)


def test_pre_norm_states_are_normed_before_the_head(tiny, sample_records):
    model, tokenizer = tiny
    examples, _ = tokenize_for_training(sample_records[:2], tokenizer, "chat", 512)
    batch = collate_rows([[examples[0], examples[1]]], tokenizer.pad_token_id)
    with torch.no_grad():
        post, pre = hidden_states_with_prenorm(model, batch)
        torch.testing.assert_close(model.model.norm(pre), post)
        one = torch.tensor([1.0])  # lambda = 1: the mixed state is the confident one
        a = mixup_loss(model, batch, post, one)
        b = mixup_loss(model, batch, pre, one, state_kind="pre-norm")
    assert abs(a.item() - b.item()) < 1e-5


def test_split_is_at_the_median_and_pairs_cover_everyone():
    rng = np.random.default_rng(0)
    perplexities = rng.uniform(1, 50, size=(3, 11))
    conf = confidence(perplexities)
    np.testing.assert_allclose(conf, -perplexities.mean(0))
    confident, unconfident = split_at_median(conf)
    median = np.median(conf)
    assert len(confident) == 5 and len(unconfident) == 6
    assert conf[confident].min() >= median >= conf[unconfident].max()
    pairs = random_pairs(confident, unconfident, seed=1)
    assert {c for c, _ in pairs} == set(confident) and {u for _, u in pairs} == set(unconfident)
    assert all(c in confident and u in unconfident for c, u in pairs)


def _loss_and_grad(model, batch, extra_loss):
    from harness.training import sft_loss

    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss, _ = sft_loss(model, batch, extra_loss=extra_loss)
    loss.backward()
    grad = model.lm_head.weight.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return loss.detach(), grad


def test_sftmix_with_mu_zero_is_exactly_the_one_off_loss_and_mu_changes_the_gradient(tiny, sample_records):
    from recipes.sftmix import SFTMixLoss

    model, tokenizer = tiny
    examples, _ = tokenize_for_training(sample_records[:4], tokenizer, "chat", 512)
    batch = collate_rows([[examples[0], examples[1]], [examples[2], examples[3]]], tokenizer.pad_token_id)
    model.train()
    try:
        one_off, one_off_grad = _loss_and_grad(model, batch, None)
        settings = dict(alpha=0.5, lambda_per="pair", state_kind="post-norm", truncation="first")
        zero, zero_grad = _loss_and_grad(model, batch, SFTMixLoss(mu=0.0, **settings))
        mixed, mixed_grad = _loss_and_grad(model, batch, SFTMixLoss(mu=0.2, **settings))
    finally:
        model.eval()
    assert zero.item() == one_off.item()
    assert torch.equal(zero_grad, one_off_grad)
    assert mixed.item() > one_off.item()  # mu * a positive mixup cross entropy
    assert (mixed_grad - one_off_grad).abs().max().item() > 1e-4
