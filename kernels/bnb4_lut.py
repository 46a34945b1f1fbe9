"""Decode 4-bit codes through a 16-entry codebook held in registers: a ``prmt`` byte-permute LUT.

Why: a codebook gather from L1 per nibble (the v4 GEMV) costs a load instruction per element;
here eight nibbles (one 32-bit word of packed bytes) are decoded by 22 integer instructions
and 8 conversions, with the codebook in four immediates and four registers.

The table. Each of the 16 codebook values is rounded to float16 (NF4: 2^-11 relative at most;
FP4's ``v / 12`` likewise), and its two bytes go into two *byte planes*: plane L holds the low
bytes of entries 0..15, plane H the high bytes, each as four 32-bit words (entry ``e`` in byte
``e % 4`` of word ``e // 4``). A ``prmt`` takes one table word as an immediate; the other four
(``register_words``) are loaded into registers once per kernel.

PTX ``prmt.b32 d, a, b, c`` (default mode) builds d byte by byte: result byte i is byte
``c[4i+2:4i]`` of the 8-byte pool ``{b, a}`` (a = bytes 0-3, b = bytes 4-7); selector bit
``4i+3`` would replicate that byte's sign instead, so it must be 0. Selectors live in c[15:0].

One packed word ``v`` (bytes B0..B3, byte Bj in bits 8j..8j+7, each ``hi << 4 | lo``) read as
selectors: bits 15..0 are the nibbles (hi1, lo1, hi0, lo0), so ``v``'s low half decodes the
values of bytes 0-1 in the order (lo0, hi0, lo1, hi1), and ``v >> 16`` those of bytes 2-3.

    idx = v & 0x77777777                       3-bit index of every nibble in its half-table
    sel = ((v >> 1) & 0x44444444) | 0x32103210 per nibble i: i, or i + 4 if its bit 3 is set
    for the low half (idx, sel) and the high half (idx >> 16, sel >> 16), for each plane P:
        lo8 = prmt(P[0], P[1], idx)            plane bytes of entries 0-7
        hi8 = prmt(P[2], P[3], idx)            plane bytes of entries 8-15
        p   = prmt(lo8, hi8, sel)              the right one of the two, per nibble
    then per byte j of the half: ``prmt(pL, pH, 0x5140)`` / ``0x7362`` interleaves the planes into
    the float16 pair (lo_j, hi_j), and ``cvt.f32.f16`` widens each half (exact).

Output: (hi, lo) float32 values of the high and low nibble of each byte, like the gather
decode. ``emulate_lut_decode`` replays these steps with a Python ``prmt``, and
``tests/test_bnb4_lut.py`` also runs the PTX text itself through a small interpreter, so CI
checks tables, operands and selectors for all 256 bytes without a GPU; a GPU-only test checks
the compiled asm against the same expectation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import bnb4_codec


def fp16_codebook_bits(quant_type: str, dtype: torch.dtype = torch.float16) -> list[int]:
    """The 16 codebook values rounded to ``dtype`` (float16 or bfloat16), as unsigned 16-bit patterns."""
    code = bnb4_codec.codebook(quant_type).to(torch.float32).to(dtype)
    return [int(b) & 0xFFFF for b in code.view(torch.int16).tolist()]


def byte_planes(quant_type: str, dtype: torch.dtype = torch.float16) -> tuple[list[int], list[int]]:
    """(plane L, plane H): four 32-bit words each, entry e's low/high byte in byte e % 4 of word e // 4."""
    bits = fp16_codebook_bits(quant_type, dtype)
    planes = []
    for shift in (0, 8):
        planes.append([sum(((bits[4 * w + i] >> shift) & 0xFF) << (8 * i) for i in range(4)) for w in range(4)])
    return planes[0], planes[1]


def prmt(a: int, b: int, c: int) -> int:
    """PTX ``prmt.b32`` default mode on Python ints (the model the CPU test runs)."""
    pool = (a & 0xFFFFFFFF) | ((b & 0xFFFFFFFF) << 32)
    out = 0
    for i in range(4):
        s = (c >> (4 * i)) & 0xF
        byte = (pool >> (8 * (s & 7))) & 0xFF
        if s & 8:  # sign replication
            byte = 0xFF if byte & 0x80 else 0x00
        out |= byte << (8 * i)
    return out


def emulate_lut_decode(word: int, quant_type: str) -> list[tuple[int, int]]:
    """The asm's steps on one packed word: per byte j, the float16 bits of (hi value, lo value)."""
    plane_l, plane_h = byte_planes(quant_type)
    idx = word & 0x77777777
    sel = ((word >> 1) & 0x44444444) | 0x32103210
    out = []
    for half in (0, 16):
        i, s = idx >> half, sel >> half
        p_l = prmt(prmt(plane_l[0], plane_l[1], i), prmt(plane_l[2], plane_l[3], i), s)
        p_h = prmt(prmt(plane_h[0], plane_h[1], i), prmt(plane_h[2], plane_h[3], i), s)
        for interleave in (0x5140, 0x7362):
            pair = prmt(p_l, p_h, interleave)  # (lo value in bits 0-15, hi value in bits 16-31)
            out.append((pair >> 16, pair & 0xFFFF))
    return out


def emulate_lut_decode16(word: int, quant_type: str, dtype: torch.dtype) -> list[tuple[int, int]]:
    """``_asm16``'s steps on one packed word: per byte j, the 16-bit patterns of (hi, lo)."""
    plane_l, plane_h = byte_planes(quant_type, dtype)
    idx = word & 0x77777777
    sel = ((word >> 1) & 0x44444444) | 0x32103210
    hi, lo = [], []
    for half in (0, 16):
        i, s = idx >> half, sel >> half
        p_l = prmt(prmt(plane_l[0], plane_l[1], i), prmt(plane_l[2], plane_l[3], i), s)
        p_h = prmt(prmt(plane_h[0], plane_h[1], i), prmt(plane_h[2], plane_h[3], i), s)
        for pair, out in ((prmt(p_l, p_h, 0x7351), hi), (prmt(p_l, p_h, 0x6240), lo)):
            out += [pair & 0xFFFF, pair >> 16]
    return list(zip(hi, lo))


def register_words(quant_type: str, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """int32 (L[0], L[2], H[0], H[2]): the plane words the kernel loads once into registers.

    A ``prmt`` takes at most one of its two table words as an immediate; given both as
    immediates, ptxas re-creates the other with an extra instruction before every ``prmt``
    (seen in the SASS). Loaded values cannot be re-created, so they stay in 4 registers.
    """
    plane_l, plane_h = byte_planes(quant_type, dtype)
    words = [plane_l[0], plane_l[2], plane_h[0], plane_h[2]]
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def _selector_lines(packed: str) -> list[str]:
    """PTX computing every nibble's 3-bit index (idx) and half-table selector (sel) from the
    packed word in operand ``packed``."""
    return [f"and.b32 idx, {packed}, 0x77777777;", f"shr.u32 sel, {packed}, 1;",
            "and.b32 sel, sel, 0x44444444;", "or.b32 sel, sel, 0x32103210;"]


def _plane_lines(half: int, plane_l: list[int], plane_h: list[int], words: tuple[str, str, str, str]) -> list[str]:
    """PTX looking up the plane-L and plane-H bytes (into pl, ph) of the 4 nibbles of the
    word's low (half 0) or high (half 16) two bytes; ``words`` are the operands holding the
    ``register_words`` (L[0], L[2], H[0], H[2])."""
    lines = ["shr.u32 i, idx, 16;", "shr.u32 s, sel, 16;"] if half else ["mov.b32 i, idx;", "mov.b32 s, sel;"]
    for plane, regs, dst in ((plane_l, words[:2], "pl"), (plane_h, words[2:], "ph")):
        lines += [f"prmt.b32 a, {regs[0]}, {plane[1]:#010x}, i;",
                  f"prmt.b32 b, {regs[1]}, {plane[3]:#010x}, i;",
                  f"prmt.b32 {dst}, a, b, s;"]
    return lines


def _asm(quant_type: str) -> str:
    """Inline PTX for ``tl.inline_asm_elementwise(pack=4)``. Operands: $0-$3 = float32 value of
    byte j's high nibble, $4-$7 = of its low nibble, $8 = the four packed bytes, then the four
    ``register_words`` (int32, four operands each as pack=4 repeats them): $9, $13, $17, $21."""
    plane_l, plane_h = byte_planes(quant_type)
    lines = ["{", ".reg .b32 idx, sel, i, s, a, b, pl, ph, w;", ".reg .b16 e0, e1;", *_selector_lines("$8")]
    for half, first in ((0, 0), (16, 2)):
        lines += _plane_lines(half, plane_l, plane_h, ("$9", "$13", "$17", "$21"))
        for j, interleave in ((first, "0x5140"), (first + 1, "0x7362")):
            lines += [f"prmt.b32 w, pl, ph, {interleave};",
                      "mov.b32 {e0, e1}, w;",
                      f"cvt.f32.f16 ${4 + j}, e0;",
                      f"cvt.f32.f16 ${j}, e1;"]
    lines.append("}")
    return "\n".join(lines)


def _asm16(quant_type: str, dtype: torch.dtype) -> str:
    """Inline PTX for ``tl.inline_asm_elementwise(pack=4)`` with 16-bit outputs (float16 or
    bfloat16, the codebook rounded to ``dtype``), for a tensor-core operand: no widening.
    Triton packs two 16-bit results per 32-bit operand, the first element in the low half:
    $0/$1 = the high nibbles' values of bytes (0, 1) / (2, 3), $2/$3 = the low nibbles'; $4 =
    the four packed bytes; the ``register_words`` of ``dtype`` at $5, $9, $13, $17. The same
    plane lookups as ``_asm``; only the final byte selectors differ (0x7351: bytes 1 and 3 of
    each plane, the high nibbles; 0x6240: bytes 0 and 2, the low ones)."""
    plane_l, plane_h = byte_planes(quant_type, dtype)
    lines = ["{", ".reg .b32 idx, sel, i, s, a, b, pl, ph;", *_selector_lines("$4")]
    for half, hi_out, lo_out in ((0, "$0", "$2"), (16, "$1", "$3")):
        lines += _plane_lines(half, plane_l, plane_h, ("$5", "$9", "$13", "$17"))
        lines += [f"prmt.b32 {hi_out}, pl, ph, 0x7351;", f"prmt.b32 {lo_out}, pl, ph, 0x6240;"]
    lines.append("}")
    return "\n".join(lines)


NF4_ASM = tl.constexpr(_asm("nf4"))
FP4_ASM = tl.constexpr(_asm("fp4"))
ASM_CONSTRAINTS = tl.constexpr("=r," * 8 + "r" + ",r" * 16)
NF4_ASM16 = tl.constexpr(_asm16("nf4", torch.float16))
FP4_ASM16 = tl.constexpr(_asm16("fp4", torch.float16))
NF4_ASM16_BF16 = tl.constexpr(_asm16("nf4", torch.bfloat16))
FP4_ASM16_BF16 = tl.constexpr(_asm16("fp4", torch.bfloat16))
ASM16_CONSTRAINTS = tl.constexpr("=r," * 4 + "r" + ",r" * 16)


@triton.jit
def lane_ids(shape: tl.constexpr):
    """Each element's lane index (0..31) in its warp, as int32 of ``shape``. GPU only."""
    return tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [tl.zeros(shape, tl.int32)],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def load_register_words(words_ptr, shape: tl.constexpr):
    """(l0, l2, h0, h2): the four ``register_words`` as int32 tensors of ``shape``, each lane
    loading its own copy (``words_ptr`` holds 32, one per lane). GPU only. Why per lane: a
    value ptxas can prove uniform it keeps in a uniform register and copies into a register
    before every ``prmt`` that uses it (one extra instruction per ``prmt`` in the SASS)."""
    lane = lane_ids(shape)
    return (tl.load(words_ptr + lane * 4), tl.load(words_ptr + lane * 4 + 1),
            tl.load(words_ptr + lane * 4 + 2), tl.load(words_ptr + lane * 4 + 3))


@triton.jit
def lut_decode(byte, l0, l2, h0, h2, IS_FP4: tl.constexpr):
    """(hi, lo) float32 codebook values (float16-rounded) of a uint8 tensor's nibbles. GPU only.

    l0, l2, h0, h2: the four int32 ``register_words`` of the codebook, loaded once before the
    kernel's loop (Triton does not hoist loads out of loops).
    """
    asm: tl.constexpr = FP4_ASM if IS_FP4 else NF4_ASM
    return tl.inline_asm_elementwise(asm, ASM_CONSTRAINTS, [byte, l0, l2, h0, h2],
                                     dtype=(tl.float32, tl.float32), is_pure=True, pack=4)


@triton.jit
def lut_decode16(byte, l0, l2, h0, h2, IS_FP4: tl.constexpr, BF16: tl.constexpr):
    """(hi, lo) codebook values of a uint8 tensor's nibbles as float16 (or bfloat16 with BF16),
    for a tensor-core operand. GPU only. l0..h2: ``register_words(quant_type, dtype)``."""
    if BF16:
        asm: tl.constexpr = FP4_ASM16_BF16 if IS_FP4 else NF4_ASM16_BF16
        dtype = tl.bfloat16
    else:
        asm: tl.constexpr = FP4_ASM16 if IS_FP4 else NF4_ASM16
        dtype = tl.float16
    return tl.inline_asm_elementwise(asm, ASM16_CONSTRAINTS, [byte, l0, l2, h0, h2],
                                     dtype=(dtype, dtype), is_pure=True, pack=4)
