"""GPU acceptance measurements (issue 14): what a session lent a GPU runs, and CPU CI runs in --dry-run.

    bash perf/gpu_acceptance.sh [--dry-run] [--output perf/results/gpu_acceptance.json]

On a GPU (at most about 10 minutes on one H100-class card) it measures, in this order:
1. attention A/B on Llama-3-8B-shaped heads (32 query / 8 key-value heads of 128) over one packed row of
   segments: the harness's per-segment loop (the CPU path, harness/losses.varlen_attention) against
   torch's flash varlen kernel (torch.nn.attention.varlen.varlen_attn) and flex attention with a document
   mask: forward+backward ms, peak memory, and the largest output difference;
2. where every model the harness loads lands (device, dtype): the training model, and the inference
   loads (judges, pairwise base, difficulty scorer);
3. training state bytes per parameter at each precision, as the pre-flight estimate (harness/memory.py)
   counts them (measured peaks: perf/training_memory.py);
4. training MFU of 8B-shaped decoder layers (random weights, bf16, packed 4096-token row);
5. AlpacaEval generation tokens/s through the harness's HF backend and its vLLM server (where installed);
6. an end-to-end `harness run` of the tiny model, its record's timings.
--dry-run uses small shapes and runs on the CPU, so the script cannot rot between GPU sessions; its
numbers say nothing about a GPU. Every section reports, none asserts: the goals are in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense bf16 peak FLOP/s of the cards the field rents (vendor datasheets, without sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16.items() if key in name), None)


def timed(step: Any, device: torch.device, repeats: int) -> tuple[float, float | None]:
    """(ms per call, peak GiB on the GPU) of `step`, after one warm-up call."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - started) / repeats
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return round(seconds * 1000, 3), None if peak is None else round(peak, 3)


def attention_ab(device: torch.device, dtype: torch.dtype, dry_run: bool) -> dict[str, Any]:
    from harness.losses import _CU_SEQLENS_KWARG, _SEGMENTS_KWARG, varlen_attention

    heads, kv_heads, dim = (4, 2, 16) if dry_run else (32, 8, 128)
    lengths = [24, 40, 32, 16] if dry_run else [512, 1024, 768, 1280, 512]
    tokens = sum(lengths)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, tokens, dim, generator=generator).to(device, dtype).requires_grad_()
    k = torch.randn(1, kv_heads, tokens, dim, generator=generator).to(device, dtype).requires_grad_()
    v = torch.randn(1, kv_heads, tokens, dim, generator=generator).to(device, dtype).requires_grad_()
    module = torch.nn.Module()
    module.layer_idx, module.training = 0, True
    outputs: dict[str, torch.Tensor] = {}

    def loop() -> None:
        out, _ = varlen_attention(module, q, k, v, None, **{_SEGMENTS_KWARG: lengths})
        out.float().square().mean().backward()
        outputs["loop"] = out.detach()[0]  # [tokens, heads, dim]

    boundaries = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)

    def harness_path() -> None:  # what training runs on this device (the flash kernel on CUDA in bf16)
        out, _ = varlen_attention(module, q, k, v, None, **{_SEGMENTS_KWARG: lengths, _CU_SEQLENS_KWARG: (boundaries, max(lengths))})
        out.float().square().mean().backward()
        outputs["harness"] = out.detach()[0]

    candidates = {"harness loop (CPU path)": loop, "harness path on this device": harness_path}
    if device.type == "cuda":
        from torch.nn.attention.varlen import varlen_attn

        def flash() -> None:
            out = varlen_attn(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), boundaries, boundaries,
                              max(lengths), max(lengths), window_size=(-1, 0), enable_gqa=True)
            out.float().square().mean().backward()
            outputs["flash"] = out.detach()

        candidates["torch varlen_attn (flash)"] = flash
    candidates_error = None
    if device.type == "cuda":  # flex attention has no backward on the CPU
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        document = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))

        def causal_document(b: Any, h: Any, q_index: Any, k_index: Any) -> Any:
            return (document[q_index] == document[k_index]) & (q_index >= k_index)

        mask = create_block_mask(causal_document, None, None, tokens, tokens, device=str(device))
        compiled = torch.compile(flex_attention)

        def flex() -> None:
            out = compiled(q, k, v, block_mask=mask, enable_gqa=True)
            out.float().square().mean().backward()
            outputs["flex"] = out.detach()[0].transpose(0, 1)

        candidates["flex attention (document mask)"] = flex
    else:
        candidates_error = "CPU dry run: the kernels (flash varlen, flex) need a GPU; only the loop ran"
    rows = []
    for name, step in candidates.items():
        try:
            ms, peak = timed(step, device, repeats=2 if dry_run else 10)
        except Exception as error:  # noqa: BLE001
            rows.append({"path": name, "error": f"{type(error).__name__}: {str(error)[:200]}"})
            continue
        rows.append({"path": name, "ms_fwd_bwd": ms, "peak_gib": peak})
    reference = outputs.get("loop")
    keys = {"harness loop (CPU path)": "loop", "harness path on this device": "harness", "torch varlen_attn (flash)": "flash",
            "flex attention (document mask)": "flex"}
    for row in rows:
        key = keys[row["path"]]
        if reference is not None and key in outputs:
            row["max_abs_diff_vs_loop"] = float((outputs[key].float() - reference.float()).abs().max())
    return {"shape": {"heads": heads, "kv_heads": kv_heads, "head_dim": dim, "segments": lengths}, "paths": rows,
            "note": candidates_error}


def placements() -> dict[str, Any]:
    from harness.accelerator import process_device, process_inference_dtype
    from harness.models import load_model_and_tokenizer, resolve_model

    trained, _ = load_model_and_tokenizer(resolve_model("tiny"))
    judged, _ = load_model_and_tokenizer(resolve_model("tiny"), dtype=process_inference_dtype())
    where = lambda model: f"{next(model.parameters()).device} {next(model.parameters()).dtype}"  # noqa: E731
    return {"process_device": str(process_device()), "training load": where(trained), "inference load": where(judged)}


def bytes_per_parameter(device: torch.device) -> dict[str, Any]:
    from harness.memory import ModelShape, estimate_training

    shape = ModelShape.from_config({"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256})
    rows = {}
    for precision in ("fp32", "bf16-mixed", "bf16"):
        estimate = estimate_training(shape, precision=precision, rows_per_step=1, row_tokens=4096, device=device.type)
        states = estimate.weights + estimate.gradients + estimate.optimizer
        rows[precision] = {"estimated_state_bytes_per_parameter": round(states / shape.parameters, 2)}
    return {"model": "Llama-3-8B shape (estimate)", "precisions": rows}


def decoder_mfu(device: torch.device, dry_run: bool) -> dict[str, Any]:
    """Forward+backward of 8B-shaped decoder layers over one packed row of four segments, through the attention
    the harness trains with on this device (harness.losses.varlen_attention: the flash varlen kernel on CUDA),
    in bf16."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    if dry_run:
        config = LlamaConfig(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2,
                             num_hidden_layers=2)
        tokens = 256
    else:
        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                             num_hidden_layers=2)
        tokens = 4096
    from harness.compat import register_attention
    from harness.losses import _CU_SEQLENS_KWARG, _SEGMENTS_KWARG, VARLEN_ATTENTION, varlen_attention

    register_attention(VARLEN_ATTENTION, varlen_attention)
    config._attn_implementation = VARLEN_ATTENTION
    layers = torch.nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)).to(device, torch.bfloat16)
    rotary = LlamaRotaryEmbedding(config).to(device)
    hidden = torch.randn(1, tokens, config.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
    lengths = [tokens // 4, tokens // 2, tokens // 8, tokens - tokens // 4 - tokens // 2 - tokens // 8]  # one packed row
    positions = torch.cat([torch.arange(length, device=device) for length in lengths]).unsqueeze(0)
    boundaries = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    packed = {_SEGMENTS_KWARG: lengths, _CU_SEQLENS_KWARG: (boundaries, max(lengths))}

    def step() -> None:
        states = hidden
        embeddings = rotary(states, positions)
        for layer in layers:
            out = layer(states, position_embeddings=embeddings, attention_mask=None, position_ids=positions, **packed)
            states = out[0] if isinstance(out, tuple) else out
        states.float().square().mean().backward()

    ms, peak = timed(step, device, repeats=2 if dry_run else 10)
    parameters = sum(p.numel() for p in layers.parameters())
    head_dim = config.hidden_size // config.num_attention_heads
    attention_flops = 3 * 2 * 2 * config.num_attention_heads * head_dim * sum(n * n for n in lengths) / 2 * config.num_hidden_layers
    flops = 6 * parameters * tokens + attention_flops
    achieved = flops / (ms / 1000)
    peak_rate = peak_flops(device)
    return {"layers": config.num_hidden_layers, "tokens": tokens, "ms_fwd_bwd": ms, "peak_gib": peak,
            "tflops": float(f"{achieved / 1e12:.4g}"), "mfu": None if peak_rate is None else round(achieved / peak_rate, 3)}


def generation_speed(device: torch.device, dry_run: bool) -> dict[str, Any]:
    """AlpacaEval-style generation through the harness's own two backends on the same prompts: HF generate
    (token-budget batches on a GPU) and, where a vLLM is found (HARNESS_VLLM or `vllm` on PATH), the vLLM
    server of eval.backend vllm. SmolLM2-135M-Instruct from ../shared when present, else the tiny model."""
    import tempfile

    from harness.generation import GenerationSettings, _stop_token_ids, generate
    from harness.models import load_model_and_tokenizer, resolve_model
    from harness.vllm_server import serve_evaluated, vllm_command

    shared = ROOT.parent / "shared" / "models"
    ggufs = sorted(shared.glob("**/*.gguf")) if shared.is_dir() and not dry_run else []
    resolved = resolve_model("smollm2-135m-instruct", str(ggufs[0])) if ggufs else resolve_model("tiny")
    model, tokenizer = load_model_and_tokenizer(resolved, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
    model.to(device)
    from harness.alpaca import VERSIONS, load_reference

    instructions = [row["instruction"] for row in load_reference(VERSIONS["2"].reference)][: 4 if dry_run else 256]
    settings = GenerationSettings(max_new_tokens=16 if dry_run else 256, template="chat" if tokenizer.chat_template else "alpaca")

    def tokens_per_second(generator: Any, chosen: GenerationSettings) -> dict[str, Any]:
        started = time.perf_counter()
        generations = generate(generator, tokenizer, instructions, chosen)
        seconds = time.perf_counter() - started
        tokens = sum(g.new_tokens for g in generations)
        return {"new_tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}

    result: dict[str, Any] = {"model": resolved.entry.name, "prompts": len(instructions), "max_new_tokens": settings.max_new_tokens,
                              "hf": tokens_per_second(model, settings)}
    if vllm_command() is None:
        result["vllm"] = "not installed (HARNESS_VLLM or vllm on PATH)"
        return result
    with tempfile.TemporaryDirectory() as scratch, serve_evaluated(
        model, tokenizer, _stop_token_ids(model, tokenizer), output_dir=Path(scratch), weights_dir=None, seed=0
    ) as served:
        result["vllm"] = tokens_per_second(served, GenerationSettings(**{**settings.__dict__, "backend": "vllm"}))
    result["vllm_over_hf"] = round(result["vllm"]["tokens_per_s"] / result["hf"]["tokens_per_s"], 2)
    return result


def end_to_end(dry_run: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "harness.cli", "run", "--recipe", "one-off", "--limit", "2",
                   "--set", "data.limit=8", "--output", scratch]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
        if done.returncode != 0:
            return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
        (record_path,) = Path(scratch).glob("*/record.json")
        record = json.loads(record_path.read_text())
    return {"run_id": record["run_id"], "timings": record.get("timings")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="small shapes on the CPU (what CI runs)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    dry_run = args.dry_run or not torch.cuda.is_available()
    device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)",
        "torch": torch.__version__, "dry_run": dry_run,
    }
    sections = [("attention", lambda: attention_ab(device, dtype, dry_run)), ("placements", placements),
                ("bytes_per_parameter", lambda: bytes_per_parameter(device)),
                ("decoder_mfu", lambda: decoder_mfu(device, dry_run)),
                ("generation", lambda: generation_speed(device, dry_run)), ("end_to_end", lambda: end_to_end(dry_run))]
    for name, section in sections:
        started = time.perf_counter()
        try:
            result[name] = section()
        except Exception as error:  # noqa: BLE001 - one failing section must not hide the others' numbers
            result[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        result[name + "_seconds"] = round(time.perf_counter() - started, 1)
        print(f"## {name}\n{json.dumps(result[name], indent=1, default=str)}", flush=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1, default=str) + "\n")
    failed = [name for name, _ in sections if isinstance(result[name], dict) and "error" in result[name]]
    if failed:
        sys.exit(f"gpu_acceptance: sections failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
