"""Teach ComfyUI's *stock* loaders (Load Diffusion Model, Load Checkpoint, ModelSave) our formats.

A file with ``<layer>.comfy_quant`` entries makes ComfyUI pick its mixed-precision operations,
whose ``Linear`` loads through ``comfy.ops._load_quantized_module``: a closed if/elif over the
formats ComfyUI ships, raising ``Unsupported quantization format`` for any other. Registering a
layout and a ``QUANT_ALGOS`` entry is therefore not enough. This module wraps that private
function (and its saving twin ``_quantized_weight_state_dict``): layers in one of our formats
are loaded/saved by us, everything else goes to ComfyUI's original.

ComfyUI detects a checkpoint's model from its tensors' names and shapes
(``comfy.model_detection.detect_unet_config``), and some families read the shape of a layer we
quantize (SD1.x/SDXL UNets: the cross-attention ``attn2.to_k`` gives the text width), where
our file holds packed bytes. That function is wrapped too: it sees our layers as the
QuantizedTensors they load as, which report their real, unpacked shape.

These are module globals looked up at each call (the first two private), so the wrap is
feature-detected (skipped with a log line if one is missing or has changed shape) and can
be switched off with the environment variable ``COMFY_LOWBIT_STOCK_LOADERS=0``. Our own
loader nodes do not depend on it.
"""
from __future__ import annotations

import inspect
import logging
import os

from ..layouts import QuantFormatError
from ..layouts.comfy_quant import COMFY_QUANT
from .ops import adopt_weight, is_lowbit, lowbit_entries, pop_lowbit_layer, register_quant_algos

logger = logging.getLogger(__name__)

ENV_SWITCH = "COMFY_LOWBIT_STOCK_LOADERS"
_LOAD_PARAMS = ["module", "super_load", "state_dict", "prefix", "local_metadata", "strict",
                "missing_keys", "unexpected_keys", "error_msgs"]


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def install() -> bool:
    """Wrap ComfyUI's quantized-layer loader/saver once. Returns True when active."""
    if not enabled():
        logger.info("comfy_lowbit: stock loaders left alone (%s=0)", ENV_SWITCH)
        return False
    import comfy.ops

    load = getattr(comfy.ops, "_load_quantized_module", None)
    save = getattr(comfy.ops, "_quantized_weight_state_dict", None)
    if getattr(load, "_comfy_lowbit", False):
        return True
    if load is None or save is None or list(inspect.signature(load).parameters)[:9] != _LOAD_PARAMS:
        logger.warning("comfy_lowbit: this ComfyUI's quantized loader is not the one we know; stock "
                       "loaders will not read comfy_lowbit files (our LowBit loader nodes still do)")
        return False
    register_quant_algos()

    def load_quantized_module(module, super_load, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs, *args, **kwargs):
        qt = pop_lowbit_layer(state_dict, prefix)
        if qt is None:
            return load(module, super_load, state_dict, prefix, local_metadata, strict,
                        missing_keys, unexpected_keys, error_msgs, *args, **kwargs)
        adopt_weight(module, qt.to(device=module.factory_kwargs.get("device")))
        super_load(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if f"{prefix}weight" in missing_keys:
            missing_keys.remove(f"{prefix}weight")

    def quantized_weight_state_dict(module, sd, prefix, *args, **kwargs):
        weight = getattr(module, "weight", None)
        if not is_lowbit(weight):
            return save(module, sd, prefix, *args, **kwargs)
        if getattr(module, "bias", None) is not None:
            sd[f"{prefix}bias"] = module.bias
        sd.update(lowbit_entries(prefix, weight))
        return sd

    load_quantized_module._comfy_lowbit = True
    comfy.ops._load_quantized_module = load_quantized_module
    comfy.ops._quantized_weight_state_dict = quantized_weight_state_dict
    _wrap_model_detection()
    logger.info("comfy_lowbit: stock loaders read and save comfy_lowbit formats (%s=0 to turn off)", ENV_SWITCH)
    return True


def with_real_shapes(state_dict):
    """``state_dict``, or a shallow copy of it in which each of our per-layer entries is one
    QuantizedTensor under ``<layer>.weight`` (its real shape); the input is left untouched."""
    quant_keys = [k for k in state_dict if k.endswith(COMFY_QUANT)]
    if not quant_keys:
        return state_dict
    view = dict(state_dict)
    for key in quant_keys:
        prefix = key[: -len(COMFY_QUANT)]
        try:
            qt = pop_lowbit_layer(view, prefix)
        except QuantFormatError:
            continue  # loading the layer reports it, with the layer's name
        if qt is not None:
            view[f"{prefix}weight"] = qt
    return view


def _wrap_model_detection() -> None:
    import comfy.model_detection

    detect = getattr(comfy.model_detection, "detect_unet_config", None)
    if detect is None or getattr(detect, "_comfy_lowbit", False):
        if detect is None:
            logger.warning("comfy_lowbit: this ComfyUI has no model_detection.detect_unet_config; stock "
                           "loaders may not detect models whose detection reads a quantized layer's shape")
        return

    def detect_unet_config(state_dict, key_prefix, *args, **kwargs):
        return detect(with_real_shapes(state_dict), key_prefix, *args, **kwargs)

    detect_unet_config._comfy_lowbit = True
    comfy.model_detection.detect_unet_config = detect_unet_config
