"""What every comfy_lowbit layout shares: the linear dispatch and the per-layer file contract.

A ``LowBitLayout`` is a comfy-kitchen ``QuantizedLayout`` for a *linear weight* (N, K) that
adds three things comfy-kitchen leaves to each layout:

* ``FORMAT``: the ``comfy_quant`` format name written to and read from files;
* ``linear(x, weight, bias)``: the forward, which picks a kernel by device, dtype and shape
  and falls back to the reference (``dequantize`` + ``F.linear``) everywhere else;
* ``comfy_quant_config`` / ``from_state_dict``: the per-layer serialisation beside
  comfy-kitchen's ``state_dict_tensors`` (key suffixes relative to ``<layer>.weight``).

The aten handlers are registered once, on ``LowBitLayout``; comfy-kitchen's dispatch walks
the MRO, so every subclass gets them. ``F.linear`` reaches ``aten.linear`` under
``inference_mode`` (ComfyUI's executor) and ``aten.t`` + ``aten.mm``/``aten.addmm`` under
plain ``no_grad``: ``t`` only flips a ``transposed`` flag, and ``mm``/``addmm`` with a
transposed weight are the same linear. Every ``Params`` must therefore end with a field
``transposed: bool = False``.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from comfy_kitchen.tensor import QuantizedLayout, QuantizedTensor, dequantize_args, register_layout_op

logger = logging.getLogger(__name__)

aten = torch.ops.aten


class QuantFormatError(ValueError):
    """A quantized tensor, file entry or argument is not what its format requires.

    Messages name the layer (or tensor) and say what was expected and what was found.
    """


def format_error(layer: str | None, message: str) -> QuantFormatError:
    where = f"layer '{layer}'" if layer else "quantized weight"
    return QuantFormatError(f"{where}: {message}")


class LowBitLayout(QuantizedLayout):
    """Base of our layouts; see the module docstring for the contract."""

    FORMAT: ClassVar[str]
    # ComfyUI quantizes the activation with the weight's layout unless QUANT_ALGOS says
    # "quantize_input": False; weight-only and self-quantizing layouts must say False.
    QUANTIZE_INPUT: ClassVar[bool] = False

    @classmethod
    def linear(cls, x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias`` for a non-transposed weight. Subclasses add kernels in front."""
        return reference_linear(x, weight, bias)

    @classmethod
    def comfy_quant_config(cls, params: Any) -> dict[str, Any]:
        """The ``<layer>.comfy_quant`` JSON for these params (at least ``format``)."""
        raise NotImplementedError

    @classmethod
    def from_state_dict(
        cls, layer: str, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]
    ) -> QuantizedTensor:
        """Rebuild a weight from ``state_dict_tensors``-style suffixes and its JSON config."""
        raise NotImplementedError

    @classmethod
    def get_plain_tensors(cls, qtensor: QuantizedTensor) -> tuple[torch.Tensor, ...]:
        params = qtensor._params
        return (qtensor._qdata, *(getattr(params, name) for name in params._tensor_fields()))


def reference_linear(x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The plain-PyTorch path every kernel is tested against: dequantize, then ``F.linear``."""
    w = weight.dequantize().to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def _plain(t):
    return t.dequantize() if isinstance(t, QuantizedTensor) else t


def _is_lowbit(t) -> bool:
    return isinstance(t, QuantizedTensor) and issubclass(t.layout_cls, LowBitLayout)


def _untransposed(w: QuantizedTensor) -> QuantizedTensor:
    params = w._params
    shape = params.orig_shape
    return QuantizedTensor(
        w._qdata, w._layout_cls,
        dataclasses.replace(params, orig_shape=(shape[1], shape[0]), transposed=False),
    )


def _run_linear(x, w: QuantizedTensor, bias):
    return w.layout_cls.linear(_plain(x), w, _plain(bias))


@register_layout_op(aten.t.default, LowBitLayout)
def _handle_t(qt, args, kwargs):
    w = args[0]
    params = w._params
    shape = params.orig_shape
    flipped = dataclasses.replace(params, orig_shape=(shape[1], shape[0]), transposed=not params.transposed)
    return QuantizedTensor(w._qdata, w._layout_cls, flipped)


@register_layout_op(aten.linear.default, LowBitLayout)
def _handle_linear(qt, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not _is_lowbit(w) or w._params.transposed:
        logger.debug("linear with an unexpected operand order: reference path")
        return F.linear(*dequantize_args((x, w, bias)))
    return _run_linear(x, w, bias)


@register_layout_op(aten.mm.default, LowBitLayout)
def _handle_mm(qt, args, kwargs):
    a, b = args[0], args[1]
    if _is_lowbit(b) and b._params.transposed and not isinstance(a, QuantizedTensor):
        return _run_linear(a, _untransposed(b), None)
    logger.debug("mm with a quantized left operand or untransposed weight: reference path")
    return torch.mm(*dequantize_args((a, b)))


@register_layout_op(aten.addmm.default, LowBitLayout)
def _handle_addmm(qt, args, kwargs):
    bias, a, b = args[0], args[1], args[2]
    plain_scaling = kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1
    if plain_scaling and _is_lowbit(b) and b._params.transposed and not isinstance(a, QuantizedTensor):
        if bias.dim() == 1:
            return _run_linear(a, _untransposed(b), bias)
        return _run_linear(a, _untransposed(b), None) + bias
    logger.debug("addmm outside the linear pattern: reference path")
    return torch.addmm(*dequantize_args((bias, a, b)), **kwargs)


def _handle_same_shape_view(op):
    """ComfyUI reshapes weights to the shape they already have; keep those quantized."""

    def handler(qt, args, kwargs):
        w, shape = args[0], args[1]
        if _is_lowbit(w) and w.dim() == 2 and tuple(shape) in (tuple(w.shape), (-1, w.shape[-1])):
            # A view op may not return its input itself: hand back a new wrapper of the same data.
            return QuantizedTensor(w._qdata, w._layout_cls, w._params)
        logger.debug("%s to a new shape: dequantizing", op)
        return op(*dequantize_args(args), **kwargs)

    return handler


for _op in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
    register_layout_op(_op, LowBitLayout)(_handle_same_shape_view(_op))
