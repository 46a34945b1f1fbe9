"""The format table: one comfy_quant format name -> one layout class, registered with comfy-kitchen.

Importing this package registers every layout with comfy-kitchen's registry under its class
name, which is how ``QuantizedTensor.from_float(w, "NF4Layout")`` finds it. The converter,
the loader and the demo all read ``FORMATS``; a new format is one import and one entry here.
"""
from __future__ import annotations

from comfy_kitchen.tensor import get_layout_class, register_layout_class

from .base import LowBitLayout, QuantFormatError, reference_linear
from .bnb4 import FP4Layout, NF4Layout
from .comfy_quant import decode_config, encode_config, layer_state_dict, load_layer, quantized_layers
from .int8_lodewise import BlockWiseINT8LayoutLodeWise
from .w4a4 import W4A4Layout

LAYOUT_CLASSES: tuple[type[LowBitLayout], ...] = (
    NF4Layout,
    FP4Layout,
    BlockWiseINT8LayoutLodeWise,
    W4A4Layout,
)

FORMATS: dict[str, type[LowBitLayout]] = {cls.FORMAT: cls for cls in LAYOUT_CLASSES}

for _cls in LAYOUT_CLASSES:
    # A second copy of this package in one process (pytest imports the repository root under
    # its directory name; a pip install beside custom_nodes/) must not replace the classes the
    # first copy registered, or that copy's tensors stop matching its own isinstance checks.
    try:
        get_layout_class(_cls.__name__)
    except KeyError:
        register_layout_class(_cls.__name__, _cls)

__all__ = [
    "FORMATS",
    "LAYOUT_CLASSES",
    "LowBitLayout",
    "QuantFormatError",
    "decode_config",
    "encode_config",
    "layer_state_dict",
    "load_layer",
    "quantized_layers",
    "reference_linear",
]
