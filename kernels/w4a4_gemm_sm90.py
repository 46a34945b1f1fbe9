"""W4A4 (SVDQuant) GEMM on Hopper: ``w4a4_gemm.w4a4_gemm``'s streaming path (activation codes
and the once-per-call unpacked weight, both e4m3 in split group order) computed by the
block-scaled Gluon GEMM (``block_scaled_gemm_sm90``) with 64-wide groups: each group's fp32
rescale overlaps the next group's fp8 MMA, and the low-rank term starts the accumulator as one
tf32 MMA per tile.
"""
from __future__ import annotations

import torch

from .block_scaled_gemm_sm90 import block_scaled_mm, tma_ready
from .w4a4_gemm import GROUP, check_operands

MAX_RANK = 128


def accepts(codes: torch.Tensor, unpacked: torch.Tensor, proj_up: torch.Tensor) -> bool:
    """e4m3 operands readable by TMA and a rank the low-rank tile holds."""
    return (codes.dtype == unpacked.dtype == torch.float8_e4m3fn and tma_ready(codes, unpacked)
            and proj_up.shape[1] <= MAX_RANK)


def w4a4_gemm_sm90(
    codes: torch.Tensor, ascales: torch.Tensor, unpacked: torch.Tensor, wscales: torch.Tensor,
    lora: torch.Tensor, proj_up: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
    *, out: torch.Tensor | None = None, stages: int | None = None, producer_warp: bool = False,
    split_warpgroups: bool = False,
) -> torch.Tensor:
    """Shapes as ``w4a4_gemm``: codes (M, K) and unpacked (N, K) e4m3, ascales (K/64, M) fp32,
    wscales (K/64, N), lora (C, M, R) or (M, R) fp32, proj_up (N, R)."""
    lora, (m, n, k, r) = check_operands("W4A4 sm_90 GEMM", codes, ascales, unpacked, wscales, lora, proj_up,
                                        packed=False)
    lora = lora.sum(dim=0) if lora.shape[0] > 1 else lora[0]
    if not accepts(codes, unpacked, proj_up):
        raise ValueError(f"W4A4 sm_90 GEMM: needs e4m3 codes and weight with 16-byte aligned rows, contiguous "
                         f"scales and R <= {MAX_RANK}; got {codes.dtype}/{unpacked.dtype}, R={r}")
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=codes.device)
    if m == 0:
        return out
    # Weight scales in fp32 (2.4 MB for 3072 x 12288, one small cast per call): with 16-bit
    # scales ptxas serialised the wgmma (the conversions raised register pressure past it).
    return block_scaled_mm(codes, ascales.contiguous(), unpacked, wscales.float().contiguous(), GROUP, bias, out,
                           lora.float().contiguous(), proj_up.contiguous(), stages=stages, producer_warp=producer_warp,
                           split_warpgroups=split_warpgroups)
