"""A Hopper kernel this Triton cannot build must not break a forward: ``run_sm90`` logs once,
stops trying, and the caller takes its portable kernel (checked on the CPU; nothing runs on a
GPU here)."""
from __future__ import annotations

import logging

import pytest
import torch
from triton.compiler.errors import CompilationError

from comfy_lowbit.kernels import sm90


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.setattr(sm90, "_UNBUILDABLE", set())


def _unbuildable(*args, **kwargs):
    raise CompilationError("kernel.py", None, "gluon API moved")


def test_a_build_failure_is_logged_once_and_not_retried(caplog):
    calls = []

    def launch():
        calls.append(1)
        _unbuildable()

    with caplog.at_level(logging.WARNING):
        assert sm90.run_sm90("demo", launch) is None
        assert sm90.run_sm90("demo", launch) is None
    assert calls == [1] and sum("does not build" in r.message for r in caplog.records) == 1
    assert sm90.run_sm90("other", lambda: 7) == 7


def test_runtime_errors_are_not_swallowed():
    def launch():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError):
        sm90.run_sm90("demo", launch)


@pytest.mark.skipif(not sm90.gluon_importable(), reason="this Triton has no Gluon Hopper API")
def test_int8_lodewise_falls_back_to_the_portable_gemm(monkeypatch):
    from comfy_lowbit.kernels import int8_gemm_sm90
    from comfy_lowbit.kernels.int8_quant import quantize_blockwise_reference
    from comfy_lowbit.layouts import int8_lodewise

    monkeypatch.delenv(sm90.SWITCH, raising=False)
    monkeypatch.setattr(sm90, "hopper_with_gluon", lambda device: True)
    monkeypatch.setattr(int8_gemm_sm90, "w8a8_matmul_sm90", _unbuildable)
    monkeypatch.setattr(int8_lodewise, "w8a8_matmul", lambda *a, **k: "portable")
    w_q, w_s = quantize_blockwise_reference(torch.randn(64, 256), 128)
    a_q, a_s = quantize_blockwise_reference(torch.randn(int8_lodewise.SM90_MIN_M, 256), 128)
    out = int8_lodewise._w8a8(a_q, a_s.t().contiguous(), w_q, int8_lodewise.column_major(w_s), 128, None, torch.bfloat16)
    assert out == "portable"
