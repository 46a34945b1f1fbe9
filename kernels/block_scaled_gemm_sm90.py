"""Hopper GEMM of 8-bit operands with per-K-block row and column scales; the rescale of each
block overlaps the next block's MMA.

    out[m, n] = sum_b a_scale[m, b] * w_scale[n, b] * P_b[m, n]  (+ lora[m] . up[n])  (+ bias[n])

``P_b`` is the product of one K block of 8-bit operands on the tensor cores: int8 x int8 in
int32 (``int8_lodewise``, blocks of 64/128) or e4m3 x e4m3 in fp32 (W4A4: int4 codes held
exactly in e4m3, groups of 64), exact either way. Both formats are this one sum, so one
kernel serves them (``int8_gemm_sm90`` and ``w4a4_gemm_sm90`` are their launchers).

Why a Gluon kernel: every block ends with an fp32 rescale of the whole accumulator tile
(convert, multiply, add per element), which on an H100 costs about as long as the block's
8-bit MMA. ``tl.dot`` waits for each wgmma before its result is read, so the two serialise
and the portable kernels run at about half the 8-bit rate. Here, in Gluon (Triton's
explicit-layout dialect), block b+1's ``wgmma`` is issued asynchronously into a second
register tile *before* block b's partial is rescaled, so the tensor cores and the FMA pipes
work at the same time:

    issue MMA(b+1) -> wait until only MMA(b+1) is in flight -> rescale P_b into acc

Tiles: 128 x 128 output per program, 8 warps (two warpgroups of 64 rows), one fp32
accumulator and two partial tiles (64 registers each per thread). Operands and both blocks'
scales arrive by TMA into a ring of ``STAGES`` shared-memory stages (the scales as flat 1-D
copies, so they cost no registers); a stage is refilled once both warpgroups have retired the
MMA that read it. Rows past M and weight rows past N are zero-filled by TMA and masked at the
store. The optional low-rank term (``LOW_RANK``, W4A4) joins the accumulator after the loop: one
tf32 wgmma of the tile's (BLOCK_M, R) ``lora`` rows and (BLOCK_N, R) ``up`` rows.

GPU-only: Gluon has no interpreter. Its numerics are tested on the GPU against the formats'
references; CI compiles it for sm_90 and checks ptxas keeps the wgmma asynchronous and
spills nothing.
"""
from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, warpgroup_mma, warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .gluon_common import cta_barrier, store_tile, tile_ids, tma_load

BLOCK_M = 128
BLOCK_N = 128
NUM_WARPS = 8
SMEM_FOR_STAGES = 200 * 1024  # of the 227 KB a program may use
MAX_STAGES = 8
PRODUCER_REGISTERS = gl.constexpr(40)  # the producer warp only computes coordinates
CONSUMER_REGISTERS = gl.constexpr(232)  # the second MMA warpgroup of SPLIT (the first gets what is left)


@gluon.jit
def _load_block(descs, smem, ready, block, off_m, off_n, sa_len, sw_len, pred, SCALES_TMA: gl.constexpr):
    """TMA copies of one K block's operands (and scales, with SCALES_TMA) into its ring
    stage, on one barrier."""
    a_desc, w_desc, sa_desc, sw_desc = descs
    a_smem, w_smem, sa_smem, sw_smem = smem
    stage = block % a_smem.shape[0]
    k = block * a_desc.block_type.shape[1]
    bar = ready.index(stage)
    nbytes: gl.constexpr = (a_desc.block_type.nbytes + w_desc.block_type.nbytes
                            + ((sa_desc.block_type.nbytes + sw_desc.block_type.nbytes) if SCALES_TMA else 0))
    mbarrier.expect(bar, nbytes, pred=pred)
    tma_load(a_desc, [off_m, k], bar, a_smem.index(stage), pred=pred)
    tma_load(w_desc, [off_n, k], bar, w_smem.index(stage), pred=pred)
    if SCALES_TMA:
        # The scales are (K // B, sa_len) and (K // B, sw_len) row-major, read as flat vectors
        # (rows padded to 16 bytes: a 1-D TMA copy from an unaligned address is an illegal
        # instruction). A tile's rows past M (columns past N) read padding or the next
        # block's scales, which only multiply zero-filled operand rows and land in masked outputs.
        tma_load(sa_desc, [block * sa_len + off_m], bar, sa_smem.index(stage), pred=pred)
        tma_load(sw_desc, [block * sw_len + off_n], bar, sw_smem.index(stage), pred=pred)


@gluon.jit
def _issue(smem, ready, block, partial, ROW0: gl.constexpr):
    """Start block's 8-bit MMA into ``partial`` (its old value is ignored) once its stage
    landed; the A rows are the consumer's ``partial.shape[0]`` rows from ROW0 of the tile."""
    a_smem = smem[0]
    w_smem = smem[1]
    stage = block % a_smem.shape[0]
    mbarrier.wait(ready.index(stage), (block // a_smem.shape[0]) & 1)
    a_rows = a_smem.index(stage).slice(ROW0, partial.shape[0])
    return warpgroup_mma(a_rows, w_smem.index(stage).permute((1, 0)), partial, use_acc=False, is_async=True)


@gluon.jit
def _rescale(acc, partial, smem, block, scale_ptrs, off_m, off_n, M, N, row_layout: gl.constexpr,
             col_layout: gl.constexpr, SCALES_TMA: gl.constexpr, ROW0: gl.constexpr):
    """``acc + a_scale[m, block] * w_scale[n, block] * P_block``, and P_block in fp32. The
    scales come from the ring stage (SCALES_TMA) or straight from global memory; ``off_m`` is
    the consumer's first row, ROW0 rows into the tile."""
    if SCALES_TMA:
        stage = block % smem[0].shape[0]
        sa = smem[2].index(stage).slice(ROW0, acc.shape[0]).load(row_layout)
        sw = smem[3].index(stage).load(col_layout).to(gl.float32)
    else:
        rows = off_m + gl.arange(0, acc.shape[0], layout=row_layout)
        cols = off_n + gl.arange(0, acc.shape[1], layout=col_layout)
        sa = gl.load(scale_ptrs[0] + block * scale_ptrs[2] + rows, mask=rows < M, other=0.0)
        sw = gl.load(scale_ptrs[1] + block * scale_ptrs[3] + cols, mask=cols < N, other=0.0).to(gl.float32)
    p = partial.to(gl.float32)
    # (p * sa) * sw rather than p * (sa * sw): the same two operations per element, but each
    # depends on p, so the compiler cannot hoist 64 scale products per thread above the wait
    # for the MMA (it did for fp32 partials, and spilled).
    return acc + (p * sa[:, None]) * sw[None, :], p


@gluon.jit
def _reuse(converted, PART: gl.constexpr):
    """The registers of a consumed fp32 partial as the next MMA's ignored input (int32 for the
    int8 MMA): a bitcast costs nothing, where passing the MMA's own int32 result would keep it
    alive beside its fp32 copy (a fourth 64-register tile per thread, which spills)."""
    return converted.to(PART, bitcast=True)


@gluon.jit
def _release(descs, smem, ready, empty, retired, off_m, off_n, sa_len, sw_len, n_blocks, PRODUCER_WARP: gl.constexpr,
             SCALES_TMA: gl.constexpr):
    """Block ``retired``'s MMA has finished in both warpgroups and its scales are read (the
    barrier): hand its stage back, to the producer warp (``empty``) or by loading block
    retired + STAGES into it here."""
    cta_barrier()
    if PRODUCER_WARP:
        mbarrier.arrive(empty.index(retired % smem[0].shape[0]), count=1)
    else:
        nxt = retired + smem[0].shape[0]
        _load_block(descs, smem, ready, nxt, off_m, off_n, sa_len, sw_len, nxt < n_blocks, SCALES_TMA)


@gluon.jit
def _produce(descs, smem, ready, empty, off_m, off_n, sa_len, sw_len, n_blocks, SCALES_TMA: gl.constexpr):
    """The producer warp: load block b into stage b % STAGES once the consumers released it."""
    stages = smem[0].shape[0]
    for b in range(n_blocks):
        # A fresh barrier is in phase 0, so waiting for phase 1 passes: the first round of
        # stages is free.
        mbarrier.wait(empty.index(b % stages), ((b // stages) & 1) ^ 1)
        _load_block(descs, smem, ready, b, off_m, off_n, sa_len, sw_len, True, SCALES_TMA)


@gluon.jit
def _add_low_rank(acc, lora_ptr, up_ptr, off_m, off_n, M, N, R, BLOCK_R: gl.constexpr, num_warps: gl.constexpr):
    """``acc + lora @ up.T`` for the tile (lora fp32 (M, R), up (N, R) any float dtype): tf32
    wgmmas from shared memory accumulating into ``acc``, RANK_STEP ranks at a time (a whole
    rank-128 tile in registers spilled), once per tile."""
    BLOCK_M: gl.constexpr = acc.shape[0]
    BLOCK_N: gl.constexpr = acc.shape[1]
    RANK_STEP: gl.constexpr = BLOCK_R if BLOCK_R < 32 else 32
    TR: gl.constexpr = RANK_STEP // 4
    ld: gl.constexpr = gl.BlockedLayout([1, 4], [32 // TR, TR], [num_warps, 1], [1, 0])
    r = gl.arange(0, RANK_STEP, layout=gl.SliceLayout(0, ld))
    rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))
    cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld))
    lora_smem = gl.allocate_shared_memory(
        gl.float32, [BLOCK_M, RANK_STEP], gl.NVMMASharedLayout.get_default_for([BLOCK_M, RANK_STEP], gl.float32))
    up_smem = gl.allocate_shared_memory(
        gl.float32, [BLOCK_N, RANK_STEP], gl.NVMMASharedLayout.get_default_for([BLOCK_N, RANK_STEP], gl.float32))
    tf32: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                   instr_shape=[16, BLOCK_N, 8])
    # fp32 operands run as tf32 (Triton's default input precision); the accumulator keeps
    # its registers (the two MMA layouts differ only in the instruction's K).
    out = gl.convert_layout(acc, tf32)
    for r0 in range(0, R, RANK_STEP):
        rank = r0 + r
        lora = gl.load(lora_ptr + rows[:, None].to(gl.int64) * R + rank[None, :],
                       mask=(rows[:, None] < M) & (rank[None, :] < R), other=0.0)
        up = gl.load(up_ptr + cols[:, None].to(gl.int64) * R + rank[None, :],
                     mask=(cols[:, None] < N) & (rank[None, :] < R), other=0.0).to(gl.float32)
        cta_barrier()  # the previous step's (synchronous) MMA has read both buffers
        lora_smem.store(lora)
        up_smem.store(up)
        fence_async_shared()
        cta_barrier()
        out = warpgroup_mma(lora_smem, up_smem.permute((1, 0)), out)
    return gl.convert_layout(out, acc.type.layout)


@gluon.jit
def _consume(descs, smem, ready, empty, scale_ptrs, lora_ptr, up_ptr, bias_ptr, out_ptr, off_m, off_n, M, N, R,
             n_blocks, stride_om, PART: gl.constexpr, HAS_BIAS: gl.constexpr, LOW_RANK: gl.constexpr,
             BLOCK_R: gl.constexpr, PRODUCER_WARP: gl.constexpr, SCALES_TMA: gl.constexpr, num_warps: gl.constexpr,
             ROW0: gl.constexpr, BLOCK_M: gl.constexpr):
    """The MMA + rescale main loop over the K blocks, then the epilogue (bias, cast, store),
    for BLOCK_M rows of the tile from ROW0 (the whole tile, or one warpgroup's half)."""
    BLOCK_N: gl.constexpr = smem[1].shape[1]
    rows0 = off_m + ROW0  # this consumer's first output row (off_m stays the tile's, for loads)
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 32])
    row_layout: gl.constexpr = gl.SliceLayout(1, mma)
    col_layout: gl.constexpr = gl.SliceLayout(0, mma)
    # Two partial tiles with fixed roles, X for even blocks and Y for odd ones (the loop
    # takes blocks in pairs): swapping roles every block would make the compiler copy a tile
    # a wgmma is still writing, which serialises every wgmma. A retired tile is converted to
    # fp32 and rescaled, and the converted registers become the next MMA's (ignored) input.
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
    y_free = gl.zeros([BLOCK_M, BLOCK_N], PART, mma)
    x_busy = _issue(smem, ready, 0, gl.zeros([BLOCK_M, BLOCK_N], PART, mma), ROW0)
    for b in range(1, n_blocks - 1, 2):
        y_busy = _issue(smem, ready, b, y_free, ROW0)
        x = warpgroup_mma_wait(num_outstanding=1, deps=[x_busy])  # block b-1
        acc, x = _rescale(acc, x, smem, b - 1, scale_ptrs, rows0, off_n, M, N, row_layout, col_layout, SCALES_TMA, ROW0)
        _release(descs, smem, ready, empty, b - 1, off_m, off_n, scale_ptrs[2], scale_ptrs[3], n_blocks, PRODUCER_WARP,
                 SCALES_TMA)
        x_busy = _issue(smem, ready, b + 1, _reuse(x, PART), ROW0)
        y = warpgroup_mma_wait(num_outstanding=1, deps=[y_busy])  # block b
        acc, y = _rescale(acc, y, smem, b, scale_ptrs, rows0, off_n, M, N, row_layout, col_layout, SCALES_TMA, ROW0)
        _release(descs, smem, ready, empty, b, off_m, off_n, scale_ptrs[2], scale_ptrs[3], n_blocks, PRODUCER_WARP,
                 SCALES_TMA)
        y_free = _reuse(y, PART)
    if n_blocks % 2 == 0:  # one odd block left: into Y
        y_busy = _issue(smem, ready, n_blocks - 1, y_free, ROW0)
        x = warpgroup_mma_wait(num_outstanding=1, deps=[x_busy])
        acc, x = _rescale(acc, x, smem, n_blocks - 2, scale_ptrs, rows0, off_n, M, N, row_layout, col_layout,
                          SCALES_TMA, ROW0)
        y = warpgroup_mma_wait(num_outstanding=0, deps=[y_busy])
        acc, y = _rescale(acc, y, smem, n_blocks - 1, scale_ptrs, rows0, off_n, M, N, row_layout, col_layout, SCALES_TMA, ROW0)
    else:
        x = warpgroup_mma_wait(num_outstanding=0, deps=[x_busy])
        acc, x = _rescale(acc, x, smem, n_blocks - 1, scale_ptrs, rows0, off_n, M, N, row_layout, col_layout, SCALES_TMA, ROW0)

    if LOW_RANK:
        acc = _add_low_rank(acc, lora_ptr, up_ptr, rows0, off_n, M, N, R, BLOCK_R, num_warps)
    store_tile(acc, bias_ptr, out_ptr, rows0, off_n, M, N, stride_om, HAS_BIAS, num_warps)


@gluon.jit
def block_scaled_mm_kernel(
    a_desc, w_desc, sa_desc, sw_desc, sa_ptr, sw_ptr, sa_len, sw_len, lora_ptr, up_ptr, bias_ptr, out_ptr, M, N, K, R, stride_om,
    PART: gl.constexpr, HAS_BIAS: gl.constexpr, LOW_RANK: gl.constexpr, BLOCK_R: gl.constexpr, STAGES: gl.constexpr,
    GROUP_M: gl.constexpr, PRODUCER_WARP: gl.constexpr, SCALES_TMA: gl.constexpr, num_warps: gl.constexpr,
    SPLIT: gl.constexpr = False,
):
    """One 128x128 output tile per program.

    PRODUCER_WARP: one extra warp issues every TMA load (warp specialisation), so the MMA
    warps meet one barrier per block instead of one per copy; otherwise the MMA warps refill
    the ring themselves; either way one CTA barrier per block holds the two MMA warpgroups in
    step. SPLIT (with the producer warp, num_warps=4): the tile's two 64-row halves are two
    partitions of one warpgroup each, synchronised only through the ring's barriers (a stage
    is free once both have released it), so one warpgroup's rescale can run while the other's
    MMA holds the tensor cores, as in CUTLASS's ping-pong kernels. On the H100 SPLIT measured
    level with the producer warp alone (benchmarks/NOTES.md, int8 version 4).
    """
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    QBLOCK: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    n_blocks = K // QBLOCK

    descs = (a_desc, w_desc, sa_desc, sw_desc)
    scale_ptrs = (sa_ptr, sw_ptr, sa_len, sw_len)  # the scale matrices and their row lengths
    smem = (
        gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, QBLOCK], a_desc.layout),
        gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, QBLOCK], w_desc.layout),
        gl.allocate_shared_memory(sa_desc.dtype, [STAGES, BLOCK_M], sa_desc.layout),
        gl.allocate_shared_memory(sw_desc.dtype, [STAGES, BLOCK_N], sw_desc.layout),
    )
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2 if SPLIT else 1)
    if SPLIT:
        HALF: gl.constexpr = BLOCK_M // 2
        gl.warp_specialize([
            (_consume, (descs, smem, ready, empty, scale_ptrs, lora_ptr, up_ptr, bias_ptr, out_ptr, off_m, off_n,
                        M, N, R, n_blocks, stride_om, PART, HAS_BIAS, LOW_RANK, BLOCK_R, PRODUCER_WARP, SCALES_TMA,
                        num_warps, 0, HALF)),
            (_consume, (descs, smem, ready, empty, scale_ptrs, lora_ptr, up_ptr, bias_ptr, out_ptr, off_m, off_n,
                        M, N, R, n_blocks, stride_om, PART, HAS_BIAS, LOW_RANK, BLOCK_R, PRODUCER_WARP, SCALES_TMA,
                        num_warps, HALF, HALF)),
            (_produce, (descs, smem, ready, empty, off_m, off_n, sa_len, sw_len, n_blocks, SCALES_TMA)),
        ], [num_warps, 1], [CONSUMER_REGISTERS, PRODUCER_REGISTERS])
    elif PRODUCER_WARP:
        gl.warp_specialize([
            (_consume, (descs, smem, ready, empty, scale_ptrs, lora_ptr, up_ptr, bias_ptr, out_ptr, off_m, off_n,
                        M, N, R, n_blocks, stride_om, PART, HAS_BIAS, LOW_RANK, BLOCK_R, PRODUCER_WARP, SCALES_TMA,
                        num_warps, 0, BLOCK_M)),
            (_produce, (descs, smem, ready, empty, off_m, off_n, sa_len, sw_len, n_blocks, SCALES_TMA)),
        ], [1], [PRODUCER_REGISTERS])
    else:
        for s in gl.static_range(STAGES):
            _load_block(descs, smem, ready, s, off_m, off_n, sa_len, sw_len, s < n_blocks, SCALES_TMA)
        _consume(descs, smem, ready, empty, scale_ptrs, lora_ptr, up_ptr, bias_ptr, out_ptr, off_m, off_n, M, N, R,
                 n_blocks, stride_om, PART, HAS_BIAS, LOW_RANK, BLOCK_R, PRODUCER_WARP, SCALES_TMA, num_warps,
                 0, BLOCK_M)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))
        mbarrier.invalidate(empty.index(s))


_GL = {torch.int8: gl.int8, torch.float8_e4m3fn: gl.float8e4nv, torch.float32: gl.float32,
       torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@functools.cache
def _tile_layout(shape: tuple[int, ...], dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(list(shape), _GL[dtype])


@functools.cache
def _flat_layout(bits: int):
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=bits, rank=1)


def descriptors(a: torch.Tensor, a_scale_t: torch.Tensor, w: torch.Tensor, w_scale_t: torch.Tensor, block: int):
    """TMA descriptors: one program's A (BLOCK_M x block) and W (BLOCK_N x block) tiles, and its
    BLOCK_M row and BLOCK_N column scales of one block, read from the flat (K/B, M) and
    (K/B, N) scale matrices. The shared-memory layouts are cached: building them (Gluon
    dataclasses that validate every field) was a sixth of a launch's ~200 us of host time on
    the H100 machine (benchmarks/profile_host.py)."""
    def tile(t, shape):
        return TensorDescriptor.from_tensor(t, shape, _tile_layout(tuple(shape), t.dtype))

    def flat(t, length):
        return TensorDescriptor.from_tensor(t.reshape(-1), [length], _flat_layout(t.element_size() * 8))

    return tile(a, [BLOCK_M, block]), tile(w, [BLOCK_N, block]), flat(a_scale_t, BLOCK_M), flat(w_scale_t, BLOCK_N)


def default_stages(block: int, producer_warp: bool = False, out_bytes: int = 2, rank_tile: int = 0,
                   split: bool = False) -> int:
    """As many ring stages as fit in shared memory: a TMA load takes about 1-2 us, and one
    stage holds only one block's MMA (256 clocks for 128 x 128 x 64 8-bit), so deep rings pay.

    Without the producer warp the compiler overlays the epilogue's buffers (the output tile's
    layout change, the low-rank operands) on the ring, which is dead by then; inside
    warp-specialised partitions it does not, so those are reserved first.
    """
    stage_bytes = (BLOCK_M + BLOCK_N) * (block + 4)
    if split:  # each half keeps its own low-rank buffers: (64 lora + 128 up rows) x 32 ranks
        reserved = BLOCK_M * BLOCK_N * out_bytes + 2 * (BLOCK_M // 2 + BLOCK_N) * min(rank_tile, 32) * 4
    elif producer_warp:
        reserved = BLOCK_M * BLOCK_N * out_bytes + (BLOCK_M + BLOCK_N) * rank_tile * 4
    else:
        reserved = 0
    return max(2, min(MAX_STAGES, (SMEM_FOR_STAGES - reserved) // stage_bytes))


def rows_16_byte_aligned(scale_t: torch.Tensor) -> torch.Tensor:
    """``scale_t`` (K/B, L), contiguous with L padded so every row starts 16-byte aligned, as
    the scales' 1-D TMA copies need. The padding is never read into a used output; the copy
    costs a few microseconds, only when L is not already a multiple of 16 bytes."""
    pad = -scale_t.shape[1] % (16 // scale_t.element_size())
    return torch.nn.functional.pad(scale_t, (0, pad)).contiguous() if pad else scale_t.contiguous()


def tma_ready(*tensors: torch.Tensor) -> bool:
    """16-byte aligned bases and row strides (what TMA reads), innermost stride 1."""
    return all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1
               and (t.dim() < 2 or t.stride(0) * t.element_size() % 16 == 0) for t in tensors)


def block_scaled_mm(
    a: torch.Tensor, a_scale_t: torch.Tensor, w: torch.Tensor, w_scale_t: torch.Tensor, block: int,
    bias: torch.Tensor | None, out: torch.Tensor, lora: torch.Tensor | None = None, up: torch.Tensor | None = None,
    *, stages: int | None = None, group_m: int = 8, producer_warp: bool = False, scales_by_tma: bool = True,
    split_warpgroups: bool = False,
) -> torch.Tensor:
    """``out = sum_b a_scale * w_scale * P_b (+ lora @ up.T) (+ bias)`` (module doc).

    a (M, K) and w (N, K) 8-bit (int8, or both e4m3), a_scale_t (K/B, M) fp32 and w_scale_t
    (K/B, N) contiguous, lora (M, R) fp32 and up (N, R) contiguous; out (M, N). The format
    launchers check shapes and ``tma_ready``; this one only launches. ``stages`` defaults to
    ``default_stages``. ``split_warpgroups`` (implies the producer warp): the kernel's SPLIT.
    """
    m, k = a.shape
    n = w.shape[0]
    r = 0 if up is None else up.shape[1]
    rank_tile = max(16, triton.next_power_of_2(max(r, 1)))
    a_scale_t, w_scale_t = rows_16_byte_aligned(a_scale_t), rows_16_byte_aligned(w_scale_t)
    producer_warp = producer_warp or split_warpgroups
    stages = stages or default_stages(block, producer_warp, out.element_size(), rank_tile if lora is not None else 0,
                                      split_warpgroups)
    grid = (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N),)
    block_scaled_mm_kernel[grid](
        *descriptors(a, a_scale_t, w, w_scale_t, block), a_scale_t, w_scale_t, a_scale_t.shape[1], w_scale_t.shape[1],
        out if lora is None else lora, out if up is None else up,
        bias if bias is not None else out, out, m, n, k, r, out.stride(0),
        PART=gl.int32 if a.dtype == torch.int8 else gl.float32,  # the MMA's result type
        HAS_BIAS=bias is not None, LOW_RANK=lora is not None, BLOCK_R=rank_tile,
        STAGES=stages, GROUP_M=group_m, PRODUCER_WARP=producer_warp, SCALES_TMA=scales_by_tma,
        SPLIT=split_warpgroups, num_warps=NUM_WARPS // 2 if split_warpgroups else NUM_WARPS,
    )
    return out
