"""W4A4 at small M (1..16 rows): one GEMV launch that reads the packed weight once.

Inputs (shapes and orders as in ``w4a4_gemm.py``; viewed here as 32-bit words):

    qweight (N, K/8)  int32   word i of row n = bytes 4i..4i+3 of the packed row: 8 nibbles,
                              the low nibble of each byte an even column, the high one the odd
                              column after it. Word j (0..7) of group g holds columns
                              64g + 8j .. 64g + 8j + 7.
    codes   (M, K/4)  int32   the quantizer's int8 codes in split group order, 4 per word: word
                              j of group g = even columns 64g + 8j, +2, +4, +6 (bytes 4j..4j+3
                              of the group); word 8 + j = the odd columns 64g + 8j + 1, ..., +7.
    ascales (K/64, M) fp32;  wscales (K/64, N);  lora (C, M, R) fp32 partials;  proj_up (N, R)

So the lo-nibble bytes of weight word j pair with activation word j and the hi-nibble bytes
with word 8 + j, byte by byte, without any reordering. Math per (m, n, group g):

    lo16 = (w << 4) & 0xF0F0F0F0     each byte = 16 * (signed low nibble), exact in int8
    hi16 =  w       & 0xF0F0F0F0     each byte = 16 * (signed high nibble)
    D16  = sum_j dp4a(lo16_j, even_j) + dp4a(hi16_j, odd_j)       = 16 * D_g  (exact int32)
    out[m, n] = sum_g D16 * (ascale[m, g] / 16) * wscale[g, n]  +  lora[m] . proj_up[n]  +  bias[n]

``dp4a`` (PTX ``dp4a.s32.s32``: four signed byte products summed into an int32) makes the
decode two logic ops per 8 nibbles and the dot product one instruction per 4 products per row,
so the kernel stays memory-bound (the packed weight is the floor: 18.9 MB, 7 us on an H100 at
K=3072, N=12288). Under the interpreter (no inline PTX) the same dp4a is computed with shifts.

No split-K across programs, hence no zeroed buffer, no atomics and no cast launch: a program
owns BLOCK_N output columns for up to 8 rows and walks all of K itself, BLOCK_N x GROUPS groups
(16-byte loads, two per thread) per step, the next step's weight words loaded before the
current step is computed. The tile spreads K over the threads; the per-group partial sums
stay in registers and are added across K once, after the loop.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .w4a4_gemm import GROUP, check_operands

try:  # programmatic dependent launch (Triton 3.6 has it); without it the GEMV launches plainly
    from triton.language.extra.cuda import gdc_wait
except ImportError:  # pragma: no cover - older Triton
    gdc_wait = None

MAX_ROWS = 16
# Rows per program: the activation words of each sit in registers beside the weight tile.
# More rows take more programs over the same weight tile, launched next to each other so
# that all but the first read it from L2.
ROWS_PER_PROGRAM = 8
# 0xF0F0F0F0 as a signed 32-bit constant: keeps the high nibble of every byte.
HIGH_NIBBLES: tl.constexpr = tl.constexpr(-252645136)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _dp4a(a, b, c, USE_PTX: tl.constexpr):
    """c + sum of the four signed byte products of int32 words a and b (PTX dp4a.s32.s32)."""
    if USE_PTX:
        d = tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                      dtype=tl.int32, is_pure=True, pack=1)
    else:  # the interpreter: the same sum with arithmetic shifts (byte i = (x << 24 - 8i) >> 24)
        d = c + ((a << 24) >> 24) * ((b << 24) >> 24)
        d += ((a << 16) >> 24) * ((b << 16) >> 24)
        d += ((a << 8) >> 24) * ((b << 8) >> 24)
        d += (a >> 24) * (b >> 24)
    return d


@triton.jit
def _step(acc, w, g0, a_tile, ascales_ptr, wscales_ptr, m4, n4, g4, M, N, num_groups, USE_PTX: tl.constexpr):
    """acc (M, N, G, 1) += the scaled group sums of the G groups from g0, weight words ``w``."""
    ok = g4 + g0 < num_groups
    a_ok = (m4 < M) & ok
    even = tl.load(a_tile + g0 * 16, mask=a_ok, other=0)
    odd = tl.load(a_tile + g0 * 16 + 8, mask=a_ok, other=0)
    d16 = _dp4a((w << 4) & HIGH_NIBBLES, even, tl.zeros_like(w), USE_PTX)
    d16 = _dp4a(w & HIGH_NIBBLES, odd, d16, USE_PTX)
    # Kept 4-D (M, N, G, 1) so the sums, the scales and the accumulator share the weight's
    # layout: a 3-D accumulator made Triton move every step's sums through shared memory.
    group_sum = tl.sum(d16, axis=3, keep_dims=True)  # 16 * D_g, exact
    # 1/16 undoes the nibble position; exact (a power of two).
    a_scale = tl.load(ascales_ptr + (g4 + g0) * M + m4, mask=a_ok, other=0.0) * 0.0625
    w_scale = tl.load(wscales_ptr + (g4 + g0) * N + n4, mask=ok & (n4 < N), other=0.0).to(tl.float32)
    return acc + group_sum.to(tl.float32) * (a_scale * w_scale)


@triton.jit
def w4a4_gemv_kernel(
    a_ptr, ascales_ptr, w_ptr, wscales_ptr, lora_ptr, up_ptr, bias_ptr, out_ptr,
    M, N, K, R, CHUNKS,
    stride_am, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_PTX: tl.constexpr, PDL: tl.constexpr = False,
):
    # 4-D tiles (row m, column n, group g, word j): the weight is (1, N, G, 8), the activation
    # (M, 1, G, 8); their dp4a products broadcast to (M, N, G, 8) and are summed over j.
    # Each iteration takes two such tiles (2G groups), loaded one iteration ahead.
    #
    # Tile sizes keep BLOCK_M*G*8 and BLOCK_N*G under the thread count: Triton then loads the
    # activation words and scales straight into the weight's layout (it re-loads "cheap"
    # small tensors rather than convert them), so the loop has no shared-memory round trip.
    row_blocks = tl.cdiv(M, BLOCK_M)
    m1 = (tl.program_id(0) % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    n1 = (tl.program_id(0) // row_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    g1 = tl.arange(0, GROUPS)
    j1 = tl.arange(0, 8)
    m4 = m1[:, None, None, None]
    n4 = n1[None, :, None, None]
    g4 = g1[None, None, :, None]
    j4 = j1[None, None, None, :]
    n3 = n1[None, :, None]
    num_groups = K // 64
    # Row strides in words (K/8 and K/4) come as arguments, not computed here: Triton then
    # knows them divisible by 16 at FLUX sizes and emits 16-byte loads.
    w_tile = w_ptr + n4.to(tl.int64) * stride_wn + g4 * 8 + j4  # (1, N, G, 8)
    a_tile = a_ptr + m4.to(tl.int64) * stride_am + g4 * 16 + j4  # (M, 1, G, 8), even words
    col_ok4 = n4 < N

    w0 = tl.load(w_tile, mask=col_ok4 & (g4 < num_groups), other=0)
    w1 = tl.load(w_tile + GROUPS * 8, mask=col_ok4 & (g4 + GROUPS < num_groups), other=0)
    if PDL:
        # Launched as a programmatic dependent of the quantizer: the first weight tiles (which
        # do not depend on it) are already on their way; wait for its codes, scales and
        # low-rank partials from here on.
        gdc_wait()
    acc = tl.zeros((BLOCK_M, BLOCK_N, GROUPS, 1), dtype=tl.float32)
    for g0 in range(0, num_groups, 2 * GROUPS):
        # The next iteration's weight words first: their DRAM latency overlaps this math.
        g_next = g0 + 2 * GROUPS
        w0_next = tl.load(w_tile + g_next * 8, mask=col_ok4 & (g4 + g_next < num_groups), other=0)
        w1_next = tl.load(w_tile + (g_next + GROUPS) * 8, mask=col_ok4 & (g4 + g_next + GROUPS < num_groups), other=0)
        acc = _step(acc, w0, g0, a_tile, ascales_ptr, wscales_ptr, m4, n4, g4, M, N, num_groups, USE_PTX)
        acc = _step(acc, w1, g0 + GROUPS, a_tile, ascales_ptr, wscales_ptr, m4, n4, g4, M, N, num_groups, USE_PTX)
        w0 = w0_next
        w1 = w1_next
    out = tl.sum(tl.sum(acc, axis=3), axis=2)  # (M, N)

    # Low-rank term: the quantizer's C partials of x @ proj_down, summed, times proj_up[n];
    # 32 ranks at a time (a (M, N, R) product at rank 256 and 8 rows spilled).
    c1 = tl.arange(0, BLOCK_C)
    c3 = c1[:, None, None]
    cm3 = m1[None, :, None]
    RANK_STEP: tl.constexpr = min(BLOCK_R, 32)
    for r0 in tl.static_range(0, BLOCK_R, RANK_STEP):
        r3 = r0 + tl.arange(0, RANK_STEP)[None, None, :]
        lora_ok = (c3 < CHUNKS) & (cm3 < M) & (r3 < R)
        lora = tl.sum(tl.load(lora_ptr + (c3 * M + cm3) * R + r3, mask=lora_ok, other=0.0), axis=0)  # (M, RANK_STEP)
        up = tl.load(up_ptr + n3.to(tl.int64) * R + r3, mask=(n3 < N) & (r3 < R), other=0.0).to(tl.float32)  # (1, N, RANK_STEP)
        out += tl.sum(lora[:, None, :] * up, axis=2)
    m2 = m1[:, None]
    n2 = n1[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + n2, mask=n2 < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + m2.to(tl.int64) * stride_om + n2, out.to(out_ptr.dtype.element_ty), mask=(m2 < M) & (n2 < N))


def lora_chunks(m: int, k: int, r: int) -> int:
    """How many low-rank partials the quantizer should write for this GEMV. More chunks mean
    more quantizer programs (each walks fewer groups); the GEMV loads them all at once after
    its loop, 32 ranks at a time: BLOCK_C x BLOCK_M x 32 fp32 values per program, kept to 4096
    (32 registers a thread), i.e. 128 row-chunks (sm_90 SASS: 40 registers at one row, 122 at
    eight)."""
    return max(1, min(k // GROUP, 4096 // (block_rows(m) * min(triton.next_power_of_2(r), 32))))


def block_rows(m: int) -> int:
    return min(ROWS_PER_PROGRAM, triton.next_power_of_2(max(m, 1)))


def default_tile(m: int, n: int) -> dict:
    """BLOCK_N x GROUPS = 64 groups per tile, two tiles per iteration (4 warps: one 16-byte
    load of 4 words per thread and tile). The layout rule (BLOCK_M*GROUPS*8 and
    BLOCK_N*GROUPS under the 128 threads) sets GROUPS = 8 / BLOCK_M at most: (16, 4) at one
    or two rows, (32, 2) at 4 rows, (64, 1) at 8; (8, 8) at one row, which the H100 sweep
    measured fastest or within 3% on every FLUX shape (12.2 against 14.1 us for (16, 4) at
    3072 x 12288, 15.6 against 28.1 at 12288 x 3072; results/w4a4-small-m-h100-2026-11-23.txt).
    SASS for sm_90 (Triton 3.6): LDG.E.128 weight loads, no BAR.SYNC or shared memory in the
    loop, no spills, 40-94 registers (benchmarks/NOTES.md, W4A4 v4)."""
    rows = block_rows(m)
    if rows == 1:
        return {"BLOCK_N": 8, "GROUPS": 8, "num_warps": 4}
    groups = min(4, 8 // rows)
    return {"BLOCK_N": 64 // groups, "GROUPS": groups, "num_warps": 4}


def w4a4_gemv(
    codes: torch.Tensor, ascales: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor,
    lora: torch.Tensor, proj_up: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
    *, config: dict | None = None, out: torch.Tensor | None = None, pdl: bool = False,
) -> torch.Tensor:
    """Small-M W4A4 product: int8 split-order ``codes`` (M <= 16), shapes as in ``w4a4_gemm``.
    ``config`` pins BLOCK_N/GROUPS/num_warps; ``out`` is the (M, N) buffer to write. ``pdl``
    (sm_90+) launches it as a programmatic dependent of the kernel before it on the stream
    (the quantizer, launched with ``config={"launch_dependents": True}``): it starts, and
    fetches its first weight tiles, while that kernel still runs."""
    m = codes.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"W4A4 GEMV: at most {MAX_ROWS} rows, got M={m} (use w4a4_gemm)")
    if codes.dtype != torch.int8:
        raise ValueError(f"W4A4 GEMV: needs int8 activation codes (dp4a), got {codes.dtype}")
    lora, (m, n, k, r) = check_operands("W4A4 GEMV", codes, ascales, qweight, wscales, lora, proj_up)
    chunks = lora.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=codes.device)
    c = dict(config or default_tile(m, n))
    warps = c.pop("num_warps", 4)
    weights = (qweight, wscales, proj_up)
    if qweight.storage_offset() % 4 or not all(t.is_contiguous() for t in weights):
        # A copy launched here would sit between the quantizer and the GEMV, whose first
        # weight loads come before its griddepcontrol.wait: launch plainly then.
        pdl = False
        qweight = qweight.clone() if qweight.storage_offset() % 4 else qweight  # 32-bit view: 4-byte aligned start
    block_m = block_rows(m)
    w4a4_gemv_kernel[(triton.cdiv(m, block_m) * triton.cdiv(n, c["BLOCK_N"]),)](
        codes.contiguous().view(torch.int32), ascales.contiguous(), qweight.contiguous().view(torch.int32),
        wscales.contiguous(), lora.contiguous(), proj_up.contiguous(), bias if bias is not None else out, out,
        m, n, k, r, chunks, k // 4, k // 8, out.stride(0),
        BLOCK_M=block_m, BLOCK_C=triton.next_power_of_2(chunks),
        BLOCK_R=triton.next_power_of_2(r), HAS_BIAS=bias is not None, USE_PTX=not _interpreting(),
        **c, num_warps=warps,
        **({"PDL": True, "launch_pdl": True} if pdl and gdc_wait is not None and not _interpreting() else {}),
    )
    return out
