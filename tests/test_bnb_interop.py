"""bitsandbytes-serialised state dicts (``QuantState.as_dict(packed=True)``, as transformers,
diffusers and Forge save them) <-> our layouts, both ways, bit for bit; errors name the tensor."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from comfy_kitchen.tensor import QuantizedTensor
from safetensors.torch import save_file

import bnb_peer
from comfy_lowbit.convert.bnb import load_bnb_4bit, to_bnb_4bit
from comfy_lowbit.layouts import QuantFormatError
from support import outlier_matrix

W = "transformer_blocks.3.ff.net.2.weight"


def _bnb_state_dict(quant_type, double_quant, shape=(72, 136), dtype=torch.bfloat16, block_size=64, seed=0):
    w = (outlier_matrix(shape[0], shape[1], seed=seed, scale=10.0) / shape[1] ** 0.5).to(dtype)
    packed, state = bnb_peer.quantize(w, block_size, quant_type, double_quant)
    sd = bnb_peer.serialised(W, packed, state)
    sd["transformer_blocks.3.ff.net.2.bias"] = torch.randn(shape[0])
    sd["transformer_blocks.3.norm.weight"] = torch.randn(shape[1])
    return sd, packed, state


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant, shape, dtype, block_size", [
    (False, (72, 136), torch.bfloat16, 64),
    (True, (72, 136), torch.float16, 64),
    (True, (301, 33), torch.float32, 128),
])
def test_load_then_write_round_trips_bit_for_bit(quant_type, double_quant, shape, dtype, block_size):
    sd, packed, state = _bnb_state_dict(quant_type, double_quant, shape, dtype, block_size)
    loaded = load_bnb_4bit(sd)
    assert set(loaded) == {W, "transformer_blocks.3.ff.net.2.bias", "transformer_blocks.3.norm.weight"}
    qt = loaded[W]
    assert isinstance(qt, QuantizedTensor) and qt.layout_cls.QUANT_TYPE == quant_type
    assert qt.shape == shape and qt.dtype == dtype and qt._params.double_quant == double_quant
    assert torch.equal(qt.dequantize(), bnb_peer.dequantize(packed, state))
    assert loaded["transformer_blocks.3.norm.weight"] is sd["transformer_blocks.3.norm.weight"]

    written = to_bnb_4bit(loaded)
    assert set(written) == set(sd)
    for key, value in sd.items():
        assert written[key].dtype == value.dtype and torch.equal(written[key], value), key
    again = bnb_peer.state_from_serialised(W, written)
    assert torch.equal(bnb_peer.dequantize(written[W], again), qt.dequantize())


@pytest.mark.parametrize("layout", ["NF4Layout", "FP4Layout"])
def test_our_weights_load_in_bitsandbytes(layout):
    w = outlier_matrix(40, 96, seed=4, dtype=torch.bfloat16)
    qt = QuantizedTensor.from_float(w, layout, block_size=32, double_quant=True)
    written = to_bnb_4bit({W: qt})
    state = bnb_peer.state_from_serialised(W, written)
    assert torch.equal(bnb_peer.dequantize(written[W], state), qt.dequantize())


def test_wider_quant_storage_is_read_as_bytes():
    """bitsandbytes can store the packed bytes in another dtype (quant_storage, for FSDP)."""
    sd, packed, state = _bnb_state_dict("nf4", False)
    sd[W] = packed.view(-1).view(torch.bfloat16).unsqueeze(1)
    assert torch.equal(load_bnb_4bit(sd)[W].dequantize(), bnb_peer.dequantize(packed, state))


def test_loading_needs_no_bitsandbytes(tmp_path: Path):
    sd, packed, state = _bnb_state_dict("fp4", True)
    save_file(sd, str(tmp_path / "bnb.safetensors"))
    torch.save(bnb_peer.dequantize(packed, state), tmp_path / "ref.pt")
    script = f"""
import sys
sys.modules["bitsandbytes"] = None  # any import of it now fails
import torch
from safetensors.torch import load_file
from comfy_lowbit.convert.bnb import load_bnb_4bit
w = load_bnb_4bit(load_file({str(tmp_path / "bnb.safetensors")!r}))[{W!r}]
assert torch.equal(w.dequantize(), torch.load({str(tmp_path / "ref.pt")!r}))
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def _json(sd, key):
    return json.loads(bytes(sd[key].tolist()))


def _with_state(sd, key, **changes):
    state = {**_json(sd, key), **changes}
    return {**sd, key: torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)}


QS = f"{W}.quant_state.bitsandbytes__nf4"


@pytest.mark.parametrize("mutate, key, match", [
    (lambda sd: {k: v for k, v in sd.items() if k != f"{W}.absmax"}, f"{W}.absmax", r"missing; expected torch.uint8 of shape \[153\]"),
    (lambda sd: {**sd, f"{W}.absmax": sd[f"{W}.absmax"][:100]}, f"{W}.absmax", r"expected torch.uint8 of shape \[153\], got torch.uint8 of shape \[100\]"),
    (lambda sd: {k: v for k, v in sd.items() if k != f"{W}.nested_absmax"}, f"{W}.nested_absmax", r"missing; expected torch.float32 of shape \[1\]"),
    (lambda sd: {k: v for k, v in sd.items() if k != W}, W, r"missing; .* describes it"),
    (lambda sd: {**sd, W: sd[W][:-1]}, W, r"expected 4896 bytes of packed 4-bit codes"),
    (lambda sd: {**sd, f"{W}.quant_map": sd[f"{W}.quant_map"].flip(0)}, f"{W}.quant_map", r"not bitsandbytes' standard nf4 codebook"),
    (lambda sd: {**sd, QS: sd[QS][:-3]}, QS, r"not valid UTF-8 JSON"),
    (lambda sd: _with_state(sd, QS, blocksize=100), QS, r'"blocksize" must be one of .* got 100'),
    (lambda sd: _with_state(sd, QS, dtype="int8"), QS, r'"dtype" must be one of .* got \'int8\''),
    (lambda sd: _with_state(sd, QS, quant_type="fp4"), QS, r'"quant_type" must be "nf4"'),
    (lambda sd: {**sd, f"{W}.quant_state.bitsandbytes__int4": sd.pop(QS)}, f"{W}.quant_state.bitsandbytes__int4", r"unknown bitsandbytes quant type 'int4'"),
])
def test_errors_name_the_tensor(mutate, key, match):
    sd, _, _ = _bnb_state_dict("nf4", True)
    with pytest.raises(QuantFormatError, match=match) as info:
        load_bnb_4bit(mutate(dict(sd)))
    assert f"'{key}'" in str(info.value)
