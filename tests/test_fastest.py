"""``kernels/fastest.py``: the first call for a key times the candidates, later calls take the
winner; untimed (interpreter, COMFY_LOWBIT_AUTOTUNE=0) each caller's measured rule applies.
Checked on the CPU with a stand-in clock, and through the int8_lodewise and W4A4 dispatch
with recorded (not run) kernels."""
from __future__ import annotations

import pytest
import torch
from support import KERNEL_DEVICE, relative_error

from comfy_lowbit.kernels import fastest as fastest_module
from comfy_lowbit.kernels import sm90
from comfy_lowbit.kernels.fastest import fastest


@pytest.fixture
def timed(monkeypatch):
    """Timing on, no earlier winners, and a clock that reads each candidate's listed time."""
    monkeypatch.setattr(fastest_module, "_WINNERS", {})
    monkeypatch.setattr(fastest_module, "tuning_enabled", lambda: True)
    clock = {}
    monkeypatch.setattr(fastest_module, "_median_ms", lambda launch: clock[launch()])
    return clock


def test_the_fastest_candidate_wins_once_per_key(timed):
    runs = []

    def candidate(name):
        def launch():
            runs.append(name)
            return name
        return launch

    timed.update(a=3.0, b=1.0, c=2.0)
    candidates = {name: candidate(name) for name in "abc"}
    assert fastest(("k", 1), candidates, default="a") == "b"
    timed_runs = len(runs)
    assert fastest(("k", 1), candidates, default="a") == "b"
    assert len(runs) == timed_runs, "a known key is not timed again"
    timed.update(a=0.5)
    assert fastest(("k", 2), candidates, default="c") == "a", "each key is timed on its own"


def test_candidates_that_decline_are_not_timed(timed):
    timed.update(fast=1.0)
    declined = {"slow": lambda: None, "fast": lambda: "fast"}
    assert fastest(("decline",), declined, default="slow") == "fast"
    assert fastest(("none",), {"x": lambda: None}, default="x") == "x"


def test_untimed_the_default_applies_and_nothing_runs(monkeypatch):
    monkeypatch.setattr(fastest_module, "_WINNERS", {})
    monkeypatch.setenv("COMFY_LOWBIT_AUTOTUNE", "0")
    assert fastest(("off",), {"a": pytest.fail, "b": pytest.fail}, default="b") == "b"
    monkeypatch.delenv("COMFY_LOWBIT_AUTOTUNE")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fastest(("off",), {"a": pytest.fail}, default="a") == "a"


def test_errors_propagate(timed):
    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError):
        fastest(("broken",), {"a": broken}, default="a")


@pytest.mark.skipif(not sm90.gluon_importable(), reason="this Triton has no Gluon Hopper API")
def test_int8_lodewise_takes_the_split_hopper_gemm_untimed(timed, monkeypatch):
    """From SM90_MIN_M rows int8_lodewise runs the Hopper GEMM with split warpgroups, with the
    timing on or off: its GPU time beat the portable kernel at every measured shape, and the
    timing would charge it its launch overhead (layouts/int8_lodewise.py)."""
    from comfy_lowbit.kernels import int8_gemm_sm90
    from comfy_lowbit.kernels.int8_quant import quantize_blockwise_reference
    from comfy_lowbit.layouts import int8_lodewise

    monkeypatch.delenv(sm90.SWITCH, raising=False)
    monkeypatch.setattr(sm90, "hopper_with_gluon", lambda device: True)
    monkeypatch.setattr(int8_gemm_sm90, "w8a8_matmul_sm90", lambda *a, **warps: _plan_of(warps))
    monkeypatch.setattr(int8_lodewise, "w8a8_matmul", lambda *a, **k: "portable")
    timed.update({"portable": 1.0, "sm90": 2.0, "sm90_producer": 3.0, "sm90_split": 4.0})
    w_q, w_s = quantize_blockwise_reference(torch.randn(64, 256), 128)
    outs = []
    for m in (int8_lodewise.SM90_MIN_M - 1, int8_lodewise.SM90_MIN_M):
        a_q, a_s = quantize_blockwise_reference(torch.randn(m, 256), 128)
        outs.append(int8_lodewise._w8a8(a_q, a_s.t().contiguous(), w_q, int8_lodewise.column_major(w_s), 128, None,
                                        torch.bfloat16))
    assert outs == ["portable", "sm90_split"]


@pytest.mark.skipif(not sm90.gluon_importable(), reason="this Triton has no Gluon Hopper API")
def test_w4a4_takes_the_timed_winner(timed, monkeypatch):
    from comfy_lowbit.kernels import w4a4_gemm_sm90
    from comfy_lowbit.layouts import w4a4

    monkeypatch.setattr(w4a4_gemm_sm90, "w4a4_gemm_sm90", lambda *a, **warps: _plan_of(warps))
    timed.update({"portable": 2.0, "sm90": 1.0, "sm90_producer": 3.0, "sm90_split": 4.0})
    params = w4a4.W4A4Layout.Params(scale=torch.zeros(2, 64), orig_dtype=torch.bfloat16, orig_shape=(64, 128),
                                    proj_down=torch.zeros(128, 32), proj_up=torch.zeros(64, 32),
                                    smooth_factor=torch.ones(128))
    codes = torch.zeros(256, 128, dtype=torch.float8_e4m3fn)
    out = w4a4._fastest_streaming_gemm(lambda: "portable", codes, torch.zeros(2, 256), codes[:64], params,
                                       torch.zeros(256, 32), None, torch.bfloat16)
    assert out == "sm90"


def _plan_of(warps: dict) -> str:
    """The WARP_PLANS name of a Hopper launch's keyword arguments (what a fake launch returns)."""
    return next(name for name, kwargs in sm90.WARP_PLANS.items() if kwargs == warps)


def test_w4a4_quantizer_runs_the_timed_configuration(timed, monkeypatch):
    """From TUNE_MIN_ROWS rows the quantizer times its TUNED_CONFIGS once per shape and runs
    the winner; every candidate gives the reference's codes and scales."""
    from comfy_lowbit.kernels import w4a4_quantize as wq
    from comfy_lowbit.kernels.w4a4_quantize import natural_group_order

    winner = "32 rows, 8 warps"
    monkeypatch.setattr(fastest_module, "_median_ms",
                        lambda launch: 1.0 if launch.keywords["config"] == wq.TUNED_CONFIGS[winner] else 2.0)
    seen = []
    launch = wq.w4a4_quantize_kernel
    monkeypatch.setattr(wq, "w4a4_quantize_kernel", _Recorder(launch, seen))
    g = torch.Generator().manual_seed(3)
    m, k, r = wq.TUNE_MIN_ROWS, 128, 8
    x = torch.randn(m, k, generator=g).to(KERNEL_DEVICE, torch.bfloat16)
    # bf16 throughout, as a layout calls it (fp32 operands would take tf32 on the GPU)
    smooth = (torch.rand(k, generator=g) + 0.5).to(KERNEL_DEVICE, torch.bfloat16)
    down = (torch.randn(k, r, generator=g) / 8).to(KERNEL_DEVICE, torch.bfloat16)
    codes, ascales, lora = wq.quantize_activations(x, smooth, down)
    ref_codes, ref_scales, ref_lora = wq.quantize_activations_reference(x, smooth, down)
    assert seen[-1] == 32, "the last launch (the returned result) used the winner's 32-row tile"
    assert len(seen) == len(wq.TUNED_CONFIGS) + 1
    diff = (natural_group_order(codes).int() - ref_codes.int()).abs()
    # the GPU's division may round a value at a code boundary the other way (test_w4a4_kernels)
    assert diff.max() <= (1 if KERNEL_DEVICE == "cuda" else 0) and (diff > 0).sum() <= diff.numel() // 1000
    assert torch.allclose(ascales, ref_scales, rtol=1e-6, atol=0)
    assert relative_error(lora.sum(0), ref_lora) < 1e-5


class _Recorder:
    """A kernel stand-in that records each launch's BLOCK_M and launches the real kernel."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(kwargs["BLOCK_M"])
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("m,dtype,winner", [(2, torch.bfloat16, "dequant_cublas"), (7, torch.float32, "gemv_lut")])
def test_nf4_small_batches_run_the_timed_path(timed, monkeypatch, m, dtype, winner):
    """Where the skinny tensor-core kernel does not serve by rule (2 rows, or float32 x), the
    NF4 linear times the v5 GEMV against dequantize + cuBLAS once per shape (up to
    TIMED_MAX_M rows) and runs the winner (whatever the untimed rule says)."""
    from test_bnb4_kernels import check_linear, make_weight

    from comfy_lowbit.kernels import bnb4_linear as lin

    monkeypatch.setattr(fastest_module, "_median_ms", lambda launch: 1.0 if launch.keywords["path"] == winner else 2.0)
    ran = []
    for path in ("gemv_lut", "dequant_cublas"):
        launch = getattr(lin, {"gemv_lut": "_launch_gemv_lut", "dequant_cublas": "dequantize"}[path])
        monkeypatch.setattr(lin, launch.__name__, lambda *a, _l=launch, _p=path, **k: ran.append(_p) or _l(*a, **k))
    weight = make_weight(96, 256, "nf4", True, seed=m)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(KERNEL_DEVICE, dtype)
    check_linear(x, weight, None, None, dtype)
    assert ran[-1] == winner and set(ran) == {"gemv_lut", "dequant_cublas"}
    assert m <= lin.TIMED_MAX_M


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times real launches on a GPU")
@pytest.mark.parametrize("layout,m", [("NF4Layout", 2), ("NF4Layout", 300), ("BlockWiseINT8LayoutLodeWise", 1024),
                                      ("W4A4Layout", 2), ("W4A4Layout", 1024)])
def test_timed_dispatch_on_gpu_matches_the_reference(monkeypatch, layout, m):
    """With the timing on (and Triton's own autotuning as the run has it), each timed layout's
    first call times its candidates, the second takes the cached winner, and both agree with
    the layout's plain-PyTorch path (int8_lodewise, dispatched by rule, is checked the same)."""
    from comfy_kitchen.tensor import QuantizedTensor

    from support import outlier_matrix, relative_error

    monkeypatch.setattr(fastest_module, "_WINNERS", {})
    monkeypatch.setattr(fastest_module, "tuning_enabled", lambda: True)
    n, k = 384, 768
    w = (outlier_matrix(n, k, seed=m, scale=4.0) / k**0.5).to(torch.bfloat16)
    qt = QuantizedTensor.from_float(w.cuda(), layout)
    x = outlier_matrix(m, k, seed=m + 1, scale=10.0).to(torch.bfloat16).cuda()
    bias = torch.randn(n, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16).cuda()
    if layout == "W4A4Layout":  # its reference quantizes the activations the same way
        from comfy_lowbit.layouts.w4a4 import w4a4_linear_reference

        ref, tolerance = w4a4_linear_reference(x, qt, bias).float().cpu(), 1e-2
    elif layout == "BlockWiseINT8LayoutLodeWise":  # W8A8: the exact-integer sums of the same operands
        from comfy_lowbit.kernels.int8_gemm import w8a8_reference
        from comfy_lowbit.kernels.int8_quant import quantize_blockwise_reference

        block = qt._params.block_size
        a_q, a_scale = quantize_blockwise_reference(x.cpu(), block)
        ref = w8a8_reference(a_q, a_scale, qt._qdata.cpu(), qt._params.scale.cpu(), block, bias.cpu())[0].float()
        tolerance = 4e-3  # the bf16 output rounding
    else:
        ref = torch.nn.functional.linear(x.cpu().float(), qt.dequantize().cpu().float(), bias.cpu().float())
        tolerance = 1e-2
    with torch.inference_mode():
        first = torch.nn.functional.linear(x, qt, bias)
        timed = dict(fastest_module._WINNERS)
        second = torch.nn.functional.linear(x, qt, bias)
    if layout == "BlockWiseINT8LayoutLodeWise":
        assert not timed, "int8_lodewise dispatches by rule (layouts/int8_lodewise.py), untimed"
    else:
        assert timed, "the first call timed its candidates"
    assert fastest_module._WINNERS == timed, "the second call reused the winners"
    for out in (first, second):
        assert torch.isfinite(out).all() and relative_error(out.float().cpu(), ref) < tolerance
