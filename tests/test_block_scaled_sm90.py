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

from sm90_support import assert_async_and_unspilled, block_scaled_build, build_ptx, needs_gluon


@needs_gluon
@pytest.mark.parametrize("block", (64, 128))
@pytest.mark.parametrize("producer_warp", (False, True))
def test_int8_lodewise_kernel_builds_async_and_unspilled(block, producer_warp):
    ptx = build_ptx(*block_scaled_build(torch.int8, block, 4, rank=0, producer_warp=producer_warp))
    assert "mma_async.sync.aligned.m64n128k32.s32.s8.s8" in ptx and "wgmma.wait_group.sync.aligned 1" in ptx
    assert_async_and_unspilled(ptx)


@needs_gluon
@pytest.mark.parametrize("out_dtype", (torch.bfloat16, torch.float16))
def test_w4a4_kernel_builds_async_and_unspilled(out_dtype):
    ptx = build_ptx(*block_scaled_build(torch.float8_e4m3fn, 64, 5, rank=32, producer_warp=False, out_dtype=out_dtype))
    assert "e4m3.e4m3" in ptx and ".tf32.tf32" in ptx and "wgmma.wait_group.sync.aligned 1" in ptx
    assert_async_and_unspilled(ptx)


@needs_gluon
@pytest.mark.parametrize("dtype,block,rank", [(torch.int8, 128, 0), (torch.int8, 64, 0), (torch.float8_e4m3fn, 64, 32)])
def test_split_warpgroups_build_two_independent_consumers(dtype, block, rank):
    """SPLIT: two one-warpgroup MMA partitions, each synchronising its own warps (named
    barriers of 128 threads, not a CTA barrier) and releasing a ring stage with one arrive
    from its first thread; the stage barriers expect both."""
    ptx = build_ptx(*block_scaled_build(dtype, block, 5, rank=rank, producer_warp=True, split=True))
    assert "mbarrier.init.shared::cta.b64" in ptx and "], 2;" in ptx, "the empty barriers must count two consumers"
    assert "bar.sync \t0, 128;" in ptx and "bar.sync \t2, 128;" in ptx
    assert ptx.count("wgmma.wait_group.sync.aligned 1") >= 4, "both consumers keep one MMA in flight"
    assert_async_and_unspilled(ptx)
