"""Build every variant of the Hopper Gluon kernels for sm_90 without a GPU and report problems.

Why: these kernels were written without a GPU, and a variant that fails to build, spills, gets
its wgmma serialised by ptxas or needs more shared memory than an H100 has wastes device time.
This compiles each variant the GPU tests and the dispatch can launch (int8 blocks 64/128, the
W4A4 fp8 path with ranks 8-128, NF4/FP4 blocks 64-256 with and without double quant; every
output dtype, bias on/off, with and without the producer warp) with the installed Triton and
prints the ones ptxas is unhappy with. CI checks a few of them (tests/test_block_scaled_sm90.py,
tests/test_bnb4_kernels.py); this is the whole set, ~2 minutes.

    python benchmarks/check_sm90_builds.py                      # CI's Triton
    PYTHONPATH=/path/to/triton-3.6:$PYTHONPATH python benchmarks/check_sm90_builds.py
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
from triton.experimental.gluon import language as gl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sm90_support import compile_for_sm90, ptxas_report  # noqa: E402

from comfy_lowbit.kernels import block_scaled_gemm_sm90 as block_scaled  # noqa: E402
from comfy_lowbit.kernels import bnb4_gemm_sm90 as bnb4  # noqa: E402

M, N = 300, 200
SMEM_LIMIT = 232448  # bytes of shared memory one H100 program may use


def problems(kernel, args, constexprs) -> str | None:
    try:
        compiled = compile_for_sm90(kernel, args, constexprs, constexprs["num_warps"])
    except Exception as exc:  # noqa: BLE001 - report every variant, whatever breaks
        return f"does not build: {type(exc).__name__}: {str(exc)[:300]}"
    report = ptxas_report(compiled.asm["ptx"])
    found = [line.strip() for line in report.splitlines() if "serialized" in line or "spill" in line]
    found = [line for line in found if " 0 bytes spill stores, 0 bytes spill loads" not in line]
    if compiled.metadata.shared > SMEM_LIMIT:
        found.append(f"{compiled.metadata.shared} bytes of shared memory")
    return "; ".join(found) or None


def block_scaled_variants():
    for dtype, block, out_dtype, producer, bias, rank in itertools.product(
            (torch.int8, torch.float8_e4m3fn), (64, 128), (torch.bfloat16, torch.float16, torch.float32),
            (False, True), (False, True), (0, 8, 20, 128)):
        if (dtype == torch.int8) == bool(rank) or (dtype != torch.int8 and block != 64):
            continue  # int8_lodewise has no low-rank term; W4A4 always has one, with 64-wide groups
        k = block * 5
        out = torch.zeros(M, N, dtype=out_dtype)
        descs = block_scaled.descriptors(torch.zeros(M, k, dtype=dtype), torch.zeros(5, M), torch.zeros(N, k, dtype=dtype),
                                         torch.zeros(5, N), block)
        rank_tile = max(16, 1 << (max(rank, 1) - 1).bit_length())
        args = dict(zip(("a_desc", "w_desc", "sa_desc", "sw_desc"), descs), lora_ptr=torch.zeros(M, max(rank, 1)),
                    up_ptr=torch.zeros(N, max(rank, 1), dtype=out_dtype), bias_ptr=out, out_ptr=out, M=M, N=N, K=k,
                    R=rank, stride_om=N)
        stages = block_scaled.default_stages(block, producer, out.element_size(), rank_tile if rank else 0)
        constexprs = dict(PART=gl.int32 if dtype == torch.int8 else gl.float32, HAS_BIAS=bias, LOW_RANK=bool(rank),
                          BLOCK_R=rank_tile, STAGES=stages, GROUP_M=8, PRODUCER_WARP=producer,
                          num_warps=block_scaled.NUM_WARPS)
        yield f"block-scaled {dtype} B{block} out {out_dtype} producer={producer} bias={bias} R={rank}", \
            block_scaled.block_scaled_mm_kernel, args, constexprs


def bnb4_variants():
    for block, double_quant, dtype, bias in itertools.product((64, 128, 256), (False, True),
                                                               (torch.bfloat16, torch.float16), (False, True)):
        k = max(1024, 4 * block)
        out = torch.zeros(M, N, dtype=dtype)
        x_desc, p_desc = bnb4.descriptors(torch.zeros(M, k, dtype=dtype), torch.zeros(N * k // 2, dtype=torch.uint8), N, k)
        absmax = torch.zeros(N * k // block, dtype=torch.uint8 if double_quant else torch.float32)
        args = dict(x_desc=x_desc, p_desc=p_desc, code_ptr=torch.zeros(16), absmax_ptr=absmax,
                    nested_ptr=torch.zeros(8), offset_ptr=torch.zeros(1), dyn_ptr=torch.zeros(256), bias_ptr=out,
                    out_ptr=out, M=M, N=N, K=k, stride_om=N)
        constexprs = dict(QBLOCK=block, DOUBLE_QUANT=double_quant, HAS_BIAS=bias, STAGES=bnb4.STAGES, GROUP_M=8,
                          num_warps=bnb4.NUM_WARPS)
        yield f"bnb4 B{block} double_quant={double_quant} {dtype} bias={bias}", bnb4._w4a16_sm90_kernel, args, constexprs


def main() -> int:
    import triton

    count = bad = 0
    for name, kernel, args, constexprs in itertools.chain(block_scaled_variants(), bnb4_variants()):
        count += 1
        found = problems(kernel, args, constexprs)
        if found:
            bad += 1
            print(f"{name}: {found}", flush=True)
    print(f"Triton {triton.__version__}: {count} variants built for sm_90, {bad} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
