"""The block-scaled Hopper GEMM's three warp plans side by side, on the FLUX shapes.

    python benchmarks/bench_sm90_plans.py [--ms 1024,4096] [--shapes 3072x12288,...]

``block_scaled_gemm_sm90`` runs its warps in step (8 warps, one CTA barrier per block), with a
producer warp (TMA loads moved to one extra warp), or split (two independent one-warpgroup
MMA partitions plus the producer warp). This times the GEMM alone, on pre-quantized operands,
for both formats that use it (int8_lodewise blocks of 128 and 64; W4A4's e4m3 codes with
64-wide groups and a rank-32 low-rank term) beside bf16 cuBLAS on the same (M, K, N), in one
process, and prints us, TOP/s, the ratio to bf16 and how far each plan's output is from the
in-step plan's (they compute the same sums, so only fp32 summation order may differ).
Timing: ``triton.testing.do_bench`` medians (L2 flushed between calls); at these sizes the
GEMMs are compute-bound, so one weight copy is enough.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from comfy_lowbit.kernels.int8_quant import quantize_rows  # noqa: E402
from comfy_lowbit.kernels.sm90 import WARP_PLANS  # noqa: E402
FLUX_SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072), (3072, 18432)]


def median_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def int8_operands(m, k, n, block, dev):
    from comfy_lowbit.kernels.int8_gemm_sm90 import w8a8_matmul_sm90

    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    a_q, a_s = quantize_rows(x, block)
    w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
    w_s = (torch.rand(k // block, n, device=dev) + 0.5).t()  # column-major, as the layout keeps it
    return lambda **plan: w8a8_matmul_sm90(a_q, a_s, w, w_s, block, None, torch.bfloat16, **plan)


def w4a4_operands(m, k, n, rank, dev):
    from comfy_lowbit.kernels.w4a4_gemm_sm90 import w4a4_gemm_sm90

    fp8 = torch.float8_e4m3fn
    codes = torch.randint(-8, 8, (m, k), device=dev).to(fp8)
    unpacked = torch.randint(-8, 8, (n, k), device=dev).to(fp8)
    ascales = torch.rand(k // 64, m, device=dev) / 7 + 0.01
    wscales = (torch.rand(k // 64, n, device=dev) / 7 + 0.01).to(torch.bfloat16)
    lora = torch.randn(m, rank, device=dev)
    up = (torch.randn(n, rank, device=dev) / 8).to(torch.bfloat16)
    return lambda **plan: w4a4_gemm_sm90(codes, ascales, unpacked, wscales, lora, up, None, torch.bfloat16, **plan)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", default="1024,4096")
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in FLUX_SHAPES), help="KxN list")
    parser.add_argument("--stages", default="", help="also time the split plan with these ring depths, e.g. 4,6")
    args = parser.parse_args()
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.version.__version__}, triton {triton.__version__}")
    print(f"{'K':>6} {'N':>6} {'M':>6} {'kernel':<28} {'us':>8} {'TOP/s':>7} {'vs bf16':>8} {'diff':>8}")
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    extra_stages = [int(s) for s in args.stages.split(",") if s]
    for m in map(int, args.ms.split(",")):
        for k, n in shapes:
            ops = 2 * m * n * k
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
            bf16 = median_us(lambda: torch.nn.functional.linear(x, w))
            print(f"{k:>6} {n:>6} {m:>6} {'bf16 cuBLAS':<28} {bf16:8.1f} {ops / bf16 / 1e6:7.0f} {1:8.2f}x", flush=True)
            formats = [(f"int8 B{b}", int8_operands(m, k, n, b, dev)) for b in (128, 64)]
            formats.append(("w4a4 R32", w4a4_operands(m, k, n, 32, dev)))
            for name, run in formats:
                reference = run().float()
                plans = list(WARP_PLANS.items())
                plans += [(f"split s{s}", {"split_warpgroups": True, "stages": s}) for s in extra_stages]
                for plan, kwargs in plans:
                    label = f"{name} {plan}"
                    try:
                        out = run(**kwargs).float()
                        diff = ((out - reference).norm() / reference.norm()).item()
                        us = median_us(lambda: run(**kwargs))
                        print(f"{k:>6} {n:>6} {m:>6} {label:<28} {us:8.1f} {ops / us / 1e6:7.0f} {bf16 / us:8.2f}x "
                              f"{diff:8.1e}", flush=True)
                    except Exception as exc:  # noqa: BLE001 - a failing plan is reported, the others still run
                        print(f"{k:>6} {n:>6} {m:>6} {label:<28} failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:100]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
