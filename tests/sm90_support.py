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
