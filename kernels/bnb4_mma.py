"""NF4/FP4 linear for a few rows of x (1-32) on tensor cores: ``y = x @ W.T + bias``.

Why: the v5 GEMV (``bnb4_linear._bnb4_gemv_lut_kernel``) spends 7.2 SASS instructions per
weight element on the H100, and a third of them (the float16 -> float32 widening of each
decoded value, its FMA with x, x's own conversion) are arithmetic a tensor core does for
free; and it decodes the weight once per 4 rows of x, so 16 rows cost four decodes. Here a
program decodes a (BLOCK_N, B) tile of W once per quantization block into 16-bit values and
hands it to one ``tl.dot`` against all (up to 32) rows of x: the decode is the only per-element
work left, and it does not grow with M. Measured on the H100 (benchmarks/NOTES.md, NF4 v7 and
v8): 1.14-1.41x bf16 at 4-16 rows, where the GEMV and dequantize + cuBLAS gave 0.44-1.20x; at
one row the GEMV stays faster (this kernel waits on its weight loads at 128 registers per
thread, 4 programs per SM: Nsight Compute, NF4 v8).

Operands are those of ``bnb4_linear`` (bitsandbytes storage: byte j of a row holds element 2j
in its high nibble and 2j+1 in its low nibble). The product is split by nibble,
``x_even @ W_hi.T + x_odd @ W_lo.T``, so decoded values never need interleaving: x's block is
loaded as element pairs (16-byte loads) and split into its even and odd columns in registers.
x is the MMA's M side: with W as M, Triton took wgmma with W through shared memory, one
16-bit store per decoded value. Each quantization block's
partial product is scaled by its absmax (decoded from double quant when present) in float32
and added to the float32 accumulator, like the GEMV does, so the result differs from the
reference only by the rounding of the decoded values to x's 16-bit type.

Decode: on the GPU the ``prmt`` register LUT of ``bnb4_lut`` with the codebook rounded to x's
dtype (float16: 2^-11 relative; bfloat16: 2^-9, the precision bitsandbytes' own dequantize
to bfloat16 has); under the interpreter the exact codebook gather, rounded the same way.
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

from .bnb4_lut import load_register_words, lut_decode16


@triton.jit
def _block_scale(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, block, DOUBLE_QUANT: tl.constexpr):
    """absmax of the quantization blocks ``block`` (decoded from double quant if present).

    ``bnb4_linear._block_absmax`` without its mask: rows past N read row 0 here, and the
    masked loads cost this kernel 10-54 registers per thread (SASS, Triton 3.6), which it
    cannot spare: it is latency-bound on its register count (benchmarks/NOTES.md, NF4 v7)."""
    if DOUBLE_QUANT:
        code = tl.load(absmax_ptr + block).to(tl.int32)
        scale = tl.load(dyn_ptr + code) * tl.load(nested_ptr + block // 256) + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block).to(tl.float32)
    return scale  # one return: Triton 3.6 rejects returns of different types in constexpr branches


@triton.jit
def bnb4_mma_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, code_ptr, words_ptr, bias_ptr, out_ptr,
    part_ptr, count_ptr, M, N, K, stride_xm, stride_om,
    QBLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, STEP_BLOCKS: tl.constexpr,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, DOUBLE_QUANT: tl.constexpr, LUT: tl.constexpr,
    DOT_FP32: tl.constexpr = False, PREFETCH: tl.constexpr = False, AHEAD: tl.constexpr = False,
):
    """Program (i, s): output columns [i*BLOCK_N, (i+1)*BLOCK_N) for all M (<= BLOCK_M) rows
    of x, over the s-th of SPLIT equal slices of the quantization blocks of K.

    Each step loads STEP_BLOCKS blocks of the tile's weight rows before decoding any, so
    several loads are in flight per thread. Rows past N read row 0 and are not stored; every
    slice is a whole number of steps (the launcher picks SPLIT so), so the loop needs no masks.

    SPLIT > 1 (a layer too narrow, or too short, to give every SM a few programs): each
    program stores its float32 partial in ``part_ptr`` (SPLIT, M, N) and counts itself in at
    ``count_ptr[i]`` (acquire-release, after its stores); the program that arrives last sums the
    SPLIT partials (read past L1, which is not coherent across SMs), adds the bias, writes the
    output and sets the counter back to 0, so the counters are zeroed once, when allocated, and
    CUDA-graph replays stay correct (the int8 GEMV's single-launch split-K, ``int8_gemv``).

    DOT_FP32 (for the interpreter, whose bfloat16 ``tl.dot`` is not a floating-point product):
    the same 16-bit values, multiplied in float32. PREFETCH (with STEP_BLOCKS = 1): each
    block's weight bytes and x are loaded one block ahead, so a warp's loads are in flight
    while it decodes (at 96-128 registers only 4-5 programs share an SM to hide latency).
    AHEAD: x and the block scale (absmax code -> dynamic map -> nested absmax: three dependent
    loads) of the next block are loaded before this block's math; Nsight Compute showed the
    warps waiting on exactly these two chains (benchmarks/NOTES.md, NF4 v8).
    """
    HALF: tl.constexpr = QBLOCK // 2
    pid = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = tl.where(n_ok, offs_n, 0)
    byte_col = tl.arange(0, HALF)
    byte_ptrs = packed_ptr + rows[None, :].to(tl.int64) * (K // 2) + byte_col[:, None]
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    # x's block as a (BLOCK_M, HALF, 2) tile, 16-byte loads; split into its even and odd
    # columns in registers (one 2-byte load per element was 16 loads per thread and block)
    x_ptrs = x_ptr + offs_m[:, None, None] * stride_xm + (2 * byte_col)[None, :, None] + tl.arange(0, 2)[None, None, :]
    blocks_per_row = K // QBLOCK
    per_split = blocks_per_row // SPLIT
    block_of_row = rows * blocks_per_row
    if LUT != 0:
        l0, l2, h0, h2 = load_register_words(words_ptr, (HALF, BLOCK_N))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kb_first = split * per_split
    kb_end = kb_first + per_split
    if PREFETCH:
        byte_next = tl.load(byte_ptrs + kb_first * HALF)
    if PREFETCH or AHEAD:
        x_next = tl.load(x_ptrs + kb_first * QBLOCK, mask=m_ok[:, None, None], other=0.0)
    if AHEAD:
        scale_next = _block_scale(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, block_of_row + kb_first, DOUBLE_QUANT)
    for kb0 in range(kb_first, kb_end, STEP_BLOCKS):
        for j in tl.static_range(STEP_BLOCKS):
            kb = kb0 + j
            kb_next = tl.minimum(kb + 1, kb_end - 1)  # past the slice: its last block again (cached)
            if PREFETCH:  # the next block's loads go out before this one's math
                byte = byte_next
                byte_next = tl.load(byte_ptrs + kb_next * HALF)
            else:
                byte = tl.load(byte_ptrs + kb * HALF)  # (HALF, BLOCK_N) uint8: W's bytes, transposed
            if PREFETCH or AHEAD:
                x_pairs = x_next
                x_next = tl.load(x_ptrs + kb_next * QBLOCK, mask=m_ok[:, None, None], other=0.0)
            else:
                x_pairs = tl.load(x_ptrs + kb * QBLOCK, mask=m_ok[:, None, None], other=0.0)
            if AHEAD:
                scale = scale_next
                scale_next = _block_scale(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, block_of_row + kb_next,
                                          DOUBLE_QUANT)
            x_even, x_odd = tl.split(x_pairs)
            if LUT != 0:
                w_hi, w_lo = lut_decode16(byte, l0, l2, h0, h2, LUT == 2, x_ptr.dtype.element_ty == tl.bfloat16)
            else:
                w_hi = tl.load(code_ptr + (byte >> 4)).to(x_ptr.dtype.element_ty)
                w_lo = tl.load(code_ptr + (byte & 15)).to(x_ptr.dtype.element_ty)
            if DOT_FP32:
                part = tl.dot(x_even.to(tl.float32), w_hi.to(tl.float32))
                part = tl.dot(x_odd.to(tl.float32), w_lo.to(tl.float32), part)
            else:
                part = tl.dot(x_even, w_hi)
                part = tl.dot(x_odd, w_lo, part)
            if not AHEAD:
                scale = _block_scale(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, block_of_row + kb, DOUBLE_QUANT)
            acc += part * scale[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part_ptrs = part_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptrs + split * M * N, acc, mask=out_mask)
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT):
                total += tl.load(part_ptrs + s * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + rows).to(tl.float32)[None, :]
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(count_ptr + pid, 0)


# Rows of x the kernel serves, and the tile by layer size. Measured on the H100 in CUDA graphs
# (benchmarks/results/bnb4-mma-tiles-h100-2026-11-23-session6.txt: 7 tiles x 3 K splits, the
# four FLUX shapes, 1 and 16 rows): 128 columns, one block per step, x and the block scale
# loaded a block ahead, won on the three large layers (3072 x 12288 both ways, 3072 x 18432);
# 64 columns, two blocks per step, on 3072 x 3072, where 128 columns leave too few column
# tiles to split K over. Each with ``split_for``'s one-wave K split. Eager timing
# (``kernels/fastest.py``) cannot choose here: at 10-40 us of GPU time per call it measures
# mostly the launch's host time.
MMA_MAX_M = 32  # rows of x one program holds: a 16- or 32-row tile (``block_m``)
LARGE_LAYER = 1 << 24  # weights (N x K) from which the wide tile runs: 3072 x 3072 is 9.4 M
# Programs per SM the K split aims at: 4 at 96-128 registers per thread and 4 warps
PROGRAMS_PER_SM = 4
WIDE_TILE = {"BLOCK_N": 128, "STEP_BLOCKS": 1, "num_warps": 4, "AHEAD": True}
NARROW_TILE = {"BLOCK_N": 64, "STEP_BLOCKS": 2, "num_warps": 4}
# What benchmarks/bench_bnb4.py --mma-tiles times (each with several K splits). Measured in session 6
# and not kept (benchmarks/NOTES.md, NF4 v8): register caps (maxnreg 96, 80), an L1 prefetch of
# the weight bytes, W read as int32 words in a permuted K order (commit cb6875c) and the absmax
# codes two blocks ahead.
MMA_TILES_SWEEP = [
    dict(BLOCK_N=64, STEP_BLOCKS=2, num_warps=4),  # NARROW_TILE
    dict(BLOCK_N=64, STEP_BLOCKS=2, num_warps=4, AHEAD=True),
    dict(BLOCK_N=128, STEP_BLOCKS=1, num_warps=4),
    dict(BLOCK_N=128, STEP_BLOCKS=1, num_warps=4, AHEAD=True),  # WIDE_TILE
    dict(BLOCK_N=128, STEP_BLOCKS=1, num_warps=4, AHEAD=True, PREFETCH=True),
    dict(BLOCK_N=128, STEP_BLOCKS=2, num_warps=4, AHEAD=True),
]


def tile_name(tile: dict) -> str:
    """``128x1x4pa`` etc.: columns x blocks per step x warps, then p(refetch), a(head)."""
    flags = "".join(c for c, key in (("p", "PREFETCH"), ("a", "AHEAD")) if tile.get(key))
    return f"{tile['BLOCK_N']}x{tile['STEP_BLOCKS']}x{tile['num_warps']}{flags}" + \
        (f"r{tile['maxnreg']}" if tile.get("maxnreg") else "")


def block_m(m: int) -> int:
    """The MMA's M side for m rows of x: 16 (the smallest ``tl.dot`` tile) or 32."""
    return 16 if m <= 16 else 32


def default_tile(n: int, k: int) -> dict:
    """The measured tile for an (N, K) layer (a copy: callers may change it)."""
    return dict(WIDE_TILE if n * k >= LARGE_LAYER else NARROW_TILE)


@functools.cache  # on every call's host path: a few us of Python per call otherwise
def split_for(n: int, k: int, block: int, block_n: int, step_blocks: int, sms: int,
              programs_per_sm: int = PROGRAMS_PER_SM) -> int:
    """K slices: the most that still run in one wave of ``programs_per_sm`` programs per SM,
    each slice a whole number of steps (no tail in the loop).

    A FLUX layer with N = 3072 has only 24 column tiles of 128: without splitting K, 108 of
    132 SMs would idle. One wave, not more: rounding up to 4 programs per SM gave 576 programs
    on every FLUX shape, 1.09 waves, and the one-wave split was 4-18% faster on the H100
    (session 6 sweep, benchmarks/NOTES.md NF4 v8)."""
    steps = k // block // step_blocks
    tiles = -(-n // block_n)
    fits = [d for d in range(1, steps + 1) if steps % d == 0 and tiles * d <= programs_per_sm * sms]
    return max(fits or [1])
