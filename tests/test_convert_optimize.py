"""``--optimize``: still bitsandbytes' format, never worse than the plain encoder per block, better overall."""
from __future__ import annotations

import pytest
import torch

from comfy_lowbit.layouts import FORMATS

pytestmark = pytest.mark.skipif("bnb_nf4" not in FORMATS, reason="needs the NF4/FP4 layouts")

from support import outlier_matrix, relative_error  # noqa: E402


def _weight(shape, seed):
    return (outlier_matrix(*shape, seed=seed, scale=6.0) / shape[1] ** 0.5).to(torch.bfloat16)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape, block", [((96, 256), 64), ((33, 65), 64), ((40, 96), 128)])
def test_optimized_blocks_never_worse_and_better_overall(quant_type, shape, block):
    from comfy_lowbit.convert.optimize import optimized_quantize_4bit
    from comfy_lowbit.kernels import bnb4_codec as codec

    x = _weight(shape, seed=shape[0])
    plain = codec.quantize_4bit(x, block, quant_type)
    packed, absmax = optimized_quantize_4bit(x, block, quant_type)
    assert packed.shape == plain[0].shape and packed.dtype == torch.uint8
    assert absmax.shape == plain[1].shape and absmax.dtype == torch.float32 and (absmax > 0).all()
    ref = x.float().reshape(-1)
    n = ref.numel()
    pad = -n % block

    def block_errors(p, a):
        y = codec.dequantize_4bit(p, a, block, quant_type, x.shape, torch.float32).reshape(-1)
        return torch.nn.functional.pad((y - ref).square(), (0, pad)).view(-1, block).sum(1)

    before, after = block_errors(*plain), block_errors(packed, absmax)
    assert (after <= before * (1 + 1e-6) + 1e-12).all(), "a block got worse than the plain encoding"
    assert after.sum() < 0.97 * before.sum()


@pytest.mark.parametrize("fmt", ["bnb_nf4", "bnb_fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_optimized_weight_is_readable_by_bitsandbytes(fmt, double_quant):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    from comfy_lowbit.convert.optimize import optimized_quantize

    layout = FORMATS[fmt]
    w = _weight((64, 192), seed=3)
    opt, plain = optimized_quantize(w, layout, {"double_quant": double_quant, "layer": "blocks.0.fc"})
    ours = opt.dequantize()
    absmax = opt._params.absmax()
    state = bnb_functional.QuantState(absmax=absmax, shape=w.shape, blocksize=64, quant_type=fmt[4:],
                                      dtype=torch.bfloat16, code=bnb_functional.get_4bit_type(fmt[4:], device="cpu"))
    theirs = bnb_functional.dequantize_4bit(opt._qdata, state)
    assert torch.equal(theirs, ours)
    assert relative_error(ours, w) < relative_error(plain.dequantize(), w)


def test_convert_with_optimize_reports_the_reduction(tmp_path):
    from comfy_lowbit.convert.converter import ConvertOptions, convert_checkpoint
    from comfy_lowbit.convert.readers import read_checkpoint
    from comfy_lowbit.convert.writer import SafetensorsWriter

    sd = {f"blocks.{i}.mlp.fc{i}.weight": _weight((128, 256), seed=10 + i) for i in range(3)}
    src = tmp_path / "in.safetensors"
    with SafetensorsWriter(src) as writer:
        for key, value in sd.items():
            writer.add(key, value)
        writer.commit()
    summary = convert_checkpoint(src, tmp_path / "out.safetensors", ConvertOptions(format="nf4", optimize=True),
                                 show_progress=False)
    stats = summary.error_stats()
    assert stats["optimize_reduction"] > 0.02 and "lower" in summary.format_text()
    loaded = read_checkpoint(tmp_path / "out.safetensors")
    for r in summary.quantized:
        assert relative_error(loaded[r.name + ".weight"].dequantize(), sd[r.name + ".weight"]) == pytest.approx(r.rel_error, rel=1e-2)
