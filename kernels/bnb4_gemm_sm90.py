"""Hopper W4A16 GEMM for the bitsandbytes NF4/FP4 layouts: the weight is decoded in the main
loop, on CUDA cores, while the tensor cores run the previous K step.

Storage and math are ``bnb4_linear``'s (read its module doc): ``y = x @ W.T + bias`` with
``W[n, k] = codebook[nibble(n, k)] * absmax[block(n, k)]``. Why a second kernel: from M of
about 1024 the weight-only GEMM is compute-bound, so the best a 4-bit weight can do is tie
cuBLAS on the bf16 product; dequantize + cuBLAS pays a fixed pass over the whole weight on
top (40 us for 3072 x 12288), and the portable fused kernel waits on its codebook loads
before every MMA. Here, in Gluon (Triton's explicit-layout dialect), each K step is:

    issue the async wgmma of step i (operands in shared memory)
    -> wait until only it is in flight (step i-1 retired, its buffers free)
    -> decode step i+1's packed bytes into the other bf16 weight buffer (CUDA cores)
    -> fence + barrier, refill the freed activation stage by TMA

so the decode hides under an MMA that is 256 x 128 x 64 per step: per thread 32 nibbles
(32 codebook loads from one 64-byte line of L1, 32 multiplies, 16 packs) against 1024
tensor-core clocks.

Tiles: 256 x 128 output per program, 8 warps (each warpgroup 128 rows, an fp32 accumulator
of 128 registers per thread); activations by TMA through a ring of ``STAGES``; the packed
weight tile (128 rows x 32 bytes) by TMA in the same stage; the decoded weight in one of
128 x 64 bf16/fp16 buffers, three of them so that the buffer being written was last read
two steps ago, by MMAs both warpgroups have retired. The absmax (fp32, or double-quantised codes decoded through the
dynamic map and the nested absmax) is one load per thread per step: each thread decodes 32
elements of one row, inside one quantization block (the block is a multiple of 64).

GPU-only (Gluon has no interpreter): tested on the GPU against ``reference_bnb4_linear``;
CI compiles it for sm_90 and checks ptxas reports no spills and no serialised wgmma.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, warpgroup_mma, warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .gluon_common import cta_barrier, store_tile, tile_ids, tma_load

BLOCK_M = 256
BLOCK_N = 128
BLOCK_K = 64
NUM_WARPS = 8
STAGES = 3
_GL = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@gluon.jit
def _load_step(x_desc, p_desc, x_smem, p_smem, ready, step, off_m, off_n, pred):
    """TMA copies of step's activation tile and packed weight tile into its stage."""
    stage = step % x_smem.shape[0]
    bar = ready.index(stage)
    mbarrier.expect(bar, x_desc.block_type.nbytes + p_desc.block_type.nbytes, pred=pred)
    tma_load(x_desc, [off_m, step * x_desc.block_type.shape[1]], bar, x_smem.index(stage), pred=pred)
    tma_load(p_desc, [off_n, step * p_desc.block_type.shape[1]], bar, p_smem.index(stage), pred=pred)


@gluon.jit
def _decode_step(p_smem, ready, w_buf, step, off_n, K, N, code_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr,
                 QBLOCK: gl.constexpr, DOUBLE_QUANT: gl.constexpr, num_warps: gl.constexpr):
    """Decode step's packed (BLOCK_N, 32) byte tile into ``w_buf`` (BLOCK_N, 64) of W values.

    Byte j of a row holds element 2j in its high nibble and 2j+1 in its low one, so the
    high and low values are joined on a new last axis and flattened: (row, j, {hi, lo}) is
    (row, 2j + {0, 1}).
    """
    stages = p_smem.shape[0]
    stage = step % stages
    mbarrier.wait(ready.index(stage), (step // stages) & 1)
    ROWS: gl.constexpr = p_smem.shape[1]
    BYTES: gl.constexpr = p_smem.shape[2]
    byte_layout: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // BYTES, BYTES // 16], [num_warps, 1], [1, 0])
    packed = p_smem.index(stage).load(byte_layout).to(gl.int32)
    rows = off_n + gl.arange(0, ROWS, layout=gl.SliceLayout(1, byte_layout))
    block = (rows.to(gl.int64) * K + step * (2 * BYTES)) // QBLOCK
    row_ok = rows < N
    if DOUBLE_QUANT:
        q = gl.load(absmax_ptr + block, mask=row_ok, other=0).to(gl.int32)
        nested = gl.load(nested_ptr + block // 256, mask=row_ok, other=0.0)
        absmax = gl.load(dyn_ptr + q) * nested + gl.load(offset_ptr)
    else:
        absmax = gl.load(absmax_ptr + block, mask=row_ok, other=0.0)
    hi = gl.load(code_ptr + (packed >> 4)) * absmax[:, None]
    lo = gl.load(code_ptr + (packed & 15)) * absmax[:, None]
    w = gl.reshape(gl.join(hi, lo), [ROWS, 2 * BYTES])
    w_buf.store(w.to(w_buf.dtype))


@gluon.jit
def _w4a16_sm90_kernel(
    x_desc, p_desc, code_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, bias_ptr, out_ptr,
    M, N, K, stride_om,
    QBLOCK: gl.constexpr, DOUBLE_QUANT: gl.constexpr, HAS_BIAS: gl.constexpr, STAGES: gl.constexpr,
    GROUP_M: gl.constexpr, num_warps: gl.constexpr,
):
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = p_desc.block_type.shape[0]
    dtype: gl.constexpr = x_desc.dtype
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])
    w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], dtype)

    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    steps = K // BLOCK_K

    x_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    p_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N, BLOCK_K // 2], p_desc.layout)
    w_bufs = gl.allocate_shared_memory(dtype, [3, BLOCK_N, BLOCK_K], w_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
    for s in gl.static_range(STAGES):
        _load_step(x_desc, p_desc, x_smem, p_smem, ready, s, off_m, off_n, s < steps)

    _decode_step(p_smem, ready, w_bufs.index(0), 0, off_n, K, N, code_ptr, absmax_ptr, nested_ptr, offset_ptr,
                 dyn_ptr, QBLOCK, DOUBLE_QUANT, num_warps)
    fence_async_shared()
    cta_barrier()
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
    for i in range(steps):
        stage = i % STAGES
        acc = warpgroup_mma(x_smem.index(stage), w_bufs.index(i % 3).permute((1, 0)), acc, is_async=True)
        # Step i-1's MMA has retired in this warpgroup; after the barrier below, in both, so
        # its activation stage takes step i-1+STAGES's tiles. Step i+1 decodes into the
        # buffer step i-2 read, which both warpgroups retired before the last barrier.
        acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])
        if i + 1 < steps:
            _decode_step(p_smem, ready, w_bufs.index((i + 1) % 3), i + 1, off_n, K, N, code_ptr, absmax_ptr,
                         nested_ptr, offset_ptr, dyn_ptr, QBLOCK, DOUBLE_QUANT, num_warps)
        fence_async_shared()
        cta_barrier()
        if i > 0:
            _load_step(x_desc, p_desc, x_smem, p_smem, ready, i - 1 + STAGES, off_m, off_n, i - 1 + STAGES < steps)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))

    store_tile(acc, bias_ptr, out_ptr, off_m, off_n, M, N, stride_om, HAS_BIAS, num_warps)


def descriptors(x2: torch.Tensor, packed: torch.Tensor, n: int, k: int):
    """TMA descriptors of one program's activation tile (BLOCK_M x BLOCK_K) and packed weight
    tile (BLOCK_N rows x BLOCK_K / 2 bytes; the flat packed bytes viewed as (N, K / 2))."""
    x_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], _GL[x2.dtype])
    p_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K // 2], gl.uint8)
    return (TensorDescriptor.from_tensor(x2, [BLOCK_M, BLOCK_K], x_layout),
            TensorDescriptor.from_tensor(packed.view(n, k // 2), [BLOCK_N, BLOCK_K // 2], p_layout))


def accepts(x2: torch.Tensor, packed: torch.Tensor, k: int, block_size: int) -> bool:
    """What TMA and the decode need: bf16/fp16 activations with 16-byte aligned rows, K a
    multiple of 64 and the quantization block too, a 16-byte aligned packed weight."""
    return (x2.dtype in _GL and k % BLOCK_K == 0 and block_size % BLOCK_K == 0 and x2.stride(1) == 1
            and (x2.stride(0) * 2) % 16 == 0 and x2.data_ptr() % 16 == 0 and packed.data_ptr() % 16 == 0
            and packed.is_contiguous())


def w4a16_matmul_sm90(x2, packed, code, absmax, nested, offset, dyn, shape, block_size, double_quant, bias, out,
                      *, stages: int = STAGES, group_m: int = 8) -> torch.Tensor:
    """``out = x2 @ W.T + bias`` for x2 (M, K) bf16/fp16 and the bnb 4-bit W (N, K); the
    caller (``bnb4_linear``) has checked the operands and ``accepts``."""
    n, k = shape
    m = x2.shape[0]
    grid = (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N),)
    _w4a16_sm90_kernel[grid](
        *descriptors(x2, packed, n, k), code, absmax, nested, offset, dyn, bias if bias is not None else out, out,
        m, n, k, out.stride(0),
        QBLOCK=block_size, DOUBLE_QUANT=double_quant, HAS_BIAS=bias is not None, STAGES=stages, GROUP_M=group_m,
        num_warps=NUM_WARPS,
    )
    return out
