"""Recognise each layer's storage format in a checkpoint and normalise it to our layouts.

Formats recognised, per layer ``L`` (a linear layer whose weight is ``L.weight``):

* plain: ``L.weight`` is a dense float tensor.
* ours: ``L.comfy_quant`` (UTF-8 JSON, ``{"format": <name in layouts.FORMATS>, ...}``),
  ``L.weight`` and ``L.weight_<suffix>`` as the layout's ``state_dict_tensors`` lists them.
* bitsandbytes / diffusers / Forge 4-bit: ``L.weight`` (uint8, two codes per byte, the first
  code in the HIGH nibble), ``L.weight.absmax``, ``L.weight.quant_map``, with double
  quantization ``L.weight.nested_absmax`` / ``L.weight.nested_quant_map``, and
  ``L.weight.quant_state.bitsandbytes__nf4|fp4`` (JSON: quant_type, blocksize, dtype, shape,
  nested_*). Read by ``convert.bnb.load_bnb_4bit`` (the NF4 layout's own loader).
* convert_to_quant 0.4 series 4-bit: ``L.comfy_quant`` with format ``bnb_nf4``/``bnb_fp4``,
  ``group_size`` at the JSON root or under ``"params"`` and, as that tool writes them,
  ``quant_type``, ``dtype``, ``shape`` and the codebook as a ``quant_map`` list; ``L.weight``
  uint8, flat, the first code in the LOW nibble; ``L.absmax`` (not ``L.weight.absmax``)
  float32 per block (the last block may be short); optionally ``L.quant_map``. Normalised by swapping the nibbles and handing the layer to the
  bitsandbytes loader: the block math is the same.
* convert_to_quant 0.4 series int8: ``L.comfy_quant`` with format ``int8_lodewise`` or
  ``int8_blockwise``, ``L.weight`` int8 (N, K), ``L.weight_scale`` float, (N, K//bs) for
  lodewise, (N//bs, K//bs) for blockwise, optionally ``L.input_scale``. ``int8_lodewise``
  files load directly when our table has that format; blockwise weights are expanded to
  their values and re-encoded (the only lossy normalisation; the error is tiny but not zero).

``read_checkpoint`` and ``normalise_state_dict`` return a state dict in which every
quantized linear weight is a ``QuantizedTensor`` of one of our layouts under ``L.weight``.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from comfy_kitchen.tensor import QuantizedTensor

from ..layouts import FORMATS, QuantFormatError, decode_config, load_layer
from ..layouts.comfy_quant import COMFY_QUANT

logger = logging.getLogger(__name__)

BNB_STATE = ".weight.quant_state.bitsandbytes__"
C2Q_4BIT = ("bnb_nf4", "bnb_fp4")
C2Q_INT8 = ("int8_lodewise", "int8_blockwise")
FOREIGN = "comfy_quant, not ours"  # e.g. ComfyUI's float8_e4m3fn layers: carried over untouched
FLOAT8 = "float8"  # float8 weights (ComfyUI "fp8 scaled" files): already quantized, carried over untouched
FLOAT8_SCALES = (".scale_weight", ".scale_input", ".input_scale")
FLOAT8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                      if hasattr(torch, name))
# Extra per-layer keys convert_to_quant writes beside L.weight (not under L.weight.*).
C2Q_SUFFIXES = (".absmax", ".quant_map", ".input_scale", ".nested_absmax", ".nested_quant_map")


@dataclass(frozen=True)
class QuantizedLayer:
    """One quantized layer found in a checkpoint: where, what, and which keys make it up."""

    layer: str
    source: str  # "ours", "bitsandbytes", "convert_to_quant", FOREIGN or FLOAT8
    format: str  # e.g. "bnb_nf4"
    keys: tuple[str, ...]
    config: dict | None = None

    @property
    def describe(self) -> str:
        return self.format if self.source == "ours" else f"{self.format} ({self.source})"


def _weight_entries(keys: Iterable[str]) -> dict[str, list[str]]:
    """layer -> its ``L.weight``, ``L.weight.*`` and ``L.weight_*`` keys, in one pass."""
    out: dict[str, list[str]] = {}
    for key in keys:
        cut = key.rfind(".weight")
        while cut >= 0:
            rest = key[cut + len(".weight"):]
            if rest == "" or rest[0] in "._":
                out.setdefault(key[:cut], []).append(key)
                break
            cut = key.rfind(".weight", 0, cut)
    return out


def _layer_keys(layer: str, by_layer: Mapping[str, list[str]], key_set: set[str],
                extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    wanted = [f"{layer}{suffix}" for suffix in extra if f"{layer}{suffix}" in key_set]
    return tuple(sorted({*by_layer.get(layer, ()), *wanted}))


def group_size(config: Mapping, layer: str) -> int:
    """convert_to_quant puts ``group_size`` at the root or under ``params``."""
    params = config.get("params") if isinstance(config.get("params"), Mapping) else {}
    size = config.get("group_size", params.get("group_size"))
    if not isinstance(size, int) or size <= 0:
        raise QuantFormatError(f"layer '{layer}': comfy_quant {config!r} has no positive integer group_size")
    return size


def find_quantized_layers(keys: Iterable[str], read: Callable[[str], torch.Tensor],
                          dtype: Callable[[str], torch.dtype] | None = None) -> dict[str, QuantizedLayer]:
    """Every quantized layer in a checkpoint with these ``keys``.

    ``read(key)`` fetches a tensor; only the small ``comfy_quant`` entries are read.
    ``dtype(key)``, when given, lets float8 weights without ``comfy_quant`` be recognised too.
    """
    keys = list(keys)
    key_set = set(keys)
    by_layer = _weight_entries(keys)
    found: dict[str, QuantizedLayer] = {}
    for key in keys:
        if key.endswith("." + COMFY_QUANT):
            layer = key[: -len(COMFY_QUANT) - 1]
            config = decode_config(read(key), layer)
            fmt = config["format"]
            if f"{layer}.absmax" in key_set and fmt.startswith("bnb_"):  # bnb_af4 too: refused when read
                source = "convert_to_quant"
            elif fmt == "int8_blockwise" or (fmt == "int8_lodewise" and fmt not in FORMATS):
                source = "convert_to_quant"
            elif fmt in FORMATS:
                source = "ours"
            else:
                source = FOREIGN
            found[layer] = QuantizedLayer(layer, source, fmt, (key, *_layer_keys(layer, by_layer, key_set, C2Q_SUFFIXES)), config)
        elif BNB_STATE in key:
            layer, quant_type = key.split(BNB_STATE)
            if layer not in found:
                found[layer] = QuantizedLayer(layer, "bitsandbytes", f"bnb_{quant_type}", _layer_keys(layer, by_layer, key_set))
    if dtype is not None:
        for key in keys:
            if key.endswith(".weight") and key[: -len(".weight")] not in found and dtype(key) in FLOAT8_DTYPES:
                layer = key[: -len(".weight")]
                group = _layer_keys(layer, by_layer, key_set, FLOAT8_SCALES)
                found[layer] = QuantizedLayer(layer, FLOAT8, str(dtype(key)).removeprefix("torch."), group)
    return found


# ---- normalising one layer ------------------------------------------------------------------
def _bnb_loader():
    try:
        from .bnb import load_bnb_4bit
    except ImportError:
        raise QuantFormatError(
            "bitsandbytes-style 4-bit layers need comfy_lowbit.convert.bnb (the NF4 layout), "
            "which this build lacks") from None
    return load_bnb_4bit


def _bnb_layer(layer: str, tensors: Mapping[str, torch.Tensor]) -> QuantizedTensor:
    result = _bnb_loader()(dict(tensors))
    weight = result.get(f"{layer}.weight")
    if not isinstance(weight, QuantizedTensor):
        raise QuantFormatError(f"layer '{layer}': the bitsandbytes loader did not return a quantized weight")
    return weight


def codebook(fmt: str) -> torch.Tensor:
    """The 16 code values of ``bnb_nf4``/``bnb_fp4``, from the NF4 layout's codec."""
    from ..kernels import bnb4_codec

    return bnb4_codec.codebook(fmt.removeprefix("bnb_")).float()


def _c2q_4bit_as_bnb(item: QuantizedLayer, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """convert_to_quant 4-bit entries -> the bitsandbytes entries of the same layer."""
    layer, config = item.layer, item.config or {}
    packed = tensors[f"{layer}.weight"]
    absmax = tensors[f"{layer}.absmax"]
    if packed.dtype != torch.uint8:
        raise QuantFormatError(f"layer '{layer}': {item.format} codes must be uint8, got {packed.dtype}")
    if not absmax.dtype.is_floating_point:
        raise QuantFormatError(f"layer '{layer}': {layer}.absmax must be float (double-quantized "
                               f"convert_to_quant files are not supported), got {absmax.dtype}")
    params = config.get("params") if isinstance(config.get("params"), Mapping) else {}
    shape = config.get("shape") or config.get("orig_shape") or params.get("shape") or params.get("orig_shape")
    if shape is None and packed.dim() == 2 and packed.shape[1] > 1:
        shape = [packed.shape[0], packed.shape[1] * 2]
    if shape is None:
        raise QuantFormatError(f"layer '{layer}': cannot tell the weight's shape: {layer}.weight is "
                               f"{tuple(packed.shape)} and comfy_quant has no shape")
    blocksize = group_size(config, layer)
    numel = int(torch.tensor(shape).prod())
    if packed.numel() * 2 < numel or absmax.numel() != -(-numel // blocksize):
        raise QuantFormatError(
            f"layer '{layer}': shape {tuple(shape)} with group_size {blocksize} needs {-(-numel // 2)} code bytes "
            f"and {-(-numel // blocksize)} absmax values, got {packed.numel()} and {absmax.numel()}")
    swapped = ((packed & 0x0F) << 4) | (packed >> 4)  # low-nibble-first -> high-nibble-first
    dtype = str(config.get("dtype") or config.get("orig_dtype") or "bfloat16").removeprefix("torch.")
    quant_type = item.format.removeprefix("bnb_")
    state = {"quant_type": quant_type, "blocksize": blocksize, "dtype": dtype, "shape": list(shape)}
    quant_map = tensors.get(f"{layer}.quant_map")
    if quant_map is None and isinstance(config.get("quant_map"), list):  # the codebook as a JSON list
        quant_map = torch.tensor(config["quant_map"], dtype=torch.float32)
    return {
        f"{layer}.weight": swapped.reshape(-1, 1),
        f"{layer}.weight.absmax": absmax.float().reshape(-1),
        f"{layer}.weight.quant_map": (quant_map if quant_map is not None else codebook(item.format)).float(),
        f"{layer}{BNB_STATE}{quant_type}": torch.frombuffer(bytearray(json.dumps(state).encode()), dtype=torch.uint8),
    }


def _c2q_int8(item: QuantizedLayer, tensors: Mapping[str, torch.Tensor]) -> QuantizedTensor:
    layer = item.layer
    q, scale = tensors.get(f"{layer}.weight"), tensors.get(f"{layer}.weight_scale")
    if q is None or scale is None or q.dtype != torch.int8 or q.dim() != 2:
        raise QuantFormatError(f"layer '{layer}': {item.format} needs an int8 (N, K) weight and weight_scale")
    n, k = q.shape
    bs = group_size(item.config or {}, layer)
    if item.format == "int8_lodewise":
        expected = (n, k // bs)
        expand = scale.float().repeat_interleave(bs, dim=1)
    else:
        expected = (n // bs, k // bs)
        expand = scale.float().repeat_interleave(bs, dim=0).repeat_interleave(bs, dim=1)
    if tuple(scale.shape) != expected or k % bs or (item.format == "int8_blockwise" and n % bs):
        raise QuantFormatError(f"layer '{layer}': {item.format} with group_size {bs} and weight {(n, k)} "
                               f"needs weight_scale {expected}, got {tuple(scale.shape)}")
    if "int8_lodewise" not in FORMATS:
        raise QuantFormatError(f"layer '{layer}': {item.format} needs the int8_lodewise layout, "
                               "which this build lacks")
    values = (q.float() * expand).to(torch.bfloat16)
    layout = FORMATS["int8_lodewise"]
    return QuantizedTensor.from_float(values, layout.__name__, **_block_kwargs(layout, bs))


def _block_kwargs(layout, block_size: int) -> dict:
    from .options import layout_kwargs

    return layout_kwargs(layout, block_size=block_size)


def to_quantized(item: QuantizedLayer, tensors: Mapping[str, torch.Tensor]) -> QuantizedTensor:
    """One recognised layer's entries -> a QuantizedTensor of one of our layouts."""
    if item.source == "ours":
        return load_layer(item.layer, tensors)
    if item.source == "bitsandbytes":
        return _bnb_layer(item.layer, tensors)
    if item.source == "convert_to_quant" and item.format in C2Q_4BIT:
        return _bnb_layer(item.layer, _c2q_4bit_as_bnb(item, tensors))
    if item.source == "convert_to_quant" and item.format in C2Q_INT8:
        if item.format == "int8_lodewise" and "int8_lodewise" in FORMATS:
            return load_layer(item.layer, tensors)
        return _c2q_int8(item, tensors)
    raise QuantFormatError(f"layer '{item.layer}': comfy_quant format {item.format!r} is not one we read; "
                           f"known: {sorted(set(FORMATS) | set(C2Q_4BIT) | set(C2Q_INT8))}")


# ---- whole state dicts ----------------------------------------------------------------------
def normalise_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every recognised quantized layer as a QuantizedTensor at ``L.weight``.

    The layer's other file entries (scales, ``comfy_quant``, quant state) are consumed; every
    other key (biases, norms, plain weights) is returned unchanged, and so are layers in
    ``comfy_quant`` formats that are not ours (ComfyUI's own float8 layers: ComfyUI reads them).
    A recognised layer that is malformed raises, naming the layer.
    """
    found = find_quantized_layers(state_dict.keys(), state_dict.__getitem__)
    out = dict(state_dict)
    for item in found.values():
        if item.source == FOREIGN:
            logger.debug("layer %s: comfy_quant format %s is not ours; left as it is", item.layer, item.format)
            continue
        tensors = {key: state_dict[key] for key in item.keys}
        weight = to_quantized(item, tensors)
        for key in item.keys:
            out.pop(key, None)
        out[f"{item.layer}.weight"] = weight
    return out


def read_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors checkpoint of any recognised format into a normalised state dict."""
    from .safetensors_file import SafetensorsFile

    with SafetensorsFile(path) as f:
        state_dict = {key: f.read(key, device) for key in f.keys()}
    try:
        return normalise_state_dict(state_dict)
    except QuantFormatError as exc:
        raise QuantFormatError(f"{path}: {exc}") from None
