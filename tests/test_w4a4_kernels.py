"""W4A4 Triton kernels against their plain-PyTorch references (interpreter on CPU, CUDA on a GPU).

Small odd shapes, outlier columns, all 16 weight nibbles, poisoned outputs. Under the
interpreter the activation codes must match the reference exactly; on a GPU the fp32
division may differ by one ulp, so a code may move by one step on an exact rounding tie
(counted, and held to a tiny fraction).
"""
from __future__ import annotations

import pytest
import torch

from comfy_lowbit.kernels.w4a4_gemm import (
    pack_int4,
    unpack_int4,
    unpack_weight,
    unpack_weight_reference,
    w4a4_gemm,
    w4a4_gemm_reference,
)
from comfy_lowbit.kernels.w4a4_quantize import (
    natural_group_order,
    quantize_activations,
    quantize_activations_reference,
    split_group_order,
)

from support import KERNEL_DEVICE, outlier_matrix, relative_error

ON_GPU = KERNEL_DEVICE == "cuda"


def _activation(m, k, seed, dtype):
    x = outlier_matrix(m, k, seed=seed, scale=20.0)
    if m > 2:
        x[1] = 0.0  # an all-zero row: absmax clamps to 1e-10, codes 0
        x[2, 3] = 3e4  # one huge value in one group
    return x.to(dtype).to(KERNEL_DEVICE)


def _poisoned_quant_buffers(m, k, r):
    codes = torch.full((m, k), 127, dtype=torch.int8, device=KERNEL_DEVICE)  # 127 is no valid code
    ascales = torch.full((k // 64, m), float("nan"), device=KERNEL_DEVICE)
    lora = torch.full((k // 64, m, r), float("nan"), device=KERNEL_DEVICE)  # one chunk per group
    return codes, ascales, lora


def test_pack_unpack_round_trip_all_nibbles():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 4)[:, torch.randperm(64)]
    packed = pack_int4(codes)
    assert packed.dtype == torch.int8 and packed.shape == (3, 32)
    assert torch.equal(unpack_int4(packed), codes)
    assert torch.equal(natural_group_order(split_group_order(codes)), codes)
    assert torch.equal(split_group_order(codes)[:, :32], codes[:, 0::2])


@pytest.mark.parametrize("m,k,r", [(1, 64, 1), (5, 192, 20), (33, 128, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unsigned", [False, True])
def test_quantize_matches_reference(m, k, r, dtype, unsigned):
    x = _activation(m, k, seed=m + k, dtype=dtype)
    g = torch.Generator().manual_seed(m * k + r)
    smooth = (torch.rand(k, generator=g) + 0.5).to(dtype).to(KERNEL_DEVICE)
    down = (torch.randn(k, r, generator=g) / 8).to(dtype).to(KERNEL_DEVICE)
    codes, ascales, lora = quantize_activations(x, smooth, down, unsigned, out=_poisoned_quant_buffers(m, k, r), chunks=k // 64)
    ref_codes, ref_scales, ref_lora = quantize_activations_reference(x, smooth, down, unsigned)
    got = natural_group_order(codes).int()
    diff = (got - ref_codes.int()).abs()
    assert got.abs().max() <= 15, "an unwritten code (poison 127) survived"
    if ON_GPU:  # the GPU's division may round a value at a code boundary the other way
        assert diff.max() <= 1 and (diff > 0).sum() <= max(2, diff.numel() // 1000)
    else:
        assert torch.equal(got, ref_codes.int())
    assert torch.isfinite(ascales).all() and torch.allclose(ascales, ref_scales, rtol=1e-6, atol=0)
    if m > 2 and not unsigned:  # unsigned adds the GELU shift first, so a zero row is not zero
        assert (got[1] == 0).all()
    assert relative_error(lora.sum(0), ref_lora) < (2e-3 if ON_GPU and dtype == torch.float32 else 1e-5)


@pytest.mark.parametrize("config", [{"STEP_GROUPS": 2}, {"STEP_GROUPS": 4, "BLOCK_M": 32, "num_warps": 8},
                                    {"BLOCK_M": 32, "FAST_DIV": True}, {"BLOCK_M": 64, "num_warps": 8, "FAST_DIV": True}])
@pytest.mark.parametrize("unsigned", [False, True])
def test_quantize_variants_match_reference(config, unsigned):
    """The benchmark's quantizer variants: several groups per step (K=320 has 5 groups, so a
    step runs past the end of K and of a chunk), 32-row tiles, fast division (exact here: the
    interpreter divides with numpy; the GPU's 2-ulp division is covered by the GPU bounds)."""
    m, k, r = 37, 320, 12
    x = _activation(m, k, seed=21, dtype=torch.bfloat16)
    smooth = (torch.rand(k) + 0.5).to(torch.bfloat16).to(KERNEL_DEVICE)
    down = (torch.randn(k, r) / 8).to(torch.bfloat16).to(KERNEL_DEVICE)
    poisoned = _poisoned_quant_buffers(m, k, r)
    out = (poisoned[0], poisoned[1], poisoned[2][:2])  # 2 chunks of whole steps
    codes, ascales, lora = quantize_activations(x, smooth, down, unsigned, out=out, chunks=2, config=config)
    ref_codes, ref_scales, ref_lora = quantize_activations_reference(x, smooth, down, unsigned)
    got = natural_group_order(codes).int()
    assert got.abs().max() <= 15, "an unwritten code (poison 127) survived"
    diff = (got - ref_codes.int()).abs()
    if ON_GPU:  # the GPU's division may round a value at a code boundary the other way
        assert diff.max() <= 1 and (diff > 0).sum() <= max(2, diff.numel() // 1000)
    else:
        assert torch.equal(got, ref_codes.int())
    assert torch.isfinite(ascales).all() and torch.allclose(ascales, ref_scales, rtol=1e-6 if not ON_GPU else 1e-5, atol=0)
    assert relative_error(lora.sum(0), ref_lora) < 1e-5


def _gemm_inputs(m, n, k, r, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _activation(m, k, seed=seed, dtype=dtype)
    smooth = (torch.rand(k, generator=gen) + 0.5).to(dtype).to(KERNEL_DEVICE)
    down = (torch.randn(k, r, generator=gen) / 8).to(dtype).to(KERNEL_DEVICE)
    codes, ascales, lora = quantize_activations_reference(x, smooth, down)
    qweight = torch.randint(-128, 128, (n, k // 2), generator=gen, dtype=torch.int8).to(KERNEL_DEVICE)  # all nibbles
    wscales = (torch.rand(k // 64, n, generator=gen) / 16 + 1e-3).to(dtype).to(KERNEL_DEVICE)
    up = torch.randn(n, r, generator=gen).to(dtype).to(KERNEL_DEVICE)
    bias = torch.randn(n, generator=gen).to(dtype).to(KERNEL_DEVICE)
    return codes, ascales, qweight, wscales, lora, up, bias


@pytest.mark.parametrize("m,n,k,r", [(1, 40, 64, 1), (5, 72, 192, 20), (17, 33, 128, 32), (33, 96, 256, 16)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemm_matches_reference(m, n, k, r, out_dtype, with_bias):
    codes, ascales, qweight, wscales, lora, up, bias = _gemm_inputs(m, n, k, r, torch.bfloat16, seed=m * n + k)
    bias = bias if with_bias else None
    poison = torch.full((m, n), float("nan"), dtype=out_dtype, device=KERNEL_DEVICE)
    out = w4a4_gemm(split_group_order(codes), ascales, qweight, wscales, lora, up, bias, out_dtype, out=poison)
    ref = w4a4_gemm_reference(codes, ascales, qweight, wscales, lora, up, bias, torch.float32)
    # fp32: exact int sums, fp32 scaling (tf32 in the rank-R epilogue on a GPU); bf16: one rounding.
    tol = 8e-3 if out_dtype == torch.bfloat16 else (2e-3 if ON_GPU else 1e-5)
    assert out.dtype == out_dtype and relative_error(out, ref) < tol


DOTS = ["int8", "int8_i2f"] + (["fp8"] if ON_GPU and torch.cuda.get_device_capability() >= (8, 9) else [])


@pytest.mark.parametrize("dot", DOTS)
@pytest.mark.parametrize("unpacked", [False, True])
@pytest.mark.parametrize("k", [192, 256])  # 4 groups: two per iteration when unpacked
@pytest.mark.parametrize("split_k", [1, 3])
def test_gemm_variants_agree(dot, unpacked, k, split_k):
    codes, ascales, qweight, wscales, lora, up, bias = _gemm_inputs(9, 48, k, 8, torch.float32, seed=7)
    code_dtype = torch.float8_e4m3fn if dot == "fp8" else torch.int8
    a = split_group_order(codes).to(code_dtype)
    w8 = unpack_weight(qweight, code_dtype) if unpacked else None
    config = {"BLOCK_M": 16, "BLOCK_N": 32, "GROUP_M": 4, "SPLIT_K": split_k}
    poison = torch.full((9, 48), float("nan"), device=KERNEL_DEVICE)
    out = w4a4_gemm(a, ascales, qweight, wscales, lora, up, bias, torch.float32, dot=dot, unpacked=w8, config=config, out=poison)
    ref = w4a4_gemm_reference(codes, ascales, qweight, wscales, lora, up, bias, torch.float32)
    assert relative_error(out, ref) < (2e-3 if ON_GPU else 1e-5)


@pytest.mark.parametrize("n,k", [(1, 64), (70, 192)])
@pytest.mark.parametrize("dtype", [torch.int8] + ([torch.float8_e4m3fn] if "fp8" in DOTS else []))
def test_unpack_weight_matches_reference(n, k, dtype):
    qweight = torch.randint(-128, 128, (n, k // 2), dtype=torch.int8).to(KERNEL_DEVICE)
    got = unpack_weight(qweight, dtype)
    assert got.dtype == dtype and torch.equal(got.float(), unpack_weight_reference(qweight).float())


@pytest.mark.parametrize("chunks", [1, 3])
def test_quantize_then_gemm_with_lora_chunks(chunks):
    """The GEMM sums the quantizer's per-chunk low-rank partials (small M splits K)."""
    m, n, k, r = 3, 40, 192, 12
    codes, ascales, qweight, wscales, _, up, bias = _gemm_inputs(m, n, k, r, torch.float32, seed=11)
    x = _activation(m, k, seed=12, dtype=torch.float32)
    smooth = (torch.rand(k) + 0.5).to(KERNEL_DEVICE)
    down = (torch.randn(k, r) / 8).to(KERNEL_DEVICE)
    q = quantize_activations(x, smooth, down, chunks=chunks)
    assert q[2].shape == (chunks, m, r)
    out = w4a4_gemm(*q[:2], qweight, wscales, q[2], up, bias, torch.float32)
    ref_codes, ref_scales, ref_lora = quantize_activations_reference(x, smooth, down)
    ref = w4a4_gemm_reference(ref_codes, ref_scales, qweight, wscales, ref_lora, up, bias, torch.float32)
    assert relative_error(out, ref) < (2e-3 if ON_GPU else 1e-5)


def test_gemm_shape_errors_say_what_was_expected():
    codes, ascales, qweight, wscales, lora, up, bias = _gemm_inputs(3, 16, 128, 4, torch.float32, seed=1)
    with pytest.raises(ValueError, match=r"wscales has shape \(16, 2\), expected \(2, 16\)"):
        w4a4_gemm(split_group_order(codes), ascales, qweight, wscales.t(), lora, up, bias, torch.float32)


def test_error_measure_never_passes_nan():
    ref = torch.randn(4, 4)
    bad = ref.clone()
    bad[0, 0] = float("nan")
    assert relative_error(bad, ref) == float("inf")


@pytest.mark.skipif(not ON_GPU, reason="the autotuned launch only exists on a GPU")
@pytest.mark.parametrize("m", [1, 16, 100, 1000])
def test_autotuned_gemm_on_gpu(m):
    codes, ascales, qweight, wscales, lora, up, bias = _gemm_inputs(m, 384, 512, 32, torch.bfloat16, seed=m)
    poison = torch.full((m, 384), float("nan"), dtype=torch.bfloat16, device="cuda")
    out = w4a4_gemm(split_group_order(codes), ascales, qweight, wscales, lora, up, bias, torch.bfloat16)
    out = w4a4_gemm(split_group_order(codes), ascales, qweight, wscales, lora, up, bias, torch.bfloat16, out=poison)
    ref = w4a4_gemm_reference(codes, ascales, qweight, wscales, lora, up, bias, torch.float32)
    assert relative_error(out, ref) < 8e-3


@pytest.mark.skipif(not ON_GPU, reason="the layout takes the kernel path only on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [2, 9])  # 74 rows: fused GEMM; 333 rows: weight unpacked first
def test_layout_linear_on_gpu_matches_reference(dtype, batch):
    from comfy_kitchen.tensor import QuantizedTensor
    from comfy_lowbit.layouts.w4a4 import w4a4_linear_reference

    w = (outlier_matrix(320, 768, seed=3, scale=4.0) / 768**0.5).to(dtype).cuda()
    qt = QuantizedTensor.from_float(w, "W4A4Layout", rank=32)
    x = _activation(batch * 37, 768, seed=4, dtype=dtype).reshape(batch, 37, 768)
    bias = torch.randn(320, device="cuda").to(dtype)
    with torch.inference_mode():
        out = torch.nn.functional.linear(x, qt, bias)
    ref = w4a4_linear_reference(x.reshape(-1, 768), qt, bias).float().reshape(batch, 37, 320)
    assert out.shape == (batch, 37, 320) and out.dtype == dtype and relative_error(out, ref) < 1e-2


# ----------------------------------------------------------------------------- Hopper (Gluon)

from comfy_lowbit.kernels.sm90 import WARP_PLANS, hopper_with_gluon  # noqa: E402

SM90 = ON_GPU and hopper_with_gluon(torch.device(KERNEL_DEVICE))


@pytest.mark.skipif(not SM90, reason="the Gluon kernel needs a Hopper GPU")
@pytest.mark.parametrize("m,n,k,r", [(300, 200, 320, 32), (129, 72, 192, 20), (1, 40, 64, 8), (1000, 264, 512, 128)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("warps", WARP_PLANS)
def test_sm90_gemm_matches_reference(m, n, k, r, out_dtype, warps):
    """Odd M and N (TMA zero-fill, masked stores), odd and even group counts (the loop's tail),
    ranks that are not a power of two, bias on odd M."""
    from comfy_lowbit.kernels.w4a4_gemm_sm90 import w4a4_gemm_sm90

    scale_dtype = out_dtype if out_dtype != torch.float32 else torch.bfloat16
    codes, ascales, qweight, wscales, lora, up, bias = _gemm_inputs(m, n, k, r, scale_dtype, seed=m + n + k)
    bias = bias if m % 2 else None
    fp8 = torch.float8_e4m3fn
    poison = torch.full((m, n), float("nan"), dtype=out_dtype, device=KERNEL_DEVICE)
    out = w4a4_gemm_sm90(split_group_order(codes).to(fp8), ascales, unpack_weight(qweight, fp8), wscales, lora, up,
                         bias, out_dtype, out=poison, **WARP_PLANS[warps])
    ref = w4a4_gemm_reference(codes, ascales, qweight, wscales, lora, up, bias, torch.float32)
    # Exact group sums, fp32 scaling, tf32 low-rank term; bf16/fp16: one output rounding.
    tol = {torch.float32: 2e-3, torch.float16: 3e-3, torch.bfloat16: 8e-3}[out_dtype]
    assert out.dtype == out_dtype
    # Rank 128 on these inputs reaches 1.2e5: fp16 must overflow to inf exactly there, and
    # only there (NaN is never an overflow).
    overflow = ref.to(out_dtype).isinf()
    assert torch.equal(out.isinf(), overflow) and not out.isnan().any()
    assert relative_error(out[~overflow], ref[~overflow]) < tol


@pytest.mark.skipif(not __import__("comfy_lowbit.kernels.sm90", fromlist=["x"]).gluon_importable(),
                    reason="this Triton has no Gluon Hopper API")
def test_layout_takes_the_hopper_gemm_only_when_enabled(monkeypatch):
    """The dispatch rule on the CPU (nothing is launched): on unless COMFY_LOWBIT_SM90=0, e4m3
    operands only."""
    from comfy_lowbit.kernels import sm90
    from comfy_lowbit.layouts import w4a4 as layout

    codes = torch.zeros(256, 128, dtype=torch.float8_e4m3fn)
    unpacked = torch.zeros(64, 128, dtype=torch.float8_e4m3fn)
    up = torch.zeros(64, 32)
    monkeypatch.setattr(sm90, "hopper_with_gluon", lambda device: True)
    monkeypatch.delenv(sm90.SWITCH, raising=False)
    assert layout._sm90_takes(codes, unpacked, up)
    assert not layout._sm90_takes(codes.view(torch.int8), unpacked.view(torch.int8), up)  # int8 MMA plan
    monkeypatch.setenv(sm90.SWITCH, "0")
    assert not layout._sm90_takes(codes, unpacked, up)
