"""IFD scoring throughput: the harness's scoring engine against a faithful re-implementation of the
Cherry LLM reference loop (cherry_seletion/data_analysis.py: batch size 1, fp32, a Python loop over
every token's log-softmax), on the same model and records, in one run. Checks the scores agree. Also
times the engine on torch's default kernels instead of oneDNN's (harness/cpu_kernels.py).

    python perf/ifd_throughput.py [--records 200] [--max-length 512] [--device cpu|cuda]

Prints a JSON summary and a markdown table (paste into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from harness import cpu_kernels
from harness.data import InstructionRecord, load_instruction_data
from harness.models import load_model_and_tokenizer, resolve_model
from harness.scoring import compute_ifd
from harness.templates import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = ROOT.parent / "shared" / "data" / "instructions" / "alpaca_random_9k.json"


def reference_part_loss(model, tokenizer, text: str, target_span: str, max_length: int, device: str) -> float:
    """Cherry's get_perplexity_and_embedding_part_text + the per-token loss loop, as in their code."""
    input_ids = tokenizer.encode(text, return_tensors="pt", truncation=True, max_length=max_length).to(device)
    start_index = text.rfind(target_span)
    start_token = len(tokenizer.encode(text[:start_index]))
    end_token = input_ids.shape[1]
    labels = input_ids.clone()
    labels[0, :start_token] = -100
    with torch.no_grad():
        outputs = model(input_ids, labels=labels)
    losses = []
    logits = outputs.logits
    for i in range(1, end_token):
        log_prob_dist = F.log_softmax(logits[0, i - 1], dim=-1)
        true_token = input_ids[0, i]
        token_loss = F.nll_loss(log_prob_dist.unsqueeze(0), true_token.unsqueeze(0))
        losses.append(token_loss.item())
    # data_by_IFD.py then averages the answer part of the per-token list.
    return float(np.mean(losses[start_token - 1 : end_token - 1]))


def reference_ifd(model, tokenizer, records: list[InstructionRecord], max_length: int, device: str) -> np.ndarray:
    scores = np.full(len(records), np.nan)
    for index, record in enumerate(records):
        template = ALPACA_PROMPT_WITH_INPUT if record.input.strip() else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=record.instruction, input=record.input)
        prompt_len = len(tokenizer.encode(prompt, truncation=True, max_length=max_length))
        if max_length - prompt_len <= 0 or not record.output:
            continue  # skipped, as data_by_IFD.py does; longer answers are truncated
        # the reference's "+ 4" is the tag's length with BOS under LLaMA's tokenizer: the tag's length here
        direct = reference_part_loss(model, tokenizer, "### Response:" + record.output, record.output,
                                     max_length - prompt_len + len(tokenizer.encode("### Response:")), device)
        conditioned = reference_part_loss(model, tokenizer, prompt + record.output, record.output, max_length, device)
        scores[index] = conditioned / direct
    return scores


def joint_tokenization_matches(tokenizer, record: InstructionRecord) -> bool:
    """Whether Cherry's joint tokenization of "### Response:" + answer gives the answer the same tokens
    as tokenizing it alone (the engine's choice, so both passes score identical answer tokens). It
    does not when the answer starts with punctuation that merges with the colon, e.g. ':"'."""
    answer = tokenizer.encode(record.output, add_special_tokens=False)
    joint = tokenizer.encode("### Response:" + record.output)
    return joint[len(joint) - len(answer):] == answer and len(joint) - len(answer) == len(tokenizer.encode("### Response:"))


def timed(function):
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows-per-batch", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    records = load_instruction_data(str(DATA), limit=args.records).records
    resolved = resolve_model("smollm2-135m-instruct", str(GGUF))
    model, tokenizer = load_model_and_tokenizer(resolved, dtype=torch.float32)
    model.to(args.device).eval()
    load_before = os.getloadavg()[0]

    def engine(scored_model):
        return compute_ifd(scored_model, tokenizer, records, template="alpaca", max_length=args.max_length,
                           model_key="bench", rows_per_batch=args.rows_per_batch).ifd

    # The reference runs first and again last: the two rates show whether the machine's speed drifted
    # during the run (a shared VM's can), and the speed-ups use their mean.
    reference, reference_first_s = timed(lambda: reference_ifd(model, tokenizer, records, args.max_length, args.device))
    engine32, engine32_s = timed(lambda: engine(model))
    original = cpu_kernels.available  # the same engine on torch's default CPU kernels (MKL sgemm, unfused MLP)
    cpu_kernels.available = lambda: False
    try:
        engine32_default, engine32_default_s = timed(lambda: engine(model))
    finally:
        cpu_kernels.available = original
    _, reference_last_s = timed(lambda: reference_ifd(model, tokenizer, records, args.max_length, args.device))
    reference_s = (reference_first_s + reference_last_s) / 2
    low = torch.bfloat16
    model_low = model.to(low)
    engine16, engine16_s = timed(lambda: engine(model_low))
    both = ~np.isnan(reference) & ~np.isnan(engine32)
    same_tokens = np.array([joint_tokenization_matches(tokenizer, record) for record in records])
    assert (np.isnan(reference) == np.isnan(engine32)).all(), "the engine and the reference skip different records"
    top = max(1, int(both.sum() * 0.1))
    top32 = set(np.argsort(-np.where(both, engine32, -np.inf))[:top])
    top16 = set(np.argsort(-np.where(both, engine16, -np.inf))[:top])
    n = len(records)
    summary = {
        "device": torch.cuda.get_device_name(0)
        if args.device == "cuda"
        else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "torch_threads": torch.get_num_threads(),
        "records": n,
        "scored": int(both.sum()),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "reference_examples_per_s": round(n / reference_s, 3),
        "reference_first_and_last_examples_per_s": [round(n / reference_first_s, 3), round(n / reference_last_s, 3)],
        "engine_fp32_examples_per_s": round(n / engine32_s, 3),
        "engine_fp32_default_kernels_examples_per_s": round(n / engine32_default_s, 3),
        "onednn_kernels_speedup": round(engine32_default_s / engine32_s, 3),
        "max_abs_diff_onednn_vs_default_kernels": float(np.max(np.abs(engine32[both] - engine32_default[both]))),
        "engine_bf16_examples_per_s": round(n / engine16_s, 3),
        "speedup_fp32": round(reference_s / engine32_s, 2),
        "speedup_bf16": round(reference_s / engine16_s, 2),
        "max_abs_diff_fp32_vs_reference": float(np.max(np.abs(engine32[both & same_tokens] - reference[both & same_tokens]))),
        "records_tokenized_differently": int((both & ~same_tokens).sum()),
        "max_abs_diff_on_those": float(np.max(np.abs(engine32[both & ~same_tokens] - reference[both & ~same_tokens]), initial=0.0)),
        "max_abs_diff_bf16_vs_fp32": float(np.max(np.abs(engine16[both] - engine32[both]))),
        "spearman_bf16_vs_fp32": float(spearmanr(engine16[both], engine32[both]).statistic),
        "top10pct_overlap_bf16_vs_fp32": f"{len(top32 & top16)}/{top}",
    }
    print(json.dumps(summary, indent=2))
    print("\n| implementation | examples/s | speed-up | agreement |\n|---|---|---|---|")
    first, last = summary["reference_first_and_last_examples_per_s"]
    print(f"| reference loop (batch 1, fp32, per-token loop) | {summary['reference_examples_per_s']} | 1.0x | "
          f"mean of a run before the engines ({first}/s) and one after ({last}/s) |")
    print(f"| engine fp32, torch's default kernels | {summary['engine_fp32_default_kernels_examples_per_s']} | "
          f"{round(reference_s / engine32_default_s, 2)}x | max abs IFD diff to oneDNN "
          f"{summary['max_abs_diff_onednn_vs_default_kernels']:.1e} |")
    print(f"| engine fp32 | {summary['engine_fp32_examples_per_s']} | {summary['speedup_fp32']}x | "
          f"max abs IFD diff {summary['max_abs_diff_fp32_vs_reference']:.2e} on records tokenized alike "
          f"({summary['records_tokenized_differently']} tokenized differently: max diff {summary['max_abs_diff_on_those']:.2e}) |")
    print(f"| engine bf16 | {summary['engine_bf16_examples_per_s']} | {summary['speedup_bf16']}x | "
          f"Spearman {summary['spearman_bf16_vs_fp32']:.4f} vs fp32, top-10% overlap {summary['top10pct_overlap_bf16_vs_fp32']} |")


if __name__ == "__main__":
    main()
