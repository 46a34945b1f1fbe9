"""ComfyUI's per-layer quantization convention: ``<layer>.comfy_quant`` plus weight tensors.

A quantized layer ``L`` is stored as ``L.weight`` (the packed data), ``L.weight_<suffix>`` for
each extra tensor the layout lists in ``state_dict_tensors``, and ``L.comfy_quant``, a 1-D
uint8 tensor holding UTF-8 JSON with at least ``{"format": ...}``. This module turns a
``QuantizedTensor`` into those entries and back, picking the layout from the format table.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from comfy_kitchen.tensor import QuantizedTensor

from .base import LowBitLayout, format_error

COMFY_QUANT = "comfy_quant"


def encode_config(config: Mapping[str, Any]) -> torch.Tensor:
    """JSON config -> the uint8 tensor stored as ``<layer>.comfy_quant``."""
    data = json.dumps(dict(config), sort_keys=True).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def decode_json_tensor(tensor: Any) -> Any:
    """A 1-D uint8 tensor of UTF-8 JSON -> the JSON value; ``ValueError`` saying what is wrong.

    Both ComfyUI's ``comfy_quant`` and bitsandbytes' ``quant_state`` entries are stored so.
    """
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.dim() != 1:
        got = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"must be a 1-D uint8 tensor of UTF-8 JSON, got {got}")
    try:
        return json.loads(bytes(tensor.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"is not valid UTF-8 JSON ({exc})") from None


def decode_config(tensor: torch.Tensor, layer: str | None = None) -> dict[str, Any]:
    """``<layer>.comfy_quant`` tensor -> JSON dict, with errors that name the layer."""
    try:
        config = decode_json_tensor(tensor)
    except ValueError as exc:
        raise format_error(layer, f"{COMFY_QUANT} {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("format"), str):
        raise format_error(layer, f'{COMFY_QUANT} must be a JSON object with a string "format", got {config!r}')
    return config


def layout_for_format(fmt: str, layer: str | None = None) -> type[LowBitLayout]:
    from . import FORMATS  # the table lives in the package; imported late to avoid a cycle

    try:
        return FORMATS[fmt]
    except KeyError:
        raise format_error(layer, f"unknown format {fmt!r}; known: {sorted(FORMATS)}") from None


def layer_state_dict(layer: str, weight: QuantizedTensor) -> dict[str, torch.Tensor]:
    """All file entries of one quantized layer (without its bias)."""
    layout = weight.layout_cls
    if not issubclass(layout, LowBitLayout):
        raise format_error(layer, f"layout {weight._layout_cls} is not a comfy_lowbit layout")
    if getattr(weight._params, "transposed", False):
        raise format_error(layer, "cannot serialise a transposed weight view; save the weight itself")
    entries = weight.state_dict(prefix=f"{layer}.weight")
    entries[f"{layer}.{COMFY_QUANT}"] = encode_config(layout.comfy_quant_config(weight._params))
    return entries


def quantized_layers(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of the layers that carry a ``comfy_quant`` entry."""
    tail = "." + COMFY_QUANT
    return [key[: -len(tail)] for key in state_dict if key.endswith(tail)]


def weight_tensors(layer: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{suffix: tensor}`` for ``<layer>.weight<suffix>`` entries ("" is the weight itself)."""
    prefix = f"{layer}.weight"
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def load_layer(layer: str, state_dict: Mapping[str, torch.Tensor]) -> QuantizedTensor:
    """Rebuild ``<layer>.weight`` as a QuantizedTensor from its file entries."""
    key = f"{layer}.{COMFY_QUANT}"
    if key not in state_dict:
        raise format_error(layer, f"missing {key}")
    config = decode_config(state_dict[key], layer)
    layout = layout_for_format(config["format"], layer)
    tensors = weight_tensors(layer, state_dict)
    if "" not in tensors:
        raise format_error(layer, f"missing {layer}.weight (format {config['format']})")
    return layout.from_state_dict(layer, tensors, config)
