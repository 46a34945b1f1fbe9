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


@gluon.jit
def store_tile(acc, bias_ptr, out_ptr, off_m, off_n, M, N, stride_om, HAS_BIAS: gl.constexpr,
               num_warps: gl.constexpr):
    """Epilogue of an fp32 accumulator tile in any layout: + bias[n], cast to the output's
    dtype, masked store. The tile is first moved (through shared memory) to a layout with 16
    contiguous bytes per thread along N, instead of the MMA layout's pairs."""
    BLOCK_M: gl.constexpr = acc.shape[0]
    BLOCK_N: gl.constexpr = acc.shape[1]
    if HAS_BIAS:
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc.type.layout))
        acc += gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)[None, :]
    VEC: gl.constexpr = 128 // out_ptr.dtype.element_ty.primitive_bitwidth
    TN: gl.constexpr = BLOCK_N // VEC if BLOCK_N // VEC < 32 else 32
    store_layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TN, TN], [num_warps, 1], [1, 0])
    out = gl.convert_layout(acc.to(out_ptr.dtype.element_ty), store_layout)
    rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, store_layout))
    cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, store_layout))
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    gl.store(out_ptr + rows[:, None].to(gl.int64) * stride_om + cols[None, :], out, mask=mask)
