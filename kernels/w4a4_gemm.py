"""W4A4 GEMM: int4 activations x int4 weights on int8 tensor cores, per-64-group scales, low-rank epilogue.

Inputs (the weight as stored by ``W4A4Layout``/comfy-kitchen, the activation from
``w4a4_quantize.quantize_activations``):

    qweight (N, K/2) int8   byte j of row n: bits 0..3 = code of column 2j, bits 4..7 = column
                            2j+1, two's-complement nibbles (-8..7)
    wscales (K/64, N)       fp (bf16/fp16/fp32)
    codes   (M, K) int8     activation codes, split group order (evens, then odds, per 64)
    ascales (K/64, M) fp32
    lora    (C, M, R) fp32  x @ proj_down as C partial sums over K chunks (C = 1 at large M)
    proj_up (N, R) fp

Math, per output element:

    out[m, n] = sum_g ascale[m, g] * wscale[g, n] * D_g[m, n]  +  lora[m] . proj_up[n]  +  bias[n]
    D_g       = codes_even(m, g) . W_lo(n, g) + codes_odd(m, g) . W_hi(n, g)      (exact int32)

Hopper has no int4 MMA, so each 32-byte weight slice is unpacked in registers with two
shifts (``(b << 4) >> 4`` and ``b >> 4``, arithmetic on int8) into the even and odd halves of
the group and fed to an 8-bit ``tl.dot`` (wgmma on sm_90, mma on sm_80) against the activation
halves, which the quantizer already wrote apart: no interleave anywhere. |D_g| <= 64 * 8 * 15,
so every conversion below is exact. Three MMA kinds (``dot``):

* ``"fp8"``: e4m3 MMA (exact for codes -8..15) with fp32 results; the weight nibbles become
  e4m3 through fp16 bit patterns. Fastest on the H100 (benchmarks/NOTES.md, W4A4); sm_89+.
* ``"int8"``: int8 MMA, int32 -> fp32 by bits (the float 1.5 * 2**23 + D minus 1.5 * 2**23),
  for GPUs whose I2F is slow; ``"int8_i2f"`` converts with a cast (ptxas emits the fast
  I2FP on sm_90).

Two ways to feed the weight:

* fused (``unpacked=None``): the packed nibbles are unpacked inside the K loop, every row tile
  again. With BLOCK_M >= M the grid spans only N and the packed weight is read once: this is
  the small-M GEMV path, with the K loop split over SPLIT_K programs (fp32 atomics into a
  zeroed buffer) so that enough loads are in flight.
* streaming (``unpacked=unpack_weight(qweight)``, the weight expanded once per call to 8-bit
  codes in split order): both operands stream from memory, one K=64 MMA per group, two groups
  per iteration (PAIRS). The layout uses it from 256 rows on.

After the loop the epilogue adds (sum of the C low-rank partials) @ proj_up.T (tf32 MMA on
a GPU) and the bias, and stores in the output dtype.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .tiling import grouped_tile_ids

GROUP = 64
DOT_KINDS = ("int8", "int8_i2f", "fp8")
CVT_MAGIC: tl.constexpr = tl.constexpr(0x4B400000)
CVT_MAGIC_F: tl.constexpr = tl.constexpr(12582912.0)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., K/2) int8 -> (..., K) int8 codes -8..7 in natural order (low nibble = even column)."""
    p = packed.to(torch.int16)
    lo = ((p & 0x0F) ^ 8) - 8
    hi = (((p >> 4) & 0x0F) ^ 8) - 8
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], -1).to(torch.int8)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(..., K) int codes -8..7 -> (..., K/2) int8, low nibble = even column."""
    c = codes.to(torch.int16)
    return ((c[..., 0::2] & 0x0F) | ((c[..., 1::2] & 0x0F) << 4)).to(torch.uint8).view(torch.int8)


def w4a4_gemm_reference(
    codes: torch.Tensor, ascales: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor,
    lora: torch.Tensor, proj_up: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """Plain-PyTorch reference in fp32 on *natural-order* codes: dequantize both sides, matmul.
    ``ascales`` is (K/64, M); ``lora`` is (M, R) or partial sums (C, M, R)."""
    m, k = codes.shape
    n = qweight.shape[0]
    if lora.dim() == 3:
        lora = lora.sum(dim=0)
    a = (codes.float().view(m, k // GROUP, GROUP) * ascales.float().t().unsqueeze(-1)).view(m, k)
    w = (unpack_int4(qweight).float().view(n, k // GROUP, GROUP) * wscales.float().t().unsqueeze(-1)).view(n, k)
    out = a @ w.t() + lora.float() @ proj_up.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


@triton.jit
def _group_product(a_rows, w_cols, g, row_ok, col_ok, DOT: tl.constexpr, UNPACKED: tl.constexpr):
    """D_g as fp32 (BLOCK_M, BLOCK_N): exact integer sums of one 64-wide group.

    (No early returns: Triton keeps generating code after a return inside a constexpr if.)"""
    if UNPACKED:
        # Weight codes already 8-bit in split group order (``unpack_weight``): one K=64 MMA
        # with both operands streamed from memory, nothing computed in between.
        a = tl.load(a_rows + g * 64, mask=row_ok[:, None], other=0.0)
        w = tl.load(w_cols + g * 64, mask=col_ok[None, :], other=0.0)
        if DOT == "fp8":
            d = tl.dot(a, w)
        else:
            d = tl.dot(a, w, out_dtype=tl.int32)
    else:
        a_even = tl.load(a_rows + g * 64, mask=row_ok[:, None], other=0.0)  # 0.0 casts to int8 and e4m3 alike
        a_odd = tl.load(a_rows + g * 64 + 32, mask=row_ok[:, None], other=0.0)
        packed = tl.load(w_cols + g * 32, mask=col_ok[None, :], other=0)
        if DOT == "fp8":
            # Nibble -> fp16 by bits: 0x6400 | (v ^ 8) is 1024 + v + 8, exact; then -1032 and a
            # paired cvt to e4m3, which holds -8..7 exactly. Activation codes arrive as e4m3.
            lo16 = (((packed & 0x0F) ^ 0x08).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
            hi16 = ((((packed >> 4) & 0x0F) ^ 0x08).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
            d = tl.dot(a_even, lo16.to(tl.float8e4nv))
            d = tl.dot(a_odd, hi16.to(tl.float8e4nv), d)
        else:
            w_lo = (packed << 4) >> 4  # arithmetic shifts on int8 sign-extend each nibble
            w_hi = packed >> 4
            d = tl.dot(a_even, w_lo, out_dtype=tl.int32)
            d = tl.dot(a_odd, w_hi, d, out_dtype=tl.int32)
    if DOT == "int8":
        # |d| < 2**22: the bits of 1.5 * 2**23 + d are an exact float; one IADD + one FADD
        f = (d + CVT_MAGIC).to(tl.float32, bitcast=True) - CVT_MAGIC_F
    else:  # fp8 results are fp32 already; "int8_i2f" converts with I2F
        f = d.to(tl.float32)
    return f


@triton.jit
def w4a4_gemm_kernel(
    a_ptr, ascales_ptr, w_ptr, wscales_ptr, lora_ptr, up_ptr, bias_ptr, out_ptr,
    M, N, K, R, CHUNKS,
    stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT: tl.constexpr, UNPACKED: tl.constexpr,
    SPLIT_K: tl.constexpr = 1, PAIRS: tl.constexpr = False, TIMING_NO_SCALES: tl.constexpr = False,
):
    # SPLIT_K > 1 (small M): program (i, s) sums the s-th slice of the groups and adds it into a
    # zeroed fp32 ``out`` with atomics; slice 0 also adds the low-rank term and the bias.
    # PAIRS: two groups per iteration (both MMAs issued before either is scaled).
    pid_m, pid_n = grouped_tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    num_groups = K // 64

    if UNPACKED:
        k_offs = tl.arange(0, 64)
        a_rows = a_ptr + rows[:, None].to(tl.int64) * K + k_offs[None, :]
        w_cols = w_ptr + cols[None, :].to(tl.int64) * K + k_offs[:, None]
    else:
        half = tl.arange(0, 32)
        a_rows = a_ptr + rows[:, None].to(tl.int64) * K + half[None, :]
        w_cols = w_ptr + cols[None, :].to(tl.int64) * (K // 2) + half[:, None]
    split = tl.program_id(1)
    per_split = tl.cdiv(num_groups, SPLIT_K)
    g_first = split * per_split
    g_last = tl.minimum(g_first + per_split, num_groups)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(g_first, g_last, 2 if PAIRS else 1):
        d = _group_product(a_rows, w_cols, g, row_ok, col_ok, DOT, UNPACKED)
        if PAIRS:  # the launcher guarantees an even number of groups
            d_next = _group_product(a_rows, w_cols, g + 1, row_ok, col_ok, DOT, UNPACKED)
        if TIMING_NO_SCALES:  # benchmark diagnostic only (wrong result): the cost of the scaling
            acc += d
            if PAIRS:
                acc += d_next
        else:
            a_scale = tl.load(ascales_ptr + g * M + rows, mask=row_ok, other=0.0)
            w_scale = tl.load(wscales_ptr + g * N + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc += d * (a_scale[:, None] * w_scale[None, :])
            if PAIRS:
                a_scale = tl.load(ascales_ptr + (g + 1) * M + rows, mask=row_ok, other=0.0)
                w_scale = tl.load(wscales_ptr + (g + 1) * N + cols, mask=col_ok, other=0.0).to(tl.float32)
                acc += d_next * (a_scale[:, None] * w_scale[None, :])

    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    lora_tile = lora_ptr + rows[:, None].to(tl.int64) * R + ranks[None, :]
    lora_ok = row_ok[:, None] & rank_ok[None, :]
    once = (split == 0).to(tl.float32)  # the low-rank term and bias belong to one K slice only
    lora = tl.load(lora_tile, mask=lora_ok, other=0.0)
    for c in range(1, CHUNKS):
        lora += tl.load(lora_tile + c * M * R, mask=lora_ok, other=0.0)
    up = tl.load(up_ptr + cols[None, :].to(tl.int64) * R + ranks[:, None],
                 mask=col_ok[None, :] & rank_ok[:, None], other=0.0).to(tl.float32)
    acc = tl.dot(lora * once, up, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :] * once
    out = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(out, acc, mask=row_ok[:, None] & col_ok[None, :])
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def w4a4_unpack_weight_kernel(w_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr):
    """(N, K/2) packed nibbles -> (N, K) 8-bit codes (int8 or e4m3) in split group order."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    half = tl.arange(0, 32)
    ok = rows[:, None] < N
    packed = tl.load(w_ptr + rows[:, None].to(tl.int64) * (K // 2) + g * 32 + half[None, :], mask=ok, other=0)
    dst = out_ptr + rows[:, None].to(tl.int64) * K + g * 64 + half[None, :]
    ty = out_ptr.dtype.element_ty
    tl.store(dst, ((packed << 4) >> 4).to(tl.float32).to(ty), mask=ok)
    tl.store(dst + 32, (packed >> 4).to(tl.float32).to(ty), mask=ok)


def unpack_weight(qweight: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Packed (N, K/2) -> (N, K) ``dtype`` codes in split group order, for ``w4a4_gemm(unpacked=...)``.

    At large M the fused GEMM's in-register unpack (every row tile again, then through shared
    memory to the tensor cores) costs more than writing the 8-bit weight once (2 bytes per
    weight of traffic, ~19 us for 3072 x 12288 on an H100) and streaming it like the activation."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    w4a4_unpack_weight_kernel[(triton.cdiv(n, 64), k // GROUP)](qweight.contiguous(), out, n, k, BLOCK_N=64)
    return out


def unpack_weight_reference(qweight: torch.Tensor) -> torch.Tensor:
    from .w4a4_quantize import split_group_order

    return split_group_order(unpack_int4(qweight))


def _config(bm, bn, warps, stages, group_m=8, split_k=1):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": group_m, "SPLIT_K": split_k},
                         num_warps=warps, num_stages=stages)


# Tile shapes as data, by M bucket. Small M: one row tile (weight read once), narrow N tiles
# so N/BLOCK_N programs fill the 132 SMs. Large M: wide tiles so each unpacked weight tile
# serves many rows.
_CONFIGS = {
    # GEMV: one 48-group K loop per program was latency-bound (v2: 38 us where the weight read
    # takes 7 us); split K so ~1000+ programs each walk a few groups, adding up with atomics.
    "gemv": [_config(16, 64, 4, 3, split_k=8), _config(16, 64, 4, 3, split_k=16), _config(16, 128, 4, 3, split_k=8),
             _config(16, 32, 4, 3, split_k=8), _config(16, 128, 4, 3, split_k=16)],
    "mid": [_config(64, 64, 4, 4), _config(64, 128, 4, 4), _config(128, 128, 8, 3)],
    # 128x256 and 256x128 spill on sm_90 (an fp32 accumulator plus the group's partial sum
    # exceed 255 registers per thread), so the large tiles stop at 128x128 with 8 warps.
    "large": [_config(128, 128, 8, 3), _config(128, 128, 8, 4), _config(64, 128, 4, 4), _config(128, 64, 4, 4)],
}


def _bucket(m: int) -> str:
    return "gemv" if m <= 16 else "mid" if m <= 512 else "large"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TUNED: dict[str, object] = {}


def _launcher(bucket: str):
    """The autotuned kernel for one M bucket (built lazily: autotune fails under the interpreter)."""
    if bucket not in _TUNED:
        # Split-K configs add into ``out``: zero it before each autotuning trial.
        _TUNED[bucket] = triton.autotune(_CONFIGS[bucket], key=["N", "K", "R", "HAS_BIAS", "DOT", "UNPACKED", "PAIRS"],
                                         reset_to_zero=["out_ptr"] if bucket == "gemv" else None)(w4a4_gemm_kernel)
    return _TUNED[bucket]


def check_operands(
    kernel: str, codes: torch.Tensor, ascales: torch.Tensor, weight: torch.Tensor, wscales: torch.Tensor,
    lora: torch.Tensor, proj_up: torch.Tensor, *, packed: bool = True,
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """``(lora as (C, M, R), (M, N, K, R))`` for operands shaped as in the module header, or a
    ValueError naming ``kernel``, the tensor, its shape and the expected one. ``packed=False``:
    ``weight`` is the (N, K) 8-bit ``unpack_weight`` instead of the (N, K/2) nibbles."""
    m, k = codes.shape
    n = weight.shape[0]
    r = proj_up.shape[1]
    if lora.dim() == 2:
        lora = lora.unsqueeze(0)
    name = "qweight" if packed else "unpacked"
    expected = {name: (n, k // 2 if packed else k), "wscales": (k // GROUP, n), "ascales": (k // GROUP, m),
                "lora": (lora.shape[0], m, r)}
    got = {name: weight.shape, "wscales": wscales.shape, "ascales": ascales.shape, "lora": lora.shape}
    for what, shape in expected.items():
        if tuple(got[what]) != shape:
            raise ValueError(f"{kernel}: {what} has shape {tuple(got[what])}, expected {shape} (M={m}, N={n}, K={k}, R={r})")
    return lora, (m, n, k, r)


def w4a4_gemm(
    codes: torch.Tensor, ascales: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor,
    lora: torch.Tensor, proj_up: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
    *, dot: str = "int8", unpacked: torch.Tensor | None = None, config: dict | None = None,
    out: torch.Tensor | None = None, timing_no_scales: bool = False,
) -> torch.Tensor:
    """Triton launcher on split-order codes; shapes as in the module header.

    ``dot`` picks the MMA kind (codes must be e4m3 for "fp8", int8 otherwise); ``unpacked`` is
    ``unpack_weight(qweight, codes.dtype)`` for the streaming path; ``config`` pins
    BLOCK_M/BLOCK_N/GROUP_M/SPLIT_K/num_warps/num_stages instead of autotuning (tests, benchmark
    variants); ``out`` is the (M, N) buffer to write (tests poison it); ``timing_no_scales`` is a
    benchmark diagnostic that skips the per-group scaling and gives a wrong result."""
    lora, (m, n, k, r) = check_operands("W4A4 GEMM", codes, ascales, qweight, wscales, lora, proj_up)
    chunks = lora.shape[0]
    if dot not in DOT_KINDS:
        raise ValueError(f"W4A4 GEMM: dot must be one of {DOT_KINDS}, got {dot!r}")
    want = torch.float8_e4m3fn if dot == "fp8" else torch.int8
    if codes.dtype != want:
        raise ValueError(f"W4A4 GEMM: dot={dot!r} needs {want} activation codes, got {codes.dtype}")
    if unpacked is not None and (unpacked.dtype != want or tuple(unpacked.shape) != (n, k)):
        raise ValueError(f"W4A4 GEMM: unpacked weight must be ({n}, {k}) {want}, got {tuple(unpacked.shape)} {unpacked.dtype}")
    tuned = config is None and not _interpreting()
    c = None if tuned else dict(config or {"BLOCK_M": 16 if m <= 16 else 32, "BLOCK_N": 32, "GROUP_M": 4})
    split_k = (_bucket(m) == "gemv") if tuned else c.get("SPLIT_K", 1) > 1
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=codes.device)
    # Split-K programs add fp32 partial sums into a zeroed buffer, cast once at the end.
    target = torch.zeros(m, n, dtype=torch.float32, device=codes.device) if split_k else out
    args = (
        codes, ascales, qweight.contiguous() if unpacked is None else unpacked, wscales.contiguous(), lora, proj_up.contiguous(),
        bias if bias is not None else target, target, m, n, k, r, chunks, target.stride(0),
    )
    meta = dict(BLOCK_R=max(16, triton.next_power_of_2(r)), HAS_BIAS=bias is not None, DOT=dot, UNPACKED=unpacked is not None,
                PAIRS=unpacked is not None and not split_k and (k // GROUP) % 2 == 0)
    if timing_no_scales:
        meta["TIMING_NO_SCALES"] = True
    if tuned:
        grid = lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"])  # noqa: E731
        _launcher(_bucket(m))[grid](*args, **meta)
    else:
        warps, stages = c.pop("num_warps", 4), c.pop("num_stages", 2)
        grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]), c.get("SPLIT_K", 1))
        w4a4_gemm_kernel[grid](*args, **meta, **c, num_warps=warps, num_stages=stages)
    if split_k:
        out.copy_(target)
    return out
