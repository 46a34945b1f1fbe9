"""Shared test setup.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before
any module with @triton.jit is imported, so it is set here, before the tests import ours.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import comfy_lowbit  # noqa: E402

from support import KERNEL_DEVICE

# The repository root is the package and has an __init__.py, so pytest imports it a second
# time under the checkout's directory name (to look for setup_module). That second copy would
# re-register every layout class with comfy-kitchen, and QuantizedTensors would then carry
# classes that are not subclasses of comfy_lowbit's LowBitLayout. Point that name at the
# package already imported (pytest's importlib mode reuses a module found in sys.modules).
sys.modules.setdefault(Path(__file__).resolve().parents[1].name, comfy_lowbit)


@pytest.fixture
def kernel_device() -> str:
    return KERNEL_DEVICE
