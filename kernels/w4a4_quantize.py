"""W4A4 activation quantization: smooth, per-row per-64-group int4, and the low-rank down projection.

Math (comfy-kitchen's ``quantize_svdquant_w4a4``, done in fp32 whatever the input dtype):

    xm      = x + 0.171875 if act_unsigned else x           (nunchaku's post-GELU shift)
    xs      = xm / smooth                                    (fp32 division, as the reference)
    ascale  = max(absmax(xs[m, 64g : 64g+64]), 1e-10) / Q    Q = 7 signed, 15 unsigned
    code    = clamp(round_half_even(xs / ascale), -7, 7)     (0..15 when unsigned)
    lora    = x @ proj_down                                  (raw x: neither shifted nor smoothed)

Output storage (transient, never written to files), for the GEMM in ``w4a4_gemm.py``:

    codes   (M, K)    int8, one code per byte, *split group order*: inside each 64-wide group,
                      bytes 0..31 hold the codes of even columns 64g+0, +2, ..., +62 and bytes
                      32..63 the odd columns 64g+1, ..., +63. The packed weight keeps even
                      columns in low nibbles and odd in high nibbles, so the GEMM computes
                      ``codes_even . W_lo + codes_odd . W_hi`` and never re-interleaves.
    ascales (M, K/64) fp32
    lora    (M, R)    fp32

One program owns BLOCK_M rows and walks all groups once: x is read once, codes/scales/lora
written once (the "one pass" of the format's forward).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

GROUP = 64
GELU_UNSIGNED_SHIFT = 0.171875
# 1.5 * 2**23: adding then subtracting it rounds an fp32 |v| < 2**22 half-to-even, like
# torch.round; portable across Triton versions and the interpreter (no libdevice needed).
ROUND_MAGIC: tl.constexpr = tl.constexpr(12582912.0)
_SHIFT: tl.constexpr = tl.constexpr(GELU_UNSIGNED_SHIFT)


def _interpreting() -> bool:
    # The interpreter (Triton 3.9) miscomputes bf16 tl.dot; fp32 "ieee" on the same values is
    # the same sum (bf16 products are exact in fp32).
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def split_group_order(codes: torch.Tensor) -> torch.Tensor:
    """Natural column order (..., K) -> split group order (evens then odds inside each 64)."""
    k = codes.shape[-1]
    g = codes.reshape(*codes.shape[:-1], k // GROUP, GROUP // 2, 2)
    return g.transpose(-1, -2).reshape(*codes.shape[:-1], k)


def natural_group_order(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of ``split_group_order``."""
    k = codes.shape[-1]
    g = codes.reshape(*codes.shape[:-1], k // GROUP, 2, GROUP // 2)
    return g.transpose(-1, -2).reshape(*codes.shape[:-1], k)


def quantize_activations_reference(
    x: torch.Tensor, smooth: torch.Tensor, proj_down: torch.Tensor, act_unsigned: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch reference: (codes (M, K) int8 in *natural* order, ascales (M, K/64) fp32,
    lora (M, R) fp32). On fp32 input it equals comfy-kitchen's eager quantizer exactly."""
    m, k = x.shape
    xf = x.float()
    lora = xf @ proj_down.float()
    xm = xf + GELU_UNSIGNED_SHIFT if act_unsigned else xf
    groups = (xm / smooth.float()).view(m, k // GROUP, GROUP)
    qmax, qmin = (15, 0) if act_unsigned else (7, -7)
    ascales = groups.abs().amax(dim=-1).clamp(min=1e-10) / qmax
    codes = (groups / ascales.unsqueeze(-1)).round().clamp(qmin, qmax).to(torch.int8)
    return codes.reshape(m, k), ascales, lora


@triton.jit
def _quantize_group_half(xs, ascale, QMIN: tl.constexpr, QMAX: tl.constexpr):
    v = xs / ascale[:, None]
    v = (v + ROUND_MAGIC) - ROUND_MAGIC
    return tl.minimum(tl.maximum(v, QMIN), QMAX).to(tl.int8)


@triton.jit
def w4a4_quantize_kernel(
    x_ptr, smooth_ptr, down_ptr, codes_ptr, ascales_ptr, lora_ptr,
    M, K, R,
    stride_xm,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    UNSIGNED: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    half = tl.arange(0, 32)
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    num_groups = K // 64
    lora = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for g in range(num_groups):
        even_cols = g * 64 + 2 * half
        odd_cols = even_cols + 1
        x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
        x_even = tl.load(x_rows + even_cols[None, :], mask=row_ok[:, None], other=0.0)
        x_odd = tl.load(x_rows + odd_cols[None, :], mask=row_ok[:, None], other=0.0)
        # Low-rank branch on the raw input; bf16/fp16 products are exact in the fp32 accumulator.
        down_even = tl.load(down_ptr + even_cols[:, None] * R + ranks[None, :], mask=rank_ok[None, :], other=0.0)
        down_odd = tl.load(down_ptr + odd_cols[:, None] * R + ranks[None, :], mask=rank_ok[None, :], other=0.0)
        if IEEE_DOT:
            lora = tl.dot(x_even.to(tl.float32), down_even.to(tl.float32), lora, input_precision="ieee")
            lora = tl.dot(x_odd.to(tl.float32), down_odd.to(tl.float32), lora, input_precision="ieee")
        else:
            lora = tl.dot(x_even, down_even.to(x_even.dtype), lora)
            lora = tl.dot(x_odd, down_odd.to(x_odd.dtype), lora)
        s_even = tl.load(smooth_ptr + even_cols).to(tl.float32)
        s_odd = tl.load(smooth_ptr + odd_cols).to(tl.float32)
        xe = x_even.to(tl.float32)
        xo = x_odd.to(tl.float32)
        if UNSIGNED:
            xe = xe + _SHIFT
            xo = xo + _SHIFT
        xe = xe / s_even[None, :]
        xo = xo / s_odd[None, :]
        absmax = tl.maximum(tl.max(tl.abs(xe), axis=1), tl.max(tl.abs(xo), axis=1))
        if UNSIGNED:
            ascale = tl.maximum(absmax, 1e-10) / 15.0
            q_even = _quantize_group_half(xe, ascale, 0.0, 15.0)
            q_odd = _quantize_group_half(xo, ascale, 0.0, 15.0)
        else:
            ascale = tl.maximum(absmax, 1e-10) / 7.0
            q_even = _quantize_group_half(xe, ascale, -7.0, 7.0)
            q_odd = _quantize_group_half(xo, ascale, -7.0, 7.0)
        code_rows = codes_ptr + rows[:, None].to(tl.int64) * K + g * 64
        tl.store(code_rows + half[None, :], q_even, mask=row_ok[:, None])
        tl.store(code_rows + 32 + half[None, :], q_odd, mask=row_ok[:, None])
        tl.store(ascales_ptr + rows.to(tl.int64) * num_groups + g, ascale, mask=row_ok)
    tl.store(lora_ptr + rows[:, None].to(tl.int64) * R + ranks[None, :], lora, mask=row_ok[:, None] & rank_ok[None, :])


def quantize_activations(
    x: torch.Tensor, smooth: torch.Tensor, proj_down: torch.Tensor, act_unsigned: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher: (codes (M, K) int8 in split group order, ascales (M, K/64) fp32, lora (M, R) fp32)."""
    m, k = x.shape
    r = proj_down.shape[1]
    if k % GROUP:
        raise ValueError(f"W4A4 activations: K={k} must be a multiple of {GROUP}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if smooth.shape != (k,) or proj_down.shape[0] != k:
        raise ValueError(
            f"W4A4 activations: x has K={k} but smooth_factor is {tuple(smooth.shape)} and "
            f"proj_down is {tuple(proj_down.shape)}; expected ({k},) and ({k}, R)"
        )
    codes = torch.empty(m, k, dtype=torch.int8, device=x.device)
    ascales = torch.empty(m, k // GROUP, dtype=torch.float32, device=x.device)
    lora = torch.empty(m, r, dtype=torch.float32, device=x.device)
    block_m = 16 if m <= 16 else 32 if m <= 4096 else 64
    block_r = max(16, triton.next_power_of_2(r))
    w4a4_quantize_kernel[(triton.cdiv(m, block_m),)](
        x, smooth.contiguous(), proj_down.contiguous(), codes, ascales, lora,
        m, k, r, x.stride(0),
        BLOCK_M=block_m, BLOCK_R=block_r,
        UNSIGNED=act_unsigned, IEEE_DOT=x.dtype == torch.float32 or _interpreting(),
        num_warps=4,
    )
    return codes, ascales, lora
