"""The reference NF4/FP4 codec against the real bitsandbytes: every bit of every output.

Fresh random tensors with outliers, odd shapes, every block size, fp32/fp16/bf16, with and
without double quant; values exactly on and next to codebook midpoints; all-zero full and
short blocks; chunk boundaries; bad inputs.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import bnb_peer
from comfy_lowbit.kernels import bnb4_codec as codec

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((3, 7), (1, 1), (1000, 37), (4097,), (48, 256))


def _outlier_tensor(shape, dtype, seed):
    """Normal values, every 13th one 30x larger, a few exact zeros: fresh per case."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    flat = x.view(-1)
    flat[torch.randperm(flat.numel(), generator=gen)[: max(1, flat.numel() // 13)]] *= 30
    flat[torch.randperm(flat.numel(), generator=gen)[: flat.numel() // 50]] = 0
    return x.to(dtype)


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor, what: str):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, f"{what}: {ours.dtype} {ours.shape} vs {theirs.dtype} {theirs.shape}"
    differ = ours != theirs
    if ours.is_floating_point():
        differ &= ~(ours.isnan() & theirs.isnan())
    if differ.any():
        first = differ.nonzero()[:5].tolist()
        raise AssertionError(f"{what}: {int(differ.sum())} of {ours.numel()} differ, first at {first}: "
                             f"{ours[differ][:5].tolist()} vs {theirs[differ][:5].tolist()}")


def test_tables_match_bitsandbytes():
    _assert_same(codec.NF4_CODE, bnb_peer.codebook("nf4", device="cpu"), "NF4 codebook")
    _assert_same(codec.FP4_CODE, bnb_peer.codebook("fp4", device="cpu"), "FP4 codebook")
    _assert_same(codec.DYNAMIC_MAP_SIGNED, bnb_peer.dynamic_map(), "dynamic map")
    assert codec.codebook("nf4") is codec.NF4_CODE and codec.codebook("fp4") is codec.FP4_CODE


# Every block size with every shape and quant type; the dtype rotates so all three meet every
# block size and shape without a full product (the code path does not depend on the pairing).
CASES = [(qt, bs, shape, DTYPES[(i + j) % 3])
         for qt in codec.QUANT_TYPES
         for i, bs in enumerate(codec.BLOCK_SIZES)
         for j, shape in enumerate(SHAPES)]


@pytest.mark.parametrize("quant_type, block_size, shape, dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_bit_exact_with_bitsandbytes(quant_type, block_size, shape, dtype):
    x = _outlier_tensor(shape, dtype, seed=CASES.index((quant_type, block_size, shape, dtype)))
    packed, absmax = codec.quantize_4bit(x, block_size, quant_type)
    for double_quant in (False, True):
        ref_packed, state = bnb_peer.quantize(x, block_size, quant_type, double_quant)
        _assert_same(packed, ref_packed, "packed codes")
        if double_quant:
            codes, nested, offset = codec.quantize_nested_absmax(absmax)
            _assert_same(codes, state.absmax, "nested codes")
            _assert_same(nested, state.state2.absmax, "nested absmax")
            _assert_same(offset, state.offset, "offset")
            decoded_absmax = codec.dequantize_nested_absmax(codes, nested, offset)
        else:
            _assert_same(absmax, state.absmax, "absmax")
            decoded_absmax = absmax
        poisoned = torch.full(shape, float("nan"), dtype=dtype)
        ours = codec.dequantize_4bit(packed, decoded_absmax, block_size, quant_type, shape, dtype, out=poisoned)
        assert ours.data_ptr() == poisoned.data_ptr()
        _assert_same(ours, bnb_peer.dequantize(ref_packed, state), "dequantized")


@pytest.mark.parametrize("quant_type", codec.QUANT_TYPES)
def test_midpoints_ties_and_signed_zeros(quant_type):
    """Values exactly on, and one float step either side of, every midpoint; +-0; +-absmax."""
    midpoints, _ = codec._MIDPOINTS[quant_type]
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    probes = torch.cat([midpoints, midpoints.nextafter(up), midpoints.nextafter(down),
                        torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, 0.999, -0.999])])
    x = torch.cat([torch.tensor([1.0]), probes, torch.tensor([-1.0])])  # block absmax exactly 1
    packed, absmax = codec.quantize_4bit(x, 4096, quant_type)
    ref_packed, state = bnb_peer.quantize(x, 4096, quant_type)
    _assert_same(packed, ref_packed, "codes at midpoints")
    _assert_same(absmax, state.absmax, "absmax")
    # Tie rule (strict >): a value exactly on a midpoint takes the lower of its two neighbours.
    nibbles = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1)
    on_midpoint = codec.codebook(quant_type)[nibbles[1 : 1 + midpoints.numel()].long()]
    _assert_same(on_midpoint, codec.codebook(quant_type).sort().values[:-1], "codes on midpoints")


def test_all_zero_blocks():
    """A zero full block stores absmax 0, a zero short last block 1e-38; both decode to zeros."""
    x = _outlier_tensor((5 * 64 + 10,), torch.float32, seed=3)
    x[64:128] = 0
    x[5 * 64 :] = 0
    for quant_type, double_quant in itertools.product(codec.QUANT_TYPES, (False, True)):
        packed, absmax = codec.quantize_4bit(x, 64, quant_type)
        ref_packed, state = bnb_peer.quantize(x, 64, quant_type, double_quant)
        _assert_same(packed, ref_packed, "packed")
        assert absmax[1] == 0 and absmax[-1] == torch.tensor(1e-38)
        if double_quant:
            absmax = codec.dequantize_nested_absmax(*codec.quantize_nested_absmax(absmax))
        else:
            _assert_same(absmax, state.absmax, "absmax")
        y = codec.dequantize_4bit(packed, absmax, 64, quant_type, x.shape, torch.float32)
        _assert_same(y, bnb_peer.dequantize(ref_packed, state), "dequantized")
        if not double_quant:
            assert (y[64:128] == 0).all() and (y[5 * 64 :] == 0).all()


@pytest.mark.parametrize("length", [1, 255, 256, 257, 3001])
def test_nested_absmax_matches_bitsandbytes(length):
    gen = torch.Generator().manual_seed(length)
    absmax = torch.rand(length, generator=gen) ** 3 * 5
    absmax[:: max(1, length // 7)] *= 40  # outlier blocks
    codes, nested, offset = codec.quantize_nested_absmax(absmax)
    ref_codes, ref_nested = bnb_peer.quantize_blockwise(absmax - absmax.mean())
    _assert_same(codes, ref_codes, "codes")
    _assert_same(nested, ref_nested, "nested absmax")
    decoded = codec.dequantize_nested_absmax(codes, nested, offset)
    assert ((decoded - absmax).abs() <= 0.02 * absmax.abs().max()).all()


def test_nested_block_of_equal_absmax_stores_code_zero():
    """All absmax equal: every centred value is 0, bitsandbytes stores code 0 and nested absmax 0."""
    absmax = torch.full((300,), 0.75)
    codes, nested, offset = codec.quantize_nested_absmax(absmax)
    assert (codes == 0).all() and (nested == 0).all() and offset == 0.75
    _assert_same(codec.dequantize_nested_absmax(codes, nested, offset), absmax, "decoded")


@pytest.mark.parametrize("quant_type", codec.QUANT_TYPES)
def test_chunk_boundaries(quant_type, monkeypatch):
    """Chunked processing gives the same bits as one pass, short last block included."""
    monkeypatch.setattr(codec, "CHUNK_VALUES", 1024)
    x = _outlier_tensor((7 * 1024 + 77,), torch.bfloat16, seed=11)
    for block_size in (32, 256, 2048):
        packed, absmax = codec.quantize_4bit(x, block_size, quant_type)
        ref_packed, state = bnb_peer.quantize(x, block_size, quant_type)
        _assert_same(packed, ref_packed, f"packed, blocks of {block_size}")
        _assert_same(absmax, state.absmax, "absmax")
        y = codec.dequantize_4bit(packed, absmax, block_size, quant_type, x.shape, torch.bfloat16)
        _assert_same(y, bnb_peer.dequantize(ref_packed, state), "dequantized")


def test_bad_inputs():
    x = torch.randn(8, 64)
    with pytest.raises(ValueError, match="block_size must be one of"):
        codec.quantize_4bit(x, 48, "nf4")
    with pytest.raises(ValueError, match="quant_type must be one of"):
        codec.quantize_4bit(x, 64, "int4")
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        codec.quantize_4bit(x.to(torch.int32), 64, "nf4")
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[3, 5] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            codec.quantize_4bit(y, 64, "fp4")
    packed, absmax = codec.quantize_4bit(x, 64, "nf4")
    with pytest.raises(ValueError, match="absmax must have 8 values"):
        codec.dequantize_4bit(packed, absmax[:-1], 64, "nf4", x.shape, torch.float32)
    with pytest.raises(ValueError, match="packed must be uint8 with 256 bytes"):
        codec.dequantize_4bit(packed[:-1], absmax, 64, "nf4", x.shape, torch.float32)
