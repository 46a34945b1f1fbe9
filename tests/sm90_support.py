"""Compile a Gluon (sm_90) kernel without a GPU, so CI catches API drift in newer Triton.

The Hopper kernels cannot run under ``TRITON_INTERPRET=1``; their numerics are tested on the
GPU. What CI can check is that the kernel still builds for sm_90 (frontend, layouts,
lowering, ptxas) with the Triton it has, from example arguments as a launch would pass them.
"""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import mangle_type

from comfy_lowbit.kernels.sm90 import gluon_importable

needs_gluon = pytest.mark.skipif(not gluon_importable(), reason="this Triton has no Gluon Hopper API")


def compile_for_sm90(kernel, args: dict, constexprs: dict, num_warps: int):
    """``triton.compile`` of a ``@gluon.jit`` kernel for sm_90; ``args`` maps every runtime
    parameter to an example value (tensors, TMA descriptors, ints)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    signature = {name: mangle_type(value) for name, value in args.items()}
    signature.update({name: "constexpr" for name in constexprs})
    source = GluonASTSource(kernel, signature, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def ptxas_report(ptx: str) -> str:
    """``ptxas -v`` for sm_90a on a kernel's PTX: register use, spills, and the warnings that
    say wgmma was serialised (C7514/C7515), which silently halve a kernel's speed."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def assert_async_and_unspilled(ptx: str) -> None:
    report = ptxas_report(ptx)
    assert "serialized" not in report, report
    assert " 0 bytes spill stores, 0 bytes spill loads" in report, report


M, N = 300, 200  # odd sizes: partial tiles in both directions


def block_scaled_build(dtype, block: int, n_blocks: int, rank: int, producer_warp: bool,
                       out_dtype=torch.bfloat16, bias: bool = True, scales_by_tma: bool = True, split: bool = False):
    """``(kernel, args, constexprs)`` of ``block_scaled_mm_kernel`` as ``block_scaled_mm`` would
    launch it: int8 (``rank`` 0, int8_lodewise) or e4m3 operands (W4A4, with a low-rank term)."""
    from triton.experimental.gluon import language as gl

    from comfy_lowbit.kernels import block_scaled_gemm_sm90 as sm90

    k = block * n_blocks
    out = torch.zeros(M, N, dtype=out_dtype)
    a_scale_t, w_scale_t = torch.zeros(n_blocks, M), torch.zeros(n_blocks, N)
    descs = sm90.descriptors(torch.zeros(M, k, dtype=dtype), a_scale_t, torch.zeros(N, k, dtype=dtype), w_scale_t, block)
    rank_tile = max(16, triton.next_power_of_2(max(rank, 1)))
    args = dict(zip(("a_desc", "w_desc", "sa_desc", "sw_desc"), descs), sa_ptr=a_scale_t, sw_ptr=w_scale_t, sa_len=M, sw_len=N, lora_ptr=torch.zeros(M, max(rank, 1)),
                up_ptr=torch.zeros(N, max(rank, 1), dtype=out_dtype), bias_ptr=out, out_ptr=out, M=M, N=N, K=k,
                R=rank, stride_om=N)
    producer_warp = producer_warp or split
    stages = sm90.default_stages(block, producer_warp, out.element_size(), rank_tile if rank else 0, split)
    constexprs = dict(PART=gl.int32 if dtype == torch.int8 else gl.float32, HAS_BIAS=bias, LOW_RANK=bool(rank),
                      BLOCK_R=rank_tile, STAGES=stages, GROUP_M=8, PRODUCER_WARP=producer_warp,
                      SCALES_TMA=scales_by_tma, SPLIT=split,
                      num_warps=sm90.NUM_WARPS // 2 if split else sm90.NUM_WARPS)
    return sm90.block_scaled_mm_kernel, args, constexprs


def bnb4_build(block: int, double_quant: bool, dtype, bias: bool = True):
    """``(kernel, args, constexprs)`` of the NF4/FP4 Hopper GEMM as ``w4a16_matmul_sm90`` would
    launch it."""
    from comfy_lowbit.kernels import bnb4_gemm_sm90 as sm90

    k = max(1024, 4 * block)
    out = torch.zeros(M, N, dtype=dtype)
    x_desc, p_desc = sm90.descriptors(torch.zeros(M, k, dtype=dtype), torch.zeros(N * k // 2, dtype=torch.uint8), N, k)
    absmax = torch.zeros(N * k // block, dtype=torch.uint8 if double_quant else torch.float32)
    args = dict(x_desc=x_desc, p_desc=p_desc, code_ptr=torch.zeros(16), absmax_ptr=absmax, nested_ptr=torch.zeros(8),
                offset_ptr=torch.zeros(1), dyn_ptr=torch.zeros(256), bias_ptr=out, out_ptr=out, M=M, N=N, K=k,
                stride_om=N)
    constexprs = dict(QBLOCK=block, DOUBLE_QUANT=double_quant, HAS_BIAS=bias, STAGES=sm90.STAGES, GROUP_M=8,
                      num_warps=sm90.NUM_WARPS)
    return sm90._w4a16_sm90_kernel, args, constexprs


def build_ptx(kernel, args, constexprs) -> str:
    return compile_for_sm90(kernel, args, constexprs, constexprs["num_warps"]).asm["ptx"]
