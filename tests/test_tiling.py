"""The grouped launch order shared by the GEMM kernels (kernels/tiling.py), under the interpreter."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from comfy_lowbit.kernels.tiling import grouped_tile_ids

from support import KERNEL_DEVICE


@triton.jit
def _record_tile_ids(out_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid = tl.program_id(0)
    tl.store(out_ptr + 2 * pid, pid_m)
    tl.store(out_ptr + 2 * pid + 1, pid_n)


@pytest.mark.parametrize("M, N, group_m", [(100, 70, 4), (33, 200, 3), (16, 16, 8)])
def test_every_tile_once_in_groups_of_rows(M, N, group_m):
    block_m, block_n = 16, 16
    tiles_m, tiles_n = triton.cdiv(M, block_m), triton.cdiv(N, block_n)
    out = torch.full((tiles_m * tiles_n, 2), -1, dtype=torch.int32, device=KERNEL_DEVICE)
    _record_tile_ids[(tiles_m * tiles_n,)](out, M, N, block_m, block_n, group_m)
    ids = out.cpu().tolist()
    assert sorted(map(tuple, ids)) == [(m, n) for m in range(tiles_m) for n in range(tiles_n)]
    # Within a full group, consecutive programs step down the rows before moving to the next column.
    first_group = ids[: min(group_m, tiles_m)]
    assert [m for m, _ in first_group] == list(range(len(first_group))) and {n for _, n in first_group} == {0}
