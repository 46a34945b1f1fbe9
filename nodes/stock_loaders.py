"""Teach ComfyUI's *stock* loaders (Load Diffusion Model, Load Checkpoint, ModelSave) our formats.

A file with ``<layer>.comfy_quant`` entries makes ComfyUI pick its mixed-precision operations,
whose ``Linear`` loads through ``comfy.ops._load_quantized_module``: a closed if/elif over the
formats ComfyUI ships, raising ``Unsupported quantization format`` for any other. Registering a
layout and a ``QUANT_ALGOS`` entry is therefore not enough. This module wraps that private
function (and its saving twin ``_quantized_weight_state_dict``): layers in one of our formats
are loaded/saved by us, everything else goes to ComfyUI's original.

Both are private functions looked up as module globals at each call, so the wrap is
feature-detected (skipped with a log line if either is missing or has changed shape) and can
be switched off with the environment variable ``COMFY_LOWBIT_STOCK_LOADERS=0``. Our own
loader nodes do not depend on it.
"""
from __future__ import annotations

import inspect
import logging
import os

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
    logger.info("comfy_lowbit: stock loaders read and save comfy_lowbit formats (%s=0 to turn off)", ENV_SWITCH)
    return True
