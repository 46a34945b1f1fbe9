"""bitsandbytes' 4-bit formats as comfy-kitchen layouts: ``NF4Layout`` (bnb_nf4), ``FP4Layout`` (bnb_fp4).

Storage (see ``kernels/bnb4_codec.py`` for the bit-level format and the math)
----------------------------------------------------------------------------
A weight of any shape, flattened row-major, in blocks of ``block_size`` values
(32, 64, ..., 4096; the last block may be short):

* ``qdata``: uint8 ``((numel + 1) // 2, 1)``, two 4-bit codes per byte, value 2j in the
  high nibble; exactly the tensor ``bitsandbytes.functional.quantize_4bit`` returns.
* ``params.scale``: the per-block absmax, float32 ``(nblocks,)``; with ``double_quant``
  its uint8 codes into the signed dynamic map instead, plus ``params.nested_absmax``
  (float32, one per 256 blocks) and ``params.nested_offset`` (0-d float32), bitsandbytes'
  ``compress_statistics``.

``dequantize`` gives ``codebook[code] * absmax[block]`` in ``orig_dtype``, bit-exact with
``bitsandbytes.functional.dequantize_4bit``; ``linear`` runs the Triton W4A16 kernels on CUDA
(``kernels/bnb4_linear.py``) and that followed by ``F.linear`` elsewhere; quantizing a CUDA
tensor runs the Triton quantize kernel (``kernels/bnb4_quantize.py``).

File entries for a layer ``L`` (suffixes from ``state_dict_tensors``):
``L.weight`` (packed uint8), ``L.weight_absmax``, and with double quant
``L.weight_nested_absmax`` and ``L.weight_nested_offset``; ``L.comfy_quant`` holds
``{"format": "bnb_nf4" | "bnb_fp4", "block_size", "double_quant", "orig_shape", "orig_dtype"}``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from comfy_kitchen.tensor import BaseLayoutParams, QuantizedTensor

from ..kernels import bnb4_codec as codec
from .base import LowBitLayout, format_error, reference_linear

logger = logging.getLogger(__name__)

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

ABSMAX = "_absmax"
NESTED_ABSMAX = "_nested_absmax"
NESTED_OFFSET = "_nested_offset"


@dataclasses.dataclass(frozen=True)
class Bnb4Params(BaseLayoutParams):
    """Per-weight state. ``scale`` is the absmax (float32), or its uint8 codes with double quant."""

    block_size: int = 64
    double_quant: bool = False
    nested_absmax: torch.Tensor | None = None
    nested_offset: torch.Tensor | None = None
    transposed: bool = False

    def _tensor_fields(self) -> list[str]:
        return ["scale", "nested_absmax", "nested_offset"] if self.double_quant else ["scale"]

    def _validate_tensor_fields(self) -> None:
        for name in self._tensor_fields():
            if not isinstance(getattr(self, name), torch.Tensor):
                got = type(getattr(self, name)).__name__
                where = f"{type(self).__name__}.{name} (double_quant={self.double_quant})"
                raise TypeError(f"{where} must be a tensor, got {got}")

    def absmax(self) -> torch.Tensor:
        """The float32 per-block absmax, decoding the nested statistics when double-quantised."""
        if self.double_quant:
            return codec.dequantize_nested_absmax(self.scale, self.nested_absmax, self.nested_offset)
        return self.scale


class Bnb4Layout(LowBitLayout):
    """Shared body of the NF4 and FP4 layouts; subclasses only name the codebook and format."""

    QUANT_TYPE: ClassVar[str]
    Params = Bnb4Params

    # ---- quantize / dequantize -------------------------------------------------------------

    @classmethod
    def quantize(
        cls,
        tensor: torch.Tensor,
        block_size: int = 64,
        double_quant: bool = False,
        *,
        layer: str | None = None,
        scale: Any = None,
        stochastic_rounding: Any = None,
        inplace_ops: Any = None,
    ) -> tuple[torch.Tensor, Bnb4Params]:
        """Quantize ``tensor`` (any shape, fp32/fp16/bf16) exactly as bitsandbytes does.

        ``scale``, ``stochastic_rounding`` and ``inplace_ops`` are what ComfyUI passes when it
        re-quantizes a LoRA-patched weight; absmax is always recomputed and rounding is always
        to nearest (bitsandbytes has no stochastic 4-bit rounding), so they are ignored.
        ``layer`` only names the weight in error messages.
        """
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise format_error(layer, f"{cls.FORMAT} quantizes floating-point tensors, got {got}")
        if tensor.dtype not in FLOAT_DTYPES.values():
            raise format_error(layer, f"{cls.FORMAT} quantizes float32/float16/bfloat16, got {tensor.dtype}")
        if not codec.is_block_size(block_size):
            raise format_error(layer, f"block_size must be one of {list(codec.BLOCK_SIZES)}, got {block_size!r}")
        if tensor.numel() == 0:
            raise format_error(layer, f"{cls.FORMAT} cannot quantize an empty tensor ({tuple(tensor.shape)})")
        try:
            packed, absmax = cls._quantize_blocks(tensor.detach(), block_size)
        except ValueError as exc:  # NaN / Inf, found from the block absmax at no extra cost
            raise format_error(layer, f"{cls.FORMAT}: {exc}") from None
        nested_absmax = nested_offset = None
        if double_quant:
            absmax, nested_absmax, nested_offset = codec.quantize_nested_absmax(absmax)
        params = Bnb4Params(
            scale=absmax,
            orig_dtype=tensor.dtype,
            orig_shape=tuple(tensor.shape),
            block_size=block_size,
            double_quant=bool(double_quant),
            nested_absmax=nested_absmax,
            nested_offset=nested_offset,
        )
        return packed, params

    @classmethod
    def _quantize_blocks(cls, tensor: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed, float32 absmax): the Triton kernel on CUDA (bit-exact with the codec), else the codec."""
        if tensor.is_cuda:  # imported here: Triton is only needed (and only installed) where CUDA is
            from ..kernels.bnb4_quantize import bnb4_quantize

            packed, absmax = bnb4_quantize(tensor, block_size, cls.QUANT_TYPE)
            if not torch.isfinite(absmax).all():  # the codec's check, from the absmax at no extra pass
                raise ValueError("cannot quantize a tensor that contains NaN or Inf")
            return packed, absmax
        return codec.quantize_4bit(tensor, block_size, cls.QUANT_TYPE)

    @classmethod
    def dequantize(cls, qdata: torch.Tensor, params: Bnb4Params) -> torch.Tensor:
        """Values in ``orig_dtype`` and the physical shape (``orig_shape`` reversed when transposed)."""
        shape = tuple(reversed(params.orig_shape)) if params.transposed else params.orig_shape
        absmax = params.absmax()
        return codec.dequantize_4bit(qdata, absmax, params.block_size, cls.QUANT_TYPE, shape, params.orig_dtype)

    @classmethod
    def linear(cls, x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias``: the Triton kernels on CUDA (``kernels/bnb4_linear.py`` picks one
        by the number of rows), the reference path (dequantize, then ``F.linear``) elsewhere."""
        params = weight._params
        shape = params.orig_shape
        if (x.is_cuda and x.dtype in FLOAT_DTYPES.values() and len(shape) == 2 and shape[1] % params.block_size == 0
                and weight._qdata.is_cuda):
            from ..kernels.bnb4_linear import Bnb4Weight, bnb4_linear

            w = Bnb4Weight(weight._qdata, params.scale, shape, params.block_size, cls.QUANT_TYPE,
                           params.nested_absmax, params.nested_offset)
            return bnb4_linear(x, w, bias)
        logger.debug("%s linear on %s/%s, weight %s: reference path", cls.FORMAT, x.device.type, x.dtype, shape)
        return reference_linear(x, weight, bias)

    @classmethod
    def requantize_kwargs(cls, qtensor: QuantizedTensor) -> dict[str, Any]:
        params = qtensor._params
        return {"block_size": params.block_size, "double_quant": params.double_quant}

    # ---- files -----------------------------------------------------------------------------

    @classmethod
    def state_dict_tensors(cls, qdata: torch.Tensor, params: Bnb4Params) -> dict[str, torch.Tensor]:
        tensors = {"": qdata, ABSMAX: params.scale}
        if params.double_quant:
            tensors[NESTED_ABSMAX] = params.nested_absmax
            tensors[NESTED_OFFSET] = params.nested_offset
        return tensors

    @classmethod
    def comfy_quant_config(cls, params: Bnb4Params) -> dict[str, Any]:
        dtype_name = {v: k for k, v in FLOAT_DTYPES.items()}[params.orig_dtype]
        return {
            "format": cls.FORMAT,
            "block_size": params.block_size,
            "double_quant": params.double_quant,
            "orig_shape": list(params.orig_shape),
            "orig_dtype": dtype_name,
        }

    @classmethod
    def from_state_dict(
        cls, layer: str, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]
    ) -> QuantizedTensor:
        """Rebuild a weight from its file entries, checking every key, dtype and shape."""
        block_size, double_quant, shape, dtype = _read_config(cls.FORMAT, layer, config)
        numel = math.prod(shape)
        blocks = codec.num_blocks(numel, block_size)
        expected = {
            "": (torch.uint8, ((numel + 1) // 2, 1)),
            ABSMAX: (torch.uint8, (blocks,)) if double_quant else (torch.float32, (blocks,)),
        }
        if double_quant:
            expected[NESTED_ABSMAX] = (torch.float32, (codec.num_blocks(blocks, codec.NESTED_BLOCK_SIZE),))
            expected[NESTED_OFFSET] = (torch.float32, ())
        unexpected = sorted(set(tensors) - set(expected))
        if unexpected:
            names = ", ".join(f"{layer}.weight{s}" for s in unexpected)
            raise format_error(layer, f"unexpected tensors for {cls.FORMAT} (double_quant={double_quant}): {names}")
        found = {}
        for suffix, (want_dtype, want_shape) in expected.items():
            key = f"{layer}.weight{suffix}"
            if suffix not in tensors:
                raise format_error(layer, f"missing {key}: expected {want_dtype} of shape {list(want_shape)}")
            t = tensors[suffix]
            # The packed data and the 0-d offset may arrive reshaped; the element count must match.
            vector = suffix in (ABSMAX, NESTED_ABSMAX)
            if t.dtype != want_dtype or t.numel() != math.prod(want_shape) or (vector and t.dim() != 1):
                got = f"{t.dtype} of shape {list(t.shape)}"
                raise format_error(layer, f"{key}: expected {want_dtype} of shape {list(want_shape)}, got {got}")
            found[suffix] = t.reshape(want_shape)
        params = Bnb4Params(
            scale=found[ABSMAX],
            orig_dtype=dtype,
            orig_shape=shape,
            block_size=block_size,
            double_quant=double_quant,
            nested_absmax=found.get(NESTED_ABSMAX),
            nested_offset=found.get(NESTED_OFFSET),
        )
        return QuantizedTensor(found[""], cls.__name__, params)


def is_shape(value: Any) -> bool:
    """A JSON shape: a list of positive ints."""
    return isinstance(value, list) and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value)


def _read_config(fmt: str, layer: str, config: Mapping[str, Any]) -> tuple[int, bool, tuple[int, ...], torch.dtype]:
    """(block_size, double_quant, orig_shape, orig_dtype) from a ``comfy_quant`` dict, checked."""
    if config.get("format") != fmt:
        raise format_error(layer, f"comfy_quant format is {config.get('format')!r}, expected {fmt!r}")
    block_size = config.get("block_size")
    if not codec.is_block_size(block_size):
        sizes = list(codec.BLOCK_SIZES)
        raise format_error(layer, f"comfy_quant block_size must be one of {sizes}, got {block_size!r}")
    double_quant = config.get("double_quant", False)
    if not isinstance(double_quant, bool):
        raise format_error(layer, f"comfy_quant double_quant must be true or false, got {double_quant!r}")
    shape = config.get("orig_shape")
    if not is_shape(shape):
        raise format_error(layer, f"comfy_quant orig_shape must be a list of positive integers, got {shape!r}")
    dtype = FLOAT_DTYPES.get(config.get("orig_dtype"))
    if dtype is None:
        got = config.get("orig_dtype")
        raise format_error(layer, f"comfy_quant orig_dtype must be one of {sorted(FLOAT_DTYPES)}, got {got!r}")
    return block_size, double_quant, tuple(shape), dtype


class NF4Layout(Bnb4Layout):
    """bitsandbytes NF4: 16 normal-distribution quantiles per block absmax."""

    FORMAT = "bnb_nf4"
    QUANT_TYPE = "nf4"


class FP4Layout(Bnb4Layout):
    """bitsandbytes FP4: sign, 2-bit exponent, 1-bit mantissa, scaled by the block absmax."""

    FORMAT = "bnb_fp4"
    QUANT_TYPE = "fp4"
