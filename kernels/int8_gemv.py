"""Weight-only int8 GEMV for one row of activations, and its reference.

Operands: ``x`` (1, K) bf16/fp16/fp32, weight ``w_q`` int8 (N, K) with ``w_scale`` fp32
(N, K // B) (any strides; the layout keeps it contiguous along N), B = 64/128/256.

Math: ``out[n] = sum_b w_scale[n, b] * sum_{k in b} x[k] * w_q[n, k] (+ bias[n])``, all in
fp32 on CUDA cores: a single row gives tensor cores nothing to do, the time is the weight
read (1 byte per element). Codes become fp32 with an integer add and a float subtract
(``int8_to_float``), not the conversion unit, which would take longer than the read.

Each program owns BLOCK_N weight rows (of one K slice, when N is too narrow to give every SM
several programs) and walks K in steps of ``STEP_BLOCKS`` quantization
blocks, issuing the step's loads before any arithmetic so that several 16-byte loads per
thread are in flight. Everything is 2-D (rows x K), so x is loaded straight into the
layout the products need, with no shuffles through shared memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .experimental import experimental_kernels_enabled
from .int8_gemm import INTERPRETING, OUT_DTYPES, autotuning, int8_to_float, w8a16_reference
from .split_k import arrival_counters

w8a16_gemv_reference = w8a16_reference


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    N, K, stride_wn, stride_wsn, stride_wsk,
    HAS_BIAS: tl.constexpr, QBLOCK: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, STEP_BLOCKS: tl.constexpr,
    part_ptr=None, count_ptr=None, FIXUP: tl.constexpr = False, EVEN: tl.constexpr = False,
):
    """Program (i, s): rows [i*BLOCK_N, (i+1)*BLOCK_N) over the s-th of SPLIT slices of the K
    blocks. SPLIT == 1 writes the output; otherwise fp32 partials (SPLIT, N), so that a narrow
    N still gives every SM several programs. The partials are summed by ``_split_k_sum`` (a
    second launch), or with FIXUP by whichever program of row tile i finishes last: each
    program stores its partial, then counts itself in ``count_ptr[i]`` (acquire-release); the
    one that sees SPLIT - 1 earlier arrivals sums the SPLIT partials (read past L1, which is
    not coherent across SMs), writes the output and sets the counter back to 0 for the next
    call (so the counters are zeroed once, when allocated, and graph replays stay correct).

    EVEN: every slice has the same number of blocks, a multiple of STEP_BLOCKS, so no step
    needs a mask (the masks' zero fills and compares were 6% of the loop's instructions)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    wn = offs_n % N  # out-of-range rows read a valid row; masked at the store
    offs_k = tl.arange(0, QBLOCK)
    # x offsets in the weight tile's shape: the x load then gets the weight load's layout, each
    # thread reading the x elements its own weight bytes multiply (from L1). A (QBLOCK,) x would
    # be spread one element per thread and broadcast through shared memory, with two CTA
    # barriers per block (what the SASS of the 1-D version showed, 8 instructions per weight).
    x_tile = tl.broadcast_to(offs_k[None, :], (BLOCK_N, QBLOCK))
    w_rows = w_ptr + wn[:, None].to(tl.int64) * stride_wn
    s_rows = w_scale_ptr + wn * stride_wsn
    num_blocks = K // QBLOCK
    per_split = tl.cdiv(num_blocks, SPLIT)
    kb_begin = split * per_split
    kb_end = tl.minimum(kb_begin + per_split, num_blocks)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kb0 in range(kb_begin, kb_end, STEP_BLOCKS):
        for j in tl.static_range(STEP_BLOCKS):
            kcol = (kb0 + j) * QBLOCK + offs_k
            x_cols = (kb0 + j) * QBLOCK + x_tile
            if EVEN:
                kb = kb0 + j
                w = tl.load(w_rows + kcol[None, :])  # (BLOCK_N, QBLOCK) int8
                x = tl.load(x_ptr + x_cols).to(tl.float32)
            else:
                kb = tl.minimum(kb0 + j, kb_end - 1)  # a step past the slice reads its last scale...
                k_ok = kcol < kb_end * QBLOCK  # ...with weight and x masked to 0, adding nothing
                w = tl.load(w_rows + kcol[None, :], mask=k_ok[None, :], other=0)
                x = tl.load(x_ptr + x_cols, mask=x_cols < kb_end * QBLOCK, other=0.0).to(tl.float32)
            s = tl.load(s_rows + kb * stride_wsk)  # (BLOCK_N,)
            acc += tl.sum(int8_to_float(w, tl.float32) * x, axis=1) * s
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + wn).to(tl.float32)
        tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)
    elif FIXUP:
        tl.store(part_ptr + split * N + offs_n, acc, mask=offs_n < N)
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            parts = tl.load(part_ptr + tl.arange(0, SPLIT)[:, None] * N + offs_n[None, :],
                            mask=(offs_n < N)[None, :], other=0.0, cache_modifier=".cg")
            total = tl.sum(parts, axis=0)
            if HAS_BIAS:
                total += tl.load(bias_ptr + wn).to(tl.float32)
            tl.store(out_ptr + offs_n, total.to(out_ptr.dtype.element_ty), mask=offs_n < N)
            tl.atomic_xchg(count_ptr + pid, 0)
    else:
        tl.store(out_ptr + split * N + offs_n, acc, mask=offs_n < N)


@triton.jit
def _split_k_sum(part_ptr, bias_ptr, out_ptr, N, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    parts = tl.load(part_ptr + tl.arange(0, SPLIT)[:, None] * N + offs[None, :], mask=ok[None, :], other=0.0)
    acc = tl.sum(parts, axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def split_for(n: int, num_blocks: int) -> int:
    """K slices for narrow layers only (fewer than 512 16-row programs), up to ~1024 programs.

    Measured on the H100 (benchmarks/NOTES.md): N=3072 went from 0.91x to 1.88x bf16 with 8
    slices; N=12288 got slower with 2 (1.69x -> 1.56x), so wide layers are not split.
    """
    rows = triton.cdiv(n, 16)
    split = 1
    while rows < 512 and split < 8 and rows * split < 1024 and num_blocks // (2 * split) >= 2:
        split *= 2
    return split


# (BLOCK_N, STEP_BLOCKS, num_warps): a (BLOCK_N, B) int8 tile spans num_warps * 32 threads at
# 16 bytes each when BLOCK_N * B = num_warps * 512; a larger STEP_BLOCKS puts more
# independent 16-byte loads in flight per thread. Twice (or four times) that many rows give
# each thread 2 (4) rows of the same 16 columns, so one x load and conversion serves them all:
# 5.4 SASS instructions per weight byte at (64, 2, 4) against 7.3 at (16, 4, 4) (B = 128,
# sm_90, Triton 3.6), but on the H100 the autotuner kept one row per thread: a 64-row tile
# leaves N = 12288 with 192 programs, fewer than two per SM (NOTES.md, int8 version 5).
# STEP_BLOCKS 3 keeps the narrow layers' 3-block K slices (K = 3072 in 8 slices) unmasked.
GEMV_TILES = [(16, 4, 4), (32, 4, 4), (64, 2, 4), (64, 4, 4), (16, 4, 2), (32, 4, 2), (16, 8, 4),
              (16, 3, 4), (32, 3, 4), (8, 4, 2), (4, 8, 1)]
DEFAULT_GEMV_TILE = (16, 4, 4)  # without autotuning: within 3% of the best on the wide layers


def even_steps(num_blocks: int, split: int, step_blocks: int) -> bool:
    """Whether every K slice holds the same whole number of steps (the kernel's EVEN)."""
    return num_blocks % split == 0 and (num_blocks // split) % step_blocks == 0


_gemv_even = triton.heuristics({
    "EVEN": lambda a: even_steps(a["K"] // a["QBLOCK"], a["SPLIT"], a["STEP_BLOCKS"]),
})(_gemv_kernel)

if INTERPRETING:
    _gemv_tuned = _gemv_even
else:
    _gemv_tuned = triton.autotune(
        [triton.Config({"BLOCK_N": bn, "STEP_BLOCKS": sb}, num_warps=w, num_stages=1) for bn, sb, w in GEMV_TILES],
        key=["N", "K", "QBLOCK", "SPLIT"],
    )(_gemv_even)

PLAIN_GEMV = {"BLOCK_N": 8, "STEP_BLOCKS": 2}


def w8a16_gemv(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, block_size: int,
    bias: torch.Tensor | None = None, *, config: dict | None = None, split: int | None = None,
    fixup: bool | None = None,
) -> torch.Tensor:
    """``x @ (w_q * w_scale).T + bias`` for one row ``x`` (1, K); output (1, N) in x's dtype.

    ``split`` K slices (default ``split_for``: more for narrow N) are summed in fp32 by a
    second, tiny kernel, or with ``fixup`` inside the same launch by the last program of each
    row tile (default: only with ``COMFY_LOWBIT_EXPERIMENTAL=1``, until measured; it saves the
    second launch, which costs about as much as the narrow GEMV itself).
    """
    n, k = w_q.shape
    if x.dim() != 2 or x.shape != (1, k) or x.stride(1) != 1:
        raise ValueError(f"w8a16_gemv takes x of shape (1, {k}) with unit stride along K, got {tuple(x.shape)}")
    if x.dtype not in OUT_DTYPES:
        raise ValueError(f"x must be one of {OUT_DTYPES}, got {x.dtype}")
    if (w_q.dtype != torch.int8 or w_q.stride(1) != 1 or k % block_size or w_scale.dtype != torch.float32
            or tuple(w_scale.shape) != (n, k // block_size)):
        raise ValueError(f"weight must be int8 (N, K) with fp32 scales (N, K // {block_size}), got {w_q.dtype} "
                         f"{tuple(w_q.shape)} and {w_scale.dtype} {tuple(w_scale.shape)}")
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    split = split_for(n, k // block_size) if split is None else split
    if split < 1 or split & (split - 1):
        raise ValueError(f"split must be a power of two, got {split}")
    fixup = split > 1 and (experimental_kernels_enabled() if fixup is None else fixup)
    partials = None if split == 1 else torch.empty((split, n), dtype=torch.float32, device=x.device)
    target = partials if split > 1 and not fixup else out
    args = (x, w_q, w_scale, bias if bias is not None else out, target, n, k, w_q.stride(0), *w_scale.stride())
    kwargs = dict(HAS_BIAS=bias is not None, QBLOCK=block_size, SPLIT=split)
    if fixup:  # enough counters for the narrowest row tile any configuration uses
        smallest = min(min(t[0] for t in GEMV_TILES), PLAIN_GEMV["BLOCK_N"], (config or {}).get("BLOCK_N", 1 << 30))
        kwargs.update(part_ptr=partials, count_ptr=arrival_counters(x.device, triton.cdiv(n, smallest)), FIXUP=True)
    if config is None and autotuning():
        _gemv_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split)](*args, **kwargs)
    else:
        if config is None:
            config = PLAIN_GEMV if INTERPRETING else dict(zip(("BLOCK_N", "STEP_BLOCKS", "num_warps"), DEFAULT_GEMV_TILE))
        meta = dict(config)
        extra = {key: meta.pop(key) for key in ("num_warps", "num_stages") if key in meta}
        _gemv_even[(triton.cdiv(n, meta["BLOCK_N"]), split)](*args, **kwargs, **meta, **extra)
    if split > 1 and not fixup:
        _split_k_sum[(triton.cdiv(n, 256),)](target, bias if bias is not None else out, out, n,
                                             HAS_BIAS=bias is not None, SPLIT=split, BLOCK=256)
    return out
