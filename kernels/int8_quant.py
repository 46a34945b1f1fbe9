"""Symmetric int8 quantization with one scale per row per K block, and its reference.

Storage (the same for weights and activations)
----------------------------------------------
A float matrix ``t`` (R, K) with ``K % B == 0`` (``B`` = block size, 64/128/256) becomes

* ``q``     int8 (R, K), row-major, values in [-127, 127] (-128 is never produced, so the
  format is symmetric and ``-q`` is always representable);
* ``scale`` float32 (R, K // B): ``scale[r, b] = absmax(t[r, b*B:(b+1)*B]) / 127``.

Math
----
``v = t * (127 / absmax)`` then ``q = round_half_away_from_zero(v)``; an all-zero block gets
scale 0 and q 0. Both divisions are IEEE round-to-nearest (``tl.math.div_rn`` in the kernel,
``/`` in torch), and the rounding is ``r = floor(|v|)`` plus one where ``|v| >= r + 0.5`` (no
subtraction the GPU compiler could fuse with the product), so the kernel and the reference
agree bit for bit. ``t ~= q * scale``
with ``|t - q * scale| <= scale / 2`` (plus fp32 rounding of ``v``).

A block holding NaN or +-Inf gets a NaN scale (the kernel adds ``sum(x * 0)``, which is 0
for finite blocks and NaN otherwise): the GEMMs then write NaN in that row instead of a
finite value computed from garbage codes.

The activation kernel writes the scales **transposed**, (K // B, R), so that the GEMM loads
the BLOCK_M scales of one K block as one contiguous vector.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_SIZES = (64, 128, 256)
INT8_MAX = 127.0


def check_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")


# ----------------------------------------------------------------------------- reference


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero, exactly (no ``|v| + 0.5`` double rounding)."""
    a = v.abs()
    r = torch.floor(a)
    r = r + (a >= r + 0.5).to(a.dtype)
    return torch.where(v < 0, -r, r)


def quantize_blockwise_reference(
    t: torch.Tensor, block_size: int, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` (R, K) float -> (``q`` int8 (R, K), ``scale`` fp32 (R, K // block_size)).

    With ``generator`` the rounding is stochastic (``floor(v + u)``, ``u ~ U[0, 1)``), which
    ComfyUI asks for when it re-quantizes a LoRA-patched weight; otherwise round to nearest.
    """
    rows, k = t.shape
    blocks = t.float().reshape(rows, k // block_size, block_size)
    absmax = blocks.abs().amax(dim=-1)
    # NaN scale for a block holding NaN/Inf, as the kernel does (sum(x * 0) is 0 when finite).
    scale = absmax / INT8_MAX + (blocks * 0.0).sum(dim=-1)
    # Tensor / tensor: torch evaluates ``127.0 / absmax`` as ``absmax.reciprocal() * 127``,
    # rounded twice (a quarter of all values differ from IEEE division, measured), and the
    # kernel's div_rn rounds once.
    inv = torch.where(absmax > 0, torch.full_like(absmax, INT8_MAX) / absmax, torch.zeros_like(absmax))
    v = blocks * inv.unsqueeze(-1)
    if generator is None:
        q = round_half_away(v)
    else:
        noise = torch.rand(v.shape, generator=generator, device=generator.device).to(v.device)
        q = torch.floor(v + noise)
    q = q.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8).reshape(rows, k)
    return q, scale


def dequantize_blockwise_reference(q: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    """(R, K) int8 and (R, K // block_size) scales -> fp32 (R, K)."""
    rows, k = q.shape
    w = q.float().reshape(rows, k // block_size, block_size) * scale.float().unsqueeze(-1)
    return w.reshape(rows, k)


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _round_half_away(v):
    # ``a >= r + 0.5``, not ``a - r >= 0.5``: the GPU compiler contracts ``|x * inv| - r``
    # into an FMA on the *unrounded* product, which rounds near-ties differently from the
    # reference (measured: a few codes off by one per 10^4 on bf16 inputs).
    a = tl.abs(v)
    r = tl.floor(a)
    r = r + (a >= r + 0.5).to(tl.float32)
    return tl.where(v < 0, -r, r)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_t_ptr,
    R, stride_xr, stride_qr,
    BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    """One program: ROWS rows x one K block. Reads x once, writes q and the transposed scale."""
    pid_r = tl.program_id(0)
    kb = tl.program_id(1)
    rows = pid_r * ROWS + tl.arange(0, ROWS)
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < R
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xr + cols[None, :], mask=row_ok[:, None], other=0.0)
    x = x.to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=1)
    non_finite = tl.sum(x * 0.0, axis=1)  # 0 for a finite block, NaN otherwise
    scale = tl.math.div_rn(absmax, tl.full(absmax.shape, 127.0, tl.float32)) + non_finite
    inv = tl.where(absmax > 0, tl.math.div_rn(tl.full(absmax.shape, 127.0, tl.float32), absmax), 0.0)
    q = _round_half_away(x * inv[:, None])
    q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * stride_qr + cols[None, :], q, mask=row_ok[:, None])
    tl.store(scale_t_ptr + kb.to(tl.int64) * R + rows, scale, mask=row_ok)


def quantize_rows(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation quantization in one pass over ``x`` (R, K): ``(q (R, K) int8, scale_t (K // B, R) fp32)``.

    ``x`` must have unit stride along K (rows may be strided).
    """
    check_block_size(block_size)
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"quantize_rows expects a 2-D tensor with unit stride along K, got shape {tuple(x.shape)} stride {x.stride()}")
    rows, k = x.shape
    if k % block_size:
        raise ValueError(f"K={k} is not a multiple of block_size={block_size}")
    q = torch.empty((rows, k), dtype=torch.int8, device=x.device)
    scale_t = torch.empty((k // block_size, rows), dtype=torch.float32, device=x.device)
    # ~8 KB of bf16 per program: enough bytes in flight without starving small M of programs.
    rows_per_program = max(1, min(4096 // block_size, triton.next_power_of_2(rows)))
    grid = (triton.cdiv(rows, rows_per_program), k // block_size)
    _quantize_rows_kernel[grid](x, q, scale_t, rows, x.stride(0), q.stride(0), BLOCK=block_size, ROWS=rows_per_program, num_warps=4)
    return q, scale_t
