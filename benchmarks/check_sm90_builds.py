"""Build every variant of the Hopper Gluon kernels for sm_90 without a GPU and report problems.

Why: these kernels were written without a GPU, and a variant that fails to build, spills, gets
its wgmma serialised by ptxas or needs more shared memory than an H100 has wastes device time.
This compiles each variant the GPU tests and the dispatch can launch (int8 blocks 64/128, the
W4A4 fp8 path with ranks 8-128, NF4/FP4 blocks 64-256 with and without double quant; every
output dtype, bias on/off, with and without the producer warp) with the installed Triton and
prints the ones ptxas is unhappy with. CI checks a few of them (tests/test_block_scaled_sm90.py,
tests/test_bnb4_kernels.py); this is the whole set, ~2 minutes.

    python benchmarks/check_sm90_builds.py                      # CI's Triton
    PYTHONPATH=/path/to/triton-3.6:$PYTHONPATH python benchmarks/check_sm90_builds.py
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sm90_support import block_scaled_build, bnb4_build, compile_for_sm90, ptxas_report  # noqa: E402

SMEM_LIMIT = 232448  # bytes of shared memory one H100 program may use


def problems(kernel, args, constexprs) -> str | None:
    try:
        compiled = compile_for_sm90(kernel, args, constexprs, constexprs["num_warps"])
    except Exception as exc:  # noqa: BLE001 - report every variant, whatever breaks
        return f"does not build: {type(exc).__name__}: {str(exc)[:300]}"
    report = ptxas_report(compiled.asm["ptx"])
    found = [line.strip() for line in report.splitlines() if "serialized" in line or "spill" in line]
    found = [line for line in found if " 0 bytes spill stores, 0 bytes spill loads" not in line]
    if compiled.metadata.shared > SMEM_LIMIT:
        found.append(f"{compiled.metadata.shared} bytes of shared memory")
    return "; ".join(found) or None


def variants():
    for dtype, block, out_dtype, (producer, split), bias, rank in itertools.product(
            (torch.int8, torch.float8_e4m3fn), (64, 128), (torch.bfloat16, torch.float16, torch.float32),
            ((False, False), (True, False), (True, True)), (False, True), (0, 8, 20, 128)):
        if (dtype == torch.int8) == bool(rank) or (dtype != torch.int8 and block != 64):
            continue  # int8_lodewise has no low-rank term; W4A4 always has one, with 64-wide groups
        yield (f"block-scaled {dtype} B{block} out {out_dtype} producer={producer} split={split} bias={bias} R={rank}",
               block_scaled_build(dtype, block, 5, rank, producer, out_dtype, bias, split=split))
    for block, double_quant, dtype, bias in itertools.product((64, 128, 256), (False, True),
                                                               (torch.bfloat16, torch.float16), (False, True)):
        yield f"bnb4 B{block} double_quant={double_quant} {dtype} bias={bias}", bnb4_build(block, double_quant, dtype, bias)


def main() -> int:
    import triton

    count = bad = 0
    for name, build in variants():
        count += 1
        found = problems(*build)
        if found:
            bad += 1
            print(f"{name}: {found}", flush=True)
    print(f"Triton {triton.__version__}: {count} variants built for sm_90, {bad} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
