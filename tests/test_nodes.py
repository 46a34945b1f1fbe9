"""The ComfyUI nodes without ComfyUI: definitions and the operations' loading path.

CI has no ComfyUI, so these run against ``tests/comfy_standin`` (the few ComfyUI names we use,
same call shapes; see its README). The real ComfyUI is exercised by ``tests/e2e``.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from comfy_kitchen.tensor import QuantizedTensor

from comfy_lowbit.layouts import FORMATS, QuantFormatError, layer_state_dict

from support import outlier_matrix, relative_error

STANDIN = Path(__file__).parent / "comfy_standin"
N, K = 96, 256


@pytest.fixture(scope="module")
def comfy():
    """Put the stand-in on sys.path for this module only; import our nodes against it."""
    sys.path.insert(0, str(STANDIN))
    ours = [m for m in sys.modules if m.startswith("comfy_lowbit.nodes")]
    for name in ours:
        sys.modules.pop(name)
    try:
        yield {
            "definitions": importlib.import_module("comfy_lowbit.nodes.definitions"),
            "ops": importlib.import_module("comfy_lowbit.nodes.ops"),
            "stock": importlib.import_module("comfy_lowbit.nodes.stock_loaders"),
            "folder_paths": importlib.import_module("folder_paths"),
            "comfy_ops": importlib.import_module("comfy.ops"),
            "quant_ops": importlib.import_module("comfy.quant_ops"),
        }
    finally:
        sys.path.remove(str(STANDIN))
        for name in [m for m in sys.modules if m.split(".")[0] in ("comfy", "comfy_api", "folder_paths")
                     or m.startswith("comfy_lowbit.nodes")]:
            sys.modules.pop(name)


def test_package_imports_without_comfyui():
    import comfy_lowbit

    assert "comfy" not in sys.modules or sys.modules["comfy"].__file__.startswith(str(STANDIN))
    assert not hasattr(comfy_lowbit, "comfy_entrypoint")


def _schema(node):
    return node.define_schema()


def test_every_node_is_described(comfy):
    defs = comfy["definitions"]
    comfy["folder_paths"].FOLDERS.update({"diffusion_models": {"a.safetensors": "/m/a.safetensors"},
                                          "checkpoints": {"c.safetensors": "/m/c.safetensors"}})
    ids = [_schema(node).node_id for node in defs.NODES]
    assert ids == ["LowBitModelLoader", "LowBitCheckpointLoader", "LowBitCLIPLoader", "LowBitConvert"]
    for node in defs.NODES:
        schema = _schema(node)
        assert schema.display_name and len(schema.description) > 40, schema.node_id
        for inp in schema.inputs:
            assert inp.tooltip and len(inp.tooltip) > 10, f"{schema.node_id}.{inp.id} has no tooltip"
            if inp.io_type == "COMBO" and inp.default is not None:
                assert inp.default in inp.options, f"{schema.node_id}.{inp.id}: default not an option"
        for out in schema.outputs:
            assert out.tooltip, f"{schema.node_id} output {out.io_type} has no tooltip"


def test_model_loader_schema(comfy):
    defs = comfy["definitions"]
    comfy["folder_paths"].FOLDERS["diffusion_models"] = {"flux.safetensors": "/m/flux.safetensors"}
    schema = _schema(defs.LowBitModelLoader)
    assert schema.display_name == "Load Diffusion Model (LowBit)"
    inputs = {i.id: i for i in schema.inputs}
    assert list(inputs) == ["unet_name", "quantize_on_load", "lora_mode"]
    assert inputs["unet_name"].options == ["flux.safetensors"]
    assert inputs["quantize_on_load"].default == "none"
    # The choices are exactly the UI formats whose layouts this build has.
    landed = [ui for ui, fmt in defs.UI_FORMATS.items() if fmt in FORMATS]
    assert inputs["quantize_on_load"].options == ["none", *landed]
    assert inputs["lora_mode"].options == ["requantize", "runtime"] and inputs["lora_mode"].default == "requantize"
    assert [o.io_type for o in schema.outputs] == ["MODEL"]
    assert [o.io_type for o in _schema(defs.LowBitCheckpointLoader).outputs] == ["MODEL", "CLIP", "VAE"]
    assert [o.io_type for o in _schema(defs.LowBitCLIPLoader).outputs] == ["CLIP"]
    convert = _schema(defs.LowBitConvert)
    assert [o.io_type for o in convert.outputs] == ["STRING", "STRING"] and convert.is_output_node


def test_missing_file_is_a_clear_error(comfy):
    comfy["folder_paths"].FOLDERS["diffusion_models"] = {}
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        comfy["definitions"].LowBitModelLoader.execute("nope.safetensors")


def test_output_name():
    from comfy_lowbit.nodes.convert_node import output_name

    assert output_name("sub/flux1-dev.safetensors", "bnb_nf4") == "sub/flux1-dev-bnb_nf4.safetensors"
    assert output_name("x.sft", "int8_lodewise", " mine ") == "x-mine.safetensors"


class TinyModel(torch.nn.Module):
    """One layer outside the blocks (kept float on load) and one inside (quantized on load)."""

    def __init__(self, ops):
        super().__init__()
        self.img_in = ops.Linear(K, K, bias=True)
        self.blocks = torch.nn.ModuleList([torch.nn.ModuleDict({"proj": ops.Linear(K, N, bias=True)})])


def _float_state_dict(seed=0):
    return {
        "img_in.weight": (outlier_matrix(K, K, seed=seed, scale=4.0) / K**0.5).to(torch.bfloat16),
        "img_in.bias": torch.randn(K).to(torch.bfloat16),
        "blocks.0.proj.weight": (outlier_matrix(N, K, seed=seed + 1, scale=4.0) / K**0.5).to(torch.bfloat16),
        "blocks.0.proj.bias": torch.randn(N).to(torch.bfloat16),
    }


needs_formats = pytest.mark.skipif(not FORMATS, reason="no layouts registered yet")


@needs_formats
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_ops_load_our_file_entries_and_save_them_back(comfy, fmt):
    layout = FORMATS[fmt]
    sd = _float_state_dict()
    qt = QuantizedTensor.from_float(sd["blocks.0.proj.weight"], layout.__name__)
    file_sd = {k: v for k, v in sd.items() if k != "blocks.0.proj.weight"}
    file_sd.update(layer_state_dict("blocks.0.proj", qt))
    model = TinyModel(comfy["ops"].lowbit_operations())
    missing, unexpected = model.load_state_dict(dict(file_sd), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    w = model.blocks[0]["proj"].weight
    assert isinstance(w, QuantizedTensor) and w._layout_cls == layout.__name__ and w.shape == (N, K)
    assert torch.equal(w.dequantize(), qt.dequantize())
    assert model.blocks[0]["proj"].quant_format == fmt
    assert comfy["quant_ops"].QUANT_ALGOS[fmt]["quantize_input"] is layout.QUANTIZE_INPUT
    assert not isinstance(model.img_in.weight, QuantizedTensor)

    x = outlier_matrix(5, K, seed=9)
    with torch.inference_mode():
        out = model.blocks[0]["proj"](x)
    ref = F.linear(x, qt.dequantize().float(), sd["blocks.0.proj.bias"].float())
    # bf16-level agreement (the layout may round in bf16); W4A4 also quantizes activations.
    assert relative_error(out, ref) < (0.2 if fmt == "svdquant_w4a4" else 1e-2)

    saved = model.state_dict()
    for key, value in layer_state_dict("blocks.0.proj", qt).items():
        assert torch.equal(saved[key], value), key


@needs_formats
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_ops_quantize_on_load_blocks_only(comfy, fmt):
    sd = _float_state_dict(3)
    model = TinyModel(comfy["ops"].lowbit_operations(quantize=fmt))
    model.load_state_dict(dict(sd))
    w = model.blocks[0]["proj"].weight
    assert isinstance(w, QuantizedTensor) and w.layout_cls is FORMATS[fmt]
    expected = QuantizedTensor.from_float(sd["blocks.0.proj.weight"], FORMATS[fmt].__name__)
    assert torch.equal(w.dequantize(), expected.dequantize())  # the layout's own quantizer, as is
    assert not isinstance(model.img_in.weight, QuantizedTensor)  # outside the blocks: kept
    assert torch.equal(model.img_in.weight, sd["img_in.weight"])


@needs_formats
def test_ops_reject_a_weight_of_the_wrong_shape(comfy):
    fmt = sorted(FORMATS)[0]
    qt = QuantizedTensor.from_float((torch.randn(N, K) / K**0.5).to(torch.bfloat16), FORMATS[fmt].__name__)
    sd = _float_state_dict()
    sd.pop("blocks.0.proj.weight")
    sd.update(layer_state_dict("blocks.0.proj", qt))
    model = TinyModel(comfy["ops"].lowbit_operations())
    model.blocks[0]["proj"] = comfy["ops"].lowbit_operations().Linear(K, 2 * N)
    with pytest.raises(QuantFormatError, match="blocks.0.proj.*expects"):
        model.load_state_dict(sd, strict=False)


@pytest.mark.parametrize("quantize", [None, *sorted(FORMATS)[:1]])
def test_ops_layer_missing_from_the_file_computes_zeros(comfy, quantize):
    """A weight the file lacks (SD1.5 checkpoints have no CLIP text_projection): the layer runs,
    outputs its bias, and the key is reported missing; ComfyUI's own base would leave it None."""
    sd = _float_state_dict(5)
    sd.pop("img_in.weight")
    model = TinyModel(comfy["ops"].lowbit_operations(quantize=quantize))
    missing, unexpected = model.load_state_dict(dict(sd), strict=False)
    assert missing == ["img_in.weight"] and not unexpected, (missing, unexpected)
    x = outlier_matrix(3, K, seed=4).to(torch.bfloat16)
    with torch.inference_mode():
        out = model.img_in(x)
    assert torch.equal(out, sd["img_in.bias"].expand(3, K))
    assert torch.equal(model.blocks[0]["proj"].bias, sd["blocks.0.proj.bias"])  # the rest loads as usual


def test_quantize_on_load_follows_the_converter_through_comfyui_renames(comfy):
    """The keep rule sees ComfyUI's layer names: prefixes stripped (the UNet) or replaced (an
    SD1.5 checkpoint's ``cond_stage_model.`` text encoder is loaded as ``clip_l.``)."""
    loading = importlib.import_module("comfy_lowbit.nodes.loading")
    w = torch.zeros(8, 8)
    sd = {
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": w,
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": w,
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": w,
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": w,
        "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight": w,
        "model.diffusion_model.time_embed.0.weight": w,
        "first_stage_model.decoder.up.0.block.0.conv1.weight": torch.zeros(8, 8, 3, 3),
        "first_stage_model.decoder.mid.attn_1.q.weight": w,
    }
    keep = loading.converter_keep_rule(sd)
    for layer in ("clip_l.transformer.text_model.encoder.layers.0.mlp.fc1",
                  "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q",
                  "diffusion_model.input_blocks.1.0.emb_layers.1", "input_blocks.1.0.emb_layers.1"):
        assert not keep(layer), f"{layer} should be quantized, as the converter does"
    for layer in ("clip_l.transformer.text_model.embeddings.token_embedding", "diffusion_model.time_embed.0",
                  "decoder.mid.attn_1.q", "clip_l.transformer.text_projection",
                  "diffusion_model.input_blocks.1.0.emb_layers.2"):
        assert keep(layer), f"{layer} should stay in float, as the converter keeps it"


def test_unknown_quantize_format_is_a_clear_error(comfy):
    with pytest.raises(QuantFormatError, match="quantize_on_load.*'nf9'"):
        comfy["ops"].lowbit_operations(quantize="nf9")


@needs_formats
def test_stock_loader_reads_our_format_only_when_switched_on(comfy, monkeypatch):
    fmt = sorted(FORMATS)[0]
    comfy_ops = comfy["comfy_ops"]
    qt = QuantizedTensor.from_float((torch.randn(N, K) / K**0.5).to(torch.bfloat16), FORMATS[fmt].__name__)
    entries = {"bias": torch.randn(N)}
    entries.update({k[len("l."):]: v for k, v in layer_state_dict("l", qt).items()})

    def load():
        layer = comfy_ops.mixed_precision_ops({}, torch.bfloat16).Linear(K, N)
        layer.load_state_dict(dict(entries))
        return layer

    original = comfy_ops._load_quantized_module, comfy_ops._quantized_weight_state_dict
    try:
        monkeypatch.setenv("COMFY_LOWBIT_STOCK_LOADERS", "0")
        assert comfy["stock"].install() is False
        with pytest.raises((KeyError, ValueError), match=f"{fmt}|Unsupported quantization format"):
            load()  # ComfyUI: KeyError if QUANT_ALGOS lacks the format, ValueError if it has it
        monkeypatch.setenv("COMFY_LOWBIT_STOCK_LOADERS", "1")
        assert comfy["stock"].install() is True
        layer = load()
        assert isinstance(layer.weight, QuantizedTensor) and torch.equal(layer.weight.dequantize(), qt.dequantize())
        saved = layer.state_dict()
        assert torch.equal(saved["comfy_quant"], entries["comfy_quant"])
        plain = comfy_ops.mixed_precision_ops({}, torch.bfloat16).Linear(K, N)
        plain.load_state_dict({"weight": torch.randn(N, K), "bias": torch.randn(N)})  # delegated
        assert not isinstance(plain.weight, QuantizedTensor)
    finally:
        comfy_ops._load_quantized_module, comfy_ops._quantized_weight_state_dict = original


@needs_formats
def test_stock_model_detection_sees_our_layers_real_shapes(comfy):
    """ComfyUI's detection reads an SD UNet's text width from attn2.to_k, which our file holds
    packed; with the stock loaders installed it sees the unpacked shape (the file's dict untouched)."""
    detection = importlib.import_module("comfy.model_detection")
    comfy_ops = comfy["comfy_ops"]
    layer = "model.diffusion_model." + detection.TO_K[: -len(".weight")]
    layout = FORMATS[sorted(FORMATS)[0]]
    qt = QuantizedTensor.from_float((torch.randn(N, K) / K**0.5).to(torch.bfloat16), layout.__name__)
    sd = layer_state_dict(layer, qt)
    assert tuple(sd[f"{layer}.weight"].shape) != (N, K)  # packed: detection would read the wrong width
    before = dict(sd)
    originals = (comfy_ops._load_quantized_module, comfy_ops._quantized_weight_state_dict,
                 detection.detect_unet_config)
    try:
        assert comfy["stock"].install() is True
        assert detection.detect_unet_config(sd, "model.diffusion_model.")["context_dim"] == K
        assert sd.keys() == before.keys() and all(sd[k] is before[k] for k in sd)
        plain = {"model.diffusion_model." + detection.TO_K: torch.zeros(N, 2 * K)}
        assert detection.detect_unet_config(plain, "model.diffusion_model.")["context_dim"] == 2 * K
    finally:
        (comfy_ops._load_quantized_module, comfy_ops._quantized_weight_state_dict,
         detection.detect_unet_config) = originals
