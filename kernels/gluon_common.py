"""Gluon helpers shared by the Hopper kernels (``*_sm90.py``); imported only by them, so the
package stays importable with a Triton that has no Gluon."""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import tma

# Triton 3.6 names the TMA load async_copy_global_to_shared; later releases, async_load.
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
# Triton 3.6 names the CTA barrier thread_barrier; later releases, barrier.
cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier


@gluon.jit
def tile_ids(M, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    """Grouped order (as ``tiling.grouped_tile_ids``): GROUP_M row tiles share weight tiles in L2."""
    pid = gl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = gl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n
