"""Which part of the block-scaled Hopper GEMM (``kernels/block_scaled_gemm_sm90.py``) fails on
a GPU: each case runs in its own process, because a CUDA fault poisons the process's context.

    python benchmarks/diag_sm90.py          # every case, one line each
    python benchmarks/diag_sm90.py CASE     # one case

Cases isolate one feature each: a bare 1-D TMA copy at unaligned coordinates (how the kernel
reads the scales), int8 and e4m3 operands, aligned and partial tiles, scales by TMA or by plain
loads, the producer warp, the low-rank term.
"""
from __future__ import annotations

import subprocess
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from comfy_lowbit.kernels.block_scaled_gemm_sm90 import block_scaled_mm
from comfy_lowbit.kernels.gluon_common import tma_load

CASES = {
    # name: (dtype, M, N, n_blocks, block, rank, scales_by_tma, producer_warp, stages)
    "int8_aligned": ("int8", 256, 256, 2, 128, 0, True, False, None),
    "int8_aligned_notma": ("int8", 256, 256, 2, 128, 0, False, False, None),
    "int8_odd": ("int8", 17, 200, 2, 64, 0, True, False, None),
    "int8_odd_notma": ("int8", 17, 200, 2, 64, 0, False, False, None),
    "int8_aligned_2stages": ("int8", 256, 256, 4, 128, 0, True, False, 2),
    "int8_producer": ("int8", 256, 256, 4, 128, 0, True, True, None),
    "fp8_aligned": ("fp8", 256, 256, 4, 64, 0, True, False, None),
    "fp8_aligned_notma": ("fp8", 256, 256, 4, 64, 0, False, False, None),
    "fp8_lowrank": ("fp8", 256, 256, 4, 64, 32, True, False, None),
}


@gluon.jit
def copy_kernel(desc, out_ptr, start):
    smem = gl.allocate_shared_memory(gl.float32, [128], desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    mbarrier.expect(bar, desc.block_type.nbytes)
    tma_load(desc, [start], bar, smem)
    mbarrier.wait(bar, 0)
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    gl.store(out_ptr + gl.arange(0, 128, layout=layout), smem.load(layout))
    mbarrier.invalidate(bar)


def run_tma_1d() -> str:
    """A 1-D TMA copy of 128 fp32 from a 34-element vector at 16-byte aligned coordinates."""

    src = torch.arange(1, 35, dtype=torch.float32, device="cuda")
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
    desc = TensorDescriptor.from_tensor(src, [128], layout)
    report = []
    for start in (0, 20, 4):  # multiples of 16 bytes: an unaligned start is an illegal instruction
        out = torch.full((128,), float("nan"), device="cuda")
        copy_kernel[(1,)](desc, out, start, num_warps=4)
        torch.cuda.synchronize()
        want = torch.zeros(128, device="cuda")
        want[: 34 - start] = src[start:]
        report.append(f"start {start}: {'ok' if torch.equal(out, want) else 'WRONG ' + str(out[:8].tolist())}")
    return "; ".join(report)


def run_case(name: str) -> str:
    kind, m, n, n_blocks, block, rank, by_tma, producer, stages = CASES[name]
    k = n_blocks * block
    g = torch.Generator().manual_seed(0)
    if kind == "int8":
        a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    else:
        a = torch.randint(-7, 8, (m, k), generator=g).float().to(torch.float8_e4m3fn)
        w = torch.randint(-8, 8, (n, k), generator=g).float().to(torch.float8_e4m3fn)
    sa = torch.rand(n_blocks, m, generator=g) + 0.5
    sw = torch.rand(n_blocks, n, generator=g) + 0.5
    lora = torch.randn(m, rank, generator=g) if rank else None
    up = torch.randn(n, rank, generator=g) if rank else None
    bias = torch.randn(n, generator=g)
    ref = bias.double()[None, :].expand(m, n).clone()
    for b in range(n_blocks):
        sl = slice(b * block, (b + 1) * block)
        ref += sa[b].double()[:, None] * sw[b].double()[None, :] * (a[:, sl].double() @ w[:, sl].double().T)
    if rank:
        ref += lora.double() @ up.double().T
    dev = "cuda"
    out = torch.full((m, n), float("nan"), device=dev)
    block_scaled_mm(a.to(dev), sa.to(dev), w.to(dev), sw.to(dev), block, bias.to(dev), out,
                    None if lora is None else lora.to(dev), None if up is None else up.to(dev),
                    stages=stages, producer_warp=producer, scales_by_tma=by_tma)
    torch.cuda.synchronize()
    err = ((out.double().cpu() - ref).abs().max() / ref.abs().max()).item()
    return f"{'ok' if err < (2e-3 if rank else 1e-6) else 'WRONG'} max rel err {err:.2e}"


def main() -> None:
    if len(sys.argv) > 1:
        name = sys.argv[1]
        print(run_tma_1d() if name == "tma_1d" else run_case(name))
        return
    for name in ["tma_1d", *CASES]:
        try:
            done = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, timeout=180)
            lines = (done.stdout + done.stderr).strip().splitlines()
            errors = [line for line in lines if "Error" in line or "error" in line]
            print(f"{name:24s} rc={done.returncode} {(errors or lines or [''])[-1][:300]}", flush=True)
        except subprocess.TimeoutExpired:
            print(f"{name:24s} TIMEOUT (hang)", flush=True)


if __name__ == "__main__":
    main()
