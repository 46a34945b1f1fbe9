"""W4A16 linear for the bitsandbytes NF4/FP4 layouts: ``y = x @ W.T + bias`` with W stored in 4 bits.

Storage (bitsandbytes, see ``bnb4_codec``), for a weight of shape (N, K), K a multiple of the
quantization block B (64 by default):

* ``packed``: uint8, ``N*K/2`` bytes, the row-major flattening of W; byte ``j`` holds element
  ``2j`` in bits 7..4 (high nibble) and element ``2j+1`` in bits 3..0. Row ``n`` of W is bytes
  ``[n*K/2, (n+1)*K/2)``, so element (n, k) is in byte ``n*K/2 + k//2``.
* each nibble is an index into a 16-entry float32 codebook (NF4 or FP4; the kernels take the
  codebook as a tensor, so one kernel family serves both).
* block absmax, one per B consecutive elements (block ``(n*K + k) // B = n*K/B + k//B``), either
  float32, or double-quantised: a uint8 code per block, one float32 ``nested_absmax`` per 256
  blocks and a float32 ``offset``, decoded as
  ``absmax[i] = DYNAMIC_MAP_SIGNED[code[i]] * nested_absmax[i // 256] + offset``.

Math: ``W[n, k] = codebook[nibble(n, k)] * absmax[block(n, k)]``, and
``y[m, n] = sum_k x[m, k] * W[n, k] + bias[n]``, accumulated in float32.

Five portable paths; ``dispatch_path`` picks by the number of rows M of x, from the H100
measurements in ``benchmarks/NOTES.md``: the v5 GEMV (``gemv_lut``) for one row, the skinny
tensor-core kernel (``mma``, ``kernels/bnb4_mma.py``) for 3-16 rows of fp16/bf16 x (3-32 on
layers of 2^24 weights and more), and for
the rest the faster of the GEMV (up to 8 rows) and dequantize + cuBLAS, timed per shape on its
first call. On Hopper, with
``COMFY_LOWBIT_EXPERIMENTAL=1``, large M takes ``fused_sm90`` instead
(``kernels/bnb4_gemm_sm90.py``: decode in the main loop overlapped with async wgmma):

* ``gemv``: every program owns a few rows of W and one row of x and walks all of K, reading
  each packed byte once; x is read as element pairs so its tile indexes like the byte tile;
  nibbles are decoded through the codebook, each quantization block's partial dot product is
  scaled by its absmax once (so the absmax, nested or not, costs one decode per block), and
  the sum stays in float32. Small row tiles give enough programs to fill the GPU even when N
  is small, so no split-K (whose extra zero/reduce launches would cost more than a GEMV of
  these sizes takes). An autotuned variant issues the next step's loads before the math.
* ``gemv_lut`` (v5, the default for one row since session 3's measurement): a thread owns whole 16-byte
  chunks of W (128-bit loads, one absmax each) and keeps per-chunk sums, so the loop has no
  cross-thread traffic; the codebook is decoded by ``prmt`` from registers (``bnb4_lut``) on
  the GPU; one decode serves up to 4 rows of x.
* ``mma``: W decoded once per quantization block to 16-bit values in registers and multiplied
  with all rows of x by one ``tl.dot``; K split across programs, the partials summed by the
  last one in the same launch (``bnb4_mma``).
* ``fused``: a tensor-core GEMM that dequantizes the W tile in the main loop. It computes the
  transposed product ``y.T[n, m] = W[n, :] . x[m, :]`` so the dequantized W tile (made in
  registers) is the left operand and its rows fill the MMA's M dimension even when x has a
  single 16-row tile. Measured slower than dequantize + cuBLAS at every M on the H100, so
  only reachable with ``path="fused"``; kept, tested and benchmarked as the baseline a
  better fused kernel has to beat.
* ``dequant_cublas``: a bandwidth-bound dequantize of the whole W into a scratch buffer
  reused between calls (0.82 of copy bandwidth), then cuBLAS with the bias in its epilogue.

``reference_bnb4_linear`` (dequantize with ``bnb4_codec`` + ``F.linear`` in float32) is what the
kernels are tested against.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import bnb4_codec, bnb4_lut, bnb4_mma
from .bnb4_lut import load_register_words, lut_decode
from .experimental import experimental_kernels_enabled
from .split_k import arrival_counters
from .tiling import grouped_tile_ids

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Autotuning compiles every config for every constexpr combination; the GPU tests, which cover
# many such combinations, set COMFY_LOWBIT_AUTOTUNE=0 to use the fixed configs below instead.
AUTOTUNE = not INTERPRET and os.environ.get("COMFY_LOWBIT_AUTOTUNE", "1") != "0"

_TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
ACTIVATION_DTYPES = tuple(_TORCH_TO_TL)


@dataclasses.dataclass(frozen=True)
class Bnb4Weight:
    """The tensors and sizes of one bitsandbytes 4-bit weight of shape (N, K), as stored.

    ``absmax`` is float32 (one per block) or, when double-quantised, uint8 codes with
    ``nested_absmax`` (float32, one per 256 blocks) and ``offset`` (float32, 0-d) beside it.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    block_size: int
    quant_type: str
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _block_absmax(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, block, mask, DOUBLE_QUANT: tl.constexpr):
    """absmax of quantization block(s) ``block`` (any shape), decoding double quant if present."""
    if DOUBLE_QUANT:
        code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_ptr + block // 256, mask=mask, other=0.0)
        return tl.load(dyn_ptr + code) * nested + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def _decode(code_ptr, pair_ptr, byte, PAIR: tl.constexpr):
    """Codebook values (float32) of the high and low nibble of each byte.

    PAIR: one 8-byte gather per byte from a 256-entry table of (code[hi], code[lo]) float32
    pairs instead of two 4-byte gathers from the 16-entry codebook (half the load
    instructions; both tables sit in L1).
    """
    if PAIR:
        pair = tl.load(pair_ptr + byte)
        w_hi = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        w_lo = pair.to(tl.int32).to(tl.float32, bitcast=True)
    else:
        w_hi = tl.load(code_ptr + (byte >> 4))
        w_lo = tl.load(code_ptr + (byte & 15))
    return w_hi, w_lo


# ----------------------------------------------------------------------------- GEMV (M = 1)


@triton.jit
def _unpair(v, X_KIND: tl.constexpr):
    """(x[2j], x[2j+1]) in float32 from the word holding both (little-endian: 2j in the low half).

    X_KIND 0: bf16 pair in an int32, 1: fp16 pair in an int32, 2: fp32 pair in an int64.
    Loading x as pairs gives a tile with exactly the shape and indexing of the packed-byte
    tile (byte j holds elements 2j and 2j+1), so no reshape/split shuffles are needed.
    """
    if X_KIND == 0:
        even = (v << 16).to(tl.float32, bitcast=True)
        odd = (v & -65536).to(tl.float32, bitcast=True)
    elif X_KIND == 1:
        even = (v & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        odd = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        even = v.to(tl.int32).to(tl.float32, bitcast=True)
        odd = (v >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return even, odd


@triton.jit
def _bnb4_gemv_kernel(
    xp_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, code_ptr, pair_ptr, bias_ptr, out_ptr,
    N, K, stride_xpm, stride_om,
    QBLOCK: tl.constexpr,  # quantization block size B
    SUB: tl.constexpr,  # elements per sub-chunk sharing one absmax: min(B, 64)
    CHUNKS: tl.constexpr,  # sub-chunks per loop iteration
    BLOCK_N: tl.constexpr,
    X_KIND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    PAIR: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """One row of x (program axis 1) against BLOCK_N rows of W; xp = x viewed as element pairs."""
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    HALF: tl.constexpr = SUB // 2
    STEP: tl.constexpr = CHUNKS * SUB
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_c = tl.arange(0, CHUNKS)
    offs_h = tl.arange(0, HALF)
    # byte (n, c, h) and x pair (c, h) of one step: both hold elements k0 + c*SUB + 2h, +1
    byte_off = offs_n[:, None, None] * (K // 2) + offs_c[None, :, None] * HALF + offs_h[None, None, :]
    pair_off = offs_c[:, None] * HALF + offs_h[None, :]
    x_row = xp_ptr + row * stride_xpm
    block_row = offs_n[:, None] * (K // QBLOCK)
    acc = tl.zeros((BLOCK_N, CHUNKS), dtype=tl.float32)
    if PREFETCH:
        # Software pipelining by hand: step k0 + STEP's loads are issued before step k0's math.
        c_ok = offs_c * SUB < K
        byte = tl.load(packed_ptr + byte_off, mask=n_ok[:, None, None] & c_ok[None, :, None], other=0)
        xv = tl.load(x_row + pair_off, mask=c_ok[:, None], other=0)
        for k0 in range(0, K, STEP):
            kn = k0 + STEP
            cn_ok = (kn + offs_c * SUB) < K
            byte_next = tl.load(packed_ptr + byte_off + kn // 2, mask=n_ok[:, None, None] & cn_ok[None, :, None], other=0)
            xv_next = tl.load(x_row + pair_off + kn // 2, mask=cn_ok[:, None], other=0)
            c_ok = (k0 + offs_c * SUB) < K
            scale = _block_absmax(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr,
                                  block_row + (k0 + offs_c[None, :] * SUB) // QBLOCK, n_ok[:, None] & c_ok[None, :],
                                  DOUBLE_QUANT)
            w_hi, w_lo = _decode(code_ptr, pair_ptr, byte, PAIR)
            x_even, x_odd = _unpair(xv, X_KIND)
            acc += tl.sum(w_hi * x_even[None, :, :] + w_lo * x_odd[None, :, :], axis=2) * scale
            byte, xv = byte_next, xv_next
    else:
        for k0 in range(0, K, STEP):
            c_ok = (k0 + offs_c * SUB) < K
            byte = tl.load(packed_ptr + byte_off + k0 // 2, mask=n_ok[:, None, None] & c_ok[None, :, None], other=0)
            xv = tl.load(x_row + pair_off + k0 // 2, mask=c_ok[:, None], other=0)
            scale = _block_absmax(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr,
                                  block_row + (k0 + offs_c[None, :] * SUB) // QBLOCK, n_ok[:, None] & c_ok[None, :],
                                  DOUBLE_QUANT)
            w_hi, w_lo = _decode(code_ptr, pair_ptr, byte, PAIR)
            x_even, x_odd = _unpair(xv, X_KIND)
            acc += tl.sum(w_hi * x_even[None, :, :] + w_lo * x_odd[None, :, :], axis=2) * scale
    _store_row(out_ptr, bias_ptr, acc, row, offs_n, n_ok, stride_om, HAS_BIAS)


@triton.jit
def _bnb4_gemv_lut_kernel(
    xp_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, code_ptr, words_ptr, bias_ptr, out_ptr,
    M, N, ROW_BYTES, BLOCKS_PER_ROW, stride_xpm, stride_om,
    QBLOCK: tl.constexpr,
    ROWS: tl.constexpr,  # rows of x per program, 1 to 4: each decoded weight chunk serves all of them
    BLOCK_N: tl.constexpr,  # weight rows per program
    KB: tl.constexpr,  # 16-byte chunks of a row per loop step
    X_KIND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    LUT: tl.constexpr,  # 0: codebook gather (interpreter, fp32 x), 1: NF4 register LUT, 2: FP4 register LUT
    EVEN: tl.constexpr,  # N % BLOCK_N == 0 and the row's chunks % KB == 0: no masks on the weight
    PREFETCH: tl.constexpr = False,  # load step i+1's weight chunks before decoding step i
):
    """v5 GEMV: ROWS rows of x (program axis 1) against BLOCK_N rows of W.

    The weight tile is (BLOCK_N rows, KB chunks, 16 bytes): a thread owns whole 16-byte chunks
    (one 128-bit load each; a chunk is 32 elements, so it lies in one quantization block and
    needs one absmax). Per step a thread decodes its chunk once, sums its products with each
    row of x in registers and adds ``sum * absmax`` to its own (weight row, chunk) accumulator
    of that x row: no cross-thread traffic in the loop; the chunk axis is reduced once, after
    it. The x rows are unrolled by hand (one 3-D tile each, acc0..acc3): a 4-D (x row, weight
    row, chunk, byte) tile compiled to shared-memory layout conversions in the loop.
    """
    pid_n = tl.program_id(0)
    row0 = tl.program_id(1) * ROWS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    chunk = tl.arange(0, KB)
    lane = tl.arange(0, 16)
    byte_off = offs_n[:, None, None] * ROW_BYTES + chunk[None, :, None] * 16 + lane[None, None, :]
    # x pairs of the same elements, broadcast over the weight rows so that the x load has the
    # byte load's shape: Triton then gives both one layout (16 per thread), x needs no shuffle
    pair_off = tl.broadcast_to(chunk[None, :, None] * 16 + lane[None, None, :], (BLOCK_N, KB, 16))
    num_chunks = ROW_BYTES // 16
    if LUT != 0:
        # The LUT's register words, one copy per lane (``load_register_words`` says why)
        l0, l2, h0, h2 = load_register_words(words_ptr, (BLOCK_N, KB))
        l0, l2, h0, h2 = l0[:, :, None], l2[:, :, None], h0[:, :, None], h2[:, :, None]
    acc0 = tl.zeros((BLOCK_N, KB), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, KB), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, KB), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, KB), dtype=tl.float32)
    if PREFETCH:
        byte_next = _weight_chunks(packed_ptr, byte_off, 0, n_ok, chunk, num_chunks, EVEN)
    for c0 in range(0, num_chunks, KB):
        c_ok = (c0 + chunk) < num_chunks
        tile_ok = n_ok[:, None, None] & c_ok[None, :, None]
        if PREFETCH:
            # On the H100 the v5 loop ran at about issue + DRAM time added (16 us at
            # 3072x12288): with only 3 steps per program nothing overlapped the first load.
            byte = byte_next
            # past the last step: EVEN wraps to the first chunks (read, never used)
            nxt = (c0 + KB) % num_chunks if EVEN else c0 + KB
            byte_next = _weight_chunks(packed_ptr, byte_off, nxt, n_ok, chunk, num_chunks, EVEN)
        else:
            byte = _weight_chunks(packed_ptr, byte_off, c0, n_ok, chunk, num_chunks, EVEN)
        if LUT == 0:
            w_hi, w_lo = _decode(code_ptr, code_ptr, byte, False)
        else:
            w_hi, w_lo = lut_decode(byte, l0, l2, h0, h2, LUT == 2)
        block = offs_n[:, None] * BLOCKS_PER_ROW + ((c0 + chunk[None, :]) * 32) // QBLOCK
        scale = _block_absmax(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, block,
                              (n_ok[:, None] & c_ok[None, :]) | EVEN, DOUBLE_QUANT)
        x_ptrs = xp_ptr + row0 * stride_xpm + pair_off + c0 * 16
        acc0 += _row_dot(x_ptrs, w_hi, w_lo, tile_ok, M - row0, 0, EVEN, X_KIND) * scale
        if ROWS > 1:
            acc1 += _row_dot(x_ptrs + stride_xpm, w_hi, w_lo, tile_ok, M - row0, 1, False, X_KIND) * scale
        if ROWS > 2:
            acc2 += _row_dot(x_ptrs + 2 * stride_xpm, w_hi, w_lo, tile_ok, M - row0, 2, False, X_KIND) * scale
            acc3 += _row_dot(x_ptrs + 3 * stride_xpm, w_hi, w_lo, tile_ok, M - row0, 3, False, X_KIND) * scale
    _store_row(out_ptr, bias_ptr, acc0, row0, offs_n, n_ok, stride_om, HAS_BIAS)
    if ROWS > 1:
        if row0 + 1 < M:
            _store_row(out_ptr, bias_ptr, acc1, row0 + 1, offs_n, n_ok, stride_om, HAS_BIAS)
    if ROWS > 2:
        if row0 + 2 < M:
            _store_row(out_ptr, bias_ptr, acc2, row0 + 2, offs_n, n_ok, stride_om, HAS_BIAS)
        if row0 + 3 < M:
            _store_row(out_ptr, bias_ptr, acc3, row0 + 3, offs_n, n_ok, stride_om, HAS_BIAS)


@triton.jit
def _weight_chunks(packed_ptr, byte_off, c0, n_ok, chunk, num_chunks, EVEN: tl.constexpr):
    """The (BLOCK_N, KB, 16) packed bytes of chunks c0.. (zeros past the tile's rows/chunks)."""
    if EVEN:
        return tl.load(packed_ptr + byte_off + c0 * 16)
    ok = n_ok[:, None, None] & ((c0 + chunk) < num_chunks)[None, :, None]
    return tl.load(packed_ptr + byte_off + c0 * 16, mask=ok, other=0)


@triton.jit
def _row_dot(x_ptrs, w_hi, w_lo, tile_ok, rows_left, R: tl.constexpr, UNMASKED: tl.constexpr,
             X_KIND: tl.constexpr):
    """Per (weight row, chunk): the chunk's dot product with x row R of the program (pairs at
    x_ptrs; zeros past the rows_left rows that exist)."""
    if UNMASKED:
        xv = tl.load(x_ptrs)
    else:
        xv = tl.load(x_ptrs, mask=tile_ok & (tl.full(tile_ok.shape, R, tl.int32) < rows_left), other=0)
    x_even, x_odd = _unpair(xv, X_KIND)
    return tl.sum(w_hi * x_even + w_lo * x_odd, axis=2)


@triton.jit
def _store_row(out_ptr, bias_ptr, acc, row, offs_n, n_ok, stride_om, HAS_BIAS: tl.constexpr):
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


# ----------------------------------------------------------------------------- fused GEMM


@triton.jit
def _bnb4_matmul_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, code_ptr, pair_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, M_BUCKET,  # M_BUCKET: only an autotune key
    QBLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
    PAIR: tl.constexpr,
):
    pid_m, pid_n = grouped_tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    HALF_K: tl.constexpr = BLOCK_K // 2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF_K)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    byte_ptrs = packed_ptr + offs_n[:, None] * (K // 2) + offs_h[None, :]
    xt_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]  # x.T tile (BLOCK_K, BLOCK_M)
    # The interpreter (Triton 3.9) returns garbage for 16-bit tl.dot: upcast there only.
    op_dtype = tl.float32 if INTERPRETED else x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        byte = tl.load(byte_ptrs + k0 // 2, mask=n_ok[:, None], other=0)
        xt = tl.load(xt_ptrs + k0, mask=m_ok[None, :], other=0.0).to(op_dtype)
        w_hi, w_lo = _decode(code_ptr, pair_ptr, byte, PAIR)
        if BLOCK_K <= QBLOCK:  # the whole K step lies in one quantization block per row
            scale = _block_absmax(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr,
                                  offs_n * (K // QBLOCK) + k0 // QBLOCK, n_ok, DOUBLE_QUANT)[:, None]
        else:
            scale = _block_absmax(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr,
                                  offs_n[:, None] * (K // QBLOCK) + (k0 + 2 * offs_h[None, :]) // QBLOCK,
                                  n_ok[:, None], DOUBLE_QUANT)
        # back into K order: (BLOCK_N, HALF_K, 2) -> (BLOCK_N, BLOCK_K), high nibble first
        w = tl.reshape(tl.join((w_hi * scale).to(op_dtype), (w_lo * scale).to(op_dtype)), (BLOCK_N, BLOCK_K))
        acc = tl.dot(w, xt, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


# ----------------------------------------------------------------------------- dequantize


@triton.jit
def _bnb4_dequantize_kernel(
    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, code_ptr, pair_ptr, out_ptr, num_bytes,
    QBLOCK: tl.constexpr, BLOCK_BYTES: tl.constexpr, DOUBLE_QUANT: tl.constexpr, PAIR: tl.constexpr,
):
    """Whole-weight dequantize, flat: out[2j], out[2j + 1] from byte j (N*K is even).

    Flat 1-D tiles measured 10x faster than (rows, 32 bytes) tiles on the H100 (v1 vs v2 in
    benchmarks/NOTES.md): the joined (BLOCK_BYTES, 2) result stores as contiguous vectors.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    ok = offs < num_bytes
    byte = tl.load(packed_ptr + offs, mask=ok, other=0)
    scale = _block_absmax(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, (2 * offs) // QBLOCK, ok, DOUBLE_QUANT)
    w_hi, w_lo = _decode(code_ptr, pair_ptr, byte, PAIR)
    out_ty = out_ptr.dtype.element_ty
    w = tl.join((w_hi * scale).to(out_ty), (w_lo * scale).to(out_ty))  # (BLOCK_BYTES, 2)
    out_offs = 2 * offs[:, None] + tl.arange(0, 2)[None, :]
    tl.store(out_ptr + out_offs, w, mask=ok[:, None])


# ----------------------------------------------------------------------------- autotuning


def _matmul_configs() -> list[triton.Config]:
    """Small set: skinny tiles for small M (16-32 weight rows give enough CTAs when N is small),
    wgmma-sized tiles for large M; BLOCK_K 128 halves the loop trips for skinny tiles."""
    configs = []
    for bm, bn, bk, warps, stages in [
        (16, 16, 64, 4, 4), (16, 32, 64, 4, 4), (16, 64, 64, 4, 4), (16, 32, 128, 4, 3), (16, 64, 128, 4, 3),
        (32, 32, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 4),
        (128, 128, 64, 8, 3), (256, 128, 64, 8, 3),
    ]:
        for pair in (False, True):
            configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "PAIR": pair},
                                         num_warps=warps, num_stages=stages))
    return configs


def _prune_matmul(configs, named_args, **kwargs):
    """Keep only tiles that fit the M bucket (a 256-row tile for 16 rows is wasted work)."""
    bucket, k = named_args["M_BUCKET"], named_args["K"]
    kept = []
    for c in configs:
        if c.kwargs["BLOCK_M"] > max(16, bucket):
            continue
        if k % c.kwargs["BLOCK_K"]:  # the K loop has no tail: fall back to the largest step dividing K
            c = triton.Config({**c.kwargs, "BLOCK_K": min(64, k & -k)}, num_warps=c.num_warps, num_stages=c.num_stages)
        kept.append(c)
    return kept or configs[:1]


# (BLOCK_N, CHUNKS, num_warps): weight rows and 64-element sub-chunks per step.
_GEMV_TILES = [(8, 2, 4), (8, 4, 4), (16, 2, 4), (16, 4, 4), (16, 8, 8), (32, 2, 4), (32, 4, 8), (64, 1, 4)]


def _gemv_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_N": bn, "CHUNKS": ch, "PAIR": False, "PREFETCH": pf}, num_warps=w)
            for bn, ch, w in _GEMV_TILES for pf in (False, True)]


# (BLOCK_N, KB, num_warps) of the v5 GEMV: rows per program and 16-byte chunks per step.
_GEMV_LUT_TILES = [(4, 32, 4), (8, 32, 4), (16, 32, 4), (4, 64, 4), (8, 64, 8), (16, 64, 8), (2, 64, 4)]


def _gemv_lut_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_N": bn, "KB": kb, "PREFETCH": pf}, num_warps=w)
            for bn, kb, w in _GEMV_LUT_TILES for pf in (False, True)]


# EVEN (no masks) whenever the tile divides the shape: the masked loads cost a register
# zeroing per element and the predicates
_gemv_lut_jit = triton.heuristics({
    "EVEN": lambda a: a["N"] % a["BLOCK_N"] == 0 and (a["ROW_BYTES"] // 16) % a["KB"] == 0,
})(_bnb4_gemv_lut_kernel)

if not AUTOTUNE:
    _gemv = _bnb4_gemv_kernel
    _gemv_lut = _gemv_lut_jit
    _matmul = _bnb4_matmul_kernel
else:
    _gemv = triton.autotune(_gemv_configs(), key=["N", "K"])(_bnb4_gemv_kernel)
    _gemv_lut = triton.autotune(_gemv_lut_configs(), key=["N", "ROW_BYTES", "ROWS", "LUT", "DOUBLE_QUANT", "X_KIND"])(
        _gemv_lut_jit)
    _matmul = triton.autotune(
        _matmul_configs(), key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune_matmul}
    )(_bnb4_matmul_kernel)

# Without autotuning (interpreter, COMFY_LOWBIT_AUTOTUNE=0) these fixed settings are used.
# (the interpreter runs programs one after another: few, large ones keep CI fast)
_FIXED_GEMV = {"BLOCK_N": 64 if INTERPRET else 16, "CHUNKS": 4 if INTERPRET else 2, "PAIR": True, "PREFETCH": True}
_FIXED_GEMV_LUT = {"BLOCK_N": 32 if INTERPRET else 8, "KB": 8 if INTERPRET else 32, "PREFETCH": False}
_FIXED_MATMUL = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4, "PAIR": False}
_BEST: dict[tuple, triton.Config] = {}


def _run_tuned(tuner, kernel, key: tuple, grid_of, args: tuple, meta: dict) -> None:
    """Launch through the autotuner on a key's first call, then straight through the jit
    kernel with the config it chose: the autotuner's per-call Python costs ~10s of us."""
    best = _BEST.get(key)
    if best is None:
        tuner[grid_of](*args, **meta)
        _BEST[key] = tuner.best_config
        return
    kernel[grid_of(best.kwargs)](*args, **meta, **best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)


# ----------------------------------------------------------------------------- launchers

_CONSTANTS: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

# Largest M served by the v5 GEMV (``gemv_lut``): on the H100 it beat the v4 GEMV at 1-8 rows
# on every FLUX shape and dequantize + cuBLAS up to 8 rows (benchmarks/NOTES.md, v5).
GEMV_LUT_MAX_M = 8
DEQUANT_BLOCK_BYTES = 1024


def _constants(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codebook, byte -> value-pair table, signed dynamic map) on ``device``, made once per device.

    The pair table holds, for each byte, the float32 bits of code[hi] in its upper and of
    code[lo] in its lower 32 bits (int64).
    """
    key = (quant_type, device)
    if key not in _CONSTANTS:
        code = bnb4_codec.codebook(quant_type).to(torch.float32).contiguous()
        bits = code.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        byte = torch.arange(256)
        pair = (bits[byte >> 4] << 32) | bits[byte & 15]
        _CONSTANTS[key] = (code.to(device), pair.to(device),
                           bnb4_codec.DYNAMIC_MAP_SIGNED.to(device=device, dtype=torch.float32).contiguous())
    return _CONSTANTS[key]


def _fail(what: str, expected, got) -> None:
    raise ValueError(f"bnb4 linear: {what}: expected {expected}, got {got}")


def check_inputs(x: torch.Tensor, w: Bnb4Weight, bias: torch.Tensor | None) -> None:
    """Shape/dtype/device checks, once per call at the launcher, with expected-vs-got messages.

    Messages are only formatted on failure: this runs on every forward call.
    """
    n, k = w.shape
    b = w.block_size
    if w.quant_type not in ("nf4", "fp4"):
        _fail("quant_type", "'nf4' or 'fp4'", repr(w.quant_type))
    if b < 32 or b & (b - 1):
        _fail("block_size", "a power of two >= 32", b)
    if k % b:
        _fail("in_features K", f"a multiple of the block size {b}", k)
    if x.dtype not in ACTIVATION_DTYPES:
        _fail("activation dtype", "float16, bfloat16 or float32", x.dtype)
    if x.shape[-1] != k:
        _fail("activation last dim", k, tuple(x.shape))
    if w.packed.dtype != torch.uint8 or w.packed.numel() * 2 != n * k:
        _fail("packed weight", f"uint8 with {n * k // 2} elements", f"{w.packed.dtype} with {w.packed.numel()}")
    nblocks = n * k // b
    if w.absmax.numel() != nblocks:
        _fail("absmax", f"{nblocks} values", w.absmax.numel())
    if w.nested_absmax is not None:
        if w.absmax.dtype != torch.uint8:
            _fail("double-quantised absmax codes", torch.uint8, w.absmax.dtype)
        if w.nested_absmax.numel() != -(-nblocks // 256):
            _fail("nested_absmax", f"{-(-nblocks // 256)} values", w.nested_absmax.numel())
        if w.offset is None or w.offset.numel() != 1:
            _fail("offset", "one value", None if w.offset is None else w.offset.numel())
    elif w.absmax.dtype != torch.float32:
        _fail("absmax dtype", torch.float32, w.absmax.dtype)
    if bias is not None and bias.shape != (n,):
        _fail("bias shape", (n,), tuple(bias.shape))
    device = x.device
    for name, t in (("packed", w.packed), ("absmax", w.absmax), ("bias", bias)):
        if t is not None and t.device != device:
            _fail(f"{name} device", device, t.device)


def _absmax_args(w: Bnb4Weight, dyn: torch.Tensor):
    if w.double_quant:
        return w.absmax, w.nested_absmax, w.offset.reshape(1).float(), dyn
    return w.absmax, w.absmax, w.absmax, dyn  # unused pointers


def _m_bucket(m: int) -> int:
    return 16 if m <= 16 else min(1 << (m - 1).bit_length(), 1024)


# From 2 rows to this many the v5 GEMV and dequantize + cuBLAS are within 2x of each other
# and which wins depends on the shape (at 8 rows the H100 had the GEMV ahead at 3072x12288 and
# level at 3072x3072): the first call per shape times both (``fastest``). At 16 rows the GEMV
# lost on every FLUX shape (1.4-1.8x slower in CUDA graphs), yet the eager timing picked it on
# three of four, so it is no candidate there.
TIMED_MAX_M = 8


# From MMA_MIN_M to MMA_RULE_MAX_M rows of float16/bfloat16 x the skinny tensor-core kernel
# runs, by rule: in CUDA graphs on the H100 it beat the v5 GEMV at 4 rows on three FLUX shapes
# of four (tied on 3072x3072) and dequantize + cuBLAS at 16 rows on all four, by 1.5-2.6x; at
# 2 rows the GEMV measured faster (20.5 us against about 24 at 3072x12288).
MMA_MIN_M = 3
MMA_RULE_MAX_M = 16
# ... and up to 32 rows (its 32-row tile) on large layers (``bnb4_mma.LARGE_LAYER`` weights and
# more): at 32 rows it took 60-82 us on the three large FLUX shapes against 70-107 for
# dequantize + cuBLAS, and 19.9 against 16.7 on 3072 x 3072 (session 6).
MMA_LARGE_MAX_M = 32


def dispatch_path(x2: torch.Tensor, w: Bnb4Weight, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> str:
    """The portable path ``bnb4_linear`` takes for these operands: the v5 GEMV at one row, the
    skinny tensor-core kernel for 3-16 rows of 16-bit x (3-32 on large layers), otherwise the
    fastest path for this shape (timed on its first call, ``_fastest_path``)."""
    m = x2.shape[0]
    if m == 1:
        return choose_path(m)
    if MMA_MIN_M <= m <= mma_max_m(*w.shape) and x2.dtype != torch.float32:
        return "mma"
    return _fastest_path(x2, w, bias, out)


def mma_max_m(n: int, k: int) -> int:
    """The most rows of x the skinny tensor-core kernel takes by rule for an (N, K) layer."""
    return MMA_LARGE_MAX_M if n * k >= bnb4_mma.LARGE_LAYER else MMA_RULE_MAX_M


def _fastest_path(x2: torch.Tensor, w: Bnb4Weight, bias: torch.Tensor | None, out: torch.Tensor | None) -> str:
    """Timed per shape (``fastest``): the v5 GEMV (up to TIMED_MAX_M rows) and dequantize +
    cuBLAS, plain and overlapped (``_dequant_cublas_overlapped``); untimed, ``choose_path``."""
    from .fastest import fastest, m_bucket

    m = x2.shape[0]
    paths = ("gemv_lut",) if m <= TIMED_MAX_M else ()
    paths += ("dequant_cublas", "dequant_cublas_overlap")
    launches = {path: functools.partial(bnb4_linear, x2, w, bias, path=path, out=out) for path in paths}
    key = ("NF4/FP4", m if m <= TIMED_MAX_M else m_bucket(m), *w.shape, w.block_size, w.quant_type, w.double_quant,
           x2.dtype, bias is not None, x2.device)
    return fastest(key, launches, default=choose_path(m))


def choose_path(m: int) -> str:
    """The path for M rows: the v5 GEMV up to GEMV_LUT_MAX_M, dequantize + cuBLAS above. The
    fused GEMMs (portable and Hopper) measured slower than dequantize + cuBLAS at every
    M >= 2 on the H100 (NOTES.md: v3, and the v5 Hopper GEMM)."""
    return "gemv_lut" if m <= GEMV_LUT_MAX_M else "dequant_cublas"


def bnb4_linear(
    x: torch.Tensor,
    w: Bnb4Weight,
    bias: torch.Tensor | None = None,
    *,
    path: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for x of shape (..., K) in fp16/bf16/fp32; output in x's dtype.

    ``path`` forces one of ``gemv``/``gemv_lut``/``fused``/``fused_sm90``/``dequant_cublas``
    (benchmarks, tests); ``out``
    (contiguous, (M, N) with M the rows of x) lets tests hand in a poisoned buffer.
    """
    check_inputs(x, w, bias)
    n, k = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if out is None:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    else:
        if out.shape != (m, n) or out.dtype != x.dtype or not out.is_contiguous():
            _fail("out", f"contiguous {(m, n)} {x.dtype}", f"{tuple(out.shape)} {out.dtype} {out.stride()}")
    if m == 0:
        return out.reshape(*lead, n)
    if path is None and _sm90_path(x2, w) == "fused_sm90":
        from .sm90 import run_sm90

        if run_sm90("NF4/FP4 fused GEMM", _launch_sm90, x2, w, bias, out) is not None:
            return out.reshape(*lead, n)
    path = path or dispatch_path(x2, w, bias, out)
    if path == "gemv":
        _launch_gemv(x2, w, bias, out)
    elif path == "gemv_lut":
        _launch_gemv_lut(x2, w, bias, out)
    elif path == "mma":
        _launch_mma(x2, w, bias, out)
    elif path == "fused":
        _launch_matmul(x2, w, bias, out)
    elif path == "fused_sm90":
        _launch_sm90(x2, w, bias, out)
    elif path == "dequant_cublas_overlap":
        _dequant_cublas_overlapped(x2, w, bias, out)
    elif path == "dequant_cublas":
        weight = dequantize(w, x.dtype, scratch=True)
        if bias is None:
            torch.mm(x2, weight.t(), out=out)
        else:  # cuBLASLt fuses a 1-D bias into its epilogue
            torch.addmm(bias.to(x.dtype), x2, weight.t(), out=out)
    else:
        raise ValueError(f"bnb4 linear: path: expected 'gemv', 'gemv_lut', 'mma', 'fused', 'fused_sm90', "
                         f"'dequant_cublas' or 'dequant_cublas_overlap', got {path!r}")
    return out.reshape(*lead, n)


_X_KIND = {torch.bfloat16: (0, torch.int32), torch.float16: (1, torch.int32), torch.float32: (2, torch.int64)}


# The Hopper fused GEMM (kernels/bnb4_gemm_sm90.py; opt-in: the H100 measured it at about half
# the speed of dequantize + cuBLAS, NOTES.md v5 Hopper): where it has at least this many 256 x 128
# output tiles, about two waves on a 132-SM H100, so that no SMs idle.
SM90_MIN_TILES = 256


def _sm90_path(x2: torch.Tensor, w: Bnb4Weight) -> str | None:
    """``"fused_sm90"`` where the Hopper kernel is enabled and takes these operands, else None."""
    from .sm90 import sm90_kernels_enabled

    m, (n, k) = x2.shape[0], w.shape
    if m < 512 or not experimental_kernels_enabled() or not sm90_kernels_enabled(x2.device):
        return None
    try:
        from . import bnb4_gemm_sm90
    except (ImportError, AttributeError):  # a Gluon whose API this kernel does not match
        return None
    tiles = triton.cdiv(m, bnb4_gemm_sm90.BLOCK_M) * triton.cdiv(n, bnb4_gemm_sm90.BLOCK_N)
    if tiles < SM90_MIN_TILES or not bnb4_gemm_sm90.accepts(x2, w.packed, k, w.block_size):
        return None
    return "fused_sm90"


def _launch_sm90(x2, w: Bnb4Weight, bias, out) -> torch.Tensor:
    from . import bnb4_gemm_sm90

    n, k = w.shape
    if not bnb4_gemm_sm90.accepts(x2, w.packed, k, w.block_size):
        _fail("fused_sm90 operands", "bf16/fp16 x with 16-byte aligned rows, K and block multiples of 64",
              f"{x2.dtype} strides {x2.stride()}, K={k}, block {w.block_size}")
    code, _, dyn = _constants(w.quant_type, x2.device)
    return bnb4_gemm_sm90.w4a16_matmul_sm90(x2, w.packed, code, *_absmax_args(w, dyn), w.shape, w.block_size,
                                             w.double_quant, bias, out)


def _launch_gemv(x2, w: Bnb4Weight, bias, out) -> None:
    n, k = w.shape
    m = x2.shape[0]
    code, pair, dyn = _constants(w.quant_type, x2.device)
    kind, word = _X_KIND[x2.dtype]
    if x2.stride(0) % 2 or x2.data_ptr() % (2 * x2.element_size()):
        x2 = x2.clone()  # the pair view needs every row to start on a pair boundary
    xp = x2.view(word)  # (M, K/2): element pairs, K is even
    args = (xp, w.packed, *_absmax_args(w, dyn), code, pair, bias if bias is not None else out, out,
            n, k, xp.stride(0), out.stride(0))
    meta = dict(QBLOCK=w.block_size, SUB=min(w.block_size, 64), X_KIND=kind,
                HAS_BIAS=bias is not None, DOUBLE_QUANT=w.double_quant)
    grid_of = lambda c: (triton.cdiv(n, c["BLOCK_N"]), m)  # noqa: E731
    if not AUTOTUNE:
        _gemv[grid_of(_FIXED_GEMV)](*args, **meta, **_FIXED_GEMV)
    else:
        key = ("gemv", n, k, x2.dtype, *meta.values())
        _run_tuned(_gemv, _bnb4_gemv_kernel, key, grid_of, args, meta)


_LUT_WORDS: dict[tuple[str, torch.device], torch.Tensor] = {}


def _lut_words(quant_type: str, device: torch.device, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """32 copies (one per lane) of the codebook's four LUT register words (values rounded to
    ``dtype``, float16 or bfloat16), int32."""
    key = (quant_type, device, dtype)
    if key not in _LUT_WORDS:
        _LUT_WORDS[key] = bnb4_lut.register_words(quant_type, dtype).repeat(32).to(device)
    return _LUT_WORDS[key]


def _gemv_rows(m: int) -> int:
    """Rows of x per v5 GEMV program: 1, 2 or 4 (one weight decode serves each of them)."""
    return 1 if m == 1 else 2 if m == 2 else 4


def _launch_gemv_lut(x2, w: Bnb4Weight, bias, out) -> None:
    """The v5 GEMV. Register LUT on the GPU for fp16/bf16 x (the codebook rounded to float16:
    2^-11 relative, below those dtypes' output rounding); the exact codebook gather for fp32 x
    and under the interpreter (inline PTX cannot be interpreted)."""
    n, k = w.shape
    m = x2.shape[0]
    code, _, dyn = _constants(w.quant_type, x2.device)
    kind, word = _X_KIND[x2.dtype]
    if x2.stride(0) % 2 or x2.data_ptr() % (2 * x2.element_size()):
        x2 = x2.clone()
    xp = x2.view(word)
    lut = 0 if INTERPRET or x2.dtype == torch.float32 else (1 if w.quant_type == "nf4" else 2)
    words = _lut_words(w.quant_type, x2.device) if lut else code
    args = (xp, w.packed, *_absmax_args(w, dyn), code, words, bias if bias is not None else out, out,
            m, n, k // 2, k // w.block_size, xp.stride(0), out.stride(0))
    rows = _gemv_rows(m)
    meta = dict(QBLOCK=w.block_size, ROWS=rows, X_KIND=kind, HAS_BIAS=bias is not None, DOUBLE_QUANT=w.double_quant,
                LUT=lut)
    grid_of = lambda c: (triton.cdiv(n, c["BLOCK_N"]), triton.cdiv(m, rows))  # noqa: E731
    if not AUTOTUNE:
        _gemv_lut[grid_of(_FIXED_GEMV_LUT)](*args, **meta, **_FIXED_GEMV_LUT)
    else:
        key = ("gemv_lut", n, k, x2.dtype, *meta.values())
        _run_tuned(_gemv_lut, _gemv_lut_jit, key, grid_of, args, meta)


def _launch_mma(x2, w: Bnb4Weight, bias, out, config: dict | None = None) -> None:
    """The skinny tensor-core kernel (``bnb4_mma``) for up to MMA_MAX_M rows of fp16/bf16 x,
    with the measured tile for the layer's size (``bnb4_mma.default_tile``) and the K split
    of ``bnb4_mma.split_for``; ``config`` forces a tile (and ``SPLIT``, ``maxnreg``): tests,
    benchmarks."""
    n, k = w.shape
    m = x2.shape[0]
    if m > bnb4_mma.MMA_MAX_M or x2.dtype == torch.float32:
        _fail("mma path operands", f"at most {bnb4_mma.MMA_MAX_M} rows of float16/bfloat16 x",
              f"{m} rows of {x2.dtype}")
    code, _, dyn = _constants(w.quant_type, x2.device)
    lut = 0 if INTERPRET else (1 if w.quant_type == "nf4" else 2)
    words = _lut_words(w.quant_type, x2.device, x2.dtype) if lut else code
    meta = dict(QBLOCK=w.block_size, BLOCK_M=bnb4_mma.block_m(m), HAS_BIAS=bias is not None,
                DOUBLE_QUANT=w.double_quant, LUT=lut, DOT_FP32=INTERPRET)
    tile = dict(config or bnb4_mma.default_tile(n, k))
    warps = tile.pop("num_warps", 4)
    maxnreg = tile.pop("maxnreg", None)
    launch_options = {"maxnreg": maxnreg} if maxnreg else {}
    if (k // w.block_size) % tile["STEP_BLOCKS"]:
        tile["STEP_BLOCKS"] = 1
    split = tile.pop("SPLIT", None) or bnb4_mma.split_for(n, k, w.block_size, tile["BLOCK_N"], tile["STEP_BLOCKS"],
                                                          _sm_count(x2.device.index) if x2.is_cuda else 4)
    if (k // w.block_size // tile["STEP_BLOCKS"]) % split:
        _fail("mma K split", f"a divisor of the {k // w.block_size // tile['STEP_BLOCKS']} steps of a row", split)
    tiles = triton.cdiv(n, tile["BLOCK_N"])
    partials = torch.empty((split, m, n), device=x2.device, dtype=torch.float32) if split > 1 else out
    counters = arrival_counters(x2.device, tiles) if split > 1 else out
    bnb4_mma.bnb4_mma_kernel[(tiles, split)](
        x2, w.packed, *_absmax_args(w, dyn), code, words, bias if bias is not None else out, out,
        partials, counters, m, n, k, x2.stride(0), out.stride(0), SPLIT=split, **meta, **tile,
        num_warps=warps, num_stages=1, **launch_options)


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()).multi_processor_count


def _launch_matmul(x2, w: Bnb4Weight, bias, out) -> None:
    n, k = w.shape
    m = x2.shape[0]
    code, pair, dyn = _constants(w.quant_type, x2.device)
    args = (x2, w.packed, *_absmax_args(w, dyn), code, pair, bias if bias is not None else out, out,
            m, n, k, x2.stride(0), out.stride(0), _m_bucket(m))
    meta = dict(QBLOCK=w.block_size, HAS_BIAS=bias is not None, DOUBLE_QUANT=w.double_quant,
                DOT_PRECISION="ieee" if x2.dtype == torch.float32 or INTERPRET else "tf32",
                INTERPRETED=INTERPRET)
    grid_of = lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)  # noqa: E731
    if not AUTOTUNE:
        _matmul[grid_of(_FIXED_MATMUL)](*args, **meta, **{**_FIXED_MATMUL, "BLOCK_K": min(64, k & -k)})
    else:
        key = ("fused", _m_bucket(m), n, k, x2.dtype, *meta.values())
        _run_tuned(_matmul, _bnb4_matmul_kernel, key, grid_of, args, meta)


# ----------------------------------------------------------------------------- dequantize + cuBLAS, overlapped

OVERLAP_CHUNKS = 4
_OVERLAP_BUFFERS: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_EVENTS: dict[torch.device, list[torch.cuda.Event]] = {}


def weight_rows(w: Bnb4Weight, r0: int, r1: int) -> Bnb4Weight:
    """Rows r0:r1 of W as views of its tensors. Row r0 must start a quantization block and,
    double-quantised, a nested block of 256 (``overlap_row_ranges`` chooses such rows)."""
    n, k = w.shape
    b0, b1 = r0 * k // w.block_size, r1 * k // w.block_size
    if (r0 * k) % w.block_size or (w.double_quant and b0 % 256):
        raise ValueError(f"bnb4 weight rows {r0}:{r1} of K={k}: row {r0} does not start a quantization "
                         f"block{' and a nested block of 256' if w.double_quant else ''}")
    nested = w.nested_absmax.reshape(-1)[b0 // 256:] if w.double_quant else None
    return Bnb4Weight(w.packed.reshape(-1)[r0 * k // 2: r1 * k // 2], w.absmax.reshape(-1)[b0:b1], (r1 - r0, k),
                      w.block_size, w.quant_type, nested, w.offset)


def overlap_row_ranges(n: int, k: int, block: int, chunks: int = OVERLAP_CHUNKS) -> list[tuple[int, int]]:
    """About n / chunks rows each, every range starting on a nested-block boundary (256
    quantization blocks) and on a multiple of 128 rows (whole GEMM tiles)."""
    step = math.lcm(256 * block // math.gcd(k, 256 * block), 128)
    rows = triton.cdiv(triton.cdiv(n, chunks), step) * step
    return [(r, min(r + rows, n)) for r in range(0, n, rows)]


def _dequant_cublas_overlapped(x2: torch.Tensor, w: Bnb4Weight, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """Dequantize + cuBLAS with the dequantize hidden: W is done in row ranges, range i+1
    dequantized on a side stream into one of two buffers while cuBLAS multiplies range i
    into out's columns (cuBLAS writes a column block in place, leading dimension N). On the
    H100 the plain path paid its whole ~40 us dequantize on top of the GEMM (0.83-0.87x bf16
    at 4096 rows). Without CUDA (the interpreter) the same ranges run in order.

    Stream order: the side stream first waits for everything before this call on the main
    stream (the weight's and x's producers, the last call's GEMMs still reading the
    buffers); range i's GEMM waits for its dequantize; range i+2's dequantize waits for range
    i's GEMM (same buffer). Every side-stream launch is joined before this returns.
    """
    n, k = w.shape
    ranges = overlap_row_ranges(n, k, w.block_size)
    buffers = _overlap_buffers(x2.device, x2.dtype, (ranges[0][1] - ranges[0][0]) * k)
    cuda = x2.is_cuda
    if cuda:
        main = torch.cuda.current_stream(x2.device)
        side = _SIDE_STREAMS.get(x2.device)
        if side is None:
            side = _SIDE_STREAMS[x2.device] = torch.cuda.Stream(x2.device)
        side.wait_stream(main)
        events = _EVENTS.setdefault(x2.device, [])
        events += [torch.cuda.Event() for _ in range(2 * len(ranges) - len(events))]
        # Reused across calls: a wait takes the event's state when it is enqueued.
        ready, done = events[:len(ranges)], events[len(ranges):2 * len(ranges)]
    for i, (r0, r1) in enumerate(ranges):
        weight = buffers[i % 2][: (r1 - r0) * k].view(r1 - r0, k)
        if cuda:
            with torch.cuda.stream(side):
                if i >= 2:
                    side.wait_event(done[i - 2])
                dequantize(weight_rows(w, r0, r1), x2.dtype, out=weight)
                ready[i].record(side)
            main.wait_event(ready[i])
        else:
            dequantize(weight_rows(w, r0, r1), x2.dtype, out=weight)
        if bias is None:
            torch.mm(x2, weight.t(), out=out[:, r0:r1])
        else:
            torch.addmm(bias[r0:r1].to(x2.dtype), x2, weight.t(), out=out[:, r0:r1])
        if cuda:
            done[i].record(main)


def _overlap_buffers(device: torch.device, dtype: torch.dtype, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two persistent buffers of ``numel`` elements (never freed, so no stream can see their
    memory handed to another tensor while it still reads them)."""
    buffers = _OVERLAP_BUFFERS.get((device, dtype))
    if buffers is None or buffers[0].numel() < numel:
        buffers = _OVERLAP_BUFFERS[(device, dtype)] = tuple(torch.empty(numel, device=device, dtype=dtype)
                                                            for _ in range(2))
    return buffers


def dequantize(w: Bnb4Weight, dtype: torch.dtype, scratch: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """The whole weight (N, K) in ``dtype``; with ``scratch`` into a per-(device, dtype) buffer
    reused by the next call (valid until then; callers on one stream only)."""
    n, k = w.shape
    numel = n * k
    device = w.packed.device
    if out is not None:
        if out.numel() != numel or out.dtype != dtype or not out.is_contiguous():
            _fail("dequantize out", f"contiguous {numel} elements of {dtype}", f"{out.numel()} of {out.dtype}")
        out = out.view(-1)
    elif scratch:
        buf = _SCRATCH.get((device, dtype))
        if buf is None or buf.numel() < numel:
            buf = _SCRATCH[(device, dtype)] = torch.empty(numel, device=device, dtype=dtype)
        out = buf[:numel]
    else:
        out = torch.empty(numel, device=device, dtype=dtype)
    code, pair, dyn = _constants(w.quant_type, device)
    block_bytes = 256 if INTERPRET else DEQUANT_BLOCK_BYTES
    grid = (triton.cdiv(numel // 2, block_bytes),)
    _bnb4_dequantize_kernel[grid](w.packed, *_absmax_args(w, dyn), code, pair, out, numel // 2,
                                  QBLOCK=w.block_size, BLOCK_BYTES=block_bytes, DOUBLE_QUANT=w.double_quant,
                                  PAIR=False, num_warps=4)
    return out.view(n, k)


# ----------------------------------------------------------------------------- reference


def reference_dequantize(w: Bnb4Weight) -> torch.Tensor:
    """W (N, K) in float32 through the plain-PyTorch codec."""
    absmax = w.absmax
    if w.double_quant:
        absmax = bnb4_codec.dequantize_nested_absmax(w.absmax, w.nested_absmax, w.offset)
    return bnb4_codec.dequantize_4bit(w.packed, absmax, w.block_size, w.quant_type, w.shape, torch.float32)


def reference_bnb4_linear(x: torch.Tensor, w: Bnb4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the kernels compute, in float32: dequantize with the codec, then ``F.linear``."""
    return F.linear(x.float(), reference_dequantize(w), None if bias is None else bias.float())
