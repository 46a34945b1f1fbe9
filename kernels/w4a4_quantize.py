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
    ascales (K/64, M) fp32    (group-major: the GEMM loads one group's scales for a row tile
                              as one contiguous vector)
    lora    (C, M, R) fp32    C partial sums over K chunks; their sum is x @ proj_down

One pass: x is read once; codes, scales and the low-rank partials are written once. A program
owns BLOCK_M rows and one chunk of groups; at small M, K is cut into C chunks so that enough
programs run (one row at M=1 would otherwise walk K alone).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .fastest import fastest, m_bucket

try:  # programmatic dependent launch (Triton 3.6 has it); see w4a4_gemv.py
    from triton.language.extra.cuda import gdc_launch_dependents
except ImportError:  # pragma: no cover - older Triton
    gdc_launch_dependents = None

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
    """Plain-PyTorch reference: (codes (M, K) int8 in *natural* order, ascales (K/64, M) fp32,
    lora (M, R) fp32). On fp32 input it equals comfy-kitchen's eager quantizer exactly."""
    m, k = x.shape
    xf = x.float()
    lora = xf @ proj_down.float()
    xm = xf + GELU_UNSIGNED_SHIFT if act_unsigned else xf
    groups = (xm / smooth.float()).view(m, k // GROUP, GROUP)
    qmax, qmin = (15, 0) if act_unsigned else (7, -7)
    ascales = groups.abs().amax(dim=-1).clamp(min=1e-10) / qmax
    codes = (groups / ascales.unsqueeze(-1)).round().clamp(qmin, qmax).to(torch.int8)
    return codes.reshape(m, k), ascales.t().contiguous(), lora


@triton.jit
def _div(a, b, FAST: tl.constexpr):
    """a / b. FAST: PTX ``div.approx.f32`` (MUFU.RCP + FMUL, 2 ulp), what Triton's ``/``
    already gives on the GPU (``div.full.f32``, 2 ulp) minus its range fix-ups (4 more
    instructions per division), which only matter for |b| > 2**126; the interpreter divides
    exactly."""
    if FAST:
        q = tl.inline_asm_elementwise("div.approx.f32 $0, $1, $2;", "=r,r,r", [a, b],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        q = a / b
    return q


@triton.jit
def _quantize_half(xs, ascale, QMIN: tl.constexpr, QMAX: tl.constexpr):
    v = xs / ascale[:, None]  # ptxas computes 1/ascale once per row and multiplies
    v = (v + ROUND_MAGIC) - ROUND_MAGIC
    return tl.minimum(tl.maximum(v, QMIN), QMAX)


@triton.jit
def w4a4_quantize_kernel(
    x_ptr, smooth_ptr, down_ptr, codes_ptr, ascales_ptr, lora_ptr,
    M, K, R, GROUPS_PER_CHUNK,
    stride_xm,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    UNSIGNED: tl.constexpr, IEEE_DOT: tl.constexpr,
    STEP_GROUPS: tl.constexpr = 1, FAST_DIV: tl.constexpr = False, LAUNCH_DEPENDENTS: tl.constexpr = False,
):
    # Program (i, c): rows i*BLOCK_M.., groups of chunk c, STEP_GROUPS groups per iteration
    # (unrolled: fewer loop iterations and more independent loads per thread). Each chunk
    # writes its own partial low-rank sum lora[c]; the GEMM epilogue adds the chunks (no
    # atomics, no memset).
    if LAUNCH_DEPENDENTS:
        # Let a kernel launched after this one with programmatic dependent launch (the small-M
        # GEMV) start now; it waits for this grid's results itself (griddepcontrol.wait).
        gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    chunk = tl.program_id(1)
    row_ok = rows[:, None] < M
    cols = tl.arange(0, 64)
    half = tl.arange(0, 32)
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    num_groups = K // 64
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    code_rows = codes_ptr + rows[:, None].to(tl.int64) * K
    lora = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    first = chunk * GROUPS_PER_CHUNK
    last = tl.minimum(first + GROUPS_PER_CHUNK, num_groups)
    for g0 in range(first, last, STEP_GROUPS):
        for s in tl.static_range(STEP_GROUPS):
            g = g0 + s
            # The launcher makes chunks multiples of STEP_GROUPS; K may not be (as vectors:
            # the interpreter refuses scalar masks). One group per step never runs past the
            # end: constant masks there keep v3's loop (19 fewer instructions per group).
            if STEP_GROUPS == 1:
                ok = cols < 64
                half_ok = half < 32
                row_scale_ok = rows < M
            else:
                ok = (cols * 0 + g) < last
                half_ok = (half * 0 + g) < last
                row_scale_ok = (rows < M) & ((rows * 0 + g) < last)
            x = tl.load(x_rows + g * 64 + cols[None, :], mask=row_ok & ok[None, :], other=0.0)
            # Low-rank branch on the raw input; bf16/fp16 products are exact in the fp32 accumulator.
            down = tl.load(down_ptr + (g * 64 + cols[:, None]) * R + ranks[None, :],
                           mask=rank_ok[None, :] & ok[:, None], other=0.0)
            if IEEE_DOT:
                lora = tl.dot(x.to(tl.float32), down.to(tl.float32), lora, input_precision="ieee")
            else:
                lora = tl.dot(x, down.to(x.dtype), lora)
            xs = x.to(tl.float32)
            if UNSIGNED:
                xs = xs + _SHIFT
            smooth = tl.load(smooth_ptr + g * 64 + cols, mask=ok, other=1.0).to(tl.float32)
            if FAST_DIV:
                # PTX div.approx.f32 (MUFU.RCP + FMUL, 2 ulp): what Triton's ``/`` gives on the
                # GPU already (div.full.f32, 2 ulp) without its range fix-ups (4 more
                # instructions per element), needed only for divisors above 2**126.
                xs = tl.inline_asm_elementwise("div.approx.f32 $0, $1, $2;", "=r,r,r", [xs, smooth[None, :]],
                                               dtype=tl.float32, is_pure=True, pack=1)
            else:
                xs = xs / smooth[None, :]
            absmax = tl.max(tl.abs(xs), axis=1)
            # Even and odd columns apart: (BLOCK_M, 64) -> two (BLOCK_M, 32), within each thread.
            x_even, x_odd = tl.split(tl.reshape(xs, (BLOCK_M, 32, 2)))
            if UNSIGNED:
                ascale = tl.maximum(absmax, 1e-10) / 15.0
                q_even = _quantize_half(x_even, ascale, 0.0, 15.0)
                q_odd = _quantize_half(x_odd, ascale, 0.0, 15.0)
            else:
                ascale = tl.maximum(absmax, 1e-10) / 7.0
                q_even = _quantize_half(x_even, ascale, -7.0, 7.0)
                q_odd = _quantize_half(x_odd, ascale, -7.0, 7.0)
            code_ty = codes_ptr.dtype.element_ty  # int8, or e4m3 for the fp8 GEMM (exact for -7..15)
            tl.store(code_rows + g * 64 + half[None, :], q_even.to(code_ty), mask=row_ok & half_ok[None, :])
            tl.store(code_rows + g * 64 + 32 + half[None, :], q_odd.to(code_ty), mask=row_ok & half_ok[None, :])
            tl.store(ascales_ptr + g * M + rows, ascale, mask=row_scale_ok)
    lora_out = lora_ptr + chunk * M * R + rows[:, None].to(tl.int64) * R + ranks[None, :]
    tl.store(lora_out, lora, mask=row_ok & rank_ok[None, :])


# Programs to aim for: several per SM (132 on an H100), so that enough loads are in flight;
# v1 used 256 and ran at a third of the copy bandwidth at M=4096 (see benchmarks/NOTES.md).
_TARGET_PROGRAMS = 1024


def default_config(m: int) -> dict:
    """v3, measured on the H100: 16-row tiles (32 above 4096 rows), one group per step."""
    return {"BLOCK_M": 16 if m <= 4096 else 32, "STEP_GROUPS": 1, "FAST_DIV": False, "num_warps": 4,
            "num_stages": 3, "programs": _TARGET_PROGRAMS, "launch_dependents": False}


# Configurations timed against v3 on the first call for a large shape (``fastest``): the bench's
# variants (benchmarks/NOTES.md, W4A4 v4 quantizer) that give the same codes and scales as
# v3 (FAST_DIV, which may round a boundary value the other way, is left out). Only the
# number of low-rank partial sums, hence their summation order, differs between them.
TUNED_CONFIGS = {
    "v3": {},
    "32 rows, 8 warps": {"BLOCK_M": 32, "num_warps": 8},
    "64 rows, 8 warps": {"BLOCK_M": 64, "num_warps": 8},
    "2 groups per step": {"STEP_GROUPS": 2},
    "32 rows, 8 warps, 2 groups per step": {"BLOCK_M": 32, "num_warps": 8, "STEP_GROUPS": 2},
}
TUNE_MIN_ROWS = 256  # below, the quantizer takes a few microseconds whatever its tile


def quantize_activations(
    x: torch.Tensor, smooth: torch.Tensor, proj_down: torch.Tensor, act_unsigned: bool = False,
    *, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, chunks: int | None = None,
    codes_dtype: torch.dtype = torch.int8, config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher: codes (M, K) int8 in split group order, ascales (K/64, M) fp32 and the
    low-rank activations as C partial sums (C, M, R) fp32 (their sum is x @ proj_down).

    ``codes_dtype`` is int8 or torch.float8_e4m3fn (for the fp8 GEMM). ``chunks`` fixes C
    (default: enough programs to fill the GPU); ``out`` supplies the three buffers (tests poison
    them to catch unwritten elements). ``config`` overrides ``default_config`` keys (BLOCK_M,
    STEP_GROUPS, FAST_DIV, num_warps, num_stages, programs: the benchmark's variants;
    launch_dependents: let a following ``w4a4_gemv(pdl=True)`` start early); FAST_DIV and
    launch_dependents are ignored under the interpreter (no inline PTX there)."""
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
    if config is None and out is None and chunks is None and m >= TUNE_MIN_ROWS:
        config = _fastest_config(x, smooth, proj_down, act_unsigned, codes_dtype)
    c = default_config(m)
    c.update(config or {})
    groups = k // GROUP
    block_m, step = c["BLOCK_M"], c["STEP_GROUPS"]
    row_blocks = triton.cdiv(m, block_m)
    wanted = chunks if chunks is not None else max(1, c["programs"] // row_blocks)
    per_chunk = triton.cdiv(groups, min(max(wanted, 1), groups))
    per_chunk = triton.cdiv(per_chunk, step) * step  # whole steps per chunk
    chunks = triton.cdiv(groups, per_chunk)
    if out is None:
        out = (
            torch.empty(m, k, dtype=codes_dtype, device=x.device),
            torch.empty(groups, m, dtype=torch.float32, device=x.device),
            torch.empty(chunks, m, r, dtype=torch.float32, device=x.device),
        )
    codes, ascales, lora = out
    w4a4_quantize_kernel[(row_blocks, chunks)](
        x, smooth.contiguous(), proj_down.contiguous(), codes, ascales, lora,
        m, k, r, per_chunk, x.stride(0),
        BLOCK_M=block_m, BLOCK_R=max(16, triton.next_power_of_2(r)),
        UNSIGNED=act_unsigned, IEEE_DOT=x.dtype == torch.float32 or _interpreting(),
        STEP_GROUPS=step, FAST_DIV=c["FAST_DIV"] and not _interpreting(),
        LAUNCH_DEPENDENTS=c["launch_dependents"] and gdc_launch_dependents is not None and not _interpreting(),
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    return codes, ascales, lora


def _fastest_config(x, smooth, proj_down, act_unsigned, codes_dtype) -> dict:
    """The TUNED_CONFIGS entry that ran fastest for this shape (timed on its first call)."""
    launches = {name: functools.partial(quantize_activations, x, smooth, proj_down, act_unsigned,
                                        codes_dtype=codes_dtype, config=config)
                for name, config in TUNED_CONFIGS.items()}
    key = ("W4A4 quantize", m_bucket(x.shape[0]), x.shape[1], proj_down.shape[1], x.dtype, act_unsigned, codes_dtype,
           x.device)
    return TUNED_CONFIGS[fastest(key, launches, default="v3")]
