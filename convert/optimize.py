"""``--optimize``: a better NF4/FP4 encoder that still writes the bitsandbytes format.

bitsandbytes stores each block of ``B`` values as a float32 scale ``absmax`` and 16-level codes
``c`` with ``x_hat = codebook[c] * absmax``. Its encoder takes ``absmax = max |x|`` and the
nearest code of ``x / absmax``. Nothing in the format requires that scale: any positive
``s`` decodes the same way, so we choose, per block, the ``s`` and codes that minimise the
block's squared error ``sum (x - s * codebook[c])^2``:

1. candidates ``s = f * max|x|`` for ``f`` in ``SCALE_FACTORS`` (<= 1: clipping the one
   largest value buys finer steps for all the others), each with its nearest codes;
2. from the best candidate, a least-squares refit ``s = <x, v> / <v, v>`` with
   ``v = codebook[c]`` fixed, then nearest codes again (``REFINE_STEPS`` times);
3. the plain encoding is candidate zero, so no block ever gets worse than bitsandbytes'.

Everything is vectorised over blocks and done in chunks of ``CHUNK_VALUES`` values, so memory
stays bounded. Readers need nothing new: the output is ordinary bitsandbytes 4-bit data.
"""
from __future__ import annotations

import torch

from ..kernels import bnb4_codec

SCALE_FACTORS = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76, 0.73, 0.70)
REFINE_STEPS = 2
CHUNK_VALUES = 1 << 21


class _Codebook:
    """A codebook's values and its nearest-code search.

    The search is the codec's own (``bnb4_codec._codes``, a 16-bit lookup table, about 3x
    faster on the CPU than ``torch.bucketize``), so codes are chosen exactly as the plain
    encoder chooses them for the same scaled values.
    """

    def __init__(self, quant_type: str, device):
        self.quant_type = quant_type
        self.values = bnb4_codec.codebook(quant_type).to(device)

    def nearest(self, scaled: torch.Tensor) -> torch.Tensor:
        return bnb4_codec._codes(scaled.contiguous().view(-1), self.quant_type).view(scaled.shape)


def _block_error(x: torch.Tensor, scale: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return (x - scale.unsqueeze(1) * values).square_().sum(1)


def _optimize_chunk(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, book: _Codebook):
    """Improve (codes, scale) of blocks ``x`` (rows); returns them with per-block errors."""
    best_err = _block_error(x, scale, book.values[codes.long()])
    absmax = x.abs().amax(1)
    live = absmax > 0  # all-zero blocks are exact already
    safe_absmax = torch.where(live, absmax, torch.ones_like(absmax))

    def consider(s: torch.Tensor):
        nonlocal codes, scale, best_err
        s = torch.where(live & (s > 0), s, safe_absmax)
        candidate = book.nearest(x / s.unsqueeze(1))
        err = _block_error(x, s, book.values[candidate.long()])
        better = (err < best_err) & live
        codes = torch.where(better.unsqueeze(1), candidate, codes)
        scale = torch.where(better, s, scale)
        best_err = torch.where(better, err, best_err)

    for factor in SCALE_FACTORS:
        consider(safe_absmax * factor)
    for _ in range(REFINE_STEPS):
        v = book.values[codes.long()]
        consider((x * v).sum(1) / (v * v).sum(1).clamp_min(1e-30))
    return codes, scale, best_err


def unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """bitsandbytes bytes (first code in the high nibble) -> one uint8 code per value."""
    packed = packed.reshape(-1)
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:numel]


def pack_codes(codes: torch.Tensor, pad_code: int) -> torch.Tensor:
    """One uint8 code per value -> bitsandbytes bytes ``((n + 1) // 2, 1)``, first code high."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), pad_code)])
    pairs = codes.view(-1, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).reshape(-1, 1)


def optimized_quantize_4bit(x: torch.Tensor, block_size: int = 64, quant_type: str = "nf4",
                            plain: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Like ``bnb4_codec.quantize_4bit`` (same outputs, same format) with a lower squared error.

    Returns ``(packed, absmax)``; ``plain`` is the plain encoding when the caller has it. The
    short last block bitsandbytes allows is handled by padding with zeros, which every
    codebook represents exactly.
    """
    packed, absmax = plain if plain is not None else bnb4_codec.quantize_4bit(x, block_size, quant_type)
    flat = x.reshape(-1).float()
    n = flat.numel()
    codes = unpack_codes(packed, n)
    pad_code = int(codes[-1]) if n % 2 == 0 else int(packed.reshape(-1)[-1] & 0x0F)
    book = _Codebook(quant_type, x.device)
    out_codes = torch.empty_like(codes)
    out_scale = absmax.clone()
    chunk = max(CHUNK_VALUES // block_size, 1) * block_size
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = -(-(stop - start) // block_size)
        pad = rows * block_size - (stop - start)
        xs = torch.nn.functional.pad(flat[start:stop], (0, pad)).view(rows, block_size)
        cs = torch.nn.functional.pad(codes[start:stop], (0, pad), value=pad_code).view(rows, block_size)
        first = start // block_size
        new_codes, new_scale, _ = _optimize_chunk(xs, cs, absmax[first:first + rows], book)
        out_codes[start:stop] = new_codes.view(-1)[: stop - start]
        out_scale[first:first + rows] = new_scale
    return pack_codes(out_codes, pad_code), out_scale


def optimized_quantize(weight: torch.Tensor, layout, kwargs: dict):
    """(optimized, plain) QuantizedTensors of ``weight`` in the NF4/FP4 ``layout``.

    Goes through the layout's per-layer file contract (``state_dict_tensors`` /
    ``comfy_quant_config`` / ``from_state_dict``), replacing only the codes and the block
    scales, so the result is checked by the same code that checks files.
    """
    from comfy_kitchen.tensor import QuantizedTensor

    from ..layouts.bnb4 import ABSMAX, NESTED_ABSMAX, NESTED_OFFSET

    layer = kwargs.get("layer") or "weight"
    plain = QuantizedTensor.from_float(weight, layout.__name__, **kwargs)
    config = layout.comfy_quant_config(plain._params)
    tensors = dict(layout.state_dict_tensors(plain._qdata, plain._params))
    quant_type = layout.FORMAT.removeprefix("bnb_")
    start = None if config.get("double_quant") else (tensors[""], tensors[ABSMAX])
    packed, absmax = optimized_quantize_4bit(weight, config["block_size"], quant_type, plain=start)
    tensors[""] = packed
    if config.get("double_quant"):
        tensors[ABSMAX], tensors[NESTED_ABSMAX], tensors[NESTED_OFFSET] = bnb4_codec.quantize_nested_absmax(absmax)
    else:
        tensors[ABSMAX] = absmax
    return layout.from_state_dict(layer, tensors, config), plain
