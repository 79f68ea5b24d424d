"""oneDNN kernels for the scoring engine's gradient-free forward passes on CPU.

On x86 CPUs an fp32 nn.Linear in torch runs MKL's sgemm. oneDNN's matmul (the kernel torch.compile's
CPU backend emits for linear layers, `torch.ops.mkldnn._linear_pointwise`) is faster at the shapes of
a small decoder: 2-D products of a few thousand tokens by 192-1536 features ran at 207-213 GFLOP/s
against MKL's 167-187 on our 2-core AVX-512 machine (perf/linear_kernels.py; perf/ifd_throughput.py
measures the end-to-end effect). It also applies an elementwise epilogue inside the same kernel, so a SwiGLU MLP
(down(silu(gate(x)) * up(x)), Llama/Mistral/Qwen2) needs no separate SiLU and product passes over
the [tokens, intermediate] activations.

`onednn_inference(model)` switches a model to these kernels for the duration of a block, only where
they apply (CPU, fp32, no gradients); everything else keeps torch's own path. Results equal the
default path within float rounding (a different summation order), which tests/harness/test_cpu_kernels.py
checks. Training never uses them: the ops have no backward.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

_active = 0  # depth of onednn_inference blocks: the fused LM-head loss asks `linear` for its logits


def available() -> bool:
    """oneDNN is compiled into this torch build, exposes the fused linear op, and the CPU is x86-64 (where
    it was measured; on other CPUs torch's default path is kept)."""
    return (
        platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16, from /proc/cpuinfo's flags).
    Without it torch emulates bf16 matmuls: on a 2-core AVX2 EPYC (2026-12-03) tests/test_smollm2.py's run
    (SmolLM2-135M, 4 steps of 2 x 512 tokens, then 20 ARC-Easy items) took 868 s to train in bf16 and 91 s
    in all in fp32. Elsewhere (no /proc/cpuinfo) this says False."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_warning(training_precision: str, eval_precision: str, device_type: str) -> str | None:
    """One line when a run asks the CPU for bf16 it would only emulate (many times slower than fp32), or None."""
    wants = [what for what, asked in (("training.precision", training_precision in ("bf16", "bf16-mixed")),
                                      ("eval.precision", eval_precision == "bf16")) if asked]
    if device_type != "cpu" or not wants or native_bf16():
        return None
    verb = "ask" if len(wants) > 1 else "asks"
    return (f"{' and '.join(wants)} {verb} for bf16, which this CPU emulates (no AVX512-BF16 or AMX): expect it to run "
            "many times slower than fp32")


def _usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
    )


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, epilogue: str = "none") -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, epilogue, [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through oneDNN inside an onednn_inference block where it applies."""
    if _active and _usable(x, weight):
        return _onednn(x, weight, bias)
    return F.linear(x, weight, bias)


def _linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if _usable(x, module.weight):
        return _onednn(x, module.weight, module.bias)
    return F.linear(x, module.weight, module.bias)


def _is_swiglu_mlp(module: torch.nn.Module) -> bool:
    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    activation = getattr(module, "act_fn", None)
    silu = isinstance(activation, torch.nn.SiLU) or type(activation).__name__ == "SiLUActivation"
    return silu and all(type(part) is torch.nn.Linear for part in parts)


def _swiglu_forward(module: Any, x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with SiLU and the product fused into the two input projections."""
    gate, up, down = module.gate_proj, module.up_proj, module.down_proj
    if not (_usable(x, gate.weight) and _usable(x, up.weight) and _usable(x, down.weight)):
        return down(module.act_fn(gate(x)) * up(x))
    flat = x.reshape(-1, x.shape[-1])
    gated = torch.ops.mkldnn._linear_pointwise(flat, gate.weight, gate.bias, "swish", [], "")
    product = torch.ops.mkldnn._linear_pointwise.binary(flat, gated, up.weight, up.bias, "mul")
    out = torch.ops.mkldnn._linear_pointwise(product, down.weight, down.bias, "none", [], "")
    return out.view(*x.shape[:-1], down.weight.shape[0])


@contextlib.contextmanager
def onednn_inference(model: torch.nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Run the model's linear layers and SwiGLU MLPs on oneDNN inside the block (yields whether it did).

    The instance's forward is replaced, then restored on exit (also on errors); a LoRA-wrapped or
    otherwise custom layer is left alone because only exact nn.Linear instances are switched."""
    global _active
    if not (enabled and available()):
        yield False
        return
    patched: list[torch.nn.Module] = []
    for module in model.modules():
        if "forward" in module.__dict__:  # already overridden (e.g. by a wrapper): keep it
            continue
        if _is_swiglu_mlp(module):
            module.forward = functools.partial(_swiglu_forward, module)
        elif type(module) is torch.nn.Linear:
            module.forward = functools.partial(_linear_forward, module)
        else:
            continue
        patched.append(module)
    _active += 1
    try:
        yield True
    finally:
        _active -= 1
        for module in patched:
            del module.forward
