"""Host (CPU) time per call of our GPU launchers, and where it goes.

    python benchmarks/profile_host.py

ComfyUI runs models eagerly, so a launcher whose Python costs more than its kernel leaves the
GPU idle. This enqueues N calls back to back without synchronising (the GPU queue absorbs
them) and divides the wall time by N, then profiles the same calls with cProfile and prints
the functions that cost the most. Launchers: the int8 W8A8 Hopper GEMM (each warp plan), the
portable W8A8 GEMM, the W4A4 Hopper GEMM, and ``F.linear`` on an int8_lodewise weight.
"""
from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from comfy_lowbit.kernels.int8_quant import quantize_rows  # noqa: E402

CALLS = 200


def host_us(fn) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / CALLS * 1e6


def profile(label: str, fn, top: int = 18) -> None:
    us = host_us(fn)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(CALLS):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    print(f"\n## {label}: {us:.1f} us of host time per call")
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000], flush=True)


def main() -> int:
    from comfy_lowbit.kernels.int8_gemm import w8a8_matmul
    from comfy_lowbit.kernels.int8_gemm_sm90 import w8a8_matmul_sm90
    from comfy_lowbit.kernels.w4a4_gemm_sm90 import w4a4_gemm_sm90

    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; {CALLS} calls each, not synchronised")
    m, k, n, block = 256, 3072, 3072, 128
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    a_q, a_s = quantize_rows(x, block)
    w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
    w_s = (torch.rand(k // block, n, device=dev) + 0.5).t()
    for plan in ({}, {"producer_warp": True}, {"split_warpgroups": True}):
        profile(f"int8 sm90 {plan}", lambda: w8a8_matmul_sm90(a_q, a_s, w, w_s, block, None, torch.bfloat16, **plan))
    profile("int8 portable", lambda: w8a8_matmul(a_q, a_s, w, w_s, block, None, torch.bfloat16))
    profile("quantize_rows", lambda: quantize_rows(x, block))

    fp8 = torch.float8_e4m3fn
    codes = torch.randint(-8, 8, (m, k), device=dev).to(fp8)
    unpacked = torch.randint(-8, 8, (n, k), device=dev).to(fp8)
    ascales = torch.rand(k // 64, m, device=dev)
    wscales = torch.rand(k // 64, n, device=dev).to(torch.bfloat16)
    lora, up = torch.randn(m, 32, device=dev), torch.randn(n, 32, device=dev).to(torch.bfloat16)
    profile("w4a4 sm90 producer", lambda: w4a4_gemm_sm90(codes, ascales, unpacked, wscales, lora, up, None,
                                                          torch.bfloat16, producer_warp=True))

    from comfy_kitchen.tensor import QuantizedTensor

    import comfy_lowbit  # noqa: F401  (registers the layouts)

    weight = QuantizedTensor.from_float(torch.randn(n, k, device=dev, dtype=torch.bfloat16), "BlockWiseINT8LayoutLodeWise")
    big = torch.randn(1024, k, device=dev, dtype=torch.bfloat16)
    torch.nn.functional.linear(big, weight)  # timed dispatch for this shape happens here
    profile("F.linear int8_lodewise, 1024 rows", lambda: torch.nn.functional.linear(big, weight))
    return 0


if __name__ == "__main__":
    sys.exit(main())
