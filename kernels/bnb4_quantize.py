"""Quantize to the bitsandbytes NF4/FP4 layout on the GPU, bit-exact with ``bnb4_codec``.

Output format (see ``bnb4_linear`` for the bit layout): ``packed`` uint8 ``((numel+1)//2, 1)``,
element 2j in the high nibble of byte j, over the row-major flattening of x; ``absmax`` float32,
one per block of B consecutive elements (the last block may be partial).

Math, per block, exactly as the reference does it in float32:
``absmax = max|x|``; ``s = clamp(x * (1 / max(absmax, 1e-38)), -1, 1)`` (a reciprocal then a
multiply, both correctly rounded: Triton's plain ``/`` is an approximate division, so the
reciprocal uses ``div_rn``); a short last block (numel not a multiple of B) instead stores
``max(absmax, 1e-38)`` and divides, as bitsandbytes does; the code is ``order[#{t in thresholds : s > t}]``, where
``thresholds`` are the 15 midpoints between the sorted codebook values and ``order`` maps a
sorted position back to its code (identity for NF4, which is sorted; a permutation for FP4,
whose sign is bit 3). Counting strict ``>`` is ``torch.bucketize`` with ``right=False``: a value
exactly on a midpoint gets the lower code. The 15 thresholds are passed as scalars, so the
count is 15 compare-and-adds in registers, and ``order`` is a 16-entry table in L1.

Double quantization of the absmax (``nested=True``) works on 1/B of the data and runs through
the codec's own PyTorch code on the GPU: it is bit-exact by construction and costs a few small
launches next to the bandwidth-bound pass over the weight.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import bnb4_codec
from .bnb4_linear import _X_KIND, _unpair

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _codes(s, order_ptr, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, SORTED: tl.constexpr):
    """4-bit codes of scaled values: the count of midpoints strictly below, through ``order``."""
    pos = ((s > t0).to(tl.int32) + (s > t1).to(tl.int32) + (s > t2).to(tl.int32) + (s > t3).to(tl.int32)
           + (s > t4).to(tl.int32) + (s > t5).to(tl.int32) + (s > t6).to(tl.int32) + (s > t7).to(tl.int32)
           + (s > t8).to(tl.int32) + (s > t9).to(tl.int32) + (s > t10).to(tl.int32) + (s > t11).to(tl.int32)
           + (s > t12).to(tl.int32) + (s > t13).to(tl.int32) + (s > t14).to(tl.int32))
    if SORTED:  # NF4: the sorted position is the code
        return pos.to(tl.uint8)
    return tl.load(order_ptr + pos).to(tl.uint8)


@triton.jit
def _bnb4_quantize_kernel(
    xp_ptr, packed_ptr, absmax_ptr, order_ptr, numel, num_blocks, tiny,
    t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14,
    QBLOCK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, SORTED: tl.constexpr, X_KIND: tl.constexpr,
):
    """x is read as element pairs (``xp``, see ``bnb4_linear._unpair``): word j holds elements 2j
    and 2j+1, which become byte j's high and low nibble, so the packing needs no shuffles."""
    HALF: tl.constexpr = QBLOCK // 2
    first = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM
    blocks = first + tl.arange(0, BLOCKS_PER_PROGRAM)
    word = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]
    word_ok = word < (numel + 1) // 2
    even, odd = _unpair(tl.load(xp_ptr + word, mask=word_ok, other=0), X_KIND)
    absmax = tl.maximum(tl.max(tl.abs(even), axis=1), tl.max(tl.abs(odd), axis=1))
    clamped = tl.maximum(absmax, tiny)  # tiny = 1e-38, a float32 denormal: passed in, not a literal
    recip = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), clamped)
    if (first + BLOCKS_PER_PROGRAM >= num_blocks) & (numel % QBLOCK != 0):
        # the program holding bitsandbytes' short last block: that block divides and stores
        # the clamped absmax (module header); a per-element division everywhere would cost
        # more than the whole rest of the kernel
        last = blocks == num_blocks - 1
        tl.store(absmax_ptr + blocks, tl.where(last, clamped, absmax), mask=blocks < num_blocks)
        short = last[:, None]
        s_even = tl.where(short, tl.math.div_rn(even, clamped[:, None]), even * recip[:, None])
        s_odd = tl.where(short, tl.math.div_rn(odd, clamped[:, None]), odd * recip[:, None])
    else:
        tl.store(absmax_ptr + blocks, absmax, mask=blocks < num_blocks)
        s_even = even * recip[:, None]
        s_odd = odd * recip[:, None]
    s_even = tl.minimum(tl.maximum(s_even, -1.0), 1.0)
    s_odd = tl.minimum(tl.maximum(s_odd, -1.0), 1.0)
    hi = _codes(s_even, order_ptr, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, SORTED)
    lo = _codes(s_odd, order_ptr, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, SORTED)
    tl.store(packed_ptr + word, (hi << 4) | lo, mask=word_ok)


_TABLES: dict[tuple[str, torch.device], tuple[list[float], torch.Tensor]] = {}


def quantize_tables(quant_type: str, device: torch.device) -> tuple[list[float], torch.Tensor]:
    """(15 sorted float32 midpoints as Python floats, int32 order table on ``device``)."""
    key = (quant_type, device)
    if key not in _TABLES:
        code = bnb4_codec.codebook(quant_type).float()
        order = torch.argsort(code, stable=True)
        midpoints = (code[order[:-1]] + code[order[1:]]) / 2  # float32 arithmetic, as the codec
        _TABLES[key] = ([float(t) for t in midpoints.tolist()], order.to(device=device, dtype=torch.int32))
    return _TABLES[key]


def bnb4_quantize(x: torch.Tensor, block_size: int = 64, quant_type: str = "nf4", nested: bool = False,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Quantize ``x`` (any shape, fp16/bf16/fp32) like ``bnb4_codec.quantize_4bit``.

    Returns ``(packed, absmax)``, or with ``nested`` ``(packed, absmax_codes, nested_absmax, offset)``.
    ``out`` = ``(packed, absmax)`` buffers to write into (tests poison them).
    """
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bnb4 quantize: quant_type: expected 'nf4' or 'fp4', got {quant_type!r}")
    if block_size < 32 or block_size & (block_size - 1):
        raise ValueError(f"bnb4 quantize: block_size: expected a power of two >= 32, got {block_size}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"bnb4 quantize: dtype: expected float16, bfloat16 or float32, got {x.dtype}")
    flat = x.reshape(-1)
    numel = flat.numel()
    if numel % 2 or not flat.is_contiguous() or flat.data_ptr() % (2 * flat.element_size()):
        # the kernel reads element pairs: pad an odd count with the 0.0 bitsandbytes pads with
        flat = torch.cat([flat, flat.new_zeros(numel % 2)])
    num_blocks = -(-numel // block_size)
    if out is None:
        packed = torch.empty(((numel + 1) // 2, 1), device=x.device, dtype=torch.uint8)
        absmax = torch.empty(num_blocks, device=x.device, dtype=torch.float32)
    else:
        packed, absmax = out
        if packed.shape != ((numel + 1) // 2, 1) or packed.dtype != torch.uint8 or absmax.shape != (num_blocks,) \
                or absmax.dtype != torch.float32 or not (packed.is_contiguous() and absmax.is_contiguous()):
            raise ValueError(f"bnb4 quantize: out: expected uint8 {((numel + 1) // 2, 1)} and float32 ({num_blocks},), "
                             f"got {packed.dtype} {tuple(packed.shape)} and {absmax.dtype} {tuple(absmax.shape)}")
    thresholds, order = quantize_tables(quant_type, x.device)
    per_program = max(1, min(16, 2048 // block_size)) if not INTERPRET else max(1, min(4, 256 // block_size))
    grid = (triton.cdiv(num_blocks, per_program),)
    if numel:
        kind, word = _X_KIND[flat.dtype]
        _bnb4_quantize_kernel[grid](flat.view(word), packed, absmax, order, numel, num_blocks, 1e-38, *thresholds,
                                    QBLOCK=block_size, BLOCKS_PER_PROGRAM=per_program,
                                    SORTED=quant_type == "nf4", X_KIND=kind, num_warps=4)
    if not nested:
        return packed, absmax
    codes, nested_absmax, offset = bnb4_codec.quantize_nested_absmax(absmax)
    return packed, codes, nested_absmax, offset
