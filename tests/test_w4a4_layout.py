"""W4A4Layout: quantizer quality, agreement with comfy-kitchen's SVDQuant layout and eager
kernels, files that move between the two, and errors that name the layer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from comfy_kitchen.backends.eager import svdquant as ck_eager
from comfy_kitchen.tensor import QuantizedTensor
from safetensors.torch import load_file, save_file

from comfy_lowbit.layouts import QuantFormatError, encode_config, layer_state_dict, load_layer
from comfy_lowbit.layouts.w4a4 import W4A4Layout, w4a4_linear_reference

from support import KERNEL_DEVICE, outlier_matrix, relative_error

CK_LAYOUT = "TensorCoreSVDQuantW4A4Layout"
N, K = 160, 512


def _weight(seed=0, n=N, k=K):
    return (outlier_matrix(n, k, seed=seed, scale=4.0) / k**0.5).to(torch.bfloat16)


def _activations(rows, k, seed, hot):
    """Normal activations with the same outlier channels ``hot`` (x20) in every batch."""
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    x[:, hot] *= 20.0
    return x


def _ck_forward(x, qt):
    """comfy-kitchen's eager forward on a weight's tensors (its quantize + scaled_mm)."""
    p = qt._params
    q_x, ascales, lora = ck_eager.quantize_svdquant_w4a4(
        x + ck_eager._GELU_UNSIGNED_SHIFT if p.act_unsigned else x, p.smooth_factor, p.proj_down,
        act_unsigned=p.act_unsigned, lora_x=x if p.act_unsigned else None)
    out = ck_eager.scaled_mm_svdquant_w4a4(q_x, qt._qdata, ascales, p.scale, lora, p.proj_up, None, act_unsigned=p.act_unsigned)
    return out[: x.shape[0]]


def _as_ck(qt):
    p = qt._params
    from comfy_kitchen.tensor.svdquant_w4a4 import TensorCoreSVDQuantW4A4Layout

    params = TensorCoreSVDQuantW4A4Layout.Params(
        scale=p.scale, orig_dtype=p.orig_dtype, orig_shape=p.orig_shape,
        proj_down=p.proj_down, proj_up=p.proj_up, smooth_factor=p.smooth_factor,
    )
    return QuantizedTensor(qt._qdata, CK_LAYOUT, params)


# ------------------------------------------------------------------ quantizer


def test_quantizer_stores_comfy_kitchen_shapes_and_dtypes():
    qt = QuantizedTensor.from_float(_weight(), "W4A4Layout", rank=16)
    p = qt._params
    assert qt._qdata.shape == (N, K // 2) and qt._qdata.dtype == torch.int8
    assert p.scale.shape == (K // 64, N) and p.proj_down.shape == (K, 16) and p.proj_up.shape == (N, 16)
    assert p.smooth_factor.shape == (K,)
    assert {t.dtype for t in (p.scale, p.proj_down, p.proj_up, p.smooth_factor)} == {torch.bfloat16}


def test_quantizer_quality_and_rank():
    w = _weight(1)
    errors = [relative_error(QuantizedTensor.from_float(w, "W4A4Layout", rank=r).dequantize(), w) for r in (8, 64)]
    assert errors[0] < 0.12 and errors[1] < errors[0]  # a larger low-rank branch leaves less to int4


def test_calibrated_smoothing_meets_the_accuracy_target_on_outlier_activations():
    w = _weight(2)
    hot = torch.randperm(K, generator=torch.Generator().manual_seed(9))[: K // 16]
    calib, test = _activations(256, K, 10, hot), _activations(64, K, 11, hot)
    ref = test.double() @ w.double().t()
    data_free = QuantizedTensor.from_float(w, "W4A4Layout")
    calibrated = QuantizedTensor.from_float(w, "W4A4Layout", act_absmax=calib.abs().amax(dim=0))
    err_free = relative_error(w4a4_linear_reference(test, data_free, None), ref)
    err_cal = relative_error(w4a4_linear_reference(test, calibrated, None), ref)
    assert err_cal <= 0.10 < err_free


def test_quantizer_runs_on_the_tensors_device():
    qt = QuantizedTensor.from_float(_weight(3).to(KERNEL_DEVICE), "W4A4Layout")
    assert qt._qdata.device.type == KERNEL_DEVICE and qt._params.proj_up.device.type == KERNEL_DEVICE


def test_requantize_keeps_rank_alpha_and_calibrated_smoothing():
    w = _weight(4)
    qt = QuantizedTensor.from_float(w, "W4A4Layout", rank=8, alpha=0.7, act_absmax=torch.rand(K) * 10 + 0.1)
    again = qt.requantize_from_float(w + 0.001, scale="recalculate", stochastic_rounding=1, inplace_ops=True)
    assert again._params.proj_up.shape[1] == 8 and again._params.alpha == 0.7
    assert torch.equal(again._params.smooth_factor, qt._params.smooth_factor)


@pytest.mark.parametrize(
    "kwargs, shape, message",
    [
        ({}, (8, 100), "K a multiple of 64"),
        ({"rank": 0}, (8, 64), "rank must be in 1..8"),
        ({"alpha": 1.5}, (64, 64), "alpha must be in"),
        ({"act_absmax": torch.ones(63)}, (64, 64), r"act_absmax must have shape \(64,\)"),
    ],
)
def test_quantizer_rejects_bad_arguments(kwargs, shape, message):
    with pytest.raises(QuantFormatError, match=message):
        QuantizedTensor.from_float(torch.randn(shape), "W4A4Layout", **kwargs)


def test_quantizer_rejects_unknown_keywords():
    with pytest.raises(TypeError, match="unknown keyword"):
        QuantizedTensor.from_float(torch.randn(8, 64), "W4A4Layout", group_size=32)


# ------------------------------------------------------------------ comfy-kitchen agreement


@pytest.mark.parametrize("act_unsigned", [False, True])
def test_reference_forward_equals_comfy_kitchen_eager_in_fp32(act_unsigned):
    """Same fp32 tensors: ck's eager quantizer emits the same codes and scales, so outputs agree to fp32."""
    qt = QuantizedTensor.from_float(_weight(5).float(), "W4A4Layout", act_unsigned=act_unsigned)
    p = qt._params
    f32 = W4A4Layout.Params(
        scale=p.scale.float(), orig_dtype=torch.float32, orig_shape=p.orig_shape,
        proj_down=p.proj_down.float(), proj_up=p.proj_up.float(), smooth_factor=p.smooth_factor.float(),
        act_unsigned=act_unsigned,
    )
    qt32 = QuantizedTensor(qt._qdata, "W4A4Layout", f32)
    x = outlier_matrix(7, K, seed=6)
    assert relative_error(w4a4_linear_reference(x, qt32, None), _ck_forward(x, qt32)) < 1e-5


def test_reference_forward_close_to_comfy_kitchen_eager_in_bf16():
    """ck's eager path quantizes in bf16 arithmetic (we use fp32): a few codes differ by one step."""
    qt = QuantizedTensor.from_float(_weight(6), "W4A4Layout")
    x = outlier_matrix(9, K, seed=7).to(torch.bfloat16)
    ours = w4a4_linear_reference(x, qt, None)
    theirs = _ck_forward(x, qt)
    ref = x.double() @ qt.dequantize().double().t()
    assert relative_error(ours, theirs) < 0.03
    assert relative_error(ours, ref) <= relative_error(theirs, ref) * 1.1


def test_dequantize_equals_comfy_kitchen_dequantize():
    qt = QuantizedTensor.from_float(_weight(7), "W4A4Layout")
    assert relative_error(qt.dequantize(), _as_ck(qt).dequantize()) < 5e-3  # theirs goes through bf16 matmuls


def test_comfy_kitchen_tensor_set_loads_and_gives_the_same_output(tmp_path):
    """A layer saved through comfy-kitchen's layout (its key suffixes) loads in ours unchanged."""
    ck_qt = _as_ck(QuantizedTensor.from_float(_weight(8), "W4A4Layout"))
    entries = ck_qt.state_dict(prefix="double_blocks.0.img_mlp.0.weight")
    entries["double_blocks.0.img_mlp.0.comfy_quant"] = encode_config({"format": "svdquant_w4a4"})
    save_file(entries, tmp_path / "ck.safetensors")
    ours = load_layer("double_blocks.0.img_mlp.0", load_file(tmp_path / "ck.safetensors"))
    assert ours._layout_cls == "W4A4Layout" and ours.shape == (N, K) and ours.dtype == torch.bfloat16
    x = outlier_matrix(6, K, seed=8).to(torch.bfloat16)
    bias = torch.randn(N).to(torch.bfloat16)
    with torch.inference_mode():
        got = F.linear(x, ours, bias)
    assert relative_error(got, _ck_forward(x, ck_qt) + bias) < 0.03
    assert relative_error(got.float(), w4a4_linear_reference(x, ours, bias).float()) < 1e-2


def test_our_tensor_set_has_comfy_kitchen_keys_and_round_trips(tmp_path):
    qt = QuantizedTensor.from_float(_weight(9), "W4A4Layout", act_unsigned=True)
    entries = layer_state_dict("blocks.3.mlp.fc2", qt)
    assert set(entries) == {f"blocks.3.mlp.fc2.{s}" for s in (
        "weight", "weight_scale", "weight_proj_down", "weight_proj_up", "weight_smooth_factor", "comfy_quant")}
    assert set(entries) - {"blocks.3.mlp.fc2.comfy_quant"} == {f"blocks.3.mlp.fc2.weight{s}" for s in _as_ck(qt).state_dict()}
    save_file(entries, tmp_path / "ours.safetensors")
    back = load_layer("blocks.3.mlp.fc2", load_file(tmp_path / "ours.safetensors"))
    assert back._params.act_unsigned and torch.equal(back.dequantize(), qt.dequantize())
    x = outlier_matrix(4, K, seed=10)
    assert torch.equal(w4a4_linear_reference(x, back, None), w4a4_linear_reference(x, qt, None))


# ------------------------------------------------------------------ bad files


def _entries():
    return layer_state_dict("blocks.1.attn.proj", QuantizedTensor.from_float(_weight(11), "W4A4Layout"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda e: e.pop("blocks.1.attn.proj.weight_proj_up"), r"needs blocks\.1\.attn\.proj\.weight_proj_up"),
        (lambda e: e.update({"blocks.1.attn.proj.weight_scale": torch.ones(N, K // 64)}), r"weight_scale must be a float tensor of shape \(8, 160\)"),
        (lambda e: e.update({"blocks.1.attn.proj.weight_smooth_factor": torch.ones(K, dtype=torch.int32)}), r"weight_smooth_factor must be a float"),
        (lambda e: e.update({"blocks.1.attn.proj.weight": torch.zeros(2, 8, 32, 128, dtype=torch.int8)}), "tile-packed"),
        (lambda e: e.update({"blocks.1.attn.proj.weight": torch.zeros(N, 40, dtype=torch.int8)}), "not a multiple of 64"),
    ],
)
def test_bad_files_name_the_layer_and_the_expectation(edit, message):
    entries = _entries()
    edit(entries)
    with pytest.raises(QuantFormatError, match="layer 'blocks.1.attn.proj'") as info:
        load_layer("blocks.1.attn.proj", entries)
    assert info.match(message)
