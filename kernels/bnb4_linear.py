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

Three paths, chosen by the number of rows M of x (``choose_path``):

* ``gemv`` (M = 1): every program owns a few rows of W and walks all of K, reading each packed
  byte once; nibbles are decoded through the codebook, the partial dot product of each
  quantization block is formed first and scaled by its absmax once (so the absmax, nested or
  not, costs one decode per block, not per element), and the sum stays in float32 registers.
  Small row tiles give enough programs to fill the GPU even when N is small, so no split-K
  (whose extra zero/reduce launches would cost more than a GEMV of these sizes takes).
* ``fused`` (small and medium M): a tensor-core GEMM that dequantizes the W tile in the main
  loop. It computes the transposed product ``y.T[n, m] = W[n, :] . x[m, :]`` so the dequantized
  W tile (made in registers) is the left operand and its rows fill the MMA's M dimension
  even when x has a single 16-row tile.
* ``dequant_cublas`` (large M): a bandwidth-bound dequantize of the whole W into a scratch
  buffer reused between calls, then cuBLAS. At large M the GEMM is compute-bound and the
  dequantize is a fixed cost of about one read of the bf16 weight.

``reference_bnb4_linear`` (dequantize with ``bnb4_codec`` + ``F.linear`` in float32) is what the
kernels are tested against.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import bnb4_codec

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
def _bnb4_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, code_ptr, pair_ptr, bias_ptr, out_ptr,
    N, K, stride_xm, stride_om,
    QBLOCK: tl.constexpr,  # quantization block size B
    SUB: tl.constexpr,  # elements per sub-chunk sharing one absmax: min(B, 64)
    CHUNKS: tl.constexpr,  # sub-chunks per loop iteration
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    PAIR: tl.constexpr,
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    HALF: tl.constexpr = SUB // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_c = tl.arange(0, CHUNKS)
    offs_h = tl.arange(0, HALF)
    offs_pair = tl.arange(0, 2)
    # byte (n, c, h) of one iteration; x element (c, h, p) of one iteration
    byte_off = offs_n[:, None, None] * (K // 2) + offs_c[None, :, None] * HALF + offs_h[None, None, :]
    x_off = offs_c[:, None, None] * SUB + offs_h[None, :, None] * 2 + offs_pair[None, None, :]
    x_row = x_ptr + row * stride_xm
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, CHUNKS * SUB):
        c_ok = (k0 + offs_c * SUB) < K
        ok = n_ok[:, None, None] & c_ok[None, :, None]
        byte = tl.load(packed_ptr + byte_off + k0 // 2, mask=ok, other=0)
        w_hi, w_lo = _decode(code_ptr, pair_ptr, byte, PAIR)
        xv = tl.load(x_row + k0 + x_off, mask=c_ok[:, None, None], other=0.0).to(tl.float32)
        x_even, x_odd = tl.split(xv)  # (CHUNKS, HALF) each: elements 2h and 2h+1
        part = tl.sum(w_hi * x_even[None, :, :] + w_lo * x_odd[None, :, :], axis=2)
        block = offs_n[:, None] * (K // QBLOCK) + (k0 + offs_c[None, :] * SUB) // QBLOCK
        scale = _block_absmax(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, block,
                              n_ok[:, None] & c_ok[None, :], DOUBLE_QUANT)
        acc += tl.sum(part * scale, axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


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
    # Program order: GROUP_M tiles of rows of x share the sweep over N, so the x rows stay in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size

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
    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, code_ptr, pair_ptr, out_ptr, num_rows,
    QBLOCK: tl.constexpr, SUB: tl.constexpr, ROWS: tl.constexpr, DOUBLE_QUANT: tl.constexpr, PAIR: tl.constexpr,
):
    """Whole-weight dequantize, viewed flat as rows of SUB = min(B, 64) elements (SUB/2 bytes)
    that share one absmax: out[r*SUB + 2h], out[r*SUB + 2h + 1] from byte r*SUB/2 + h."""
    HALF: tl.constexpr = SUB // 2
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    ok = rows < num_rows
    offs_h = tl.arange(0, HALF)
    byte = tl.load(packed_ptr + rows[:, None] * HALF + offs_h[None, :], mask=ok[:, None], other=0)
    scale = _block_absmax(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, (rows * SUB) // QBLOCK, ok, DOUBLE_QUANT)
    w_hi, w_lo = _decode(code_ptr, pair_ptr, byte, PAIR)
    out_ty = out_ptr.dtype.element_ty
    w = tl.join((w_hi * scale[:, None]).to(out_ty), (w_lo * scale[:, None]).to(out_ty))  # (ROWS, HALF, 2)
    out_offs = rows[:, None, None] * SUB + 2 * offs_h[None, :, None] + tl.arange(0, 2)[None, None, :]
    tl.store(out_ptr + out_offs, w, mask=ok[:, None, None])


# ----------------------------------------------------------------------------- autotuning


def _matmul_configs() -> list[triton.Config]:
    """Small set: skinny tiles for M <= 64, wgmma-sized tiles for large M."""
    configs = []
    for bm, bn, warps, stages in [
        (16, 16, 4, 4), (16, 32, 4, 4), (16, 64, 4, 4), (32, 32, 4, 4), (32, 64, 4, 4),
        (64, 64, 4, 4), (64, 128, 4, 4), (128, 128, 8, 3), (256, 128, 8, 3),
    ]:
        for pair in (False, True):
            configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8, "PAIR": pair},
                                         num_warps=warps, num_stages=stages))
    return configs


def _prune_matmul(configs, named_args, **kwargs):
    """Keep only tiles that fit the M bucket (a 256-row tile for 16 rows is wasted work)."""
    bucket = named_args["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, bucket)]
    return kept or configs[:1]


def _gemv_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_N": bn, "CHUNKS": ch, "PAIR": pair}, num_warps=w)
        for bn, ch, w in [(8, 4, 4), (16, 4, 4), (16, 8, 8), (32, 2, 4), (32, 4, 8), (64, 1, 4), (128, 1, 8)]
        for pair in (False, True)
    ]


if not AUTOTUNE:
    _gemv = _bnb4_gemv_kernel
    _matmul = _bnb4_matmul_kernel
else:
    _gemv = triton.autotune(_gemv_configs(), key=["N", "K"])(_bnb4_gemv_kernel)
    _matmul = triton.autotune(
        _matmul_configs(), key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune_matmul}
    )(_bnb4_matmul_kernel)

# Without autotuning (interpreter, COMFY_LOWBIT_AUTOTUNE=0) these fixed settings are used.
_FIXED_GEMV = {"BLOCK_N": 64, "CHUNKS": 4, "PAIR": True}
_FIXED_MATMUL = {"BLOCK_M": 32, "BLOCK_N": 64, "GROUP_M": 4, "PAIR": False}


# ----------------------------------------------------------------------------- launchers

_CONSTANTS: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

# M at or below which each path is used (measured on the H100, see benchmarks/NOTES.md).
GEMV_MAX_M = 1
DEQUANT_ROWS = 64  # 64 rows x 32 bytes = 2 KB of packed weight per program
FUSED_MAX_M = 256


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


def choose_path(m: int) -> str:
    if m <= GEMV_MAX_M:
        return "gemv"
    if m <= FUSED_MAX_M:
        return "fused"
    return "dequant_cublas"


def bnb4_linear(
    x: torch.Tensor,
    w: Bnb4Weight,
    bias: torch.Tensor | None = None,
    *,
    path: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for x of shape (..., K) in fp16/bf16/fp32; output in x's dtype.

    ``path`` forces one of ``gemv``/``fused``/``dequant_cublas`` (benchmarks, tests); ``out``
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
    path = path or choose_path(m)
    if path == "gemv":
        _launch_gemv(x2, w, bias, out)
    elif path == "fused":
        _launch_matmul(x2, w, bias, out)
    elif path == "dequant_cublas":
        weight = dequantize(w, x.dtype, scratch=True)
        if bias is None:
            torch.mm(x2, weight.t(), out=out)
        else:  # cuBLASLt fuses a 1-D bias into its epilogue
            torch.addmm(bias.to(x.dtype), x2, weight.t(), out=out)
    else:
        raise ValueError(f"bnb4 linear: path: expected 'gemv', 'fused' or 'dequant_cublas', got {path!r}")
    return out.reshape(*lead, n)


def _launch_gemv(x2, w: Bnb4Weight, bias, out) -> None:
    n, k = w.shape
    code, pair, dyn = _constants(w.quant_type, x2.device)
    sub = min(w.block_size, 64)
    args = (x2, w.packed, *_absmax_args(w, dyn), code, pair, bias if bias is not None else out, out,
            n, k, x2.stride(0), out.stride(0))
    meta = dict(QBLOCK=w.block_size, SUB=sub, HAS_BIAS=bias is not None, DOUBLE_QUANT=w.double_quant)
    if not AUTOTUNE:
        grid = (triton.cdiv(n, _FIXED_GEMV["BLOCK_N"]), x2.shape[0])
        _gemv[grid](*args, **meta, **_FIXED_GEMV)
    else:
        _gemv[lambda c: (triton.cdiv(n, c["BLOCK_N"]), x2.shape[0])](*args, **meta)


def _launch_matmul(x2, w: Bnb4Weight, bias, out) -> None:
    n, k = w.shape
    m = x2.shape[0]
    code, pair, dyn = _constants(w.quant_type, x2.device)
    args = (x2, w.packed, *_absmax_args(w, dyn), code, pair, bias if bias is not None else out, out,
            m, n, k, x2.stride(0), out.stride(0), _m_bucket(m))
    meta = dict(QBLOCK=w.block_size, BLOCK_K=min(w.block_size, 64), HAS_BIAS=bias is not None,
                DOUBLE_QUANT=w.double_quant,
                DOT_PRECISION="ieee" if x2.dtype == torch.float32 or INTERPRET else "tf32",
                INTERPRETED=INTERPRET)
    if not AUTOTUNE:
        c = _FIXED_MATMUL
        grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)
        _matmul[grid](*args, **meta, **c)
    else:
        _matmul[lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)](*args, **meta)


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
    sub = min(w.block_size, 64)
    rows = 8 if INTERPRET else DEQUANT_ROWS
    grid = (triton.cdiv(numel // sub, rows),)
    _bnb4_dequantize_kernel[grid](w.packed, *_absmax_args(w, dyn), code, pair, out, numel // sub,
                                  QBLOCK=w.block_size, SUB=sub, ROWS=rows, DOUBLE_QUANT=w.double_quant,
                                  PAIR=True, num_warps=4)
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
