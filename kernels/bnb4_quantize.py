"""Quantize to the bitsandbytes NF4/FP4 layout on the GPU, bit-exact with ``bnb4_codec``.

Output format (see ``bnb4_linear`` for the bit layout): ``packed`` uint8 ``((numel+1)//2, 1)``,
element 2j in the high nibble of byte j, over the row-major flattening of x; ``absmax`` float32,
one per block of B consecutive elements (the last block may be partial).

Math, per block, exactly as the reference does it in float32:
``absmax = max|x|``; ``s = clamp(x * (1 / max(absmax, 1e-38)), -1, 1)`` (a reciprocal then a
multiply, both correctly rounded: Triton's plain ``/`` is an approximate division, so the
reciprocal uses ``div_rn``; the clamp needs no instruction, as a value past +-1 gets the code
of +-1 anyway); a short last block (numel not a multiple of B) instead stores
``max(absmax, 1e-38)`` and divides, as bitsandbytes does; the code is ``order[#{t in thresholds : s > t}]``, where
``thresholds`` are the 15 midpoints between the sorted codebook values and ``order`` maps a
sorted position back to its code (identity for NF4, which is sorted; a permutation for FP4,
whose sign is bit 3). Counting strict ``>`` is ``torch.bucketize`` with ``right=False``: a value
exactly on a midpoint gets the lower code. The 15 thresholds are passed as scalars and the
count is found by a 4-level binary search in registers (``_codes``); ``order`` is a 64-bit
constant (16 nibbles) read with a shift.

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
from .bnb4_linear import _X_KIND, AUTOTUNE, _unpair

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _codes(s, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, ORDER: tl.constexpr):
    """4-bit codes (int32: 8-bit math costs byte shuffles) of scaled values: the count of
    midpoints strictly below, through ``order``.

    The count of sorted thresholds below ``s`` is found by a 4-level binary search: each level
    compares against the middle threshold of the remaining range (chosen by the bits found so
    far with selects) and yields one bit of the count. For sorted thresholds this equals the
    15-comparison count exactly, ties included (both use strict ``>``); 4 compares and 11
    selects instead of 15 compares and 15 adds. ``ORDER``: 0 for a sorted codebook (NF4: the
    count is the code), else the 16 codes by sorted position as nibbles of a 64-bit constant
    (FP4), read with a shift instead of a table load.
    """
    b3 = s > t7
    b2 = s > tl.where(b3, t11, t3)
    b1 = s > tl.where(b3, tl.where(b2, t13, t9), tl.where(b2, t5, t1))
    b0 = s > tl.where(b3, tl.where(b2, tl.where(b1, t14, t12), tl.where(b1, t10, t8)),
                      tl.where(b2, tl.where(b1, t6, t4), tl.where(b1, t2, t0)))
    pos = b3.to(tl.int32) * 8 + b2.to(tl.int32) * 4 + b1.to(tl.int32) * 2 + b0.to(tl.int32)
    if ORDER == 0:
        return pos
    return ((tl.full(pos.shape, ORDER, tl.uint64) >> (pos * 4).to(tl.uint64)) & 15).to(tl.int32)


@triton.jit
def _bnb4_quantize_kernel(
    xp_ptr, packed_ptr, absmax_ptr, numel, num_blocks, size_class, tiny,
    t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14,
    QBLOCK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, ORDER: tl.constexpr, X_KIND: tl.constexpr,
    EVEN: tl.constexpr,  # numel is a multiple of QBLOCK * BLOCKS_PER_PROGRAM: no masks, no short block
):
    """x is read as element pairs (``xp``, see ``bnb4_linear._unpair``): word j holds elements 2j
    and 2j+1, which become byte j's high and low nibble, so the packing needs no shuffles."""
    HALF: tl.constexpr = QBLOCK // 2
    first = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM
    blocks = first + tl.arange(0, BLOCKS_PER_PROGRAM)
    word = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]
    if EVEN:
        even, odd = _unpair(tl.load(xp_ptr + word), X_KIND)
    else:
        word_ok = word < (numel + 1) // 2
        even, odd = _unpair(tl.load(xp_ptr + word, mask=word_ok, other=0), X_KIND)
    absmax = tl.maximum(tl.max(tl.abs(even), axis=1), tl.max(tl.abs(odd), axis=1))
    clamped = tl.maximum(absmax, tiny)  # tiny = 1e-38, a float32 denormal: passed in, not a literal
    recip = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), clamped)
    if EVEN:
        tl.store(absmax_ptr + blocks, absmax)
        s_even = even * recip[:, None]
        s_odd = odd * recip[:, None]
    elif (first + BLOCKS_PER_PROGRAM >= num_blocks) & (numel % QBLOCK != 0):
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
    # no clamp to [-1, 1]: past +-1 the search gives the code of +-1, as the codec's does
    hi = _codes(s_even, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, ORDER)
    lo = _codes(s_odd, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, ORDER)
    byte = ((hi << 4) | lo).to(tl.uint8)
    if EVEN:
        tl.store(packed_ptr + word, byte)
    else:
        tl.store(packed_ptr + word, byte, mask=word_ok)


# EVEN (no masks) whenever the program's blocks divide the tensor
_quantize_jit = triton.heuristics({
    "EVEN": lambda a: a["numel"] % (a["QBLOCK"] * a["BLOCKS_PER_PROGRAM"]) == 0,
})(_bnb4_quantize_kernel)


def _quantize_configs() -> list[triton.Config]:
    """Blocks per program (2K-16K elements: each thread loads 16-byte words of x ahead of its
    compares) and warps; the fixed 4096-element / 4-warp tile reached 0.46-0.48 of copy
    bandwidth on the H100, so the tile is tuned once per size class and block."""
    return [triton.Config({"BLOCKS_PER_PROGRAM": b}, num_warps=w)
            for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) for w in (4, 8)]


def _prune_quantize(configs, named_args, **meta):
    qblock = meta.get("QBLOCK", named_args.get("QBLOCK"))
    elements = [(c, c.kwargs["BLOCKS_PER_PROGRAM"] * qblock) for c in configs]
    # at most 64 elements per thread: 128 spilled (255 registers) on the H100
    kept = [c for c, e in elements if 2048 <= e <= 16384 and e <= 64 * 32 * c.num_warps]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCKS_PER_PROGRAM"])]


# size_class (bit length of the element count) keys the tuning: a checkpoint's few layer
# sizes each tune once per process at load time (Triton's benchmark, ~0.1 s per kept tile),
# not every distinct tensor
_quantize_tuned = triton.autotune(_quantize_configs(), key=["size_class", "QBLOCK", "X_KIND"],
                                  prune_configs_by={"early_config_prune": _prune_quantize})(_quantize_jit)

_TABLES: dict[str, tuple[list[float], int]] = {}


def quantize_tables(quant_type: str) -> tuple[list[float], int]:
    """(15 sorted float32 midpoints as Python floats, the ``ORDER`` constant of ``_codes``:
    0 when the codebook is sorted, else code of sorted position p in bits 4p..4p+3)."""
    if quant_type not in _TABLES:
        code = bnb4_codec.codebook(quant_type).float()
        order = torch.argsort(code, stable=True)
        midpoints = (code[order[:-1]] + code[order[1:]]) / 2  # float32 arithmetic, as the codec
        packed_order = 0 if torch.equal(order, torch.arange(16)) else sum(int(c) << (4 * p) for p, c in enumerate(order))
        _TABLES[quant_type] = ([float(t) for t in midpoints.tolist()], packed_order)
    return _TABLES[quant_type]


def bnb4_quantize(x: torch.Tensor, block_size: int = 64, quant_type: str = "nf4", nested: bool = False,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None, blocks_per_program: int | None = None):
    """Quantize ``x`` (any shape, fp16/bf16/fp32) like ``bnb4_codec.quantize_4bit``.

    Returns ``(packed, absmax)``, or with ``nested`` ``(packed, absmax_codes, nested_absmax, offset)``.
    ``out`` = ``(packed, absmax)`` buffers to write into (tests poison them);
    ``blocks_per_program`` pins the tile instead of tuning it (tests run every tuned tile).
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
    thresholds, order = quantize_tables(quant_type)
    if numel:
        kind, word = _X_KIND[flat.dtype]
        args = (flat.view(word), packed, absmax, numel, num_blocks, numel.bit_length(), 1e-38, *thresholds)
        if AUTOTUNE and blocks_per_program is None:
            grid = lambda meta: (triton.cdiv(num_blocks, meta["BLOCKS_PER_PROGRAM"]),)  # noqa: E731
            _quantize_tuned[grid](*args, QBLOCK=block_size, ORDER=order, X_KIND=kind)
        else:
            # 4096 elements per program: each thread loads 4 x 16 bytes (bf16) before it computes
            per_program = blocks_per_program or (
                max(1, min(64, 4096 // block_size)) if not INTERPRET else max(1, min(4, 256 // block_size)))
            _quantize_jit[(triton.cdiv(num_blocks, per_program),)](
                *args, QBLOCK=block_size, BLOCKS_PER_PROGRAM=per_program, ORDER=order, X_KIND=kind, num_warps=4)
    if not nested:
        return packed, absmax
    codes, nested_absmax, offset = bnb4_codec.quantize_nested_absmax(absmax)
    return packed, codes, nested_absmax, offset
