"""The one switch for kernels that have not yet run on a GPU: ``COMFY_LOWBIT_EXPERIMENTAL=1``.

Some kernels were written in a session with no GPU to run them on: compiled for the target
and checked offline (interpreter where Triton has one, ptxas and the SASS where it does not),
with GPU tests and benchmarks waiting. Until those have passed and shown a speed-up, the
dispatch takes them only when this variable is ``1`` (read on every call, so a benchmark or
test can flip it); otherwise the measured kernels run. NOTES.md says which kernels these are.
"""
from __future__ import annotations

import os

ENV = "COMFY_LOWBIT_EXPERIMENTAL"


def experimental_kernels_enabled() -> bool:
    return os.environ.get(ENV, "0") == "1"
