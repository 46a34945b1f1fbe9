"""Quantized files people already have: bitsandbytes/diffusers/Forge 4-bit and convert_to_quant 0.4.

Each is generated here the way its tool writes it (bitsandbytes itself for the first; the
documented convert_to_quant layout, first code in the LOW nibble and ``X.absmax``, for the
second), then read by ``read_checkpoint``, named by ``inspect``, refused by ``convert`` without
``--keep-quantized`` and carried over with it. The decoded weights must equal what the
original tool's decoder gives, bit for bit.
"""
from __future__ import annotations

import pytest
import torch
from comfy_kitchen.tensor import QuantizedTensor

from comfy_lowbit import cli
from comfy_lowbit.convert.converter import ConversionError, ConvertOptions, convert_checkpoint
from comfy_lowbit.convert.readers import normalise_state_dict, read_checkpoint
from comfy_lowbit.convert.writer import SafetensorsWriter
from comfy_lowbit.layouts import FORMATS, encode_config

pytestmark = pytest.mark.skipif("bnb_nf4" not in FORMATS, reason="needs the NF4/FP4 layouts")

from support import outlier_matrix  # noqa: E402


def _save(path, sd):
    with SafetensorsWriter(path, metadata={"source": "test"}) as writer:
        for key, value in sd.items():
            writer.add(key, value)
        writer.commit()
    return path


def _weight(n, k, seed):
    return (outlier_matrix(n, k, seed=seed, scale=5.0) / k**0.5).to(torch.bfloat16)


def _others(gen_seed=0):
    gen = torch.Generator().manual_seed(gen_seed)
    return {"blocks.0.attn.qkv.bias": torch.randn(192, generator=gen).bfloat16(),
            "blocks.0.norm.weight": torch.ones(64, dtype=torch.bfloat16),
            "blocks.0.mlp.fc2.weight": _weight(64, 128, 7)}  # still plain


def _check_carry_over(tmp_path, src, expected, fmt_name, capsys):
    """inspect names it; convert refuses, then carries it over; both decode to ``expected``."""
    assert cli.main(["inspect", str(src)]) == 0
    assert fmt_name in capsys.readouterr().out
    loaded = read_checkpoint(src)
    weight = loaded["blocks.0.attn.qkv.weight"]
    assert isinstance(weight, QuantizedTensor)
    assert torch.equal(weight.dequantize(), expected)
    assert sorted(loaded) == sorted(["blocks.0.attn.qkv.weight", *_others()])
    with pytest.raises(ConversionError, match="already holds 1 quantized layers.*blocks.0.attn.qkv"):
        convert_checkpoint(src, tmp_path / "out.safetensors", ConvertOptions(format="nf4"), show_progress=False)
    summary = convert_checkpoint(src, tmp_path / "out.safetensors", ConvertOptions(format="nf4", keep_quantized=True),
                                 show_progress=False)
    assert [layer for layer, _ in summary.passed_through] == ["blocks.0.attn.qkv"]
    assert [r.name for r in summary.quantized] == ["blocks.0.mlp.fc2"]
    again = read_checkpoint(tmp_path / "out.safetensors")["blocks.0.attn.qkv.weight"]
    assert torch.equal(again.dequantize(), expected)


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", False), ("fp4", False), ("nf4", True)])
def test_bitsandbytes_files(tmp_path, capsys, quant_type, double_quant):
    bnb_peer = pytest.importorskip("bnb_peer")
    w = _weight(192, 64, seed=1)
    packed, state = bnb_peer.quantize(w, 64, quant_type, double_quant)
    sd = {**bnb_peer.serialised("blocks.0.attn.qkv.weight", packed, state), **_others()}
    src = _save(tmp_path / "bnb.safetensors", sd)
    expected = bnb_peer.dequantize(packed, state)
    _check_carry_over(tmp_path, src, expected, f"bnb_{quant_type} (bitsandbytes)", capsys)


def _c2q_entries(w, quant_type, block_size, config_style):
    """A layer as convert_to_quant 0.4 writes it (flat codes, LOW nibble first, X.absmax)."""
    from comfy_lowbit.kernels import bnb4_codec as codec

    packed, absmax = codec.quantize_4bit(w, block_size, quant_type)
    low_first = ((packed & 0x0F) << 4) | (packed >> 4)
    config = {"format": f"bnb_{quant_type}", "quant_type": quant_type, "dtype": "bfloat16", "shape": list(w.shape),
              "quant_map": codec.codebook(quant_type).tolist()}
    if config_style == "root":
        config["group_size"] = block_size
    else:
        config["params"] = {"group_size": block_size}
    entries = {"blocks.0.attn.qkv.weight": low_first.reshape(-1), "blocks.0.attn.qkv.absmax": absmax,
               "blocks.0.attn.qkv.comfy_quant": encode_config(config)}
    expected = codec.dequantize_4bit(packed, absmax, block_size, quant_type, w.shape, torch.bfloat16)
    return entries, expected


@pytest.mark.parametrize("quant_type, block_size, config_style", [("nf4", 64, "root"), ("fp4", 128, "params"),
                                                                  ("nf4", 32, "params")])
def test_convert_to_quant_4bit_files(tmp_path, capsys, quant_type, block_size, config_style):
    w = _weight(192, 64, seed=2)
    entries, expected = _c2q_entries(w, quant_type, block_size, config_style)
    src = _save(tmp_path / "c2q.safetensors", {**entries, **_others()})
    _check_carry_over(tmp_path, src, expected, f"bnb_{quant_type} (convert_to_quant)", capsys)


def test_low_nibble_first_is_honoured():
    """Reading convert_to_quant codes high-nibble-first would swap every pair of values."""
    w = _weight(8, 64, seed=3)
    entries, expected = _c2q_entries(w, "nf4", 64, "root")
    weight = normalise_state_dict(entries)["blocks.0.attn.qkv.weight"]
    assert torch.equal(weight.dequantize(), expected)
    swapped = dict(entries, **{"blocks.0.attn.qkv.weight": ((entries["blocks.0.attn.qkv.weight"] & 0x0F) << 4)
                               | (entries["blocks.0.attn.qkv.weight"] >> 4)})
    assert not torch.equal(normalise_state_dict(swapped)["blocks.0.attn.qkv.weight"].dequantize(), expected)


@pytest.mark.parametrize("change, match", [
    (lambda e: e.update({"blocks.0.attn.qkv.absmax": e["blocks.0.attn.qkv.absmax"][:-1]}), "needs 6144 code bytes and 192 absmax"),
    (lambda e: e.update({"blocks.0.attn.qkv.comfy_quant": encode_config({"format": "bnb_nf4", "shape": [192, 64]})}),
     "no positive integer group_size"),
    (lambda e: e.update({"blocks.0.attn.qkv.comfy_quant": encode_config({"format": "bnb_af4", "group_size": 64})}),
     "'bnb_af4' is not one we read"),
])
def test_broken_convert_to_quant_layers_name_the_layer(change, match):
    entries, _ = _c2q_entries(_weight(192, 64, seed=4), "nf4", 64, "root")
    change(entries)
    with pytest.raises(ValueError, match=rf"layer 'blocks.0.attn.qkv'.*{match}"):
        normalise_state_dict(entries)
