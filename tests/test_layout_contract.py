"""The contract every comfy_lowbit layout keeps, run for each entry of the format table.

Linear dispatch (aten.linear under inference_mode, t + mm/addmm under no_grad), 2-D and 3-D
inputs, bias or none; device and dtype moves, clone/detach/copy_ keep the weight quantized;
the per-layer file entries round-trip; ComfyUI's requantize keywords are accepted.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from comfy_kitchen.tensor import QuantizedTensor

from comfy_lowbit.layouts import FORMATS, layer_state_dict, load_layer

from support import outlier_matrix, relative_error

# W4A4 quantizes activations too, so its linear differs from dequantize + F.linear by design.
LINEAR_VS_DEQUANT_RTOL = {"svdquant_w4a4": 0.2}
DEFAULT_RTOL = 1e-5
# Weight round-trip error bound. bitsandbytes' FP4 has no code between 1/192 and 1/6 of the
# block absmax, so bit-exact with bitsandbytes it measures ~0.19 on this outlier matrix.
WEIGHT_RTOL = {"bnb_fp4": 0.25}
DEFAULT_WEIGHT_RTOL = 0.15

N, K = 96, 256

pytestmark = pytest.mark.skipif(not FORMATS, reason="no layouts registered yet")


def _weight(seed=0, dtype=torch.bfloat16):
    return (outlier_matrix(N, K, seed=seed, scale=4.0) / K**0.5).to(dtype)


@pytest.fixture(params=sorted(FORMATS))
def layout(request):
    return FORMATS[request.param]


def test_from_float_keeps_shape_dtype_and_values(layout):
    w = _weight()
    qt = QuantizedTensor.from_float(w, layout.__name__)
    assert isinstance(qt, QuantizedTensor) and qt.shape == w.shape and qt.dtype == w.dtype
    dq = qt.dequantize()
    assert dq.shape == w.shape and dq.dtype == w.dtype
    assert relative_error(dq, w) < WEIGHT_RTOL.get(layout.FORMAT, DEFAULT_WEIGHT_RTOL)


@pytest.mark.parametrize("x_shape", [(5, K), (2, 7, K)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_linear_matches_dequantized(layout, x_shape, with_bias, mode):
    qt = QuantizedTensor.from_float(_weight(1), layout.__name__)
    x = outlier_matrix(int(torch.tensor(x_shape[:-1]).prod()), K, seed=2).reshape(x_shape)
    bias = torch.randn(N) if with_bias else None
    ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with ctx:
        out = F.linear(x, qt, bias)
    ref = F.linear(x, qt.dequantize().float(), bias)
    assert out.shape == ref.shape and not isinstance(out, QuantizedTensor)
    assert relative_error(out, ref) <= LINEAR_VS_DEQUANT_RTOL.get(layout.FORMAT, DEFAULT_RTOL)


def test_moves_and_copies_stay_quantized(layout):
    qt = QuantizedTensor.from_float(_weight(3), layout.__name__)
    ref = qt.dequantize()
    for moved in (qt.to("cpu"), qt.clone(), qt.detach()):
        assert isinstance(moved, QuantizedTensor) and moved._layout_cls == qt._layout_cls
        assert torch.equal(moved.dequantize(), ref)
    for dtype in (torch.float16, torch.float32):
        moved = qt.to(device="cpu", dtype=dtype)
        assert isinstance(moved, QuantizedTensor) and moved.dtype == dtype
        # Same stored data, decoded straight to the new dtype: equal up to that dtype's rounding.
        torch.testing.assert_close(moved.dequantize().float(), ref.float(), rtol=1e-2, atol=1e-3)
    dst = QuantizedTensor.from_float(_weight(4), layout.__name__)
    dst.copy_(qt)
    assert torch.equal(dst.dequantize(), ref)


def test_state_dict_round_trip(layout):
    qt = QuantizedTensor.from_float(_weight(5), layout.__name__)
    entries = layer_state_dict("blocks.0.attn.qkv", qt)
    assert "blocks.0.attn.qkv.comfy_quant" in entries and "blocks.0.attn.qkv.weight" in entries
    assert all(k.startswith("blocks.0.attn.qkv.") for k in entries)
    back = load_layer("blocks.0.attn.qkv", {k: v.clone() for k, v in entries.items()})
    assert back._layout_cls == qt._layout_cls and back.shape == qt.shape and back.dtype == qt.dtype
    assert torch.equal(back.dequantize(), qt.dequantize())


def test_requantize_accepts_comfyui_keywords(layout):
    qt = QuantizedTensor.from_float(_weight(6), layout.__name__)
    patched = qt.dequantize() + 0.01
    again = qt.requantize_from_float(patched, scale="recalculate", stochastic_rounding=1234, inplace_ops=True)
    assert again._layout_cls == qt._layout_cls
    assert layout.comfy_quant_config(again._params) == layout.comfy_quant_config(qt._params)
    assert relative_error(again.dequantize(), patched) < WEIGHT_RTOL.get(layout.FORMAT, DEFAULT_WEIGHT_RTOL)
