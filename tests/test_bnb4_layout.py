"""NF4Layout / FP4Layout beyond the shared contract: bitsandbytes-exact weights, every option,
serialisation with and without double quant, requantize, and errors that name the layer."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from comfy_kitchen.tensor import QuantizedTensor
from safetensors.torch import load, save

import bnb_peer
from comfy_lowbit.layouts import QuantFormatError, encode_config, layer_state_dict, load_layer
from comfy_lowbit.layouts.bnb4 import Bnb4Params, FP4Layout, NF4Layout
from support import outlier_matrix, relative_error

LAYOUTS = {"nf4": NF4Layout, "fp4": FP4Layout}
LAYER = "double_blocks.7.img_mlp.0"


def _weight(shape, dtype=torch.bfloat16, seed=0):
    rows = shape[0] if len(shape) > 1 else 1
    w = outlier_matrix(rows, int(torch.tensor(shape).prod()) // rows, seed=seed, scale=8.0)
    return (w / w.shape[1] ** 0.5).reshape(shape).to(dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape, dtype, block_size, double_quant", [
    ((96, 200), torch.bfloat16, 64, False),
    ((33, 65), torch.float16, 32, True),
    ((4097,), torch.float32, 4096, True),
    ((2, 3, 50), torch.bfloat16, 128, False),
])
def test_from_float_is_bitsandbytes_exact(quant_type, shape, dtype, block_size, double_quant):
    w = _weight(shape, dtype, seed=block_size)
    qt = QuantizedTensor.from_float(w, LAYOUTS[quant_type].__name__, block_size=block_size, double_quant=double_quant)
    assert qt.shape == w.shape and qt.dtype == dtype and qt._params.orig_dtype == dtype
    ref_packed, state = bnb_peer.quantize(w, block_size, quant_type, double_quant)
    assert torch.equal(qt._qdata, ref_packed)
    assert torch.equal(qt._params.scale, state.absmax)
    if double_quant:
        assert torch.equal(qt._params.nested_absmax, state.state2.absmax)
        assert torch.equal(qt._params.nested_offset, state.offset)
    dq = qt.dequantize()
    assert dq.dtype == dtype and torch.equal(dq, bnb_peer.dequantize(ref_packed, state))


def test_params_fields_follow_double_quant():
    plain = QuantizedTensor.from_float(_weight((16, 64)), "NF4Layout")._params
    nested = QuantizedTensor.from_float(_weight((16, 64)), "NF4Layout", double_quant=True)._params
    assert plain._tensor_fields() == ["scale"] and plain.nested_absmax is None
    assert nested._tensor_fields() == ["scale", "nested_absmax", "nested_offset"]
    assert all(isinstance(getattr(nested, f), torch.Tensor) for f in nested._tensor_fields())
    assert nested.scale.dtype == torch.uint8 and plain.scale.dtype == torch.float32
    assert dataclasses.fields(Bnb4Params)[-1].name == "transposed"


@pytest.mark.parametrize("layout", [NF4Layout, FP4Layout])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_matches_dequantized_weight(layout, x_dtype):
    """F.linear through the layout equals F.linear on the dequantized weight (same ops: exact),
    and is close to the float64 product (tolerance: the activation dtype's rounding)."""
    qt = QuantizedTensor.from_float(_weight((48, 160)), layout.__name__, block_size=32, double_quant=True)
    x = outlier_matrix(2 * 9, 160, seed=5).reshape(2, 9, 160).to(x_dtype)
    bias = torch.randn(48).to(x_dtype)
    with torch.inference_mode():
        out = F.linear(x, qt, bias)
    assert out.dtype == x_dtype and out.shape == (2, 9, 48)
    assert torch.equal(out, F.linear(x, qt.dequantize().to(x_dtype), bias))
    ref64 = F.linear(x.double(), qt.dequantize().double(), bias.double())
    assert relative_error(out, ref64) < {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[x_dtype]


def test_transposed_view_and_moves_keep_double_quant():
    qt = QuantizedTensor.from_float(_weight((24, 96)), "FP4Layout", block_size=64, double_quant=True)
    ref = qt.dequantize()
    assert torch.equal(qt.t().dequantize(), ref.t())
    for moved in (qt.to(torch.float32), qt.clone(), qt.detach(), qt.to("cpu")):
        assert isinstance(moved, QuantizedTensor) and moved._params.double_quant
        assert moved._params.nested_absmax is not None
        # Decoding computes in float32 and rounds once to the tensor's dtype.
        assert torch.equal(moved.dequantize(), qt.to(torch.float32).dequantize().to(moved.dtype))


def test_requantize_keeps_block_size_and_double_quant():
    qt = QuantizedTensor.from_float(_weight((32, 128)), "NF4Layout", block_size=128, double_quant=True)
    patched = qt.dequantize() + 0.01 * _weight((32, 128), seed=9)  # a LoRA-like update
    again = qt.requantize_from_float(patched, scale="recalculate", stochastic_rounding=7, inplace_ops=True)
    assert again._params.block_size == 128 and again._params.double_quant
    direct = QuantizedTensor.from_float(patched, "NF4Layout", block_size=128, double_quant=True)
    assert torch.equal(again._qdata, direct._qdata) and torch.equal(again.dequantize(), direct.dequantize())


@pytest.mark.parametrize("double_quant", [False, True])
def test_file_entries_and_safetensors_round_trip(double_quant):
    w = _weight((40, 72), torch.float16)
    qt = QuantizedTensor.from_float(w, "FP4Layout", block_size=256, double_quant=double_quant)
    entries = layer_state_dict(LAYER, qt)
    expected = {f"{LAYER}.weight", f"{LAYER}.weight_absmax", f"{LAYER}.comfy_quant"}
    if double_quant:
        expected |= {f"{LAYER}.weight_nested_absmax", f"{LAYER}.weight_nested_offset"}
    assert set(entries) == expected
    assert entries[f"{LAYER}.weight"].dtype == torch.uint8 and entries[f"{LAYER}.weight"].shape == (40 * 72 // 2, 1)
    config = json.loads(bytes(entries[f"{LAYER}.comfy_quant"].tolist()))
    assert config == {"format": "bnb_fp4", "block_size": 256, "double_quant": double_quant,
                      "orig_shape": [40, 72], "orig_dtype": "float16"}
    back = load_layer(LAYER, load(save({k: v.contiguous() for k, v in entries.items()})))
    assert back._params.double_quant == double_quant and back.dtype == torch.float16
    assert torch.equal(back.dequantize(), qt.dequantize())


# ---- bad input: every error names the layer and says what was expected ----------------------


@pytest.mark.parametrize("bad, match", [
    (torch.arange(64 * 4, dtype=torch.int32).reshape(4, 64), "floating-point tensors, got torch.int32"),
    (torch.full((4, 64), float("nan")), "NaN or Inf"),
    (torch.tensor([[1.0, float("inf")] * 32] * 4), "NaN or Inf"),
    (torch.randn(4, 64, dtype=torch.float64), "float32/float16/bfloat16, got torch.float64"),
])
def test_quantize_rejects_bad_tensors(bad, match):
    with pytest.raises(QuantFormatError, match=match) as info:
        QuantizedTensor.from_float(bad, "NF4Layout", layer=LAYER)
    assert LAYER in str(info.value)


def test_quantize_rejects_unknown_block_size():
    with pytest.raises(QuantFormatError, match=r"block_size must be one of .* got 100"):
        QuantizedTensor.from_float(torch.randn(4, 100), "FP4Layout", block_size=100)


def _entries(double_quant=True):
    qt = QuantizedTensor.from_float(_weight((20, 64)), "NF4Layout", block_size=32, double_quant=double_quant)
    return layer_state_dict(LAYER, qt)


def _with_config(entries, **changes):
    config = json.loads(bytes(entries[f"{LAYER}.comfy_quant"].tolist()))
    config.update(changes)
    return {**entries, f"{LAYER}.comfy_quant": encode_config(config)}


@pytest.mark.parametrize("mutate, match", [
    (lambda e: {k: v for k, v in e.items() if not k.endswith("weight_absmax")}, r"missing .*weight_absmax: expected torch.uint8 of shape \[40\]"),
    (lambda e: {**e, f"{LAYER}.weight_absmax": e[f"{LAYER}.weight_absmax"][:-1]}, r"weight_absmax: expected torch.uint8 of shape \[40\], got torch.uint8 of shape \[39\]"),
    (lambda e: {**e, f"{LAYER}.weight_absmax": e[f"{LAYER}.weight_absmax"].float()}, r"weight_absmax: expected torch.uint8 .* got torch.float32"),
    (lambda e: {k: v for k, v in e.items() if not k.endswith("nested_absmax")}, r"missing .*weight_nested_absmax"),
    (lambda e: {**e, f"{LAYER}.weight": e[f"{LAYER}.weight"][:-2]}, r"\.weight: expected torch.uint8 of shape \[640, 1\], got torch.uint8 of shape \[638, 1\]"),
    (lambda e: _with_config(e, block_size=48), r"block_size must be one of .* got 48"),
    (lambda e: _with_config(e, orig_dtype="int8"), r"orig_dtype must be one of .* got 'int8'"),
    (lambda e: _with_config(e, orig_shape=[20, "64"]), r"orig_shape must be a list of positive integers"),
    (lambda e: _with_config(e, double_quant=False), r"unexpected tensors for bnb_nf4 \(double_quant=False\)"),
    (lambda e: {**e, f"{LAYER}.comfy_quant": torch.tensor(list(b'{"format": "bnb_nf4", "block_'), dtype=torch.uint8)}, r"not valid UTF-8 JSON"),
    (lambda e: _with_config(e, format="bnb_nf5"), r"unknown format 'bnb_nf5'"),
])
def test_load_errors_name_the_layer(mutate, match):
    with pytest.raises(QuantFormatError, match=match) as info:
        load_layer(LAYER, mutate(_entries()))
    assert f"layer '{LAYER}'" in str(info.value)


def test_load_error_for_non_double_quant_absmax_dtype():
    entries = _entries(double_quant=False)
    entries[f"{LAYER}.weight_absmax"] = entries[f"{LAYER}.weight_absmax"].half()
    with pytest.raises(QuantFormatError, match=r"weight_absmax: expected torch.float32 of shape \[40\], got torch.float16") as info:
        load_layer(LAYER, entries)
    assert LAYER in str(info.value)
