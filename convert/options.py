"""Format names and quantization options as the user spells them -> the layout's own keywords.

The CLI speaks one vocabulary (``--format nf4 --block-size 64 --double-quant --rank 32``);
each layout's ``quantize`` names its keywords as its format's literature does. This module
maps one to the other by looking at ``quantize``'s signature, so a new layout needs no entry
here, and an option the chosen format cannot take is an error, not silently ignored.
"""
from __future__ import annotations

import inspect

from ..layouts import FORMATS, LowBitLayout

# Short names accepted by --format, besides every format name in the table.
ALIASES = {"nf4": "bnb_nf4", "fp4": "bnb_fp4", "int8": "int8_lodewise", "w4a4": "svdquant_w4a4"}

# Our option -> the keyword names layouts may use for it, in order of preference.
KEYWORDS = {
    "block_size": ("block_size", "blocksize", "group_size"),
    "double_quant": ("double_quant", "compress_statistics", "nested"),
    "rank": ("rank",),
}


def resolve_format(name: str) -> type[LowBitLayout]:
    fmt = ALIASES.get(name, name)
    if fmt not in FORMATS:
        known = sorted({*FORMATS, *(a for a, f in ALIASES.items() if f in FORMATS)})
        raise ValueError(f"format {name!r} is not available in this build; available: {', '.join(known) or 'none'}")
    return FORMATS[fmt]


def layout_kwargs(layout: type[LowBitLayout], **options) -> dict:
    """``quantize`` keywords for the options that are not None, named as ``layout`` names them."""
    accepted = inspect.signature(layout.quantize).parameters
    kwargs = {}
    for option, value in options.items():
        if value is None or value is False:
            continue
        name = next((n for n in KEYWORDS.get(option, (option,)) if n in accepted), None)
        if name is None:
            offered = [f"--{opt.replace('_', '-')}" for opt, names in KEYWORDS.items() if any(n in accepted for n in names)]
            raise ValueError(f"format {layout.FORMAT} has no {option.replace('_', ' ')} option "
                             f"(it takes: {', '.join(offered) or 'no options'})")
        kwargs[name] = value
    return kwargs


def takes_layer_name(layout: type[LowBitLayout]) -> bool:
    """Whether ``quantize`` accepts ``layer=`` (used to name the layer in its errors)."""
    return "layer" in inspect.signature(layout.quantize).parameters
