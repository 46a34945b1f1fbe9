"""int8_lodewise as a layout: quantization, files (ours and earlier tools'), bad input, linear.

The kernels have their own tests (test_int8_kernels.py); here the layout's decisions: round
to nearest with per-row per-block scales for every block size, what is written to and read
from files and which mistakes are refused, and that ``F.linear`` through the layout computes
the W8A8 product (exact-integer reference on CUDA, dequantize + F.linear on the CPU).
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from comfy_kitchen.tensor import QuantizedTensor

from comfy_lowbit.kernels.int8_gemm import w8a8_reference
from comfy_lowbit.kernels.int8_quant import quantize_blockwise_reference
from comfy_lowbit.layouts import FORMATS, QuantFormatError, decode_config, encode_config, layer_state_dict, load_layer
from comfy_lowbit.layouts.int8_lodewise import W8A16_MAX_M, BlockWiseINT8LayoutLodeWise

from support import KERNEL_DEVICE, outlier_matrix, relative_error

LAYOUT = "BlockWiseINT8LayoutLodeWise"
LAYER = "double_blocks.0.img_mlp.0"


def _weight(n=48, k=512, seed=0, dtype=torch.bfloat16):
    return (outlier_matrix(n, k, seed=seed, scale=5.0) / k**0.5).to(dtype)


def test_format_is_in_the_table():
    assert FORMATS["int8_lodewise"] is BlockWiseINT8LayoutLodeWise


@pytest.mark.parametrize("block", [64, 128, 256])
def test_quantize_rounds_to_nearest_per_row_per_block(block):
    w = _weight(seed=block)
    qt = QuantizedTensor.from_float(w, LAYOUT, block_size=block)
    q, scale = qt._qdata, qt._params.scale
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (w.shape[0], w.shape[1] // block)
    blocks = w.float().reshape(w.shape[0], -1, block)
    torch.testing.assert_close(scale, blocks.abs().amax(-1) / 127, rtol=0, atol=0)
    v = blocks / scale[:, :, None]
    # Round to nearest: |v - q| <= 1/2 everywhere; truncation would leave errors near 1.
    err = (v - q.float().reshape(v.shape)).abs()
    assert err.max() <= 0.5 + 1e-5 and err.mean() < 0.3
    assert q.abs().max() == 127 and q.min() >= -127
    assert relative_error(qt.dequantize(), w) < 0.02  # 5x outlier columns in every block


def test_all_zero_blocks_and_rows():
    w = _weight(8, 256)
    w[2] = 0
    w[5, 128:] = 0
    qt = QuantizedTensor.from_float(w, LAYOUT)
    assert (qt._params.scale[2] == 0).all() and qt._params.scale[5, 1] == 0
    assert torch.isfinite(qt.dequantize().float()).all() and (qt.dequantize()[2] == 0).all()


@pytest.mark.parametrize("bad, message", [
    (torch.randint(-5, 5, (16, 128)), "float32/bfloat16/float16"),
    (torch.randn(16, 100), "not a multiple of block_size 128"),
    (torch.randn(4, 16, 128), "2-D"),
])
def test_quantize_rejects_what_it_cannot_represent(bad, message):
    with pytest.raises(QuantFormatError, match=message):
        QuantizedTensor.from_float(bad, LAYOUT)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_quantize_rejects_non_finite_weights(value):
    w = torch.randn(16, 128)
    w[3, 7] = value
    with pytest.raises(QuantFormatError, match="NaN or Inf"):
        BlockWiseINT8LayoutLodeWise.quantize(w, layer=LAYER)
    with pytest.raises(QuantFormatError, match=LAYER):
        BlockWiseINT8LayoutLodeWise.quantize(w, layer=LAYER)


def test_quantize_rejects_unknown_block_size():
    with pytest.raises(QuantFormatError, match="block_size must be one of"):
        QuantizedTensor.from_float(torch.randn(8, 192), LAYOUT, block_size=96)


def test_requantize_keeps_block_size_and_accepts_comfyui_keywords():
    w = _weight()
    qt = QuantizedTensor.from_float(w, LAYOUT, block_size=64)
    assert BlockWiseINT8LayoutLodeWise.requantize_kwargs(qt) == {"block_size": 64}
    patched = qt.dequantize() + 0.002
    again = qt.requantize_from_float(patched, scale="recalculate", stochastic_rounding=0, inplace_ops=True)
    assert again._params.block_size == 64
    assert relative_error(again.dequantize(), patched) < 0.02
    with pytest.raises(QuantFormatError, match="computes its own scales"):
        qt.requantize_from_float(patched, scale=torch.ones(1))


def test_stochastic_rounding_is_seeded_and_unbiased():
    w = _weight(64, 512)
    a = QuantizedTensor.from_float(w, LAYOUT, stochastic_rounding=7)
    b = QuantizedTensor.from_float(w, LAYOUT, stochastic_rounding=7)
    c = QuantizedTensor.from_float(w, LAYOUT, stochastic_rounding=8)
    nearest = QuantizedTensor.from_float(w, LAYOUT)
    assert torch.equal(a._qdata, b._qdata) and not torch.equal(a._qdata, c._qdata)
    assert not torch.equal(a._qdata, nearest._qdata)
    # Stochastic codes are within one step, and unbiased: the mean error is far below a step.
    v = (w.float().reshape(64, -1, 128) / a._params.scale[:, :, None]).reshape(64, 512)
    diff = v - a._qdata.float()
    assert diff.abs().max() < 1 and abs(diff.mean()) < 0.02


def _entries(block=128, seed=1):
    qt = QuantizedTensor.from_float(_weight(seed=seed), LAYOUT, block_size=block)
    return qt, layer_state_dict(LAYER, qt)


@pytest.mark.parametrize("block", [64, 256])
def test_file_entries(block):
    qt, entries = _entries(block)
    assert set(entries) == {f"{LAYER}.weight", f"{LAYER}.weight_scale", f"{LAYER}.comfy_quant"}
    assert entries[f"{LAYER}.weight"].dtype == torch.int8
    assert entries[f"{LAYER}.weight_scale"].shape == (48, 512 // block)
    assert decode_config(entries[f"{LAYER}.comfy_quant"]) == {"format": "int8_lodewise", "block_size": block, "orig_dtype": "bfloat16"}
    back = load_layer(LAYER, entries)
    assert back._params.block_size == block and torch.equal(back.dequantize(), qt.dequantize())


def test_scale_with_the_wrong_shape_is_refused_naming_both_shapes():
    qt, entries = _entries()
    for wrong in (entries[f"{LAYER}.weight_scale"].t().contiguous(), torch.ones(48, 1), torch.ones(48)):
        bad = {**entries, f"{LAYER}.weight_scale": wrong}
        shapes = f"{re.escape(str(tuple(wrong.shape)))}, expected {re.escape('(48, 4)')}"
        with pytest.raises(QuantFormatError, match=f"{re.escape(LAYER)}.*{shapes}"):
            load_layer(LAYER, bad)


@pytest.mark.parametrize("config", [
    {"format": "int8_lodewise", "group_size": 64},
    {"format": "int8_lodewise", "params": {"group_size": 64}},
    {"format": "int8_lodewise", "block_size": 64, "params": {"group_size": 64}},
])
def test_earlier_tools_group_size_is_read(config):
    qt, entries = _entries(64)
    entries[f"{LAYER}.comfy_quant"] = encode_config(config)
    back = load_layer(LAYER, entries)
    assert back._params.block_size == 64 and torch.equal(back.dequantize(), qt.dequantize())


def test_bf16_scales_from_files_are_read():
    qt, entries = _entries()
    entries[f"{LAYER}.weight_scale"] = entries[f"{LAYER}.weight_scale"].bfloat16()
    back = load_layer(LAYER, entries)
    assert back._params.scale.dtype == torch.float32
    assert relative_error(back.dequantize(), qt.dequantize()) < 0.01


@pytest.mark.parametrize("change, message", [
    ({"comfy_quant": {"format": "int8_lodewise", "block_size": 64, "group_size": 128}}, "conflicting block sizes"),
    ({"comfy_quant": {"format": "int8_lodewise", "group_size": 96}}, "must be one of"),
    ({"weight": torch.zeros(48, 512, dtype=torch.uint8)}, "2-D int8"),
    ({"weight_scale": -torch.ones(48, 4)}, "negative, NaN or Inf"),
    ({"weight_scale": torch.full((48, 4), float("nan"))}, "negative, NaN or Inf"),
    ({"weight_scale": torch.ones(48, 4, dtype=torch.float64)}, "float32/bfloat16/float16"),
    ({"weight_scale": None}, "missing"),
])
def test_bad_files_are_refused_naming_the_layer(change, message):
    _, entries = _entries()
    for suffix, value in change.items():
        key = f"{LAYER}.{suffix}"
        if value is None:
            del entries[key]
        else:
            entries[key] = encode_config(value) if suffix == "comfy_quant" else value
    with pytest.raises(QuantFormatError, match=message) as info:
        load_layer(LAYER, entries)
    assert LAYER in str(info.value)


# ---------------------------------------------------------------------- linear


@pytest.mark.parametrize("m", [1, 3, W8A16_MAX_M, 77])
def test_linear_on_cpu_is_the_dequantized_reference(m):
    qt = QuantizedTensor.from_float(_weight(), LAYOUT)
    x = outlier_matrix(m, 512, seed=m).to(torch.bfloat16)
    bias = torch.randn(48).to(torch.bfloat16)
    with torch.inference_mode():
        out = F.linear(x, qt, bias)
    ref = F.linear(x, qt.dequantize(), bias)
    assert torch.equal(out, ref)


@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="the layout's kernels run on CUDA only")
# Every block size in bf16, every dtype at the default block: each pair compiles (and
# autotunes) its own kernels, so the full product would cost minutes of compilation.
@pytest.mark.parametrize("block,dtype", [(64, torch.bfloat16), (128, torch.bfloat16), (256, torch.bfloat16),
                                         (128, torch.float16), (128, torch.float32)])
@pytest.mark.parametrize("m", [1, 4, 16, W8A16_MAX_M + 1, 300])
def test_linear_on_gpu(block, dtype, m):
    n, k = 200, 4 * 256
    qt = QuantizedTensor.from_float(_weight(n, k, seed=m, dtype=dtype), LAYOUT, block_size=block).to("cuda")
    x = outlier_matrix(m, k, seed=block + m, scale=20.0).to(dtype).cuda()
    bias = torch.randn(n, device="cuda", dtype=dtype)
    with torch.inference_mode():
        out = F.linear(x.reshape(1, m, k), qt, bias).reshape(m, n)
    assert out.dtype == dtype and torch.isfinite(out).all()
    dequantized = F.linear(x.double(), qt.dequantize().double(), bias.double())
    w8a8 = m > W8A16_MAX_M or (m > 1 and dtype == torch.float32)
    if w8a8:
        # The exact-integer reference of the same quantized operands (the reference quantizer
        # is bit-identical to the kernel's), then one output rounding.
        from comfy_lowbit.kernels.int8_quant import quantize_blockwise_reference as quant
        a_q, a_s = quant(x.cpu(), block)
        ref, magnitude = w8a8_reference(a_q, a_s, qt._qdata, qt._params.scale, block, bias.cpu())
        bound = (3 * k // block + 4) * 2.0**-24 * (magnitude + bias.cpu().double().abs()) + torch.finfo(dtype).eps * ref.abs()
        err = (out.cpu().double() - ref).abs()
        worst = (err / bound).argmax().item()
        i, j = divmod(worst, n)
        assert (err <= bound).all(), (
            f"{(err > bound).sum().item()} elements off; worst at {(i, j)}: out {out[i, j].item()} ref {ref[i, j].item()} "
            f"bound {bound[i, j].item():.3g}; rows off {sorted(set((err > bound).nonzero()[:, 0].tolist()))[:12]}")
        assert relative_error(out, dequantized) < 0.05  # the activation quantization error
    else:
        assert relative_error(out, dequantized) < {torch.float32: 1e-5, torch.bfloat16: 6e-3, torch.float16: 1e-3}[dtype]
