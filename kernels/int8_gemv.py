"""Weight-only int8 GEMV for a few rows (M <= 4), and its reference.

Operands: ``x`` (M, K) bf16/fp16/fp32, weight ``w_q`` int8 (N, K) with ``w_scale`` fp32
(N, K // B), B = block size (64/128/256).

Math: ``out[m, n] = sum_b w_scale[n, b] * sum_{k in b} x[m, k] * w_q[n, k] (+ bias[n])``,
everything in fp32 on CUDA cores (tensor cores need 16 rows; at M <= 4 the time is the
weight read, 1 byte per element, and the multiply-adds hide under it).

Each program owns BLOCK_N weight rows and walks K in steps of ``STEP_BLOCKS`` quantization
blocks, issuing the step's loads before any arithmetic so that several 16-byte loads per
thread are in flight; rows of x are re-read from L2 by every program (M*K*2 bytes, small).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .int8_gemm import INTERPRETING, OUT_DTYPES, w8a16_reference

GEMV_MAX_ROWS = 4
w8a16_gemv_reference = w8a16_reference


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_wsn, stride_om,
    HAS_BIAS: tl.constexpr, QBLOCK: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, STEP_BLOCKS: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    wn = offs_n % N  # out-of-range rows read a valid row; masked at the store
    offs_r = tl.arange(0, ROWS)
    row_ok = offs_r < M
    xr = tl.where(row_ok, offs_r, 0)
    offs_k = tl.arange(0, QBLOCK)
    w_rows = w_ptr + wn[:, None].to(tl.int64) * stride_wn
    x_rows = x_ptr + xr[:, None].to(tl.int64) * stride_xm
    num_blocks = K // QBLOCK
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for kb0 in range(0, num_blocks, STEP_BLOCKS):
        for j in tl.static_range(STEP_BLOCKS):
            kb = tl.minimum(kb0 + j, num_blocks - 1)  # a step past the end re-reads the last block...
            kcol = (kb0 + j) * QBLOCK + offs_k
            k_ok = (kcol < K)[None, :]  # ...with its x masked to 0, so it adds nothing
            w = tl.load(w_rows + kcol[None, :], mask=k_ok, other=0).to(tl.float32)  # (BLOCK_N, QBLOCK)
            x = tl.load(x_rows + kcol[None, :], mask=k_ok, other=0.0).to(tl.float32)  # (ROWS, QBLOCK)
            s = tl.load(w_scale_ptr + wn * stride_wsn + kb)  # (BLOCK_N,)
            part = tl.sum(x[:, None, :] * w[None, :, :], axis=2)  # (ROWS, BLOCK_N)
            acc += part * s[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + wn).to(tl.float32)
        acc += bias[None, :]
    mask = row_ok[:, None] & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_r[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# (BLOCK_N, STEP_BLOCKS, num_warps): a step loads BLOCK_N * STEP_BLOCKS * B bytes of weight.
# A (BLOCK_N, B) int8 tile spans num_warps * 32 threads at 16 bytes each when BLOCK_N * B =
# num_warps * 512; larger STEP_BLOCKS puts more independent 16-byte loads in flight per thread.
GEMV_TILES = [(8, 4, 2), (8, 8, 2), (16, 4, 4), (16, 8, 4), (32, 4, 8), (32, 8, 8)]

if INTERPRETING:
    _gemv_tuned = _gemv_kernel
else:
    _gemv_tuned = triton.autotune(
        [triton.Config({"BLOCK_N": bn, "STEP_BLOCKS": sb}, num_warps=w, num_stages=2) for bn, sb, w in GEMV_TILES],
        key=["ROWS", "N", "K", "QBLOCK"],
    )(_gemv_kernel)

PLAIN_GEMV = {"BLOCK_N": 8, "STEP_BLOCKS": 2}


def w8a16_gemv(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, block_size: int,
    bias: torch.Tensor | None = None, *, config: dict | None = None,
) -> torch.Tensor:
    """``x @ (w_q * w_scale).T + bias`` for M <= 4 rows; output in x's dtype."""
    n, k = w_q.shape
    m = x.shape[0]
    if not 1 <= m <= GEMV_MAX_ROWS or x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"w8a16_gemv takes x (M <= {GEMV_MAX_ROWS}, {k}) with unit stride along K, got {tuple(x.shape)}")
    if x.dtype not in OUT_DTYPES:
        raise ValueError(f"x must be one of {OUT_DTYPES}, got {x.dtype}")
    if (w_q.dtype != torch.int8 or w_q.stride(1) != 1 or k % block_size or w_scale.dtype != torch.float32
            or tuple(w_scale.shape) != (n, k // block_size)):
        raise ValueError(f"weight must be int8 (N, K) with fp32 scales (N, K // {block_size}), got {w_q.dtype} "
                         f"{tuple(w_q.shape)} and {tuple(w_scale.shape)}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    rows = triton.next_power_of_2(m)
    args = (x, w_q, w_scale, bias if bias is not None else out, out, m, n, k,
            x.stride(0), w_q.stride(0), w_scale.stride(0), out.stride(0))
    kwargs = dict(HAS_BIAS=bias is not None, QBLOCK=block_size, ROWS=rows)
    if config is None and not INTERPRETING:
        _gemv_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, **kwargs)
    else:
        meta = dict(PLAIN_GEMV if config is None else config)
        extra = {key: meta.pop(key) for key in ("num_warps", "num_stages") if key in meta}
        _gemv_kernel[(triton.cdiv(n, meta["BLOCK_N"]),)](*args, **kwargs, **meta, **extra)
    return out
