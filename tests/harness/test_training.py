import copy

import pytest
import torch
import torch.nn.functional as F

from harness.batching import collate_rows
from harness.losses import per_example_mean_losses, response_token_losses
from harness.spec import TrainingSpec
from harness.templates import render_prompt, tokenize_for_training
from harness.training import MasterWeightAdamW, train_sft


def test_prompt_tokens_carry_no_loss(tiny, sample_records):
    model, tokenizer = tiny
    examples, _ = tokenize_for_training(sample_records[:4], tokenizer, "chat", 512)
    for record, example in zip(sample_records[:4], examples, strict=False):
        prompt_ids = tokenizer(render_prompt(record, "chat", tokenizer), add_special_tokens=False).input_ids
        n_prompt = len(prompt_ids)
        assert example.input_ids[:n_prompt] == prompt_ids
        assert example.labels[:n_prompt] == [-100] * n_prompt
        assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
        assert example.labels[-1] == tokenizer.eos_token_id
    # The loss equals cross entropy over the response positions of the full logits, and nothing else.
    batch = collate_rows([[examples[0]]], tokenizer.pad_token_id)
    with torch.no_grad():
        losses, _ = response_token_losses(model, batch)
        logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
    targets = torch.tensor(examples[0].labels[1:])
    expected = F.cross_entropy(logits[targets != -100], targets[targets != -100], reduction="none")
    assert losses.shape == expected.shape
    torch.testing.assert_close(losses, expected, atol=1e-5, rtol=1e-5)


def test_packing_gives_the_same_per_example_losses(tiny, sample_records):
    model, tokenizer = tiny
    examples, _ = tokenize_for_training(sample_records[:12], tokenizer, "chat", 512)
    lengths = sorted(len(e.input_ids) for e in examples)
    assert lengths[-1] > 2 * lengths[0]  # very different lengths share a row
    with torch.no_grad():
        alone = torch.stack([per_example_mean_losses(model, collate_rows([[e]], tokenizer.pad_token_id), 1)[0]
                             for e in examples])
        packed = per_example_mean_losses(
            model, collate_rows([examples[:5], examples[5:9], examples[9:]], tokenizer.pad_token_id), len(examples)
        )
        padded = per_example_mean_losses(model, collate_rows([[e] for e in examples], tokenizer.pad_token_id), len(examples))
    assert (alone - packed).abs().max().item() < 1e-5
    assert (alone - padded).abs().max().item() < 1e-5


def test_training_lowers_the_loss_and_is_deterministic(tiny, sample_records, tmp_path):
    model, tokenizer = tiny
    examples, _ = tokenize_for_training(sample_records[:96], tokenizer, "chat", 256)
    settings = TrainingSpec(learning_rate=3e-3, max_steps=12, batch_size=4, logging_steps=3, save_steps=0, warmup_ratio=0.0)
    batch = collate_rows([[e] for e in examples[:16]], tokenizer.pad_token_id)
    with torch.no_grad():
        before = per_example_mean_losses(model, batch, 16).mean().item()
    trained, result = train_sft(copy.deepcopy(model), tokenizer, examples, settings, tmp_path / "a", seed=3)
    with torch.no_grad():
        after = per_example_mean_losses(trained, batch, 16).mean().item()
    assert after < before - 0.5, (before, after)
    assert result.loss_curve[-1][1] < result.loss_curve[0][1]
    assert result.steps == 12 and result.response_tokens > 0 and result.real_tokens > result.response_tokens
    _, again = train_sft(copy.deepcopy(model), tokenizer, examples, settings, tmp_path / "b", seed=3)
    assert again.loss_curve == result.loss_curve


def test_master_weights_keep_updates_that_bf16_would_lose():
    start = torch.full((64,), 1.0)
    plain = torch.nn.Parameter(start.clone().to(torch.bfloat16))
    mastered = torch.nn.Parameter(start.clone().to(torch.bfloat16))
    plain_opt = torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0)
    master_opt = MasterWeightAdamW([{"params": [mastered]}], lr=1e-4, weight_decay=0.0)
    for _ in range(50):
        for parameter, optimizer in ((plain, plain_opt), (mastered, master_opt)):
            optimizer.zero_grad()
            parameter.grad = torch.ones_like(parameter)
            optimizer.step()
    # Each Adam step moves ~1e-4, below bf16's spacing at 1.0 (2^-7): bf16 AdamW never moves.
    assert torch.equal(plain.detach().float(), start)
    master = master_opt.pairs[0][1]
    assert abs(master[0].item() - (1.0 - 50 * 1e-4)) < 1e-5
    assert mastered.detach().float()[0].item() < 1.0
    state = master_opt.state_dict()
    assert state["master_weights"][0].data_ptr() == master.data_ptr()  # by reference: a save needs no second copy
    restored = MasterWeightAdamW([{"params": [torch.nn.Parameter(start.clone().to(torch.bfloat16))]}], lr=1e-4)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.pairs[0][1], master)


@pytest.mark.parametrize("chunk_elements", [MasterWeightAdamW.CHUNK_ELEMENTS, 30])
def test_master_weight_adamw_follows_torch_adamw(chunk_elements, monkeypatch):
    """On fp32 parameters the master copy is exact, so the chunked fused optimizer must match AdamW,
    also when a parameter has no gradient in some step (AdamW skips it)."""
    monkeypatch.setattr(MasterWeightAdamW, "CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 7)]
    reference = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in reference]
    settings = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    reference_opt = torch.optim.AdamW(
        [{"params": reference[:2], "weight_decay": 0.1}, {"params": reference[2:], "weight_decay": 0.0}], **settings
    )
    our_opt = MasterWeightAdamW(
        [{"params": ours[:2], "weight_decay": 0.1}, {"params": ours[2:], "weight_decay": 0.0}], **settings
    )
    assert len(our_opt.chunks) == (2 if chunk_elements > 100 else 3)
    for step in range(5):
        gradients = [torch.randn(shape) for shape in shapes]
        for parameters, optimizer in ((reference, reference_opt), (ours, our_opt)):
            optimizer.zero_grad()
            for number, (parameter, gradient) in enumerate(zip(parameters, gradients, strict=True)):
                parameter.grad = None if (step == 2 and number == 1) else gradient.clone()
            optimizer.step()
        for expected, actual in zip(reference, ours, strict=True):
            torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5, msg=f"step {step}")


def test_sftmix_term_with_mu_zero_is_exactly_the_one_off_loss_and_otherwise_changes_the_gradient(tiny, sample_records):
    from harness.training import sft_loss
    from recipes.sftmix import SFTMixLoss

    model, tokenizer = tiny
    model = copy.deepcopy(model).train()
    examples, _ = tokenize_for_training(sample_records[:4], tokenizer, "chat", 512)
    batch = collate_rows([[examples[0], examples[1]], [examples[2], examples[3]]], tokenizer.pad_token_id)

    def loss_and_grad(extra):
        model.zero_grad()
        torch.manual_seed(0)
        loss, _ = sft_loss(model, batch, extra_loss=extra)
        loss.backward()
        return loss.detach(), model.lm_head.weight.grad.clone()

    plain_loss, plain_grad = loss_and_grad(None)
    zero_loss, zero_grad = loss_and_grad(SFTMixLoss(0.0, 0.5, "pair", "post-norm", "first"))
    assert torch.equal(plain_loss, zero_loss) and torch.equal(plain_grad, zero_grad)
    mixed_loss, mixed_grad = loss_and_grad(SFTMixLoss(0.2, 0.5, "pair", "post-norm", "first"))
    assert mixed_loss > plain_loss
    assert (mixed_grad - plain_grad).abs().max() > 1e-4


def test_neftune_noise_only_while_training(tiny, sample_records):
    from harness.training import sft_loss

    model, tokenizer = tiny
    model = copy.deepcopy(model)
    examples, _ = tokenize_for_training(sample_records[:3], tokenizer, "chat", 512)
    batch = collate_rows([examples], tokenizer.pad_token_id)
    with torch.no_grad():
        model.eval()
        clean, _ = sft_loss(model, batch)
        eval_noisy, _ = sft_loss(model, batch, neftune_alpha=5.0)
        model.train()
        train_clean, _ = sft_loss(model, batch)
        train_noisy, _ = sft_loss(model, batch, neftune_alpha=5.0)
    assert torch.equal(clean, eval_noisy)  # absent in eval mode
    assert not torch.equal(train_clean, train_noisy)


def test_bf16_training_keeps_rope_buffers_in_fp32_so_the_saved_model_computes_the_same(tiny, sample_records, tmp_path):
    """Pure bf16 casts the weights only: a model.to(bfloat16) would put RoPE's inv_freq in bf16 too, and
    the same weights loaded with from_pretrained (fp32 inv_freq) would then give other logits - a stage
    reloaded on resume, or the saved model/ evaluated later, would not reproduce the run."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny
    examples, _ = tokenize_for_training(sample_records[:16], tokenizer, "chat", 256)
    settings = TrainingSpec(learning_rate=3e-3, max_steps=2, batch_size=4, save_steps=0, precision="bf16")
    trained, _ = train_sft(copy.deepcopy(model), tokenizer, examples, settings, tmp_path / "run", seed=0)
    assert {p.dtype for p in trained.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in trained.buffers()} == {torch.float32}
    trained.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16).eval()
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        assert torch.equal(trained.eval()(ids).logits, reloaded(ids).logits)


def test_optimizer_steps_are_max_steps_or_the_epochs_share_rounded_up(monkeypatch):
    """The step count train_sft gives the Trainer, and SFTMix places its checkpoints by."""
    from harness.training import optimizer_steps

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    settings = TrainingSpec(batch_size=4, gradient_accumulation_steps=2)  # 8 rows a step
    assert optimizer_steps(20, settings.model_copy(update={"epochs": 1.0})) == 3
    assert optimizer_steps(20, settings.model_copy(update={"epochs": 1.5})) == 5  # ceil(3 x 1.5)
    assert optimizer_steps(20, settings.model_copy(update={"max_steps": 7})) == 7
