"""The int8_lodewise kernels against their references (interpreter on the CPU, Triton on CUDA).

Small odd shapes, activations with outlier channels, every block size, outputs poisoned with
NaN before each launch (an unwritten element can never pass), and NaN inputs must come out
as NaN. The W8A8 GEMM is held to the exact-integer reference of the *same* quantized
operands, to fp32 rounding.
"""
from __future__ import annotations

import pytest
import torch

from comfy_lowbit.kernels import int8_gemm, int8_gemv
from comfy_lowbit.kernels.int8_gemm import w8a8_matmul, w8a8_reference, w8a16_matmul, w8a16_reference
from comfy_lowbit.kernels.int8_gemv import w8a16_gemv
from comfy_lowbit.kernels.split_k import arrival_counters
from comfy_lowbit.kernels.int8_quant import quantize_blockwise_reference, quantize_rows
from comfy_lowbit.layouts.int8_lodewise import column_major

from support import KERNEL_DEVICE, outlier_matrix, relative_error

BLOCKS = (64, 128, 256)
ON_GPU = KERNEL_DEVICE == "cuda"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every output the launchers allocate starts as NaN (int8 outputs as -128, never written)."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype == torch.int8:
            t.fill_(-128)
        return t

    monkeypatch.setattr(torch, "empty", poisoned)  # the launchers call torch.empty


def _weight(n, k, block, seed, scale_layout="column"):
    """Codes and scales as the layout keeps them (scales column-major), or row-major."""
    w = outlier_matrix(n, k, seed=seed, scale=6.0) / k**0.5
    q, s = quantize_blockwise_reference(w, block)
    s = s.to(KERNEL_DEVICE)
    return q.to(KERNEL_DEVICE), column_major(s) if scale_layout == "column" else s


def _quantize_on_device(x, block):
    q, scale_t = quantize_rows(x.to(KERNEL_DEVICE), block)
    return q, scale_t


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("rows,dtype", [(1, torch.float32), (7, torch.bfloat16), (37, torch.float16), (301, torch.bfloat16)])
def test_activation_quantization_matches_reference(block, rows, dtype):
    k = 2 * block if rows < 300 else 1024  # the large case: enough rows to hit double-rounding divisions
    x = outlier_matrix(rows, k, seed=rows + block, scale=30.0).to(dtype)
    x[0, :block] = 0.0  # an all-zero block: scale 0, codes 0
    q, scale_t = _quantize_on_device(x, block)
    q_ref, s_ref = quantize_blockwise_reference(x, block)
    assert torch.equal(scale_t.t().cpu(), s_ref), "scales differ from absmax / 127"
    assert torch.equal(q.cpu(), q_ref), f"first mismatch at {(q.cpu() != q_ref).nonzero()[:3].tolist()}"
    assert q.min() >= -127 and s_ref[0, 0] == 0 and (q[0, :block] == 0).all()
    # Round to nearest (not truncation): every code within half a step of x / scale.
    v = x.float().reshape(rows, -1, block) / s_ref.clamp_min(1e-30)[:, :, None]
    assert (v.reshape(rows, k) - q_ref.float()).abs().max() <= 0.5 + 1e-4


def test_activation_quantization_marks_non_finite_blocks():
    x = outlier_matrix(3, 256, seed=1).to(torch.bfloat16)
    x[1, 5] = float("nan")
    x[2, 200] = float("inf")
    _, scale_t = _quantize_on_device(x, 128)
    s = scale_t.t().cpu()
    assert torch.isnan(s[1, 0]) and torch.isnan(s[2, 1])
    assert torch.isfinite(s[0]).all() and torch.isfinite(s[1, 1]) and torch.isfinite(s[2, 0])


def _check_w8a8(out, q, scale_t, w_q, w_s, block, bias):
    ref, magnitude = w8a8_reference(q, scale_t.t(), w_q, w_s, block, bias)
    nb = q.shape[1] // block
    # fp32: scale product, per-block product and one add per block, each <= 2^-24 relative.
    bound = (3 * nb + 4) * 2.0**-24 * (magnitude + (0 if bias is None else bias.cpu().double().abs()))
    if out.dtype != torch.float32:
        ulp = torch.finfo(out.dtype).eps
        bound = bound + ulp * ref.abs() + 1e-30  # one output rounding (interpreter truncates)
    err = (out.cpu().double() - ref).abs()
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) output elements"
    i, j = divmod((err / bound).argmax().item(), out.shape[1])
    off = (err > bound).nonzero()
    assert (err <= bound).all(), (
        f"W8A8: {len(off)} elements off the exact-integer reference; worst at {(i, j)}: out {out[i, j].item()} "
        f"ref {ref[i, j].item()} bound {bound[i, j].item():.3g}; rows {sorted(set(off[:, 0].tolist()))[:10]} "
        f"cols {sorted(set(off[:, 1].tolist()))[:10]}")


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("m,n,kb", [(1, 33, 2), (17, 40, 3), (50, 17, 1)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_w8a8_matches_exact_integer_reference(block, m, n, kb, out_dtype):
    k = kb * block
    w_q, w_s = _weight(n, k, block, seed=m + n)
    x = outlier_matrix(m, k, seed=m * n, scale=25.0).to(torch.bfloat16)
    bias = torch.randn(n).to(KERNEL_DEVICE) if m != 50 else None
    q, scale_t = _quantize_on_device(x, block)
    out = w8a8_matmul(q, scale_t, w_q, w_s, block, bias, out_dtype=out_dtype, config=int8_gemm.PLAIN_W8A8)
    assert out.shape == (m, n) and out.dtype == out_dtype
    _check_w8a8(out, q, scale_t, w_q, w_s, block, bias)
    # And stays near the float64 product with the unquantized x: this adds the activation
    # quantization error (about 0.02-0.03 with 25x outlier channels in every block).
    assert relative_error(out.cpu(), w8a16_reference(x.float(), w_q, w_s, block, bias)) < 0.05


@pytest.mark.skipif(not ON_GPU, reason="the GPU's own tiles (wgmma) need a GPU")
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tile", int8_gemm.W8A8_TILES)
def test_w8a8_gpu_tiles(tile, out_dtype):
    block, m, n, k = 128, 300, 200, 1024
    w_q, w_s = _weight(n, k, block, seed=7)
    x = outlier_matrix(m, k, seed=8, scale=20.0).to(torch.bfloat16)
    bias = torch.randn(n).to(out_dtype).to(KERNEL_DEVICE)
    q, scale_t = _quantize_on_device(x, block)
    bm, bn, warps, stages = tile[:4]
    config = {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8, "num_warps": warps, "num_stages": stages}
    if len(tile) > 4:
        config["maxnreg"] = tile[4]
    out = w8a8_matmul(q, scale_t, w_q, w_s, block, bias, out_dtype, config=config)
    _check_w8a8(out, q, scale_t, w_q, w_s, block, bias)


@pytest.mark.parametrize("exact_cvt", [True, False])
def test_w8a8_conversions_agree(exact_cvt):
    block, m, n, k = 128, 19, 24, 384
    w_q, w_s = _weight(n, k, block, seed=3)
    # Extreme codes: every partial near +-127 * 127 * block, the edge of the exact range.
    w_q = torch.where(torch.rand(n, k).to(KERNEL_DEVICE) < 0.5, -127, 127).to(torch.int8)
    x = torch.where(torch.rand(m, k) < 0.5, -1.0, 1.0).to(torch.bfloat16)
    q, scale_t = _quantize_on_device(x, block)
    out = w8a8_matmul(q, scale_t, w_q, w_s, block, None, torch.float32, exact_cvt=exact_cvt, config=int8_gemm.PLAIN_W8A8)
    _check_w8a8(out, q, scale_t, w_q, w_s, block, None)


@pytest.mark.parametrize("scale_layout", ["row", "column"])
@pytest.mark.parametrize("block,m,n,kb", [(64, 33, 70, 3), (256, 5, 64, 1)])
def test_w8a8_any_weight_scale_strides(scale_layout, block, m, n, kb):
    k = kb * block
    w_q, w_s = _weight(n, k, block, seed=kb, scale_layout=scale_layout)
    x = outlier_matrix(m, k, seed=n, scale=25.0).to(torch.float16)
    bias = torch.randn(n).to(KERNEL_DEVICE)
    q, scale_t = _quantize_on_device(x, block)
    config = {**int8_gemm.PLAIN_W8A8, "BLOCK_N": 64}
    out = w8a8_matmul(q, scale_t, w_q, w_s, block, bias, torch.float32, config=config)
    _check_w8a8(out, q, scale_t, w_q, w_s, block, bias)


def test_w8a8_propagates_nan_rows():
    block, m, n, k = 64, 5, 16, 128
    w_q, w_s = _weight(n, k, block, seed=4)
    x = outlier_matrix(m, k, seed=5).to(torch.bfloat16)
    x[2, 70] = float("nan")
    q, scale_t = _quantize_on_device(x, block)
    out = w8a8_matmul(q, scale_t, w_q, w_s, block, None, torch.float32, config=int8_gemm.PLAIN_W8A8).cpu()
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3, 4]]).all()


def _check_weight_only(out, x, w_q, w_s, block, bias):
    ref = w8a16_reference(x, w_q, w_s, block, bias)
    out = out.cpu()
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) output elements"
    # bf16/fp16 activations are exact inputs; fp32 accumulation and one output rounding.
    tol = {torch.float32: 2e-6, torch.bfloat16: 6e-3, torch.float16: 1e-3}[out.dtype]
    assert relative_error(out, ref) < tol


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("m,n,kb,dtype", [(5, 33, 2, torch.bfloat16), (18, 20, 3, torch.float16)])
def test_w8a16_matches_reference(block, m, n, kb, dtype):
    k = kb * block
    w_q, w_s = _weight(n, k, block, seed=n, scale_layout="row" if block == 64 else "column")
    x = outlier_matrix(m, k, seed=m, scale=25.0).to(dtype)
    bias = torch.randn(n).to(dtype).to(KERNEL_DEVICE)
    out = w8a16_matmul(x.to(KERNEL_DEVICE), w_q, w_s, block, bias, config=int8_gemm.PLAIN_W8A16)
    assert out.shape == (m, n) and out.dtype == dtype
    _check_weight_only(out, x, w_q, w_s, block, bias)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("n,kb,dtype,split", [(37, 3, torch.bfloat16, 1), (9, 1, torch.float32, 2),
                                               (70, 5, torch.float16, 2), (33, 7, torch.bfloat16, 4)])
def test_gemv_matches_reference(block, n, kb, dtype, split):
    m = 1
    k = kb * block
    w_q, w_s = _weight(n, k, block, seed=k)
    x = outlier_matrix(m, k, seed=n, scale=25.0).to(dtype)
    bias = None if n == 9 else torch.randn(n).to(KERNEL_DEVICE)
    out = w8a16_gemv(x.to(KERNEL_DEVICE), w_q, w_s, block, bias, config=int8_gemv.PLAIN_GEMV, split=split)
    assert out.shape == (m, n) and out.dtype == dtype
    _check_weight_only(out, x, w_q, w_s, block, bias)


@pytest.mark.parametrize("tile", int8_gemv.GEMV_TILES, ids=lambda t: "x".join(map(str, t)))
def test_every_gemv_tile_matches_reference(tile):
    """Each autotune candidate, on K slices that its steps divide (unmasked, EVEN) and on
    ones they do not (masked), with N not a multiple of its rows."""
    block_n, step, warps = tile
    block, n = 64, 37
    config = {"BLOCK_N": block_n, "STEP_BLOCKS": step, "num_warps": warps}
    for kb, split in ((2 * step, 2), (step + 1, 1)):
        assert int8_gemv.even_steps(kb, split, step) == (split == 2)
        k = kb * block
        w_q, w_s = _weight(n, k, block, seed=k + block_n)
        x = outlier_matrix(1, k, seed=step, scale=25.0).to(torch.bfloat16)
        bias = torch.randn(n).to(KERNEL_DEVICE)
        out = w8a16_gemv(x.to(KERNEL_DEVICE), w_q, w_s, block, bias, config=config, split=split)
        _check_weight_only(out, x, w_q, w_s, block, bias)


@pytest.mark.parametrize("block", (64, 128))
@pytest.mark.parametrize("n,kb,dtype,split", [(37, 3, torch.bfloat16, 2), (70, 5, torch.float16, 4), (9, 8, torch.float32, 8)])
def test_gemv_single_launch_split_k(block, n, kb, dtype, split):
    """FIXUP: the last program of each row tile sums the K slices in the same launch. Twice in
    a row: the counters it leaves behind must be zero again, or the second call goes wrong."""
    k = kb * block
    w_q, w_s = _weight(n, k, block, seed=k + 1)
    bias = torch.randn(n).to(KERNEL_DEVICE) if n != 9 else None
    for seed in (1, 2):
        x = outlier_matrix(1, k, seed=n + seed, scale=25.0).to(dtype)
        out = w8a16_gemv(x.to(KERNEL_DEVICE), w_q, w_s, block, bias, config=int8_gemv.PLAIN_GEMV, split=split, fixup=True)
        _check_weight_only(out, x, w_q, w_s, block, bias)
    assert int(arrival_counters(w_q.device, 1).abs().sum()) == 0


def test_weight_only_paths_propagate_nan():
    block, n, k = 128, 24, 256
    w_q, w_s = _weight(n, k, block, seed=9)
    x = outlier_matrix(6, k, seed=9).to(torch.bfloat16)
    x[1, 3] = float("nan")
    x = x.to(KERNEL_DEVICE)
    gemv = [w8a16_gemv(x[i : i + 1], w_q, w_s, block, config=int8_gemv.PLAIN_GEMV, split=1 + i) for i in range(2)]
    for out in (torch.cat(gemv), w8a16_matmul(x, w_q, w_s, block, config=int8_gemm.PLAIN_W8A16)):
        out = out.cpu()
        assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()


def test_launchers_reject_bad_operands():
    w_q, w_s = _weight(16, 256, 128, seed=0)
    x = torch.randn(20, 256).to(torch.bfloat16).to(KERNEL_DEVICE)
    with pytest.raises(ValueError, match="not a multiple"):
        quantize_rows(x[:, :200], 128)
    with pytest.raises(ValueError, match="block_size"):
        quantize_rows(x, 96)
    with pytest.raises(ValueError, match="scale"):
        w8a16_matmul(x, w_q, w_s.t().contiguous(), 128)
    q, scale_t = quantize_rows(x, 128)
    with pytest.raises(ValueError, match="activation scale"):
        w8a8_matmul(q, scale_t.t().contiguous(), w_q, w_s, 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_to_float_is_exact(dtype):
    """The bit tricks that replace the conversion unit, on all 256 codes."""
    import triton
    import triton.language as tl

    @triton.jit
    def convert(q_ptr, out_ptr, DTYPE: tl.constexpr):
        offs = tl.arange(0, 256)
        tl.store(out_ptr + offs, int8_gemm.int8_to_float(tl.load(q_ptr + offs), DTYPE))

    q = torch.arange(-128, 128, dtype=torch.int8, device=KERNEL_DEVICE)
    out = torch.full((256,), float("nan"), dtype=dtype, device=KERNEL_DEVICE)
    convert[(1,)](q, out, DTYPE={torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype])
    assert torch.equal(out.cpu().float(), q.cpu().float())


@pytest.mark.skipif(not ON_GPU, reason="autotuned launches need a GPU")
@pytest.mark.parametrize("m", [1, 3, 24, 200])
def test_autotuned_paths_on_gpu(m, monkeypatch):
    monkeypatch.setenv("COMFY_LOWBIT_AUTOTUNE", "1")
    block, n, k = 128, 3 * 128 + 5, 6 * 128
    w_q, w_s = _weight(n, k, block, seed=m)
    x = outlier_matrix(m, k, seed=m, scale=25.0).to(torch.bfloat16).to(KERNEL_DEVICE)
    bias = torch.randn(n, device=KERNEL_DEVICE)
    if m == 1:
        _check_weight_only(w8a16_gemv(x, w_q, w_s, block, bias), x, w_q, w_s, block, bias)
    _check_weight_only(w8a16_matmul(x, w_q, w_s, block, bias), x, w_q, w_s, block, bias)
    q, scale_t = quantize_rows(x, block)
    _check_w8a8(w8a8_matmul(q, scale_t, w_q, w_s, block, bias), q, scale_t, w_q, w_s, block, bias)


# ----------------------------------------------------------------------------- Hopper (Gluon)

from comfy_lowbit.kernels import sm90  # noqa: E402
from comfy_lowbit.kernels.sm90 import WARP_PLANS, hopper_with_gluon  # noqa: E402
from sm90_support import needs_gluon  # noqa: E402

SM90 = ON_GPU and hopper_with_gluon(torch.device(KERNEL_DEVICE))


@pytest.mark.skipif(not SM90, reason="the Gluon kernel needs a Hopper GPU")
@pytest.mark.parametrize("block", (64, 128))
@pytest.mark.parametrize("m,n,kb", [(1, 40, 1), (17, 200, 2), (300, 264, 3), (129, 136, 5), (1000, 520, 8)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("warps", WARP_PLANS)
def test_sm90_w8a8_matches_exact_integer_reference(block, m, n, kb, out_dtype, warps):
    from comfy_lowbit.kernels.int8_gemm_sm90 import w8a8_matmul_sm90

    k = kb * block
    w_q, w_s = _weight(n, k, block, seed=m + n + kb)
    x = outlier_matrix(m, k, seed=m * n + kb, scale=25.0).to(torch.bfloat16)
    bias = torch.randn(n).to(out_dtype).to(KERNEL_DEVICE) if m % 2 else None
    q, scale_t = _quantize_on_device(x, block)
    out = w8a8_matmul_sm90(q, scale_t, w_q, w_s, block, bias, out_dtype, **WARP_PLANS[warps])
    assert out.shape == (m, n) and out.dtype == out_dtype
    _check_w8a8(out, q, scale_t, w_q, w_s, block, bias)


@pytest.mark.skipif(not SM90, reason="the Gluon kernel needs a Hopper GPU")
def test_sm90_w8a8_propagates_nan_and_refuses_what_tma_cannot_read():
    from comfy_lowbit.kernels.int8_gemm_sm90 import w8a8_matmul_sm90

    block, m, n, k = 128, 70, 48, 512
    w_q, w_s = _weight(n, k, block, seed=3)
    x = outlier_matrix(m, k, seed=4).to(torch.bfloat16)
    x[5, 300] = float("nan")
    q, scale_t = _quantize_on_device(x, block)
    out = w8a8_matmul_sm90(q, scale_t, w_q, w_s, block, None, torch.float32).cpu()
    assert torch.isnan(out[5]).all() and torch.isfinite(out[torch.arange(m) != 5]).all()
    with pytest.raises(ValueError, match="column-major"):
        w8a8_matmul_sm90(q, scale_t, w_q, w_s.contiguous(), block)
    with pytest.raises(ValueError, match="blocks"):
        q256, s256 = _quantize_on_device(x, 256)
        w256, ws256 = _weight(n, k, 256, seed=3)
        w8a8_matmul_sm90(q256, s256, w256, ws256, 256)


@needs_gluon
@pytest.mark.parametrize("enabled,block,scale_layout,expected", [
    ("1", 128, "column", "sm90"), ("1", 64, "column", "sm90"), ("0", 128, "column", "portable"),
    (None, 128, "column", "sm90"), ("1", 256, "column", "portable"), ("1", 128, "row", "portable"),
])
def test_layout_takes_the_hopper_kernel_only_when_enabled_and_accepted(monkeypatch, enabled, block, scale_layout, expected):
    """The dispatch rule on the CPU (the calls are recorded, not run): on by default, off with
    COMFY_LOWBIT_SM90=0, and only for the blocks and scale layout the kernel reads."""
    from comfy_lowbit.kernels import int8_gemm_sm90
    from comfy_lowbit.layouts import int8_lodewise

    monkeypatch.setenv("COMFY_LOWBIT_AUTOTUNE", "0")  # the untimed rule (tests/test_fastest.py times)
    if enabled is None:
        monkeypatch.delenv(sm90.SWITCH, raising=False)
    else:
        monkeypatch.setenv(sm90.SWITCH, enabled)
    monkeypatch.setattr(sm90, "hopper_with_gluon", lambda device: True)
    calls = []
    monkeypatch.setattr(int8_gemm_sm90, "w8a8_matmul_sm90", lambda *a, **k: calls.append("sm90") or "out")
    monkeypatch.setattr(int8_lodewise, "w8a8_matmul", lambda *a, **k: calls.append("portable"))
    w_q, w_s = _weight(48, 2 * block, block, seed=1, scale_layout=scale_layout)
    q, scale_t = quantize_blockwise_reference(outlier_matrix(int8_lodewise.SM90_MIN_M, 2 * block, seed=2), block)
    int8_lodewise._w8a8(q, scale_t.t().contiguous(), w_q, w_s, block, None, torch.bfloat16)
    assert calls == [expected]


@needs_gluon
def test_small_batches_stay_on_the_portable_kernel(monkeypatch):
    from comfy_lowbit.kernels import int8_gemm_sm90
    from comfy_lowbit.layouts import int8_lodewise

    monkeypatch.delenv(sm90.SWITCH, raising=False)
    monkeypatch.setenv("COMFY_LOWBIT_AUTOTUNE", "0")
    monkeypatch.setattr(sm90, "hopper_with_gluon", lambda device: True)
    calls = []
    monkeypatch.setattr(int8_gemm_sm90, "w8a8_matmul_sm90", lambda *a, **k: calls.append("sm90") or "out")
    monkeypatch.setattr(int8_lodewise, "w8a8_matmul", lambda *a, **k: calls.append("portable"))
    w_q, w_s = _weight(48, 256, 128, seed=1)
    for m in (int8_lodewise.SM90_MIN_M - 1, int8_lodewise.SM90_MIN_M):
        q, scale_t = quantize_blockwise_reference(outlier_matrix(m, 256, seed=m), 128)
        int8_lodewise._w8a8(q, scale_t.t().contiguous(), w_q, w_s, 128, None, torch.bfloat16)
    assert calls == ["portable", "sm90"]
