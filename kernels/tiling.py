"""Launch-order helpers shared by the tiled GEMM kernels."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``program_id(0)`` in grouped order.

    Consecutive programs walk GROUP_M row tiles for each column tile, so a weight column tile
    is reused by GROUP_M row tiles while it is still in L2 (the Triton matmul tutorial's order).
    """
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n
