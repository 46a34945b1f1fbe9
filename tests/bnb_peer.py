"""bitsandbytes, the peer our 4-bit formats must match bit for bit, wrapped for the tests.

Two facts about bitsandbytes 0.50.2 on the CPU shape these helpers:
* its portable ("default") kernels are wrapped in ``torch.compile``; compiling them for every
  shape would cost minutes of test time for the same numbers, so they run eagerly here;
* its native CPU ``dequantize_4bit`` kernel is not one function but several, chosen by the
  machine: it looks absmax up per row (``K // block_size`` blocks per row), which is wrong
  when blocks span rows, and it only hands block sizes >= 2048 to the portable kernel when
  torch reports AVX-512 (with ``ATEN_CPU_CAPABILITY=avx2`` here, 2048-blocks over 256-wide rows
  come out wrong); on the GPU machine's CPU its fp16 conversion also differed from this
  machine's by one ulp on one value. bitsandbytes' portable ("default") kernel is the same
  on every machine, so the tests compare with the native kernel where the two agree and with
  the portable one where bitsandbytes disagrees with itself.
  (Its CPU kernel also returns a 1-D weight of even length as shape (1, n).)
"""
from __future__ import annotations

import bitsandbytes.functional as bnbf
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from bitsandbytes.functional import QuantState


def quantize(x: torch.Tensor, block_size: int, quant_type: str, double_quant: bool = False):
    """``(packed, QuantState)`` from ``bitsandbytes.functional.quantize_4bit``."""
    with torch.compiler.set_stance("force_eager"):
        return bnbf.quantize_4bit(x, blocksize=block_size, quant_type=quant_type, compress_statistics=double_quant)


def dequantize(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit``; its portable kernel where the native one disagrees."""
    with torch.compiler.set_stance("force_eager"):
        # Its CPU kernel returns a 1-D weight of even length as (1, n): same values.
        native = bnbf.dequantize_4bit(packed, state).reshape(state.shape)
        absmax = state.absmax
        if state.nested:
            absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        code = bnbf.get_4bit_type(state.quant_type, device=packed.device)
        portable = _dequantize_4bit_compute(packed.reshape(-1), absmax, code, state.blocksize, state.shape, state.dtype)
    return native if torch.equal(native, portable) else portable


def quantize_blockwise(x: torch.Tensor, block_size: int = 256):
    """``(codes, absmax)`` of bitsandbytes' 8-bit blockwise quantizer with the signed dynamic map."""
    codes, state = bnbf.quantize_blockwise(x, blocksize=block_size)
    return codes, state.absmax


def serialised(prefix: str, packed: torch.Tensor, state: QuantState) -> dict[str, torch.Tensor]:
    """What transformers/diffusers save for a ``Linear4bit`` weight ``prefix``."""
    entries = {prefix: packed}
    entries.update({f"{prefix}.{k}": v for k, v in state.as_dict(packed=True).items()})
    return entries


def state_from_serialised(prefix: str, entries: dict[str, torch.Tensor]) -> QuantState:
    start = prefix + "."
    return QuantState.from_dict({k[len(start):]: v for k, v in entries.items() if k.startswith(start)}, device="cpu")


codebook = bnbf.get_4bit_type
dynamic_map = bnbf.create_dynamic_map
