"""Pre-flight memory estimate (harness/memory.py) against the measured peak memory of real training steps.

    python perf/training_memory.py [--model tiny|smollm2] [--precision fp32|bf16] [--batch-size 4]
                                   [--max-length 512] [--steps 2] [--gradient-checkpointing]

Each configuration trains in a fresh process (so its peak resident memory is its own) for a few optimizer
steps on the shipped Alpaca sample with the harness's training core, then prints the estimate's parts, the
measured peak RSS and their ratio as JSON. SmolLM2-135M-Instruct comes from the GGUF in ../shared.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GGUF = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def measure(model: str, precision: str, batch_size: int, max_length: int, steps: int, checkpointing: bool) -> dict[str, Any]:
    """Train in this process and report the estimate beside the measured peak RSS."""
    import torch

    from harness.data import load_instruction_data
    from harness.memory import GIB, estimate_training, shape_from_directory
    from harness.models import load_model_and_tokenizer, resolve_model
    from harness.spec import TrainingSpec
    from harness.templates import tokenize_for_training
    from harness.training import train_sft, weight_dtype

    torch.manual_seed(0)
    resolved = resolve_model("tiny") if model == "tiny" else resolve_model("smollm2-135m-instruct", str(GGUF))
    loaded, tokenizer = load_model_and_tokenizer(resolved, dtype=weight_dtype(precision))
    directory = Path(loaded.name_or_path)
    settings = TrainingSpec(
        precision=precision, batch_size=batch_size, max_length=max_length, max_steps=steps, save_steps=0,
        gradient_checkpointing=checkpointing, learning_rate=1e-5, template="chat",
    )
    records = load_instruction_data("alpaca-sample", limit=batch_size * steps * 8).records
    examples, _ = tokenize_for_training(records, tokenizer, "chat", max_length)
    scored = sum(sum(1 for label in example.labels if label != -100) for example in examples)
    tokens = sum(len(example.input_ids) for example in examples)
    with tempfile.TemporaryDirectory() as scratch:
        train_sft(loaded, tokenizer, examples, settings, Path(scratch), seed=0)
    measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    estimate = estimate_training(
        shape_from_directory(directory), precision=precision, rows_per_step=batch_size, row_tokens=max_length,
        response_share=scored / tokens, gradient_checkpointing=checkpointing,
    )
    return {
        "model": model, "precision": precision, "batch_size": batch_size, "max_length": max_length,
        "gradient_checkpointing": checkpointing, "estimate": estimate.as_record(),
        "measured_peak_rss_gib": round(measured / GIB, 3), "measured_over_estimate": round(measured / estimate.total, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        print(json.dumps(measure(args.model, args.precision, args.batch_size, args.max_length, args.steps,
                                 args.gradient_checkpointing)))
        return
    result = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--in-process"], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"training_memory: the measuring process failed:\n{result.stderr[-3000:]}")
    print(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
