"""The one switch for kernels that are not (yet) the fastest measured choice:
``COMFY_LOWBIT_EXPERIMENTAL=1``.

Read on every call, so a benchmark or test can flip it. What it turns on (benchmarks/NOTES.md
has each one's measurements):

* the Hopper fused NF4/FP4 GEMM (``bnb4_gemm_sm90``): correct on the H100, but 0.37-0.51x
  bf16 where dequantize + cuBLAS reaches 0.73-0.87x;
* the single-launch split-K int8 GEMV (``int8_gemv`` FIXUP): correct, measured equal to the
  default GEMV.

Without it, the dispatch runs the kernels that measured fastest for each shape.
"""
from __future__ import annotations

import os

ENV = "COMFY_LOWBIT_EXPERIMENTAL"


def experimental_kernels_enabled() -> bool:
    return os.environ.get(ENV, "0") == "1"
