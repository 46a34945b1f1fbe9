"""Int8 GEMMs for weights with one scale per output row per K block, and their references.

Operands
--------
* weight ``w_q`` int8 (N, K) row-major and ``w_scale`` fp32 (N, K // B), B = block size;
* W8A8: activation ``a_q`` int8 (M, K) and ``a_scale_t`` fp32 (K // B, M), both written by
  ``int8_quant.quantize_rows`` (same B);
* W8A16: the activation ``x`` itself (bf16/fp16), M small.

Math
----
W8A8:  ``out[m, n] = sum_b  a_scale[m, b] * w_scale[n, b] * P_b[m, n] (+ bias[n])`` where
``P_b = sum_{k in block b} a_q[m, k] * w_q[n, k]`` is exact in int32 (|P_b| <= 127^2 * 256
< 2^22). The kernel takes one K block per step: one int8 tensor-core ``tl.dot`` gives P_b
in int32, which is turned into fp32 *exactly* and scaled in fp32 before joining the fp32
accumulator. The only roundings are the fp32 ones of that scaled sum and the final cast.

Int32 -> fp32 of P_b is exact either way: the conversion instruction (default), or with
``EXACT_CVT`` ``bitcast(P + 0x4B400000) - 12582912.0`` (an integer add and a float
subtract, exact for |P| < 2^22). On the H100 neither was consistently faster (within
+-3% across the FLUX shapes), so the default is the plain instruction.

The weight scale may be strided: the layout keeps it column-major (contiguous along N), so
the BLOCK_N scales of one K block are one contiguous load.

W8A16: ``out[m, n] = sum_b w_scale[n, b] * sum_{k in b} x[m, k] * w_q[n, k]`` with int8
codes turned into x's dtype inside the main loop (exact: |q| <= 127), a bf16/fp16 dot with
fp32 accumulation per K block, and the block's scale applied to that fp32 partial.

The block size is a constexpr: BLOCK_K of the main loop *is* the quantization block, so
every listed block size (64/128/256) is a specialization, never a hard-coded 128.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .fastest import m_bucket, tuning_enabled
from .tiling import grouped_tile_ids

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ----------------------------------------------------------------------------- references


def w8a8_reference(
    a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
    block_size: int, bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact-integer reference: ``(out, magnitude)`` in float64 on the CPU.

    ``a_scale`` is (M, K // B) (not transposed). The per-block products are exact int64;
    only the final scaling is float64. ``magnitude = sum_b |a_s w_s P_b|`` bounds the fp32
    rounding a kernel may add (about ``n_blocks * 2^-24 * magnitude``).
    """
    m, k = a_q.shape
    n = w_q.shape[0]
    nb = k // block_size
    a = a_q.cpu().to(torch.int64).reshape(m, nb, block_size).permute(1, 0, 2)
    w = w_q.cpu().to(torch.int64).reshape(n, nb, block_size).permute(1, 2, 0)
    partial = torch.bmm(a, w).double()  # (nb, M, N), exact integers
    scale = a_scale.cpu().double().t()[:, :, None] * w_scale.cpu().double().t()[:, None, :]
    terms = partial * scale
    out = terms.sum(0)
    if bias is not None:
        out = out + bias.cpu().double()
    return out, terms.abs().sum(0)


def w8a16_reference(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, block_size: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Float64 ``x @ dequant(w).T + bias`` on the CPU."""
    n, k = w_q.shape
    w = w_q.cpu().double().reshape(n, k // block_size, block_size) * w_scale.cpu().double()[:, :, None]
    out = x.cpu().double() @ w.reshape(n, k).t()
    return out if bias is None else out + bias.cpu().double()


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _epilogue(acc, bias_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    out = acc.to(out_ptr.dtype.element_ty)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :], out, mask=mask)


@triton.jit
def _w8a8_kernel(
    a_ptr, a_scale_t_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_wn, stride_wsn, stride_wsk, stride_om,
    HAS_BIAS: tl.constexpr, EXACT_CVT: tl.constexpr, QBLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/columns read a valid row instead (results masked at the store), so
    # the main-loop loads need no masks.
    am = offs_m % M
    wn = offs_n % N
    offs_k = tl.arange(0, QBLOCK)
    a_ptrs = a_ptr + am[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + wn[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    sa_ptrs = a_scale_t_ptr + am
    sw_ptrs = w_scale_ptr + wn * stride_wsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, K // QBLOCK):
        part = tl.dot(tl.load(a_ptrs), tl.load(w_ptrs), out_dtype=tl.int32)
        sa = tl.load(sa_ptrs + kb * M)
        sw = tl.load(sw_ptrs + kb * stride_wsk)
        if EXACT_CVT:  # integer add + float subtract instead of a conversion instruction
            part_f = (part + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
        else:
            part_f = part.to(tl.float32)
        acc += part_f * (sa[:, None] * sw[None, :])
        a_ptrs += QBLOCK
        w_ptrs += QBLOCK
    _epilogue(acc, bias_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS)


@triton.jit
def int8_to_float(q, dtype: tl.constexpr):
    """Exact int8 -> ``dtype`` with integer adds and one float subtract (no conversion unit).

    fp32: ``bitcast(q + 0x4B400000) - 1.5 * 2^23``; fp16: ``bitcast(q + 0x6480) - 1152``;
    bf16: the fp32 value's upper half (|q| <= 127 has at most 7 significant bits, so
    dropping the low 16 bits is exact).
    """
    if dtype == tl.float16:
        out = (q.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0
    else:
        f = (q.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
        if dtype == tl.bfloat16:
            out = (f.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            out = f
    return out  # one return: Triton 3.6 rejects returns of different types in constexpr branches


@triton.jit
def _w8a16_kernel(
    x_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_wn, stride_wsn, stride_wsk, stride_om,
    HAS_BIAS: tl.constexpr, QBLOCK: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    xm = offs_m % M
    wn = offs_n % N
    offs_k = tl.arange(0, QBLOCK)
    x_ptrs = x_ptr + xm[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + wn[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    sw_ptrs = w_scale_ptr + wn * stride_wsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, K // QBLOCK):
        x = tl.load(x_ptrs)
        w = tl.load(w_ptrs)
        if DOT_IN_FP32:  # the interpreter's bf16 tl.dot is wrong (Triton 3.9): same math in fp32
            part = tl.dot(x.to(tl.float32), int8_to_float(w, tl.float32), out_dtype=tl.float32)
        else:
            part = tl.dot(x, int8_to_float(w, x.dtype), out_dtype=tl.float32)
        acc += part * tl.load(sw_ptrs + kb * stride_wsk)[None, :]
        x_ptrs += QBLOCK
        w_ptrs += QBLOCK
    _epilogue(acc, bias_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS)


# ----------------------------------------------------------------------------- tuning

# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_K is the quantization block. The W8A8
# tile holds an int32 partial and an fp32 accumulator: 64x128 per warpgroup capped at 168
# registers (optional 5th entry: maxnreg) lets three programs share an SM, so one's MMAs run
# while another rescales (measured 612-658 TOP/s vs 544-594 uncapped with two per SM, and
# 504-528 for 128x128 with 8 warps at 255 registers, one per SM; benchmarks/NOTES.md).
W8A8_TILES = [(64, 128, 4, 3, 168), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 4), (128, 128, 8, 3)]
# Small M is bound by the weight read: narrow N tiles keep enough programs for 132 SMs.
W8A16_TILES = [(16, 32, 4, 4), (16, 64, 4, 4), (32, 64, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3), (16, 128, 4, 4)]
SMEM_LIMIT = 220 * 1024


def _configs(tiles):
    return [
        triton.Config({"BLOCK_M": t[0], "BLOCK_N": t[1], "GROUP_M": 8}, num_warps=t[2], num_stages=t[3],
                      maxnreg=t[4] if len(t) > 4 else None)
        for t in tiles
    ]


def _fits_smem(a_bytes):
    """Autotune pruner: drop tiles whose pipelined A and B stages exceed shared memory (the
    quantization block is BLOCK_K, so B=256 rules out the deeper 128-row pipelines)."""

    def prune(configs, named_args, **kwargs):
        qb = named_args.get("QBLOCK", kwargs.get("QBLOCK", 128))
        kept = [c for c in configs
                if c.num_stages * qb * (c.kwargs["BLOCK_M"] * a_bytes + c.kwargs["BLOCK_N"]) <= SMEM_LIMIT]
        return kept or configs[-1:]
    return prune


# Plain jit under the interpreter (autotune needs a driver); autotuned on the GPU.
if INTERPRETING:
    _w8a8_tuned = _w8a8_kernel
    _w8a16_tuned = _w8a16_kernel
else:
    _w8a8_tuned = triton.autotune(
        _configs(W8A8_TILES), key=["M_BUCKET", "N", "K", "QBLOCK"],
        prune_configs_by={"early_config_prune": _fits_smem(1)},
    )(_w8a8_kernel)
    _w8a16_tuned = triton.autotune(
        _configs(W8A16_TILES), key=["M_BUCKET", "N", "K", "QBLOCK"],
        prune_configs_by={"early_config_prune": _fits_smem(2)},
    )(_w8a16_kernel)

# A fixed small tile for the interpreter and for tests that pin a configuration.
PLAIN_W8A8 = {"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4}
PLAIN_W8A16 = {"BLOCK_M": 16, "BLOCK_N": 32, "GROUP_M": 4}


def autotuning() -> bool:
    """Autotune on the GPU unless ``COMFY_LOWBIT_AUTOTUNE=0`` (GPU test runs: one compile per
    specialization instead of one per candidate tile); never under the interpreter."""
    return tuning_enabled()


def fixed_config(plain: dict, tiles: list) -> dict:
    """The configuration used when not autotuning: the plain tile under the interpreter, the
    first candidate tile on the GPU."""
    if INTERPRETING:
        return plain
    bm, bn, warps, stages = tiles[0][:4]
    config = {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8, "num_warps": warps, "num_stages": stages}
    if len(tiles[0]) > 4:
        config["maxnreg"] = tiles[0][4]
    return config


# ----------------------------------------------------------------------------- launchers


def _check_weight(w_q: torch.Tensor, w_scale: torch.Tensor, block_size: int) -> tuple[int, int]:
    if w_q.dtype != torch.int8 or w_q.dim() != 2 or w_q.stride(1) != 1:
        raise ValueError(f"weight must be 2-D int8 with unit stride along K, got {w_q.dtype} {tuple(w_q.shape)}")
    n, k = w_q.shape
    if k % block_size:
        raise ValueError(f"weight K={k} is not a multiple of block_size={block_size}")
    if tuple(w_scale.shape) != (n, k // block_size) or w_scale.dtype != torch.float32:
        raise ValueError(f"weight scale must be fp32 {(n, k // block_size)}, got {w_scale.dtype} {tuple(w_scale.shape)}")
    return n, k


def check_w8a8_operands(
    a_q: torch.Tensor, a_scale_t: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, block_size: int
) -> tuple[int, int, int]:
    """``(M, N, K)`` of valid W8A8 operands (see the module doc), or a ValueError saying what is wrong."""
    n, k = _check_weight(w_q, w_scale, block_size)
    if a_q.dtype != torch.int8 or a_q.dim() != 2 or a_q.shape[1] != k or a_q.stride(1) != 1:
        raise ValueError(f"activation must be int8 (M, {k}) with unit stride along K, got {a_q.dtype} {tuple(a_q.shape)}")
    m = a_q.shape[0]
    if tuple(a_scale_t.shape) != (k // block_size, m) or not a_scale_t.is_contiguous():
        raise ValueError(f"activation scale must be contiguous fp32 {(k // block_size, m)}, got {tuple(a_scale_t.shape)}")
    return m, n, k


def _output(m: int, n: int, out_dtype: torch.dtype, device) -> torch.Tensor:
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"output dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    return torch.empty((m, n), dtype=out_dtype, device=device)


def _launch(tuned, plain, default_config, grid_args, kwargs, config):
    m, n = grid_args
    if config is None and autotuning():
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        return grid, tuned, kwargs
    meta = dict(default_config if config is None else config)
    extra = {k: meta.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in meta}
    grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    return grid, plain, {**kwargs, **meta, **extra}


def w8a8_matmul(
    a_q: torch.Tensor, a_scale_t: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, block_size: int,
    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *,
    exact_cvt: bool = False, config: dict | None = None,
) -> torch.Tensor:
    """``(a_q * a_scale) @ (w_q * w_scale).T + bias`` with int8 tensor cores (see module doc).

    ``config`` (BLOCK_M/BLOCK_N/GROUP_M[/num_warps/num_stages]) skips autotuning.
    """
    m, n, k = check_w8a8_operands(a_q, a_scale_t, w_q, w_scale, block_size)
    out = _output(m, n, out_dtype, a_q.device)
    if m == 0:
        return out
    kwargs = dict(HAS_BIAS=bias is not None, EXACT_CVT=exact_cvt, QBLOCK=block_size)
    grid, kernel, kwargs = _launch(_w8a8_tuned, _w8a8_kernel, fixed_config(PLAIN_W8A8, W8A8_TILES), (m, n), kwargs, config)
    kernel[grid](
        a_q, a_scale_t, w_q, w_scale, bias if bias is not None else out, out,
        m, n, k, m_bucket(m), a_q.stride(0), w_q.stride(0), *w_scale.stride(), out.stride(0), **kwargs,
    )
    return out


def w8a16_matmul(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, block_size: int,
    bias: torch.Tensor | None = None, *, config: dict | None = None,
) -> torch.Tensor:
    """``x @ (w_q * w_scale).T + bias`` for bf16/fp16 ``x`` (M, K); output in x's dtype."""
    n, k = _check_weight(w_q, w_scale, block_size)
    if x.dtype not in (torch.bfloat16, torch.float16) or x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"x must be bf16/fp16 (M, {k}) with unit stride along K, got {x.dtype} {tuple(x.shape)}")
    m = x.shape[0]
    out = _output(m, n, x.dtype, x.device)
    if m == 0:
        return out
    kwargs = dict(HAS_BIAS=bias is not None, QBLOCK=block_size, DOT_IN_FP32=INTERPRETING)
    grid, kernel, kwargs = _launch(_w8a16_tuned, _w8a16_kernel, fixed_config(PLAIN_W8A16, W8A16_TILES), (m, n), kwargs, config)
    kernel[grid](
        x, w_q, w_scale, bias if bias is not None else out, out,
        m, n, k, m_bucket(m), x.stride(0), w_q.stride(0), *w_scale.stride(), out.stride(0), **kwargs,
    )
    return out
