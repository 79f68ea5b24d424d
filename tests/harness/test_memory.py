"""The pre-flight memory estimate (harness/memory.py): exact parameter counts, the estimate against measured
peak memory, the refusal of configurations that cannot fit, and gradient checkpointing (same loss, same run id)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.cpu_kernels import native_bf16
from harness.errors import HarnessError
from harness.memory import (
    GIB,
    ModelShape,
    check_training_fits,
    estimate_training,
    fit_problem,
    gathered_model_problem,
    lora_parameters,
)
from harness.spec import RunSpec, TrainingSpec

REPO_ROOT = Path(__file__).resolve().parents[2]

# Public config.json values (huggingface.co/meta-llama/Meta-Llama-3-8B and HuggingFaceTB/SmolLM2-135M-Instruct).
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}
LLAMA3_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
H100 = 80 * 10**9  # bytes on an 80 GB card


def test_parameter_counts_match_the_models():
    from harness.models import TINY_SPEC, load_model_and_tokenizer, resolve_model

    tiny, _ = load_model_and_tokenizer(resolve_model("tiny"))
    assert ModelShape.from_config(TINY_SPEC).parameters == sum(p.numel() for p in tiny.parameters()) == 926_336
    assert ModelShape.from_config(SMOLLM2_135M).parameters == 134_515_008  # the GGUF's tensors, counted
    assert ModelShape.from_config(LLAMA3_8B).parameters == 8_030_261_248  # "8B": Meta's model card


def test_full_fine_tuning_of_8b_on_one_80gb_gpu_is_refused_with_what_to_change():
    shape = ModelShape.from_config(LLAMA3_8B)
    full = estimate_training(shape, precision="bf16", rows_per_step=1, row_tokens=4096, device="cuda")
    assert full.weights + full.gradients + full.optimizer > 100 * GIB  # 16 bytes a parameter before activations
    problem = fit_problem(full, H100, "GPU 0", lora=False, fsdp=False, gradient_checkpointing=False)
    assert problem is not None and "\n" not in problem
    assert "LoRA" in problem and "FSDP" in problem and "gradient_checkpointing" in problem

    lora = estimate_training(shape, precision="bf16", rows_per_step=1, row_tokens=4096, lora_rank=16,
                             gradient_checkpointing=True, device="cuda")
    assert lora_parameters(shape, 16) == 41_943_040  # r x (in + out) over the 7 linear layers of 32 blocks
    assert fit_problem(lora, H100, "GPU 0", lora=True, fsdp=False, gradient_checkpointing=True) is None
    sharded = estimate_training(shape, precision="bf16", rows_per_step=1, row_tokens=4096, processes=8, fsdp=True,
                                gradient_checkpointing=True, device="cuda")
    assert fit_problem(sharded, H100, "GPU 0", lora=False, fsdp=True, gradient_checkpointing=True) is None


def test_sharded_70b_is_refused_because_the_trained_model_is_gathered_whole_and_8b_is_not():
    """FSDP over 32 GPUs (4 nodes of 8) fits 70B's training states (1/32 of 16 bytes a parameter), but every
    process gets the whole trained model back on its GPU (141 GB in bf16): refused before loading, in one
    line; 8B (16 GB in bf16) passes."""
    problems = {}
    for name, config in (("70B", LLAMA3_70B), ("8B", LLAMA3_8B)):
        shape = ModelShape.from_config(config)
        sharded = estimate_training(shape, precision="bf16", rows_per_step=1, row_tokens=4096, processes=32, fsdp=True,
                                    gradient_checkpointing=True, device="cuda")
        assert fit_problem(sharded, H100, "GPU 0", lora=False, fsdp=True, gradient_checkpointing=True) is None
        problems[name] = gathered_model_problem(shape, "bf16", sharded, H100, "GPU 0")
    assert ModelShape.from_config(LLAMA3_70B).parameters == 70_553_706_496  # "70B": Meta's model card
    assert problems["8B"] is None
    refused = problems["70B"]
    assert refused is not None and "\n" not in refused and "131.4 GiB" in refused and "not supported yet" in refused


def test_gradient_checkpointing_keeps_one_layers_activations():
    shape = ModelShape.from_config(LLAMA3_8B)
    plain = estimate_training(shape, precision="bf16", rows_per_step=8, row_tokens=4096, device="cuda")
    checkpointed = estimate_training(shape, precision="bf16", rows_per_step=8, row_tokens=4096,
                                     gradient_checkpointing=True, device="cuda")
    assert checkpointed.activations < plain.activations / 10
    assert checkpointed.weights == plain.weights and checkpointed.optimizer == plain.optimizer


def test_a_run_that_cannot_fit_stops_in_one_line_before_loading(tmp_path):
    config = tmp_path / "llama-3-8b"
    config.mkdir()
    (config / "config.json").write_text(json.dumps(LLAMA3_8B))
    settings = TrainingSpec(precision="fp32", batch_size=8, max_length=4096)
    with pytest.raises(HarnessError) as refused:
        check_training_fits(str(config), settings, processes=1, fsdp=False, device="cpu")
    assert "\n" not in str(refused.value) and str(config) in str(refused.value) and "GiB" in str(refused.value)
    assert check_training_fits("builtin:tiny", TrainingSpec(precision="fp32"), processes=1, fsdp=False, device="cpu")


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param(["--model", "tiny", "--max-length", "256"], marks=pytest.mark.e2e, id="tiny-fp32"),
        # SmolLM2 measured on this project's 2-core machine (BENCHMARKS.md): 4.88 GiB against 4.06 estimated (1.20)
        pytest.param(["--model", "smollm2", "--precision", "bf16", "--max-length", "512"], id="smollm2-bf16", marks=[
            pytest.mark.slow,
            pytest.mark.skipif(not native_bf16(), reason="this CPU emulates bf16: two SmolLM2 steps outlast the 300 s limit"),
        ]),
        # where bf16 is emulated SmolLM2 is measured in fp32 (5.80 GiB against 5.57 estimated, 1.04; 92 s on a 2-core AVX2 EPYC)
        pytest.param(["--model", "smollm2", "--precision", "fp32", "--max-length", "512"], id="smollm2-fp32", marks=[
            pytest.mark.slow, pytest.mark.skipif(native_bf16(), reason="measured in bf16 on this CPU (smollm2-bf16)"),
        ]),
    ],
)
def test_the_estimate_is_within_a_factor_of_two_of_the_measured_peak(arguments: list[str]):
    """perf/training_memory.py trains the model in a fresh process and reports its peak RSS."""
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "perf" / "training_memory.py"), *arguments, "--batch-size", "4", "--steps", "2"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert 0.5 < result["measured_over_estimate"] < 2.0, result


def test_gradient_checkpointing_gives_the_same_training_and_leaves_run_ids_alone(tmp_path):
    from harness.data import load_instruction_data
    from harness.models import load_model_and_tokenizer, resolve_model
    from harness.templates import tokenize_for_training
    from harness.training import train_sft

    assert RunSpec().run_id() == RunSpec(training={"gradient_checkpointing": False}).run_id()
    assert RunSpec().run_id() != RunSpec(training={"gradient_checkpointing": True}).run_id()

    losses = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, tokenizer = load_model_and_tokenizer(resolve_model("tiny"))
        settings = TrainingSpec(precision="fp32", batch_size=2, max_length=128, max_steps=3, save_steps=0,
                                learning_rate=1e-3, template="chat", logging_steps=1,
                                gradient_checkpointing=checkpointing)
        records = load_instruction_data("alpaca-sample", limit=12).records
        examples, _ = tokenize_for_training(records, tokenizer, "chat", 128)
        trained, result = train_sft(model, tokenizer, examples, settings, tmp_path / str(checkpointing), seed=0)
        assert trained.is_activation_checkpointing == checkpointing
        losses[checkpointing] = [loss for _, loss in result.loss_curve]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
