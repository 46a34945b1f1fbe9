"""Hopper W8A8 GEMM for int8_lodewise: each K block's rescale overlaps the next block's MMA.

Same operands and math as ``int8_gemm.w8a8_matmul`` (read its module doc):
``out[m, n] = sum_b a_scale[m, b] * w_scale[n, b] * P_b[m, n] (+ bias[n])`` with ``P_b`` the
exact int32 product of one K block. Why a second kernel: every K block ends with an fp32
rescale of the whole accumulator tile (convert, multiply, add per element), which on an H100
costs about as long as the block's int8 MMA. ``tl.dot`` waits for each wgmma before its
result is read, so the two serialise and the portable kernel runs at about half the int8
rate. Here, written in Gluon (Triton's explicit-layout dialect), block b+1's ``wgmma`` is
issued asynchronously into a second int32 register tile *before* block b's partial is
rescaled, so the tensor cores and the FMA pipes work at the same time:

    issue MMA(b+1) -> wait until only MMA(b+1) is in flight -> rescale P_b into acc

Tiles: 128 x 128 output per program, 8 warps (two warpgroups of 64 rows), one fp32
accumulator and two int32 partial tiles (64 registers each per thread). Operands arrive by
TMA into a ring of ``STAGES`` shared-memory stages; a stage is refilled once both warpgroups
have retired the MMA that read it (a CTA barrier after the wait). Rows past M and weight rows
past N are zero-filled by TMA and masked at the store. The quantization block is the K step;
blocks of 64 and 128 are served (a 256-byte TMA row would exceed the 128-byte swizzle), 256
stays on the portable kernel.

GPU-only: Gluon has no interpreter. Its numerics are tested on the GPU against the same
exact-integer reference as the portable kernel, and CI compiles it for sm_90.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .gluon_common import cta_barrier, store_tile, tile_ids, tma_load
from .int8_gemm import OUT_DTYPES, check_w8a8_operands

BLOCK_M = 128
BLOCK_N = 128
NUM_WARPS = 8
STAGES = 4
PRODUCER_REGISTERS = gl.constexpr(40)  # the producer warp only computes coordinates
SUPPORTED_BLOCKS = (64, 128)


@gluon.jit
def _load_block(descs, smem, ready, block, off_m, off_n, M, N, pred):
    """TMA copies of one K block's operands and scales into its ring stage, on one barrier."""
    a_desc, w_desc, sa_desc, sw_desc = descs
    a_smem, w_smem, sa_smem, sw_smem = smem
    stage = block % a_smem.shape[0]
    k = block * a_desc.block_type.shape[1]
    bar = ready.index(stage)
    nbytes: gl.constexpr = (a_desc.block_type.nbytes + w_desc.block_type.nbytes
                            + sa_desc.block_type.nbytes + sw_desc.block_type.nbytes)
    mbarrier.expect(bar, nbytes, pred=pred)
    tma_load(a_desc, [off_m, k], bar, a_smem.index(stage), pred=pred)
    tma_load(w_desc, [off_n, k], bar, w_smem.index(stage), pred=pred)
    # The scales are (K // B, M) and (K // B, N) row-major, read as flat vectors: a tile's
    # rows past M (columns past N) read the next block's scales, which only multiply
    # zero-filled operand rows and land in masked outputs.
    tma_load(sa_desc, [block * M + off_m], bar, sa_smem.index(stage), pred=pred)
    tma_load(sw_desc, [block * N + off_n], bar, sw_smem.index(stage), pred=pred)


@gluon.jit
def _issue(smem, ready, block, partial):
    """Start block's int8 MMA into ``partial`` (its old value is ignored) once its stage landed."""
    a_smem = smem[0]
    w_smem = smem[1]
    stage = block % a_smem.shape[0]
    mbarrier.wait(ready.index(stage), (block // a_smem.shape[0]) & 1)
    return warpgroup_mma(a_smem.index(stage), w_smem.index(stage).permute((1, 0)), partial,
                         use_acc=False, is_async=True)


@gluon.jit
def _rescale(acc, partial, smem, block, row_layout: gl.constexpr, col_layout: gl.constexpr):
    """``acc + a_scale[m, block] * w_scale[n, block] * P_block``, and P_block in fp32."""
    stage = block % smem[0].shape[0]
    sa = smem[2].index(stage).load(row_layout)
    sw = smem[3].index(stage).load(col_layout)
    p = partial.to(gl.float32)
    return acc + p * (sa[:, None] * sw[None, :]), p


@gluon.jit
def _reuse(converted):
    """The registers of a consumed fp32 partial as the next MMA's ignored int32 input: a
    bitcast costs nothing, where passing the int32 tile would keep it alive beside its fp32
    copy (a fourth 64-register tile per thread, which spills)."""
    return converted.to(gl.int32, bitcast=True)


@gluon.jit
def _release(descs, smem, ready, empty, retired, off_m, off_n, M, N, n_blocks, PRODUCER_WARP: gl.constexpr):
    """Block ``retired``'s MMA has finished in both warpgroups and its scales are read (the
    barrier): hand its stage back, to the producer warp (``empty``) or by loading block
    retired + STAGES into it here."""
    cta_barrier()
    if PRODUCER_WARP:
        mbarrier.arrive(empty.index(retired % smem[0].shape[0]), count=1)
    else:
        nxt = retired + smem[0].shape[0]
        _load_block(descs, smem, ready, nxt, off_m, off_n, M, N, nxt < n_blocks)


@gluon.jit
def _produce(descs, smem, ready, empty, off_m, off_n, M, N, n_blocks):
    """The producer warp: load block b into stage b % STAGES once the consumers released it."""
    stages = smem[0].shape[0]
    for b in range(n_blocks):
        # A fresh barrier is in phase 0, so waiting for phase 1 passes: the first round of
        # stages is free.
        mbarrier.wait(empty.index(b % stages), ((b // stages) & 1) ^ 1)
        _load_block(descs, smem, ready, b, off_m, off_n, M, N, True)


@gluon.jit
def _consume(descs, smem, ready, empty, bias_ptr, out_ptr, off_m, off_n, M, N, n_blocks, stride_om,
             HAS_BIAS: gl.constexpr, PRODUCER_WARP: gl.constexpr, num_warps: gl.constexpr):
    """The MMA + rescale main loop over the K blocks, then the epilogue (bias, cast, store)."""
    BLOCK_M: gl.constexpr = smem[0].shape[1]
    BLOCK_N: gl.constexpr = smem[1].shape[1]
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 32])
    row_layout: gl.constexpr = gl.SliceLayout(1, mma)
    col_layout: gl.constexpr = gl.SliceLayout(0, mma)
    # Two int32 partial tiles with fixed roles, X for even blocks and Y for odd ones (the loop
    # takes blocks in pairs): swapping roles every block would make the compiler copy a tile
    # a wgmma is still writing, which serialises every wgmma. A retired tile is converted to
    # fp32 and rescaled, and the converted registers become the next MMA's (ignored) input.
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
    y_free = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, mma)
    x_busy = _issue(smem, ready, 0, gl.zeros([BLOCK_M, BLOCK_N], gl.int32, mma))
    for b in range(1, n_blocks - 1, 2):
        y_busy = _issue(smem, ready, b, y_free)
        x = warpgroup_mma_wait(num_outstanding=1, deps=[x_busy])  # block b-1
        acc, x = _rescale(acc, x, smem, b - 1, row_layout, col_layout)
        _release(descs, smem, ready, empty, b - 1, off_m, off_n, M, N, n_blocks, PRODUCER_WARP)
        x_busy = _issue(smem, ready, b + 1, _reuse(x))
        y = warpgroup_mma_wait(num_outstanding=1, deps=[y_busy])  # block b
        acc, y = _rescale(acc, y, smem, b, row_layout, col_layout)
        _release(descs, smem, ready, empty, b, off_m, off_n, M, N, n_blocks, PRODUCER_WARP)
        y_free = _reuse(y)
    if n_blocks % 2 == 0:  # one odd block left: into Y
        y_busy = _issue(smem, ready, n_blocks - 1, y_free)
        x = warpgroup_mma_wait(num_outstanding=1, deps=[x_busy])
        acc, x = _rescale(acc, x, smem, n_blocks - 2, row_layout, col_layout)
        y = warpgroup_mma_wait(num_outstanding=0, deps=[y_busy])
        acc, y = _rescale(acc, y, smem, n_blocks - 1, row_layout, col_layout)
    else:
        x = warpgroup_mma_wait(num_outstanding=0, deps=[x_busy])
        acc, x = _rescale(acc, x, smem, n_blocks - 1, row_layout, col_layout)

    store_tile(acc, bias_ptr, out_ptr, off_m, off_n, M, N, stride_om, HAS_BIAS, num_warps)


@gluon.jit
def _w8a8_sm90_kernel(
    a_desc, w_desc, sa_desc, sw_desc, bias_ptr, out_ptr, M, N, K, stride_om,
    HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr, PRODUCER_WARP: gl.constexpr,
    num_warps: gl.constexpr,
):
    """One 128x128 output tile per program. PRODUCER_WARP: one extra warp issues every TMA
    load (warp specialisation), so the MMA warps meet one barrier per block instead of one
    per copy; otherwise the MMA warps refill the ring themselves."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    QBLOCK: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    n_blocks = K // QBLOCK

    descs = (a_desc, w_desc, sa_desc, sw_desc)
    smem = (
        gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, QBLOCK], a_desc.layout),
        gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, QBLOCK], w_desc.layout),
        gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], sa_desc.layout),
        gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_N], sw_desc.layout),
    )
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    if PRODUCER_WARP:
        gl.warp_specialize([
            (_consume, (descs, smem, ready, empty, bias_ptr, out_ptr, off_m, off_n, M, N, n_blocks, stride_om,
                        HAS_BIAS, PRODUCER_WARP, num_warps)),
            (_produce, (descs, smem, ready, empty, off_m, off_n, M, N, n_blocks)),
        ], [1], [PRODUCER_REGISTERS])
    else:
        for s in gl.static_range(STAGES):
            _load_block(descs, smem, ready, s, off_m, off_n, M, N, s < n_blocks)
        _consume(descs, smem, ready, empty, bias_ptr, out_ptr, off_m, off_n, M, N, n_blocks, stride_om,
                 HAS_BIAS, PRODUCER_WARP, num_warps)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))
        mbarrier.invalidate(empty.index(s))


def descriptors(a_q: torch.Tensor, a_scale_t: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, block_size: int):
    """TMA descriptors: one program's A (BLOCK_M x block) and weight (BLOCK_N x block) tiles,
    and its BLOCK_M activation and BLOCK_N weight scales of one block (flat views)."""
    a_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, block_size], gl.int8)
    w_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, block_size], gl.int8)
    flat = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
    sw_flat = w_scale.t().reshape(-1)  # column-major (N, K // B) -> (K // B) * N, no copy
    return (TensorDescriptor.from_tensor(a_q, [BLOCK_M, block_size], a_layout),
            TensorDescriptor.from_tensor(w_q, [BLOCK_N, block_size], w_layout),
            TensorDescriptor.from_tensor(a_scale_t.reshape(-1), [BLOCK_M], flat),
            TensorDescriptor.from_tensor(sw_flat, [BLOCK_N], flat))


def accepts(a_q: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, block_size: int) -> bool:
    """Operands this kernel can take by TMA: a served block size, 16-byte aligned int8 rows,
    and weight scales kept column-major (as the layout keeps them)."""
    n = w_q.shape[0]
    return (block_size in SUPPORTED_BLOCKS and w_scale.stride() == (1, n)
            and all(t.data_ptr() % 16 == 0 for t in (a_q, w_q, w_scale))
            and a_q.stride(0) % 16 == 0 and w_q.stride(0) % 16 == 0)


def w8a8_matmul_sm90(
    a_q: torch.Tensor, a_scale_t: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, block_size: int,
    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *, group_m: int = 8,
    stages: int = STAGES, producer_warp: bool = False,
) -> torch.Tensor:
    """``int8_gemm.w8a8_matmul`` on Hopper; the caller checks ``sm90.sm90_kernels_enabled``
    and ``accepts``."""
    m, n, k = check_w8a8_operands(a_q, a_scale_t, w_q, w_scale, block_size)
    if not accepts(a_q, w_q, w_scale, block_size):
        raise ValueError(f"the sm_90 W8A8 kernel needs blocks {SUPPORTED_BLOCKS}, 16-byte aligned int8 rows and "
                         f"column-major weight scales; got block {block_size}, scale strides {w_scale.stride()}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"output dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    out = torch.empty((m, n), dtype=out_dtype, device=a_q.device)
    if m == 0:
        return out
    grid = (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N),)
    _w8a8_sm90_kernel[grid](
        *descriptors(a_q, a_scale_t, w_q, w_scale, block_size), bias if bias is not None else out, out,
        m, n, k, out.stride(0),
        HAS_BIAS=bias is not None, STAGES=stages, GROUP_M=group_m, PRODUCER_WARP=producer_warp,
        num_warps=NUM_WARPS,
    )
    return out
