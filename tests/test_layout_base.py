"""The shared linear dispatch of layouts/base.py, on a minimal int8 per-tensor layout.

Independent of any real format: checks that every route by which ``F.linear`` and
``nn.Linear`` reach a quantized weight ends in the layout's ``linear``, and that views
ComfyUI takes of a weight keep it quantized.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from comfy_kitchen.tensor import BaseLayoutParams, QuantizedTensor, register_layout_class

from comfy_lowbit.layouts.base import LowBitLayout

from support import relative_error


class ToyInt8Layout(LowBitLayout):
    FORMAT = "toy_int8"
    calls: list = []

    @dataclass(frozen=True)
    class Params(BaseLayoutParams):
        transposed: bool = False

    @classmethod
    def quantize(cls, t, **kwargs):
        scale = t.abs().amax().float() / 127
        q = torch.round(t.float() / scale).to(torch.int8)
        return q, cls.Params(scale=scale, orig_dtype=t.dtype, orig_shape=tuple(t.shape))

    @classmethod
    def dequantize(cls, q, params):
        return (q.float() * params.scale).to(params.orig_dtype)

    @classmethod
    def state_dict_tensors(cls, q, params):
        return {"": q, "_scale": params.scale}

    @classmethod
    def linear(cls, x, weight, bias):
        cls.calls.append(tuple(x.shape))
        return super().linear(x, weight, bias)


register_layout_class("ToyInt8Layout", ToyInt8Layout)


@pytest.fixture
def weight():
    ToyInt8Layout.calls.clear()
    return QuantizedTensor.from_float(torch.randn(8, 16), "ToyInt8Layout")


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad, torch.enable_grad])
@pytest.mark.parametrize("with_bias", [True, False])
def test_every_linear_route_reaches_the_layout(weight, mode, with_bias):
    x, bias = torch.randn(2, 3, 16), (torch.randn(8) if with_bias else None)
    with mode():
        out = F.linear(x, weight, bias)
    assert ToyInt8Layout.calls, "the layout's linear was bypassed"
    assert type(out) is torch.Tensor and out.shape == (2, 3, 8)
    assert relative_error(out, F.linear(x, weight.dequantize(), bias)) < 1e-6


def test_nn_linear_holding_a_quantized_weight(weight):
    layer = torch.nn.Linear(16, 8)
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    with torch.inference_mode():
        out = layer(torch.randn(4, 16))
    assert out.shape == (4, 8) and ToyInt8Layout.calls
    layer.to(torch.float16)
    assert isinstance(layer.weight.data, QuantizedTensor) and layer.weight.dtype == torch.float16


def test_views_keep_the_weight_quantized(weight):
    assert isinstance(weight.view(8, 16), QuantizedTensor)
    assert isinstance(weight.reshape(-1, 16), QuantizedTensor)
    t = weight.t()
    assert isinstance(t, QuantizedTensor) and t.shape == (16, 8) and t._params.transposed
    assert torch.equal(t.dequantize(), weight.dequantize().t())
    reshaped = weight.view(4, 32)  # a real reshape can only be served dequantized
    assert type(reshaped) is torch.Tensor and torch.equal(reshaped, weight.dequantize().view(4, 32))
