"""Shared test setup.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before
any module with @triton.jit is imported, so it is set here, before the tests import ours.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from support import KERNEL_DEVICE


@pytest.fixture
def kernel_device() -> str:
    return KERNEL_DEVICE
