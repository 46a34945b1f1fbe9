"""int8_lodewise W8A8 on Hopper: ``int8_gemm.w8a8_matmul``'s operands and math, computed by the
block-scaled Gluon GEMM (``block_scaled_gemm_sm90``), whose per-block rescale overlaps the
next block's int8 MMA. Served: quantization blocks of 64 and 128 (the K step is the block, and
a 256-byte TMA row would exceed the 128-byte swizzle); 256 stays on the portable kernel.
"""
from __future__ import annotations

import torch

from .block_scaled_gemm_sm90 import block_scaled_mm, tma_ready
from .int8_gemm import OUT_DTYPES, check_w8a8_operands

SUPPORTED_BLOCKS = (64, 128)


def accepts(a_q: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, block_size: int) -> bool:
    """A served block size, TMA-readable int8 rows, and weight scales kept column-major (as
    the layout keeps them: the (K/B, N) matrix the kernel reads, transposed)."""
    return (block_size in SUPPORTED_BLOCKS and w_scale.t().is_contiguous()
            and tma_ready(a_q, w_q) and w_scale.data_ptr() % 16 == 0)


def w8a8_matmul_sm90(
    a_q: torch.Tensor, a_scale_t: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, block_size: int,
    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *, group_m: int = 8,
    stages: int | None = None, producer_warp: bool = False, split_warpgroups: bool = False,
) -> torch.Tensor:
    """``int8_gemm.w8a8_matmul`` on Hopper; the caller checks ``sm90.sm90_kernels_enabled``
    and ``accepts``."""
    m, n, _ = check_w8a8_operands(a_q, a_scale_t, w_q, w_scale, block_size)
    if not accepts(a_q, w_q, w_scale, block_size):
        raise ValueError(f"the sm_90 W8A8 kernel needs blocks {SUPPORTED_BLOCKS}, 16-byte aligned int8 rows and "
                         f"column-major weight scales; got block {block_size}, scale strides {w_scale.stride()}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"output dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    out = torch.empty((m, n), dtype=out_dtype, device=a_q.device)
    if m == 0:
        return out
    return block_scaled_mm(a_q, a_scale_t, w_q, w_scale.t(), block_size, bias, out,
                           stages=stages, group_m=group_m, producer_warp=producer_warp,
                           split_warpgroups=split_warpgroups)
