"""Launch each skinny NF4 kernel once, inside a profiler range, for Nsight Compute.

Why: the NF4 GEMV and the skinny tensor-core kernel ran at about the sum of their issue and
DRAM times, and every explanation so far was read off the SASS (benchmarks/NOTES.md, NF4 v5
and v7). ``ncu`` on the device's H100 reads where the warps actually stall. Every case is run
(compiled, autotuned) before the profiler range opens, so the range holds exactly one launch
per case, in this order: ``CASES``.

    ncu --clock-control none --profile-from-start off --set full -o REPORT \\
        python3 benchmarks/profile_ncu.py [--cases gemv_m1,mma_m16,...]

(``run_all_on_gpu.sh`` step ``ncu`` does that and exports the details and per-SASS-line
stall samples as CSV.)
"""
from __future__ import annotations

import argparse

import torch

from comfy_lowbit.kernels import bnb4_mma
from comfy_lowbit.kernels.bnb4_linear import Bnb4Weight, _launch_mma, bnb4_linear, dequantize
from comfy_lowbit.kernels.bnb4_quantize import bnb4_quantize

K, N = 3072, 12288


def nf4_weight(n: int, k: int) -> Bnb4Weight:
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    packed, codes, nested, offset = bnb4_quantize(w, 64, "nf4", nested=True)
    return Bnb4Weight(packed, codes, (n, k), 64, "nf4", nested, offset)


def cases(w: Bnb4Weight) -> dict:
    """name -> a no-argument launch of one kernel (outputs preallocated)."""
    def x_of(m):
        return torch.randn(m, K, device="cuda", dtype=torch.bfloat16)

    x1, x16 = x_of(1), x_of(16)
    o1 = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)
    o16 = torch.empty(16, N, device="cuda", dtype=torch.bfloat16)
    wide = bnb4_mma.default_tile(N, K)
    w4a4, x4096 = w4a4_weight(N, K), x_of(4096)
    return {
        "gemv_m1": lambda: bnb4_linear(x1, w, path="gemv_lut", out=o1),
        "mma_m1": lambda: _launch_mma(x1, w, None, o1),
        "mma_m16": lambda: _launch_mma(x16, w, None, o16),
        # the default tile without AHEAD (x and the block scale loaded with their block)
        "mma_m1_plain": lambda: _launch_mma(x1, w, None, o1, config={**wide, "AHEAD": False}),
        "mma_m16_plain": lambda: _launch_mma(x16, w, None, o16, config={**wide, "AHEAD": False}),
        "dequant": lambda: dequantize(w, torch.bfloat16, scratch=True),
        "w4a4_m4096": lambda: torch.nn.functional.linear(x4096, w4a4),  # quantize (+ down proj) and GEMM
    }


def w4a4_weight(n: int, k: int):
    from comfy_kitchen.tensor import QuantizedTensor

    import comfy_lowbit  # noqa: F401  (registers W4A4Layout)

    w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    return QuantizedTensor.from_float(w, "W4A4Layout", rank=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="gemv_m1,mma_m1,mma_m16,mma_m1_plain,mma_m16_plain,dequant,w4a4_m4096")
    args = parser.parse_args()
    w = nf4_weight(N, K)
    table = cases(w)
    chosen = [c for c in args.cases.split(",") if c]
    for name in chosen:  # compile and autotune outside the profiled range
        for _ in range(3):
            table[name]()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name in chosen:
        table[name]()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled, in order:", ", ".join(chosen))


if __name__ == "__main__":
    main()
