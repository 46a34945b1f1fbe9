"""The register-LUT nibble decode (``kernels/bnb4_lut.py``) against the codebook, bit for bit.

Expected value of a nibble: the float32 codebook value rounded to float16, widened back to
float32 (exact), for all 256 bytes and both codebooks. Three checks:

* CPU: ``emulate_lut_decode`` (the algorithm with a Python ``prmt``);
* CPU: the inline PTX itself, run by a small interpreter for the instructions it uses, so the
  asm text (immediates, operand numbers, selector constants) is what gets checked;
* GPU only: the compiled asm through ``tl.inline_asm_elementwise`` (skipped without CUDA).
"""
from __future__ import annotations

import re
import struct

import pytest
import torch
import triton
import triton.language as tl

from comfy_lowbit.kernels import bnb4_codec, bnb4_lut

QUANT_TYPES = ("nf4", "fp4")
# Every byte in every position of a word, beside neighbours with other nibbles (so a decode
# that swaps two bytes' values is caught)
ALL_BYTES_AS_WORDS = [b | (b + 1) << 8 | (b + 2) << 16 | (b + 3) << 24 for b in range(0, 256, 4)] + [
    b | ((b * 37 + 11) & 255) << 8 | ((b * 101 + 7) & 255) << 16 | ((b * 53 + 3) & 255) << 24 for b in range(256)]


def expected_bits(quant_type: str) -> list[int]:
    """float32 bit patterns of the float16-rounded codebook."""
    code = bnb4_codec.codebook(quant_type).float().half().float()
    return [int(v) & 0xFFFFFFFF for v in code.view(torch.int32).tolist()]


def f16_to_f32_bits(h: int) -> int:
    return struct.unpack("<I", struct.pack("<f", struct.unpack("<e", struct.pack("<H", h))[0]))[0]


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_float16_codebook_is_close(quant_type):
    code = bnb4_codec.codebook(quant_type).float()
    err = (code.half().float() - code).abs()
    assert (err <= code.abs() * 2.0**-11).all()


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_emulated_decode_all_bytes(quant_type):
    bits = bnb4_lut.fp16_codebook_bits(quant_type)
    for word in ALL_BYTES_AS_WORDS:
        for j, (hi, lo) in enumerate(bnb4_lut.emulate_lut_decode(word, quant_type)):
            byte = (word >> (8 * j)) & 0xFF
            assert (hi, lo) == (bits[byte >> 4], bits[byte & 15]), f"byte {byte:#04x}"


def run_ptx(asm: str, operands: dict[int, int]) -> dict[int, int]:
    """Execute the asm's instructions (the subset it uses) on Python ints; returns every $n."""
    regs: dict[str, int] = {f"${i}": v for i, v in operands.items()}

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok, 0) if tok[0].isdigit() else regs[tok]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.startswith("{"):  # unpack a b32 into two b16
            lo_name, hi_name, src = re.match(r"\{(\w+), (\w+)\}, (\S+)", rest).groups()
            regs[lo_name], regs[hi_name] = val(src) & 0xFFFF, val(src) >> 16
            continue
        dst, *srcs = [t.strip() for t in rest.split(",")]
        a = [val(t) for t in srcs]
        if op == "and.b32":
            regs[dst] = a[0] & a[1]
        elif op == "or.b32":
            regs[dst] = a[0] | a[1]
        elif op == "shr.u32":
            regs[dst] = (a[0] & 0xFFFFFFFF) >> a[1]
        elif op == "mov.b32":
            regs[dst] = a[0]
        elif op == "prmt.b32":
            regs[dst] = bnb4_lut.prmt(a[0], a[1], a[2])
        elif op == "cvt.f32.f16":
            regs[dst] = f16_to_f32_bits(a[0])
        else:
            raise AssertionError(f"instruction not modelled: {line}")
    return {int(name[1:]): value for name, value in regs.items() if name.startswith("$")}


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_inline_ptx_all_bytes(quant_type):
    asm = bnb4_lut._asm(quant_type)
    assert asm == (bnb4_lut.NF4_ASM if quant_type == "nf4" else bnb4_lut.FP4_ASM).value
    words = [w & 0xFFFFFFFF for w in bnb4_lut.register_words(quant_type).tolist()]
    exp = expected_bits(quant_type)
    for word in ALL_BYTES_AS_WORDS:
        operands = {8: word, 9: words[0], 13: words[1], 17: words[2], 21: words[3]}
        out = run_ptx(asm, operands)
        for j in range(4):
            byte = (word >> (8 * j)) & 0xFF
            assert (out[j], out[4 + j]) == (exp[byte >> 4], exp[byte & 15]), f"byte {byte:#04x}"


@triton.jit
def decode_all(bytes_ptr, words_ptr, hi_ptr, lo_ptr, IS_FP4: tl.constexpr):
    offs = tl.arange(0, 256)
    byte = tl.load(bytes_ptr + offs)
    l0, l2, h0, h2 = bnb4_lut.load_register_words(words_ptr, (256,))
    hi, lo = bnb4_lut.lut_decode(byte, l0, l2, h0, h2, IS_FP4)
    tl.store(hi_ptr + offs, hi)
    tl.store(lo_ptr + offs, lo)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inline PTX runs on a GPU only")
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_gpu_lut_decode_all_bytes(quant_type):
    byte = torch.arange(256, dtype=torch.uint8, device="cuda")
    words = bnb4_lut.register_words(quant_type).repeat(32).cuda()
    hi = torch.full((256,), float("nan"), device="cuda")
    lo = torch.full((256,), float("nan"), device="cuda")
    # one warp: 8 bytes per thread, so the asm always gets 4 real bytes (pack=4)
    decode_all[(1,)](byte, words, hi, lo, IS_FP4=quant_type == "fp4", num_warps=1)
    code = bnb4_codec.codebook(quant_type).float().half().float()
    b = torch.arange(256)
    assert torch.equal(hi.cpu().view(torch.int32), code[b >> 4].view(torch.int32))
    assert torch.equal(lo.cpu().view(torch.int32), code[b & 15].view(torch.int32))


DTYPES16 = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES16)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_emulated_decode16_all_bytes(quant_type, dtype):
    bits = bnb4_lut.fp16_codebook_bits(quant_type, dtype)
    for word in ALL_BYTES_AS_WORDS:
        for j, (hi, lo) in enumerate(bnb4_lut.emulate_lut_decode16(word, quant_type, dtype)):
            byte = (word >> (8 * j)) & 0xFF
            assert (hi, lo) == (bits[byte >> 4], bits[byte & 15]), f"byte {byte:#04x}"


@pytest.mark.parametrize("dtype", DTYPES16)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_inline_ptx16_all_bytes(quant_type, dtype):
    """The 16-bit asm: $0/$1 hold the high nibbles' values of bytes (0, 1)/(2, 3), two per
    register, the first in the low half; $2/$3 the low nibbles'."""
    asm = bnb4_lut._asm16(quant_type, dtype)
    name = f"{quant_type.upper()}_ASM16" + ("_BF16" if dtype == torch.bfloat16 else "")
    assert asm == getattr(bnb4_lut, name).value
    words = [w & 0xFFFFFFFF for w in bnb4_lut.register_words(quant_type, dtype).tolist()]
    bits = bnb4_lut.fp16_codebook_bits(quant_type, dtype)
    for word in ALL_BYTES_AS_WORDS:
        out = run_ptx(asm, {4: word, 5: words[0], 9: words[1], 13: words[2], 17: words[3]})
        for j in range(4):
            byte = (word >> (8 * j)) & 0xFF
            hi = (out[j // 2] >> (16 * (j % 2))) & 0xFFFF
            lo = (out[2 + j // 2] >> (16 * (j % 2))) & 0xFFFF
            assert (hi, lo) == (bits[byte >> 4], bits[byte & 15]), f"byte {byte:#04x}"


@triton.jit
def decode16_all(bytes_ptr, words_ptr, hi_ptr, lo_ptr, IS_FP4: tl.constexpr, BF16: tl.constexpr):
    offs = tl.arange(0, 256)
    byte = tl.load(bytes_ptr + offs)
    l0, l2, h0, h2 = bnb4_lut.load_register_words(words_ptr, (256,))
    hi, lo = bnb4_lut.lut_decode16(byte, l0, l2, h0, h2, IS_FP4, BF16)
    tl.store(hi_ptr + offs, hi)
    tl.store(lo_ptr + offs, lo)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inline PTX runs on a GPU only")
@pytest.mark.parametrize("dtype", DTYPES16)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_gpu_lut_decode16_all_bytes(quant_type, dtype):
    byte = torch.arange(256, dtype=torch.uint8, device="cuda")
    words = bnb4_lut.register_words(quant_type, dtype).repeat(32).cuda()
    hi = torch.full((256,), float("nan"), device="cuda", dtype=dtype)
    lo = torch.full((256,), float("nan"), device="cuda", dtype=dtype)
    decode16_all[(1,)](byte, words, hi, lo, IS_FP4=quant_type == "fp4", BF16=dtype == torch.bfloat16, num_warps=1)
    code = bnb4_codec.codebook(quant_type).float().to(dtype)
    b = torch.arange(256)
    assert torch.equal(hi.cpu().view(torch.int16), code[b >> 4].view(torch.int16))
    assert torch.equal(lo.cpu().view(torch.int16), code[b & 15].view(torch.int16))
