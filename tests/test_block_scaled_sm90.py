"""The block-scaled Hopper GEMM (int8_lodewise W8A8 and W4A4) builds for sm_90 as launched.

CI has no GPU and Gluon has no interpreter, so this compiles the kernel for sm_90 from the
arguments each format's launcher passes (frontend, layouts, lowering, ptxas), and holds the
two properties its speed rests on: ptxas keeps the wgmma asynchronous (no serialisation
warning; one ``wait_group 1`` retires the previous block while the next runs) and spills
nothing. Numerics are tested on the GPU beside each format's other kernels.
"""
from __future__ import annotations

import pytest
import torch

from sm90_support import assert_async_and_unspilled, compile_for_sm90, needs_gluon

M, N = 300, 200


def _compile(dtype, block, n_blocks, low_rank, producer_warp, out_dtype=torch.bfloat16, scale_dtype=torch.float32):
    from comfy_lowbit.kernels import block_scaled_gemm_sm90 as sm90

    k = block * n_blocks
    a = torch.zeros(M, k, dtype=dtype)
    w = torch.zeros(N, k, dtype=dtype)
    out = torch.zeros(M, N, dtype=out_dtype)
    a_desc, w_desc, sa_desc, sw_desc = sm90.descriptors(a, torch.zeros(n_blocks, M), w,
                                                        torch.zeros(n_blocks, N, dtype=scale_dtype), block)
    r = 32 if low_rank else 0
    args = dict(a_desc=a_desc, w_desc=w_desc, sa_desc=sa_desc, sw_desc=sw_desc, lora_ptr=torch.zeros(M, max(r, 1)),
                up_ptr=torch.zeros(N, max(r, 1), dtype=out_dtype), bias_ptr=out, out_ptr=out, M=M, N=N, K=k, R=r,
                stride_om=N)
    from triton.experimental.gluon import language as gl

    constexprs = dict(PART=gl.int32 if dtype == torch.int8 else gl.float32, HAS_BIAS=True, LOW_RANK=low_rank, BLOCK_R=32, STAGES=sm90.default_stages(block), GROUP_M=8,
                      PRODUCER_WARP=producer_warp, num_warps=sm90.NUM_WARPS)
    return compile_for_sm90(sm90.block_scaled_mm_kernel, args, constexprs, sm90.NUM_WARPS).asm["ptx"]


@needs_gluon
@pytest.mark.parametrize("block", (64, 128))
@pytest.mark.parametrize("producer_warp", (False, True))
def test_int8_lodewise_kernel_builds_async_and_unspilled(block, producer_warp):
    ptx = _compile(torch.int8, block, 4, low_rank=False, producer_warp=producer_warp)
    assert "mma_async.sync.aligned.m64n128k32.s32.s8.s8" in ptx and "wgmma.wait_group.sync.aligned 1" in ptx
    assert_async_and_unspilled(ptx)


@needs_gluon
@pytest.mark.parametrize("out_dtype", (torch.bfloat16, torch.float16))
def test_w4a4_kernel_builds_async_and_unspilled(out_dtype):
    ptx = _compile(torch.float8_e4m3fn, 64, 5, low_rank=True, producer_warp=False, out_dtype=out_dtype)
    assert "e4m3.e4m3" in ptx and ".tf32.tf32" in ptx and "wgmma.wait_group.sync.aligned 1" in ptx
    assert_async_and_unspilled(ptx)
