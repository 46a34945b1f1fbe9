"""The converter end to end on tiny generated checkpoints with real key names.

Round trips per family (convert, load back, compare each layer with the same layout applied
directly, and with the float weight); kept tensors byte-identical; metadata preserved;
failures mid-way, Ctrl-C and a full disk leave no output; corrupt inputs give errors that
name the file and tensor.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import struct

import pytest
import torch
from comfy_kitchen.tensor import QuantizedTensor

from comfy_lowbit import cli
from comfy_lowbit.convert import converter as converter_module
from comfy_lowbit.convert.converter import ConversionError, ConversionInterrupted, ConvertOptions, convert_checkpoint
from comfy_lowbit.convert.readers import read_checkpoint
from comfy_lowbit.convert.safetensors_file import SafetensorsError, SafetensorsFile
from comfy_lowbit.convert.writer import OutputExistsError, SafetensorsWriter, WriteError
from comfy_lowbit.layouts import FORMATS

from convert_support import FAMILY_CHECKPOINTS, ToyBlockInt8Layout, flux
from support import relative_error

TOY = ToyBlockInt8Layout.FORMAT
CONVERT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where convert() quantizes by default
INPUT_METADATA = {"modelspec.title": "tiny test model", "format": "pt"}
REAL_FORMAT_RTOL = {"bnb_nf4": 0.2, "bnb_fp4": 0.3, "int8_lodewise": 0.05, "svdquant_w4a4": 0.2}


@pytest.fixture(autouse=True)
def toy_format(monkeypatch):
    """Register the toy layout in the format table for the duration of each test."""
    monkeypatch.setitem(FORMATS, TOY, ToyBlockInt8Layout)


def save(path, sd, metadata=INPUT_METADATA):
    with SafetensorsWriter(path, metadata=metadata) as writer:
        for key, value in sd.items():
            writer.add(key, value)
        writer.commit()
    return path


def raw_bytes(path, key):
    with SafetensorsFile(path) as f:
        return b"".join(f.raw_chunks(key)), f.info(key).dtype, f.info(key).shape


def convert(src, dst, fmt=TOY, **kwargs):
    return convert_checkpoint(src, dst, ConvertOptions(format=fmt, **kwargs), show_progress=False)


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def check_round_trip(src, dst, sd, must_keep, fmt, rtol, summary):
    layout = FORMATS[fmt]
    loaded = read_checkpoint(dst)
    kept = dict(summary.kept)
    assert set(loaded) == set(sd), "every input tensor comes back under its own name"
    quantized = {r.name + ".weight" for r in summary.quantized}
    assert quantized and not quantized & must_keep, "family rules: these must stay in high precision"
    assert must_keep <= set(kept) | {k for k in must_keep if k not in sd}
    for key, original in sd.items():
        if key in quantized:
            weight = loaded[key]
            assert isinstance(weight, QuantizedTensor) and weight.layout_cls is layout, key
            # On the device the converter quantized on (a GPU when present): the layouts agree
            # with themselves bit for bit there, not across devices (CUDA divides by a scalar
            # through its reciprocal, and SVDs differ).
            direct = QuantizedTensor.from_float(original.to(CONVERT_DEVICE), layout.__name__)
            assert torch.equal(weight.dequantize(), direct.dequantize().cpu()), f"{key}: file differs from the layout"
            assert relative_error(weight.dequantize(), original) < rtol, key
        else:
            assert key in kept, key
            assert raw_bytes(dst, key) == raw_bytes(src, key), f"{key}: kept tensor is not byte-identical"
    with SafetensorsFile(dst) as f:
        assert {k: f.metadata[k] for k in INPUT_METADATA} == INPUT_METADATA
        assert f.metadata["comfy_lowbit.format"] == fmt and "comfy_lowbit.version" in f.metadata


@pytest.mark.parametrize("family", sorted(FAMILY_CHECKPOINTS))
def test_round_trip_per_family(tmp_path, family):
    sd, must_keep = FAMILY_CHECKPOINTS[family](torch.Generator().manual_seed(1))
    src = save(tmp_path / "in.safetensors", sd)
    before = sha(src)
    summary = convert(src, tmp_path / "out.safetensors")
    assert family in {f["family"] for f in summary.families}
    check_round_trip(src, tmp_path / "out.safetensors", sd, must_keep, TOY, 0.02, summary)
    assert sha(src) == before, "the input was modified"
    assert summary.output_bytes < summary.input_bytes


@pytest.mark.parametrize("fmt", sorted(REAL_FORMAT_RTOL))
def test_round_trip_every_real_format(tmp_path, fmt):
    if fmt not in FORMATS:
        pytest.skip(f"{fmt} not in this build's format table")
    sd, must_keep = flux(torch.Generator().manual_seed(2))
    src = save(tmp_path / "in.safetensors", sd)
    summary = convert(src, tmp_path / "out.safetensors", fmt)
    check_round_trip(src, tmp_path / "out.safetensors", sd, must_keep, fmt, REAL_FORMAT_RTOL[fmt], summary)


def test_exclude_and_include_override_the_family_rules(tmp_path):
    sd, _ = flux(torch.Generator().manual_seed(3))
    src = save(tmp_path / "in.safetensors", sd)
    summary = convert(src, tmp_path / "out.safetensors", exclude=("double_blocks.*.img_attn.qkv",), include=("img_in",))
    kept, quantized = dict(summary.kept), {r.name for r in summary.quantized}
    assert kept["double_blocks.0.img_attn.qkv.weight"].startswith("--exclude")
    assert raw_bytes(tmp_path / "out.safetensors", "double_blocks.0.img_attn.qkv.weight") == \
        raw_bytes(src, "double_blocks.0.img_attn.qkv.weight")
    assert "img_in" in quantized and "txt_in" not in quantized


def test_shapes_the_format_cannot_hold_are_kept(tmp_path):
    gen = torch.Generator().manual_seed(4)
    sd = {"blocks.0.odd.weight": torch.randn(16, 40, generator=gen).bfloat16(),
          "blocks.0.fine.weight": torch.randn(16, 64, generator=gen).bfloat16()}
    src = save(tmp_path / "in.safetensors", sd)
    summary = convert(src, tmp_path / "out.safetensors")
    assert "not a multiple" in dict(summary.kept)["blocks.0.odd.weight"]
    assert [r.name for r in summary.quantized] == ["blocks.0.fine"]


def test_summary_report_and_progress(tmp_path, capsys):
    sd, _ = flux(torch.Generator().manual_seed(5))
    src = save(tmp_path / "in.safetensors", sd)
    calls = []
    summary = convert_checkpoint(src, tmp_path / "out.safetensors", ConvertOptions(format=TOY),
                                 progress=lambda done, total, key: calls.append((done, total, key)), show_progress=False)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls) and calls[-1][0] == calls[-1][1] > 0
    stats = summary.error_stats()
    errors = [r.rel_error for r in summary.quantized]
    assert stats["max"] == max(errors) and 0 < stats["mean"] < 0.02
    assert [r.rel_error for r in summary.worst(3)] == sorted(errors, reverse=True)[:3]

    report = tmp_path / "report.json"
    rc = cli.main(["convert", str(src), "-o", str(tmp_path / "cli.safetensors"), "--format", TOY, "--quiet",
                   "--report", str(report), "--block-size", "64"])
    out = capsys.readouterr().out
    assert rc == 0 and "ratio" in out and "worst layers" in out and "flux: first layer" in out
    data = json.loads(report.read_text())
    assert data["options"] == {"block_size": 64} and len(data["worst"]) == min(10, len(data["quantized"])) > 5
    assert data["output_bytes"] == os.path.getsize(tmp_path / "cli.safetensors")


def test_dry_run_writes_nothing(tmp_path, capsys):
    sd, _ = flux(torch.Generator().manual_seed(6))
    src = save(tmp_path / "in.safetensors", sd)
    assert cli.main(["convert", str(src), "--format", TOY, "--dry-run"]) == 0
    assert "would quantize" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


# ---- safety -----------------------------------------------------------------------------------
def _flux_file(tmp_path):
    sd, _ = flux(torch.Generator().manual_seed(7))
    return save(tmp_path / "in.safetensors", sd)


@pytest.mark.parametrize("failure", [RuntimeError("simulated kernel failure"), KeyboardInterrupt()])
def test_failure_mid_way_leaves_no_output(tmp_path, monkeypatch, failure):
    src = _flux_file(tmp_path)
    real, calls = converter_module.quantize_weight, []

    def failing(weight, *args):
        calls.append(1)
        if len(calls) == 3:
            raise failure
        return real(weight, *args)

    monkeypatch.setattr(converter_module, "quantize_weight", failing)
    expected = ConversionInterrupted if isinstance(failure, KeyboardInterrupt) else ConversionError
    with pytest.raises(expected, match=r"tensor '[^']+\.weight'"):
        convert(src, tmp_path / "out.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


def test_full_disk_leaves_no_output_and_names_the_tensor(tmp_path, monkeypatch):
    src = _flux_file(tmp_path)
    real_spool, writes = SafetensorsWriter._spool, []

    class FullDisk:
        def __init__(self, spool):
            self.spool = spool

        def write(self, data):
            writes.append(len(data))
            if len(writes) == 5:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.spool.write(data)

        def __getattr__(self, name):
            return getattr(self.spool, name)

    def spool(self, itemsize):
        spool, offset = real_spool(self, itemsize)
        return (spool if isinstance(spool, FullDisk) else FullDisk(spool)), offset

    monkeypatch.setattr(SafetensorsWriter, "_spool", spool)
    with pytest.raises(WriteError, match=r"writing tensor '[^']+'.*No space left on device"):
        convert(src, tmp_path / "out.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


def test_existing_output_and_the_input_itself_are_protected(tmp_path, capsys):
    src = _flux_file(tmp_path)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError):
        convert(src, out)
    assert out.read_bytes() == b"precious"
    assert cli.main(["convert", str(src), "-o", str(out), "--format", TOY, "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    before = sha(src)
    with pytest.raises(ValueError, match="output is the input"):
        convert(src, src, overwrite=True)
    assert sha(src) == before
    convert(src, out, overwrite=True)
    assert read_checkpoint(out)


def test_already_quantized_input_is_refused_or_carried_over(tmp_path):
    sd, _ = flux(torch.Generator().manual_seed(8))
    src = save(tmp_path / "in.safetensors", sd)
    once = tmp_path / "once.safetensors"
    convert(src, once)
    with pytest.raises(ConversionError, match="already holds .* quantized layers.*--keep-quantized"):
        convert(once, tmp_path / "twice.safetensors")
    summary = convert(once, tmp_path / "twice.safetensors", keep_quantized=True)
    assert summary.passed_through and not summary.quantized
    with SafetensorsFile(once) as a, SafetensorsFile(tmp_path / "twice.safetensors") as b:
        assert a.keys() == b.keys()
        for key in a.keys():
            assert b"".join(a.raw_chunks(key)) == b"".join(b.raw_chunks(key)), key


# ---- corrupt inputs -------------------------------------------------------------------------------
def _write_raw(path, header: bytes, data: bytes):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_truncated_file(tmp_path):
    src = _flux_file(tmp_path)
    data = src.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) - 100])
    with pytest.raises(SafetensorsError, match=r"cut.safetensors: tensor '.+'.*truncated"):
        convert(bad, tmp_path / "out.safetensors")
    bad.write_bytes(data[:5])
    with pytest.raises(SafetensorsError, match="not a safetensors file"):
        SafetensorsFile(bad)


def test_bad_header_json(tmp_path, capsys):
    bad = _write_raw(tmp_path / "bad.safetensors", b'{"a": {"dtype": "F32", "shape": [1], ', b"\0" * 4)
    assert cli.main(["convert", str(bad), "-o", str(tmp_path / "o.safetensors"), "--format", TOY]) == 1
    assert "bad.safetensors: header is not valid UTF-8 JSON" in capsys.readouterr().err
    assert cli.main(["inspect", str(bad)]) == 1
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F33", "shape": [2, 2], "data_offsets": [0, 16]}, "tensor 'w.weight': unknown dtype 'F33'"),
    ({"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 16]}, r"tensor 'w.weight': BF16 \(2, 2\) needs 8 bytes"),
    ({"dtype": "F32", "shape": [2, -2], "data_offsets": [0, 16]}, "tensor 'w.weight': shape must be"),
])
def test_wrong_dtype_or_shape_in_header(tmp_path, entry, message):
    bad = _write_raw(tmp_path / "bad.safetensors", json.dumps({"w.weight": entry}).encode(), b"\1" * 16)
    with pytest.raises(SafetensorsError, match=message):
        convert(bad, tmp_path / "out.safetensors")


def test_nan_weights_are_refused_with_the_tensor_named(tmp_path):
    sd, _ = flux(torch.Generator().manual_seed(9))
    sd["double_blocks.0.img_mlp.0.weight"][3, 5] = float("nan")
    src = save(tmp_path / "in.safetensors", sd)
    with pytest.raises(ConversionError, match=r"tensor 'double_blocks.0.img_mlp.0.weight': 1 of \d+ values are NaN"):
        convert(src, tmp_path / "out.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


def test_comfy_quant_of_the_wrong_type_names_the_layer(tmp_path):
    sd = {"blocks.0.q.weight": torch.zeros(4, dtype=torch.uint8), "blocks.0.q.comfy_quant": torch.ones(3, dtype=torch.int32)}
    src = save(tmp_path / "in.safetensors", sd)
    with pytest.raises(Exception, match="layer 'blocks.0.q': comfy_quant must be a 1-D uint8"):
        convert(src, tmp_path / "out.safetensors")


def test_unknown_format_and_option(tmp_path):
    src = _flux_file(tmp_path)
    with pytest.raises(ValueError, match="format 'nf5' is not available"):
        convert(src, tmp_path / "o.safetensors", fmt="nf5")
    with pytest.raises(ValueError, match="no rank option"):
        convert(src, tmp_path / "o.safetensors", rank=8)


# ---- foreign files: convert_to_quant int8 ------------------------------------------------------
def _c2q_int8_file(tmp_path, fmt, bs, config):
    gen = torch.Generator().manual_seed(10)
    n, k = 256, 256
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    shape = (n, k // bs) if fmt == "int8_lodewise" else (n // bs, k // bs)
    scale = torch.rand(shape, generator=gen) * 0.01 + 1e-3
    from comfy_lowbit.layouts import encode_config
    sd = {"blocks.0.fc.weight": q, "blocks.0.fc.weight_scale": scale, "blocks.0.fc.bias": torch.randn(n).bfloat16(),
          "blocks.0.fc.comfy_quant": encode_config(config), "blocks.0.norm.weight": torch.ones(k).bfloat16()}
    expand = scale.repeat_interleave(bs, 1) if fmt == "int8_lodewise" else \
        scale.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    return save(tmp_path / "c2q.safetensors", sd), q.float() * expand


@pytest.mark.parametrize("fmt, config, rtol", [
    ("int8_lodewise", {"format": "int8_lodewise", "params": {"group_size": 128}}, 0.0),
    ("int8_lodewise", {"format": "int8_lodewise", "group_size": 64}, 0.0),
    ("int8_blockwise", {"format": "int8_blockwise", "group_size": 64}, 0.01),
])
def test_convert_to_quant_int8_files_are_read(tmp_path, capsys, fmt, config, rtol):
    if "int8_lodewise" not in FORMATS:
        pytest.skip("int8_lodewise not in this build")
    bs = config.get("group_size") or config["params"]["group_size"]
    src, expected = _c2q_int8_file(tmp_path, fmt, bs, config)
    assert cli.main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    assert ("int8_blockwise (convert_to_quant)" if fmt == "int8_blockwise" else "int8_lodewise") in out
    loaded = read_checkpoint(src)
    assert sorted(loaded) == ["blocks.0.fc.bias", "blocks.0.fc.weight", "blocks.0.norm.weight"]
    weight = loaded["blocks.0.fc.weight"]
    assert isinstance(weight, QuantizedTensor) and weight.layout_cls is FORMATS["int8_lodewise"]
    assert relative_error(weight.dequantize().float(), expected) <= rtol + 4e-3  # bf16 rounding of the values
    summary = convert(src, tmp_path / "out.safetensors", keep_quantized=True)
    assert summary.passed_through == [("blocks.0.fc", fmt if fmt == "int8_lodewise" else f"{fmt} (convert_to_quant)")]
    again = read_checkpoint(tmp_path / "out.safetensors")["blocks.0.fc.weight"]
    assert torch.equal(again.dequantize(), weight.dequantize())


def test_float8_layers_are_already_quantized_and_carried_over_untouched(tmp_path, capsys):
    """ComfyUI's fp8 files (plain "scaled fp8" and comfy_quant float8 layers) are not re-quantized."""
    from comfy_lowbit.convert.readers import normalise_state_dict
    from comfy_lowbit.layouts import encode_config

    sd, _ = flux(torch.Generator().manual_seed(11))
    sd["double_blocks.0.img_mlp.0.weight"] = sd["double_blocks.0.img_mlp.0.weight"].to(torch.float8_e4m3fn)
    sd["double_blocks.0.img_mlp.0.scale_weight"] = torch.tensor(0.5)
    sd["double_blocks.0.img_mlp.2.weight"] = sd["double_blocks.0.img_mlp.2.weight"].to(torch.float8_e4m3fn)
    sd["double_blocks.0.img_mlp.2.weight_scale"] = torch.tensor(0.25)
    sd["double_blocks.0.img_mlp.2.comfy_quant"] = encode_config({"format": "float8_e4m3fn"})
    src = save(tmp_path / "in.safetensors", sd)
    with pytest.raises(ConversionError, match="already holds 2 quantized layers"):
        convert(src, tmp_path / "out.safetensors")
    summary = convert(src, tmp_path / "out.safetensors", keep_quantized=True)
    assert sorted(f for _, f in summary.passed_through) == ["float8_e4m3fn (comfy_quant, not ours)", "float8_e4m3fn (float8)"]
    for key in ("double_blocks.0.img_mlp.0.weight", "double_blocks.0.img_mlp.0.scale_weight",
                "double_blocks.0.img_mlp.2.weight", "double_blocks.0.img_mlp.2.weight_scale",
                "double_blocks.0.img_mlp.2.comfy_quant"):
        assert raw_bytes(tmp_path / "out.safetensors", key) == raw_bytes(src, key), key
    assert "double_blocks.0.img_mlp.0" not in {r.name for r in summary.quantized}
    normalised = normalise_state_dict({k: v for k, v in sd.items() if "img_mlp.2" in k})
    assert normalised.keys() == {k for k in sd if "img_mlp.2" in k}
    assert cli.main(["inspect", str(src)]) == 0
    assert "float8_e4m3fn (comfy_quant, not ours)" in capsys.readouterr().out


def test_read_error_mid_way_names_the_tensor_and_leaves_nothing(tmp_path, monkeypatch):
    src = _flux_file(tmp_path)
    real, calls = os.preadv, []

    def failing(fd, buffers, offset):
        calls.append(offset)
        if len(calls) == 4:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", failing)
    with pytest.raises(ConversionError, match=r"in.safetensors: tensor '[^']+': read error \(Input/output error\)"):
        convert(src, tmp_path / "out.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


def test_a_progress_callback_can_cancel(tmp_path):
    """ComfyUI cancels by raising from the progress callback: that exception, and no output."""
    src = _flux_file(tmp_path)

    class Cancelled(Exception):
        pass

    def progress(done, total, key):
        if done > total // 2:
            raise Cancelled(key)

    with pytest.raises(Cancelled):
        convert_checkpoint(src, tmp_path / "out.safetensors", ConvertOptions(format=TOY), progress=progress,
                           show_progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]
