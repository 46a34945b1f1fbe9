"""The block-scaled Hopper GEMM (int8_lodewise W8A8 and W4A4) builds for sm_90 as launched.

CI has no GPU and Gluon has no interpreter, so this compiles the kernel for sm_90 from the
arguments each format's launcher passes (frontend, layouts, lowering, ptxas), and holds the
two properties its speed rests on: ptxas keeps the wgmma asynchronous (no serialisation
warning; one ``wait_group 1`` retires the previous block while the next runs) and spills
nothing. Numerics are tested on the GPU beside each format's other kernels.
"""
from __future__ import annotations

import re

import pytest
import torch

from sm90_support import assert_async_and_unspilled, block_scaled_build, build_ptx, needs_gluon


@needs_gluon
@pytest.mark.parametrize("block", (64, 128))
@pytest.mark.parametrize("producer_warp", (False, True))
@pytest.mark.parametrize("add_convert", (False, True))
def test_int8_lodewise_kernel_builds_async_and_unspilled(block, producer_warp, add_convert):
    ptx = build_ptx(*block_scaled_build(torch.int8, block, 4, rank=0, producer_warp=producer_warp,
                                        add_convert=add_convert))
    assert "mma_async.sync.aligned.m64n128k32.s32.s8.s8" in ptx and "wgmma.wait_group.sync.aligned 1" in ptx
    assert_async_and_unspilled(ptx)
    # add_convert: the block sums reach fp32 without I2F (a quarter-rate instruction on sm_90)
    conversions = len(re.findall(r"cvt\.rn\.f32\.s32", ptx))
    assert (conversions == 0) if add_convert else (conversions > 0)


def test_add_convert_identity_is_exact_over_the_int8_block_sum_range():
    """``bitcast_f32(P + 0x4B400000) - 12582912`` equals float(P) for every |P| < 2^22 (the
    kernel's I2F-free conversion; 8-bit block sums over <= 256 columns stay below that)."""
    assert 256 * 127 * 127 < 2**22
    p = torch.cat([torch.arange(-2**22 + 1, -2**22 + 4097), torch.arange(-4096, 4097), torch.arange(2**22 - 4096, 2**22),
                   torch.randint(-2**22 + 1, 2**22, (1 << 16,), generator=torch.Generator().manual_seed(0))]).to(torch.int32)
    converted = (p + 0x4B400000).view(torch.float32) - 12582912.0
    assert torch.equal(converted, p.float())


@needs_gluon
@pytest.mark.parametrize("out_dtype", (torch.bfloat16, torch.float16))
def test_w4a4_kernel_builds_async_and_unspilled(out_dtype):
    ptx = build_ptx(*block_scaled_build(torch.float8_e4m3fn, 64, 5, rank=32, producer_warp=False, out_dtype=out_dtype))
    assert "e4m3.e4m3" in ptx and ".tf32.tf32" in ptx and "wgmma.wait_group.sync.aligned 1" in ptx
    assert_async_and_unspilled(ptx)
