"""Reference codec for bitsandbytes' 4-bit formats (NF4 and FP4), bit-exact with bitsandbytes 0.50.2.

This is the plain-PyTorch implementation every 4-bit kernel is tested against, and the CPU
path of the converter. It reproduces what bitsandbytes 0.50.2 writes on the CPU, rounding
and tie-breaking included.

Storage, bit by bit
-------------------
A weight of any shape is flattened row-major into ``n`` values and cut into blocks of
``block_size`` consecutive values (32, 64, ..., 4096); the last block may be short.

* ``absmax`` (float32, ``ceil(n / block_size)``): the largest ``|x|`` of each block.
* ``packed`` (uint8, shape ``((n + 1) // 2, 1)``): one 4-bit code per value, two per byte;
  value ``2j`` sits in the HIGH nibble of byte ``j``, value ``2j + 1`` in the low nibble.
  When ``n`` is odd the last low nibble holds the code of 0.0 (NF4: 7, FP4: 0).
* A code ``c`` means ``codebook[c] * absmax[block]``; the codebooks are ``NF4_CODE`` (16
  normal-distribution quantiles, sorted, so the code is the rank) and ``FP4_CODE`` (sign in
  bit 3, then a 2-bit exponent and 1-bit mantissa: ``[0, 1/16, 8, 12, 4, 6, 2, 3] / 12``).

Quantize math (float32 throughout, exactly as bitsandbytes orders the operations)
---------------------------------------------------------------------------------
Full blocks:  ``s = clamp(x * (1 / max(absmax, 1e-38)), -1, 1)`` (a reciprocal, then a multiply).
The short last block: ``s = clamp(x / max(absmax, 1e-38), -1, 1)`` (a true division), and its
stored absmax is the clamped one, so an all-zero short block stores 1e-38 while an all-zero
full block stores 0. Both dequantize to exact zeros.
Code: the number of sorted codebook midpoints ``m_i = (c_i + c_{i+1}) / 2`` that ``s`` is
strictly greater than (a value exactly on a midpoint takes the lower code), mapped back
through the codebook's sort order. FP4 has two zeros; +0 (code 0) sorts before -0 (code 8),
so 0.0 and small negatives get code 0 and small positives (up to the first midpoint) code 8.

Dequantize math: ``y = (codebook[c] * absmax[block]).to(out_dtype)`` (float32 product, one
rounding to the output dtype).

Nested absmax ("double quant", bitsandbytes' ``compress_statistics``)
---------------------------------------------------------------------
``offset = absmax.mean()``; ``d = absmax - offset`` is cut into blocks of 256 and stored as
uint8 codes into ``DYNAMIC_MAP_SIGNED`` plus one float32 ``nested_absmax = max|d|`` per 256.
Dequantize: ``absmax = DYNAMIC_MAP_SIGNED[q] * nested_absmax[i // 256] + offset`` (float32,
two roundings). bitsandbytes' CPU 8-bit quantizer picks the code through a 65536-entry lookup
table over [-1, 1] rather than an exact nearest search, and we reproduce it:
``t = clamp(d * (1 / nested_absmax), -1, 1)``, ``u = trunc(((t + 1) * 0.5) * 65535 + 0.5)``
in float32 steps, ``q = LUT[u]`` where ``LUT[u]`` counts the dynamic-map midpoints strictly
below ``-1 + 2u / 65535``. A block whose ``max|d|`` is 0 stores codes 0.

Which bitsandbytes: its CPU path, the one CI can run. Its CUDA kernels differ: (a) the short
last block is scaled by a reciprocal too and (b) NF4/FP4 thresholds are decimal constants, so
a value within an ulp or two of a midpoint may take the neighbouring code; (c) FP4 gives tiny
positive values code 0 and tiny negative ones code 8, the reverse of the CPU path (both
decode to zero); (d) nested codes come from an exact nearest search, which moves a few
percent of nested codes by one step. GPU kernels in this package reproduce this module.
"""
from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "BLOCK_SIZES",
    "DYNAMIC_MAP_SIGNED",
    "FP4_CODE",
    "NESTED_BLOCK_SIZE",
    "NF4_CODE",
    "QUANT_TYPES",
    "codebook",
    "dequantize_4bit",
    "dequantize_nested_absmax",
    "quantize_4bit",
    "quantize_nested_absmax",
]

BLOCK_SIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")
NESTED_BLOCK_SIZE = 256

# Values per chunk when quantizing or dequantizing a large tensor: bounds the float32
# temporaries to a few tens of MB whatever the tensor size. A multiple of every block size.
CHUNK_VALUES = 1 << 22

NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

# Sign bit 3, then exponent/mantissa bits giving 0, 1/16 (subnormal), 8, 12, 4, 6, 2, 3;
# normalised by the largest magnitude (12) with a float32 division, as bitsandbytes does.
FP4_CODE = torch.tensor(
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    dtype=torch.float32,
) / 12.0


def _signed_dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map: 7 decades, more fraction steps per decade.

    Decade ``i`` (0..6) holds the midpoints of ``linspace(0.1, 1, 2**i + 1)`` scaled by
    ``10**(i - 6)``, with both signs; then 0 and 1.0; sorted. 2 * 127 + 2 = 256 entries.
    """
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (i - 6)) * means).tolist()
        values += (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_MAP_SIGNED = _signed_dynamic_map()

_CODEBOOKS = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def codebook(quant_type: str) -> torch.Tensor:
    """The 16-entry float32 codebook of ``quant_type`` ("nf4" or "fp4"); index = 4-bit code."""
    try:
        return _CODEBOOKS[quant_type]
    except KeyError:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}") from None


def _sorted_midpoints(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints between sorted codebook values, code of each sorted position).

    A stable sort keeps FP4's +0 (code 0) ahead of -0 (code 8), which is bitsandbytes' order.
    """
    order = torch.sort(code, stable=True).indices
    ranked = code[order]
    return (ranked[:-1] + ranked[1:]) / 2, order.to(torch.uint8)


_MIDPOINTS = {name: _sorted_midpoints(code) for name, code in _CODEBOOKS.items()}
# The code 0.0 quantizes to (NF4: 7, FP4: 0): bitsandbytes pads an odd element count with it.
_ZERO_CODES = {name: int(order[torch.bucketize(torch.tensor(0.0), mids)]) for name, (mids, order) in _MIDPOINTS.items()}


def is_block_size(value: Any) -> bool:
    """True for one of ``BLOCK_SIZES`` as an int (not 64.0, not True)."""
    return isinstance(value, int) and not isinstance(value, bool) and value in BLOCK_SIZES


def _check_block_size(block_size: int) -> None:
    if not is_block_size(block_size):
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in _CODEBOOKS:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


# ---------------------------------------------------------------------------------------------
# 4-bit values
# ---------------------------------------------------------------------------------------------


def _rank_luts(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables that replace a binary search: rank(s) = low[i] + (s > threshold[i]), i = bits(s) >> 16.

    The 65536 float32 values sharing their top 16 bits form a run of one sign, monotonic in
    value, so at most one codebook midpoint falls inside it: ``low`` is the rank (number of
    sorted midpoints strictly below) at the run's lower end, and ``threshold`` that midpoint,
    or +inf when the whole run has one rank. Two ``index_select``s and a compare are several
    times faster on the CPU than ``torch.bucketize`` and give the same answer bit for bit.
    """
    midpoints, _ = _MIDPOINTS[quant_type]
    top = torch.arange(1 << 16, dtype=torch.int64) << 16
    ends = [(top | low).to(torch.int32).view(torch.float32) for low in (0, 0xFFFF)]
    infinity = torch.tensor(float("inf"))
    # Runs of NaN patterns are never looked up (inputs are finite); give them their sign's end.
    ends = [torch.where(e.isnan(), torch.copysign(infinity, e), e).clamp(-1, 1) for e in ends]
    lower_end, upper_end = torch.minimum(*ends), torch.maximum(*ends)
    low = torch.bucketize(lower_end, midpoints)
    high = torch.bucketize(upper_end, midpoints)
    assert int((high - low).max()) <= 1, "a 16-bit run holds two midpoints"
    inside = midpoints[low.clamp(max=midpoints.numel() - 1)]
    threshold = torch.where(high > low, inside, infinity)
    return low.to(torch.uint8), threshold


_RANK_LUTS = {name: _rank_luts(name) for name in _MIDPOINTS}


def _codes(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """4-bit codes of float32 scaled values: strict ``>`` against the sorted midpoints.

    Values a rounding step beyond +-1 (``x * (1 / absmax)``) get the code of +-1, as clamping would.
    """
    low, threshold = (t.to(scaled.device) for t in _RANK_LUTS[quant_type])
    run = (scaled.view(torch.int32) >> 16) & 0xFFFF
    ranks = low.index_select(0, run).add_(scaled > threshold.index_select(0, run))
    if quant_type == "nf4":  # NF4 is sorted: the rank is the code
        return ranks
    return _MIDPOINTS[quant_type][1].to(scaled.device).index_select(0, ranks.int())


def _quantize_chunk(x: torch.Tensor, block_size: int, short_tail: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled float32 values (``x / absmax``) and absmax for a flat chunk of whole blocks.

    ``short_tail``: the chunk ends in bitsandbytes' short last block (division, clamped absmax).
    """
    x = x.float()
    n = x.numel()
    full = n - n % block_size if short_tail else n
    blocks = x[:full].view(-1, block_size)
    low, high = torch.aminmax(blocks, dim=1)
    absmax = torch.maximum(high, low.neg())
    # No clamp to [-1, 1]: ``_codes`` gives values past +-1 the code of +-1, as a clamp would.
    scaled = blocks.mul(torch.reciprocal(absmax.clamp(min=1e-38)).unsqueeze(1)).view(-1)
    if full < n:
        tail_absmax = x[full:].abs().max().clamp(min=1e-38)
        scaled = torch.cat([scaled, x[full:].div(tail_absmax)])
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
    return scaled, absmax


def _pack_nibbles(codes: torch.Tensor, pad_code: int) -> torch.Tensor:
    """uint8 codes -> bytes, element 2j in the high nibble; an odd tail is padded with pad_code."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), pad_code)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0].bitwise_left_shift(4).bitwise_or_(pairs[:, 1])


def quantize_4bit(
    x: torch.Tensor, block_size: int = 64, quant_type: str = "nf4"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization, bit-exact with ``bitsandbytes.functional.quantize_4bit`` (CPU).

    Returns ``(packed, absmax)``: ``packed`` uint8 of shape ``((numel + 1) // 2, 1)`` and
    ``absmax`` float32 of shape ``(ceil(numel / block_size),)``, on ``x``'s device. Works in
    chunks of whole blocks so temporaries stay small for any tensor size.
    """
    _check_block_size(block_size)
    _check_quant_type(quant_type)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"4-bit quantization needs a float32/float16/bfloat16 tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    flat = x.reshape(-1)
    n = flat.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks(n, block_size), dtype=torch.float32, device=x.device)
    pad_code = _ZERO_CODES[quant_type]
    chunk = max(CHUNK_VALUES // block_size, 1) * block_size
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        scaled, block_absmax = _quantize_chunk(flat[start:stop], block_size, short_tail=stop == n)
        if not torch.isfinite(block_absmax).all():
            raise ValueError("cannot quantize a tensor that contains NaN or Inf")
        codes = _codes(scaled, quant_type)
        packed[start // 2 : (stop + 1) // 2, 0] = _pack_nibbles(codes, pad_code)
        absmax[start // block_size : start // block_size + block_absmax.numel()] = block_absmax
    return packed, absmax


def _byte_table(code: torch.Tensor) -> torch.Tensor:
    """(256, 2) float32: the two codebook values a packed byte holds, high nibble first."""
    byte = torch.arange(256)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)


_BYTE_TABLES = {name: _byte_table(code) for name, code in _CODEBOOKS.items()}


def dequantize_4bit(
    packed: torch.Tensor,
    absmax_fp32: torch.Tensor,
    block_size: int,
    quant_type: str,
    shape: tuple[int, ...] | torch.Size,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of ``quantize_4bit``, bit-exact with ``bitsandbytes.functional.dequantize_4bit``.

    ``y = (codebook[code] * absmax[block]).to(out_dtype)``, reshaped to ``shape``; written
    into ``out`` (contiguous, ``shape`` elements of ``out_dtype``) when given.
    """
    _check_block_size(block_size)
    _check_quant_type(quant_type)
    n = math.prod(shape)
    nbytes = (n + 1) // 2
    if packed.dtype != torch.uint8 or packed.numel() != nbytes:
        raise ValueError(
            f"packed must be uint8 with {nbytes} bytes for shape {tuple(shape)}, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    if absmax_fp32.numel() != num_blocks(n, block_size):
        raise ValueError(
            f"absmax must have {num_blocks(n, block_size)} values for {n} values in blocks of {block_size}, "
            f"got {absmax_fp32.numel()}"
        )
    packed = packed.reshape(-1)
    absmax_fp32 = absmax_fp32.reshape(-1).float()
    table = _BYTE_TABLES[quant_type].to(packed.device)
    if out is None:
        out = torch.empty(n, dtype=out_dtype, device=packed.device)
    elif out.dtype != out_dtype or out.numel() != n or not out.is_contiguous() or out.device != packed.device:
        raise ValueError(f"out must be a contiguous {out_dtype} tensor of {n} elements on {packed.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    result, out = out, out.view(-1)
    chunk = max(CHUNK_VALUES // block_size, 1) * block_size
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        values = table[packed[start // 2 : (stop + 1) // 2].long()].view(-1)[: stop - start]
        first_block = start // block_size
        full = (stop - start) // block_size * block_size
        if full:
            scales = absmax_fp32[first_block : first_block + full // block_size].unsqueeze(1)
            out[start : start + full] = values[:full].view(-1, block_size).mul(scales).view(-1)
        if full < stop - start:
            out[start + full : stop] = values[full:] * absmax_fp32[first_block + full // block_size]
    return result.view(shape)


# ---------------------------------------------------------------------------------------------
# Nested absmax (double quant)
# ---------------------------------------------------------------------------------------------

_LUT_SIZE = 65536


def _dynamic_lut() -> torch.Tensor:
    """uint8[65536]: code of the dynamic-map entry nearest to ``-1 + 2u / 65535`` (see header)."""
    code = DYNAMIC_MAP_SIGNED
    midpoints = 0.5 * (code[:-1] + code[1:])
    u = torch.arange(_LUT_SIZE, dtype=torch.float32)
    grid = -1.0 + (2.0 * u) / float(_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, grid, right=False).to(torch.uint8)


_DYNAMIC_LUT = _dynamic_lut()


def _lut_index(t: torch.Tensor) -> torch.Tensor:
    """``trunc(((t + 1) * 0.5) * 65535 + 0.5)`` in float32, ``t`` clamped to [-1, 1].

    Whether the compiled library fuses the last multiply-add or not makes no difference: for
    every float32 in [0, 1] both give the same index (checked exhaustively), so plain float32
    steps reproduce it on any device.
    """
    half = (t.clamp(-1.0, 1.0) + 1.0) * 0.5
    return (half * float(_LUT_SIZE - 1) + 0.5).long()


def quantize_nested_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' ``compress_statistics``: absmax -> (uint8 codes, nested absmax, offset).

    ``codes`` has one entry per absmax, ``nested_absmax`` one float32 per 256 absmax values,
    ``offset`` is the 0-d float32 mean that was subtracted first.
    """
    if absmax.dtype != torch.float32 or absmax.dim() != 1 or absmax.numel() == 0:
        raise ValueError(f"absmax must be a non-empty 1-D float32 tensor, got {absmax.dtype} {tuple(absmax.shape)}")
    offset = absmax.mean()
    centered = absmax - offset
    n = centered.numel()
    padded = torch.nn.functional.pad(centered, (0, num_blocks(n, NESTED_BLOCK_SIZE) * NESTED_BLOCK_SIZE - n))
    blocks = padded.view(-1, NESTED_BLOCK_SIZE)
    nested_absmax = blocks.abs().amax(dim=1)
    empty = nested_absmax == 0  # all-equal absmax: bitsandbytes stores codes 0 there
    scaled = blocks * torch.reciprocal(nested_absmax.masked_fill(empty, 1.0)).unsqueeze(1)
    codes = _DYNAMIC_LUT.to(absmax.device)[_lut_index(scaled)]
    codes = codes.masked_fill_(empty.unsqueeze(1), 0)
    return codes.view(-1)[:n].contiguous(), nested_absmax, offset


def dequantize_nested_absmax(
    codes: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor | float
) -> torch.Tensor:
    """``DYNAMIC_MAP_SIGNED[codes] * nested_absmax[i // 256] + offset`` in float32."""
    n = codes.numel()
    if codes.dtype != torch.uint8:
        raise ValueError(f"nested absmax codes must be uint8, got {codes.dtype}")
    if nested_absmax.numel() != num_blocks(n, NESTED_BLOCK_SIZE):
        raise ValueError(
            f"nested_absmax must have {num_blocks(n, NESTED_BLOCK_SIZE)} values for {n} codes, "
            f"got {nested_absmax.numel()}"
        )
    values = DYNAMIC_MAP_SIGNED.to(codes.device)[codes.reshape(-1).long()]
    scales = nested_absmax.reshape(-1).float().repeat_interleave(NESTED_BLOCK_SIZE)[:n]
    offset = torch.as_tensor(offset, dtype=torch.float32, device=codes.device)
    return values * scales + offset
