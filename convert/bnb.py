"""bitsandbytes-serialised 4-bit state dicts <-> our NF4/FP4 ``QuantizedTensor``s, without bitsandbytes.

transformers, diffusers and Forge save a ``bnb.nn.Linear4bit`` weight ``X.weight`` as
``QuantState.as_dict(packed=True)`` beside it:

====================================================  ============================================
key                                                   content
====================================================  ============================================
``X.weight``                                          packed codes, ``((numel + 1) // 2, 1)``
                                                      (uint8, or another ``quant_storage`` dtype
                                                      holding the same bytes)
``X.weight.absmax``                                   float32 per-block absmax, or uint8 codes
                                                      with double quant
``X.weight.quant_map``                                the 16-entry codebook (float32)
``X.weight.nested_absmax``                            double quant: float32, one per 256 blocks
``X.weight.nested_quant_map``                         double quant: the 256-entry dynamic map
``X.weight.quant_state.bitsandbytes__nf4`` (or fp4)   uint8 UTF-8 JSON: ``quant_type``,
                                                      ``blocksize``, ``dtype``, ``shape`` and, with
                                                      double quant, ``nested_blocksize`` (256),
                                                      ``nested_dtype``, ``nested_offset`` (float)
====================================================  ============================================

The stored data are exactly our layouts' data (``layouts/bnb4.py``), so converting moves
tensors and never re-quantizes. The stored codebooks must be the standard ones: our layouts
decode with fixed tables, so a file with another ``quant_map`` is refused rather than misread.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch
from comfy_kitchen.tensor import QuantizedTensor

from ..kernels import bnb4_codec as codec
from ..layouts.base import QuantFormatError
from ..layouts.comfy_quant import decode_json_tensor
from ..layouts.bnb4 import (ABSMAX, FLOAT_DTYPES, NESTED_ABSMAX, NESTED_OFFSET, Bnb4Layout, FP4Layout, NF4Layout,
                            is_shape)

QUANT_STATE = ".quant_state.bitsandbytes__"
LAYOUTS: dict[str, type[Bnb4Layout]] = {"nf4": NF4Layout, "fp4": FP4Layout}
_STATE_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


def _error(key: str, message: str) -> QuantFormatError:
    return QuantFormatError(f"bitsandbytes tensor '{key}': {message}")


def _decode_quant_state(key: str, tensor: Any) -> dict[str, Any]:
    try:
        state = decode_json_tensor(tensor)
    except ValueError as exc:
        raise _error(key, str(exc)) from None
    if not isinstance(state, dict):
        raise _error(key, f"expected a JSON object, got {state!r}")
    return state


def _field(key: str, state: Mapping[str, Any], name: str, check, expected: str) -> Any:
    value = state.get(name)
    if not check(value):
        raise _error(key, f'"{name}" must be {expected}, got {value!r}')
    return value


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _tensor(state_dict: Mapping[str, Any], key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """``state_dict[key]`` checked for dtype and element count, reshaped to ``shape``."""
    if key not in state_dict:
        raise _error(key, f"missing; expected {dtype} of shape {list(shape)}")
    t = state_dict[key]
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.numel() != math.prod(shape):
        got = f"{t.dtype} of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise _error(key, f"expected {dtype} of shape {list(shape)}, got {got}")
    return t.reshape(shape)


def _packed_bytes(key: str, t: Any, nbytes: int) -> torch.Tensor:
    """The packed weight as uint8 ``(nbytes, 1)``; a wider ``quant_storage`` dtype is reinterpreted."""
    if not isinstance(t, torch.Tensor):
        raise _error(key, f"expected the packed weight tensor, got {type(t).__name__}")
    if t.numel() * t.element_size() != nbytes:
        raise _error(key, f"expected {nbytes} bytes of packed 4-bit codes, got {t.dtype} of shape {list(t.shape)}")
    return t.contiguous().reshape(-1).view(torch.uint8).reshape(nbytes, 1)


def _same_table(state_dict: Mapping[str, Any], key: str, table: torch.Tensor, what: str) -> None:
    stored = _tensor(state_dict, key, torch.float32, tuple(table.shape))
    if not torch.equal(stored.cpu(), table):
        raise _error(key, f"is not bitsandbytes' standard {what}; only the standard one can be loaded")


def _load_layer(state_dict: Mapping[str, Any], weight_key: str, quant_type: str) -> QuantizedTensor:
    state_key = f"{weight_key}{QUANT_STATE}{quant_type}"
    layer = weight_key[: -len(".weight")] if weight_key.endswith(".weight") else weight_key
    state = _decode_quant_state(state_key, state_dict[state_key])
    _field(state_key, state, "quant_type", lambda v: v == quant_type, f'"{quant_type}" (as in the key name)')
    block_size = _field(state_key, state, "blocksize", codec.is_block_size, f"one of {list(codec.BLOCK_SIZES)}")
    dtype_name = _field(state_key, state, "dtype", lambda v: v in FLOAT_DTYPES, f"one of {sorted(FLOAT_DTYPES)}")
    shape = _field(state_key, state, "shape", is_shape, "a list of positive integers")
    double_quant = "nested_offset" in state or "nested_blocksize" in state
    numel = math.prod(shape)
    blocks = codec.num_blocks(numel, block_size)

    if weight_key not in state_dict:
        raise _error(weight_key, f"missing; {state_key} describes it")
    tensors = {"": _packed_bytes(weight_key, state_dict[weight_key], (numel + 1) // 2)}
    _same_table(state_dict, f"{weight_key}.quant_map", codec.codebook(quant_type), f"{quant_type} codebook")
    if double_quant:
        nested = codec.NESTED_BLOCK_SIZE
        _field(state_key, state, "nested_blocksize", lambda v: v == nested, str(nested))
        _field(state_key, state, "nested_dtype", lambda v: v == "float32", '"float32"')
        offset = _field(state_key, state, "nested_offset", _is_finite_number, "a finite number")
        _same_table(state_dict, f"{weight_key}.nested_quant_map", codec.DYNAMIC_MAP_SIGNED, "signed dynamic map")
        tensors[ABSMAX] = _tensor(state_dict, f"{weight_key}.absmax", torch.uint8, (blocks,))
        nested_blocks = codec.num_blocks(blocks, codec.NESTED_BLOCK_SIZE)
        tensors[NESTED_ABSMAX] = _tensor(state_dict, f"{weight_key}.nested_absmax", torch.float32, (nested_blocks,))
        tensors[NESTED_OFFSET] = torch.tensor(float(offset), dtype=torch.float32)
    else:
        tensors[ABSMAX] = _tensor(state_dict, f"{weight_key}.absmax", torch.float32, (blocks,))
    layout = LAYOUTS[quant_type]
    config = {"format": layout.FORMAT, "block_size": block_size, "double_quant": double_quant,
              "orig_shape": shape, "orig_dtype": dtype_name}
    return layout.from_state_dict(layer, tensors, config)


def load_bnb_4bit(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Replace every bitsandbytes 4-bit weight by an NF4/FP4 ``QuantizedTensor``; keep other keys.

    Each ``X.weight`` with an ``X.weight.quant_state.bitsandbytes__nf4|fp4`` entry becomes one
    QuantizedTensor under ``X.weight``; its ``absmax``/``quant_map``/``nested_*``/``quant_state``
    entries are consumed. Errors name the offending tensor and say what was expected.
    """
    out: dict[str, Any] = {}
    consumed: set[str] = set()
    for key in state_dict:
        head, sep, quant_type = key.rpartition(QUANT_STATE)
        if not sep:
            continue
        if quant_type not in LAYOUTS:
            raise _error(key, f"unknown bitsandbytes quant type {quant_type!r}; expected one of {sorted(LAYOUTS)}")
        out[head] = _load_layer(state_dict, head, quant_type)
        consumed.update({head, key, *(head + s for s in _STATE_SUFFIXES)})
    for key, value in state_dict.items():
        if key not in consumed:
            out[key] = value
    return out


def to_bnb_4bit(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The reverse of ``load_bnb_4bit``: NF4/FP4 QuantizedTensors -> bitsandbytes' serialised keys.

    The output loads with ``bitsandbytes.functional.QuantState.from_dict`` (and so with
    transformers/diffusers); other values pass through unchanged.
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if not (isinstance(value, QuantizedTensor) and issubclass(value.layout_cls, Bnb4Layout)):
            out[key] = value
            continue
        params = value._params
        if params.transposed:
            raise QuantFormatError(f"'{key}': cannot write a transposed view in bitsandbytes format; save the weight")
        layout = value.layout_cls
        dtype_name = {v: k for k, v in FLOAT_DTYPES.items()}[params.orig_dtype]
        state: dict[str, Any] = {"quant_type": layout.QUANT_TYPE, "blocksize": params.block_size,
                                 "dtype": dtype_name, "shape": list(params.orig_shape)}
        out[key] = value._qdata
        out[f"{key}.absmax"] = params.scale
        out[f"{key}.quant_map"] = codec.codebook(layout.QUANT_TYPE).to(value._qdata.device, copy=True)
        if params.double_quant:
            out[f"{key}.nested_absmax"] = params.nested_absmax
            out[f"{key}.nested_quant_map"] = codec.DYNAMIC_MAP_SIGNED.to(value._qdata.device, copy=True)
            state.update(nested_blocksize=codec.NESTED_BLOCK_SIZE, nested_dtype="float32",
                         nested_offset=params.nested_offset.item())
        data = json.dumps(state).encode("utf-8")
        out[f"{key}{QUANT_STATE}{layout.QUANT_TYPE}"] = torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()
    return out
