"""Our ``custom_operations`` for ComfyUI: a ``comfy.ops`` class whose ``Linear`` holds our weights.

ComfyUI builds every model from an *operations* class (``ops.Linear``, ``ops.Conv2d``, ...).
Passing ours as ``model_options["custom_operations"]`` makes the model's linear layers accept
our quantized weights whatever the running ComfyUI's built-in quantization loader knows.

We subclass ComfyUI's own mixed-precision operations rather than writing a Linear from
scratch, so offloading, low-VRAM casting, dynamic VRAM, ``convert_weight``/``set_weight``
(the LoRA path: dequantize -> patch -> ``requantize_from_float``) and ``_apply`` (device moves
that keep the weight quantized) stay ComfyUI's code. Our ``Linear`` changes three things:

* loading: a ``<layer>.weight`` that already is one of our QuantizedTensors is adopted as is
  (the reader built it, and model detection saw its real, unpacked shape); a layer stored in
  our per-layer format (``<layer>.comfy_quant`` naming a format of ``FORMATS``) is rebuilt
  with ``load_layer``; a float weight is quantized here when the loader asked for
  quantize-on-load (on the GPU when there is one); anything else is ComfyUI's business;
* saving: ``state_dict`` writes our full per-layer entries (``layer_state_dict``), so
  ``ModelSave`` round-trips our formats with every option of their ``comfy_quant`` JSON;
* ``quant_format`` / ``layout_type`` are set so ComfyUI's forward takes its weight-only path.
  That path asks ``QUANT_ALGOS[quant_format]["quantize_input"]``; ``register_quant_algos``
  adds our formats there with ``False`` (our layouts quantize activations themselves, if at
  all), which is why it runs before any model is built.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable

import torch
from comfy_kitchen.tensor import QuantizedTensor

from ..layouts import FORMATS, LowBitLayout, QuantFormatError, layer_state_dict, load_layer
from ..layouts.comfy_quant import COMFY_QUANT, decode_config

logger = logging.getLogger(__name__)

# The nodes' short format names -> format table names (files carry the full ones).
UI_FORMATS = {"nf4": "bnb_nf4", "fp4": "bnb_fp4", "int8_lodewise": "int8_lodewise", "w4a4": "svdquant_w4a4"}


def loading_format(ui_name: str) -> str:
    """A node's format choice -> the format table's name ("none" stays "none")."""
    return UI_FORMATS.get(ui_name, ui_name)


# Quantize-on-load touches the linear layers of repeated blocks only (a ``.<index>.`` in the
# name: ``double_blocks.3.img_attn.qkv``, ``encoder.block.7.layer.0.SelfAttention.q``), the
# same rule bitsandbytes Flux checkpoints follow: embedders and final projections are small
# and the most sensitive, so they stay in the file's precision.
_IN_REPEATED_BLOCK = re.compile(r"\.\d+\.")


def is_lowbit(tensor) -> bool:
    return isinstance(tensor, QuantizedTensor) and issubclass(tensor.layout_cls, LowBitLayout)


def quantize_weight(weight: torch.Tensor, fmt: str, device: torch.device | None) -> QuantizedTensor:
    """Quantize one float weight to ``fmt`` on ``device`` (the GPU when present); the result
    goes back to the weight's own device, so loading still decides where the model lives."""
    layout = FORMATS[fmt]
    home = weight.device
    work = weight.to(device) if device is not None else weight
    qt = QuantizedTensor.from_float(work, layout.__name__)
    return qt.to(home) if qt.device != home else qt


def register_quant_algos() -> list[str]:
    """Add our formats to ComfyUI's ``QUANT_ALGOS`` table (weight-only: no input quantization).

    Needed by our own ``Linear`` (ComfyUI's forward looks the format up there) and by the
    stock loaders when ``stock_loaders.install`` is active. Returns the names added.
    """
    import comfy.quant_ops

    added = []
    for fmt, layout in FORMATS.items():
        if fmt in comfy.quant_ops.QUANT_ALGOS:
            continue
        comfy.quant_ops.QUANT_ALGOS[fmt] = {
            "storage_t": None,  # ours: every tensor is stored in the dtype its layout reads
            "parameters": set(),
            "comfy_tensor_layout": layout.__name__,
            "quantize_input": layout.QUANTIZE_INPUT,
        }
        added.append(fmt)
    if added:
        logger.info("comfy_lowbit: registered formats %s in ComfyUI's QUANT_ALGOS", ", ".join(added))
    return added


def adopt_weight(module, weight: QuantizedTensor) -> None:
    """Make ``weight`` the module's weight and tell ComfyUI's forward which format it is."""
    module.weight = torch.nn.Parameter(weight, requires_grad=False)
    module.quant_format = weight.layout_cls.FORMAT
    module.layout_type = weight._layout_cls


def pop_lowbit_layer(state_dict, prefix: str) -> QuantizedTensor | None:
    """Remove and return ``<prefix>weight`` as one of our QuantizedTensors, or None (not ours).

    Accepts a weight that already is a QuantizedTensor (a reader built it) or our per-layer
    entries (``weight``, ``weight_<suffix>``, ``comfy_quant``), which it removes.
    """
    layer = prefix[:-1]
    weight = state_dict.get(f"{prefix}weight")
    if is_lowbit(weight):
        state_dict.pop(f"{prefix}weight")
        state_dict.pop(f"{prefix}{COMFY_QUANT}", None)
        return weight
    conf = state_dict.get(f"{prefix}{COMFY_QUANT}")
    if conf is None or weight is None:
        return None
    if decode_config(conf, layer)["format"] not in FORMATS:
        return None  # ComfyUI's own format (fp8, nvfp4, ...): its loader reads it
    keys = [k for k in state_dict if k.startswith(f"{prefix}weight")] + [f"{prefix}{COMFY_QUANT}"]
    name = layer or "<root>"  # a module loaded on its own has the empty prefix
    qt = load_layer(name, {f"{name}.{key[len(prefix):]}": state_dict[key] for key in keys})
    for key in keys:
        state_dict.pop(key)
    return qt


def lowbit_entries(prefix: str, weight: QuantizedTensor) -> dict[str, torch.Tensor]:
    """Our per-layer file entries of a module's weight under ``prefix`` ("" allowed)."""
    name = prefix[:-1] or "<root>"
    return {prefix + key[len(name) + 1:]: value for key, value in layer_state_dict(name, weight).items()}


def lowbit_operations(
    quantize: str | None = None,
    quantize_device: torch.device | None = None,
    keep_float: Callable[[str], bool] | None = None,
):
    """A ``comfy.ops`` class for ``model_options["custom_operations"]``.

    ``quantize``: a format of ``FORMATS`` to quantize float linear weights to while loading
    (None: keep them). ``quantize_device``: where to run that quantization. ``keep_float``:
    called with a layer name, True keeps that layer in float (the loader passes the
    converter's family rules; default: layers outside repeated blocks, ``_IN_REPEATED_BLOCK``).
    """
    import comfy.ops

    if quantize is not None and quantize not in FORMATS:
        raise QuantFormatError(f"quantize_on_load: unknown format {quantize!r}; known: {sorted(FORMATS)}")
    register_quant_algos()
    keep = keep_float or (lambda layer: not _IN_REPEATED_BLOCK.search(f".{layer}."))
    # compute_dtype=None: float weights keep the file's dtype and are cast per forward, as
    # ComfyUI's plain operations do; our quantized weights carry their own dtype.
    base = comfy.ops.mixed_precision_ops({}, compute_dtype=None)

    class LowBitOps(base):
        class Linear(base.Linear):
            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs):
                layer = prefix[:-1]
                qt = pop_lowbit_layer(state_dict, prefix)
                plain = state_dict.get(f"{prefix}weight")
                if (qt is None and quantize is not None and isinstance(plain, torch.Tensor)
                        and not isinstance(plain, QuantizedTensor) and plain.dim() == 2
                        and plain.is_floating_point() and f"{prefix}{COMFY_QUANT}" not in state_dict
                        and not keep(layer)):
                    try:
                        qt = quantize_weight(plain, quantize, quantize_device)
                    except (QuantFormatError, ValueError) as exc:  # a shape the format can't hold
                        logger.info("comfy_lowbit: %s stays in %s (%s)", layer, plain.dtype, exc)
                    else:
                        state_dict.pop(f"{prefix}weight")
                if qt is None and plain is None:
                    return self._load_without_weight(state_dict, prefix, local_metadata, strict,
                                                     missing_keys, unexpected_keys, error_msgs)
                if qt is None:
                    return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                                         missing_keys, unexpected_keys, error_msgs)
                if tuple(qt.shape) != (self.out_features, self.in_features):
                    raise QuantFormatError(
                        f"layer '{layer}': weight is {tuple(qt.shape)}, the model expects "
                        f"{(self.out_features, self.in_features)}")
                adopt_weight(self, qt)
                torch.nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                                                     missing_keys, unexpected_keys, error_msgs)
                if f"{prefix}weight" in missing_keys:
                    missing_keys.remove(f"{prefix}weight")

            def _load_without_weight(self, state_dict, prefix, local_metadata, strict,
                                     missing_keys, unexpected_keys, error_msgs):
                """A layer the file has no weight for: a zero float weight, reported missing.

                ComfyUI's mixed-precision base leaves such a layer's weight None, so its first
                forward fails far from the cause; ComfyUI's plain operations (what its own
                loaders use for float files) keep an uninitialised weight and report the key
                missing, which its loaders tolerate where a file legitimately lacks it: SD1.5
                checkpoints carry no CLIP ``text_projection`` (only the unused pooled output
                needs it). We do as the plain operations do, with zeros instead of garbage.
                """
                logger.warning("comfy_lowbit: the file has no weight for layer '%s'; it computes zeros",
                               prefix[:-1] or "<root>")
                kw = self.factory_kwargs
                self.weight = torch.nn.Parameter(
                    torch.zeros(self.out_features, self.in_features, device=kw["device"],
                                dtype=kw["dtype"] or (self.bias.dtype if self.bias is not None else None)),
                    requires_grad=False)
                torch.nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                                                     missing_keys, unexpected_keys, error_msgs)

            def state_dict(self, *args, destination=None, prefix="", **kwargs):
                if not is_lowbit(getattr(self, "weight", None)):
                    return super().state_dict(*args, destination=destination, prefix=prefix, **kwargs)
                sd = destination if destination is not None else {}
                if self.bias is not None:
                    sd[f"{prefix}bias"] = self.bias
                sd.update(lowbit_entries(prefix, self.weight))
                return sd

    LowBitOps.__name__ = LowBitOps.__qualname__ = f"LowBitOps[{quantize or 'files'}]"
    return LowBitOps
