"""Linear-layer kernels on this CPU: torch's default fp32 path (MKL sgemm) against oneDNN's matmul, the
kernel harness/cpu_kernels.py uses in the scoring engine, at SmolLM2-135M's shapes; and a SwiGLU MLP's
gate/up pair unfused against fused (SiLU and the product in the matmul epilogues).

    python perf/linear_kernels.py [--tokens 3000] [--repeats 10]

Prints GFLOP/s per shape (paste into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from harness import cpu_kernels

SHAPES = [(576, 1536), (1536, 576), (576, 576), (576, 192), (576, 49152)]  # (in, out): MLP, attention, LM head


def gflops(function, flops: float, repeats: int) -> float:
    function()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return flops * repeats / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not cpu_kernels.available():
        raise SystemExit("oneDNN's linear op is not available in this torch build / on this CPU")
    torch.manual_seed(0)
    onednn = torch.ops.mkldnn._linear_pointwise
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    print("\n| product (tokens x in -> out) | torch default GFLOP/s | oneDNN GFLOP/s |\n|---|---:|---:|")
    with torch.no_grad():
        for inputs, outputs in SHAPES:
            tokens = args.tokens if outputs < 49152 else args.tokens // 3  # the LM head runs at answer tokens only
            x, weight = torch.randn(tokens, inputs), torch.randn(outputs, inputs)
            flops = 2.0 * tokens * inputs * outputs
            default = gflops(lambda x=x, weight=weight: F.linear(x, weight), flops, args.repeats)
            fast = gflops(lambda x=x, weight=weight: onednn(x, weight, None, "none", [], ""), flops, args.repeats)
            print(f"| {tokens} x {inputs} -> {outputs} | {default:.0f} | {fast:.0f} |")
        x = torch.randn(args.tokens, 576)
        gate, up = torch.randn(1536, 576) * 0.05, torch.randn(1536, 576) * 0.05
        flops = 2 * 2.0 * args.tokens * 576 * 1536
        unfused = gflops(lambda: F.silu(F.linear(x, gate)) * F.linear(x, up), flops, args.repeats)
        fused = gflops(lambda: onednn.binary(x, onednn(x, gate, None, "swish", [], ""), up, None, "mul"), flops, args.repeats)
        print(f"| SwiGLU gate+up, {args.tokens} x 576 -> 2 x 1536 | {unfused:.0f} (unfused) | {fused:.0f} (fused) |")


if __name__ == "__main__":
    main()
