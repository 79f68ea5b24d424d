import pytest
import torch

from harness import cpu_kernels
from harness.batching import collate_rows
from harness.losses import final_hidden_states, per_example_mean_losses
from harness.scoring import ifd_pairs

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="this torch build has no oneDNN linear op")


def tiny_batch(tiny, sample_records):
    model, tokenizer = tiny
    _, conditioned, direct, _, _ = ifd_pairs(sample_records[:12], tokenizer, "alpaca", 512)
    examples = conditioned + direct
    batch = collate_rows([examples[:8], examples[8:16], examples[16:]], tokenizer.pad_token_id)
    return batch, len(examples)


def test_onednn_forward_equals_torchs_own_path(tiny, sample_records):
    model, _ = tiny
    batch, count = tiny_batch(tiny, sample_records)
    with torch.no_grad():
        hidden = final_hidden_states(model, batch)
        losses = per_example_mean_losses(model, batch, count)
        with cpu_kernels.onednn_inference(model) as switched:
            fast_hidden = final_hidden_states(model, batch)
            fast_losses = per_example_mean_losses(model, batch, count)
    assert switched
    assert (fast_hidden - hidden).abs().max() < 1e-4
    assert (fast_losses - losses).abs().max() < 1e-5
    assert not torch.equal(fast_hidden, hidden), "identical to the last bit: the oneDNN kernels did not run"


def test_swiglu_mlp_is_fused_and_matches_the_module(tiny):
    model, _ = tiny
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 37, model.config.hidden_size)
    with torch.no_grad():
        expected = mlp(x)
        with cpu_kernels.onednn_inference(model):
            assert mlp.forward.func is cpu_kernels._swiglu_forward
            got = mlp(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-5


def test_the_switch_is_undone_and_gradients_keep_torchs_path(tiny):
    model, _ = tiny
    linear = model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, model.config.hidden_size, requires_grad=True)
    with pytest.raises(RuntimeError, match="inside"):
        with cpu_kernels.onednn_inference(model):
            assert "forward" in linear.__dict__
            linear(x).sum().backward()  # gradients on: the plain F.linear path, which has a backward
            assert x.grad is not None
            raise RuntimeError("inside")
    assert not any("forward" in module.__dict__ for module in model.modules())
    assert cpu_kernels._active == 0


def test_other_dtypes_keep_torchs_path(tiny):
    model, _ = tiny
    linear = model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, model.config.hidden_size, dtype=torch.float64)
    with torch.no_grad(), cpu_kernels.onednn_inference(model):
        with pytest.raises(RuntimeError, match="dtype"):  # F.linear's own error: no oneDNN call was tried
            linear(x)


def test_bf16_on_a_cpu_that_emulates_it_gets_a_one_line_warning(monkeypatch):
    from harness import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "native_bf16", lambda: False)
    warning = cpu_kernels.bf16_warning("bf16", "bf16", "cpu")
    assert warning is not None and "\n" not in warning
    assert warning.startswith("training.precision and eval.precision ask for bf16, which this CPU emulates")  # one line
    assert cpu_kernels.bf16_warning("bf16-mixed", "fp32", "cpu").startswith("training.precision asks")
    assert cpu_kernels.bf16_warning("fp32", "fp32", "cpu") is None
    assert cpu_kernels.bf16_warning("bf16", "bf16", "cuda") is None  # GPUs: bf16 is what they are for
    monkeypatch.setattr(cpu_kernels, "native_bf16", lambda: True)
    assert cpu_kernels.bf16_warning("bf16", "bf16", "cpu") is None


def test_native_bf16_reads_the_cpus_flags():
    from pathlib import Path

    from harness import cpu_kernels

    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    assert cpu_kernels.native_bf16() == (" avx512_bf16" in flags or " amx_bf16" in flags)
