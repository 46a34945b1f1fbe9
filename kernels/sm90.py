"""When the Hopper (sm_90) Gluon kernels may run, decided per call, never at import.

The Gluon kernels (``*_sm90.py``) use Hopper's asynchronous ``wgmma`` and TMA copies, which
the portable ``tl.dot`` kernels cannot schedule the way the per-block rescales need (see
benchmarks/NOTES.md). They run only where all of these hold:

* the tensor is on a CUDA device of compute capability 9.x (wgmma is sm_90a-only);
* this Triton ships ``triton.experimental.gluon`` with the Hopper module;
* ``COMFY_LOWBIT_SM90`` is not ``0`` (the switch that sends everything to the portable
  kernels, e.g. to compare them or to rule the Hopper kernels out of a bug report).

Each caller adds its own rule (the shapes where the H100 measured a speed-up,
benchmarks/README.md), and a kernel that measured no speed-up anywhere additionally needs
``COMFY_LOWBIT_EXPERIMENTAL=1`` (``experimental``).

Everything else (other GPUs, the interpreter, older Triton) uses the portable kernels, which
compute the same math.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=1)
def gluon_importable() -> bool:
    """True when this Triton has Gluon's Hopper API (it moved between releases)."""
    try:
        from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma  # noqa: F401
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


def hopper_with_gluon(device: torch.device) -> bool:
    """Whether the Gluon kernels can run for a tensor on ``device`` (whether or not enabled)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index)[0] == 9 and gluon_importable()


SWITCH = "COMFY_LOWBIT_SM90"


def sm90_kernels_enabled(device: torch.device) -> bool:
    """Whether a tensor on ``device`` may take the Hopper Gluon kernels."""
    return os.environ.get(SWITCH, "1") != "0" and hopper_with_gluon(device)


_UNBUILDABLE: set[str] = set()


def run_sm90(name: str, launch, *args, **kwargs):
    """``launch(*args, **kwargs)``, or None when this Triton cannot build the Hopper kernel
    ``name`` (Gluon's API still moves between releases): the failure is logged once, the
    kernel is not tried again in this process, and the caller takes its portable kernel."""
    if name in _UNBUILDABLE:
        return None
    from triton.compiler.errors import CompilationError

    try:
        return launch(*args, **kwargs)
    except (CompilationError, ImportError, AttributeError) as exc:
        _UNBUILDABLE.add(name)
        logger.warning("comfy_lowbit: the sm_90 kernel %s does not build with this Triton (%s: %s); "
                       "using the portable kernel", name, type(exc).__name__, str(exc).splitlines()[0][:200])
        return None


# The block-scaled Hopper GEMM's ways of running its warps (block_scaled_gemm_sm90): in step,
# with a producer warp, or as two independent MMA warpgroups plus the producer warp.
WARP_PLANS = {"sm90": {}, "sm90_producer": {"producer_warp": True}, "sm90_split": {"split_warpgroups": True}}


def fastest_of_portable_and_hopper(name: str, key: tuple, portable, hopper, default: str):
    """The output of the fastest of ``portable()`` and ``hopper(**plan)`` for each of
    WARP_PLANS, for ``key`` (timed on its first call, ``fastest``; untimed, ``default``:
    "portable" or a WARP_PLANS name). A Hopper kernel this Triton cannot build (``run_sm90``)
    leaves the portable one."""
    from .fastest import fastest

    candidates = {"portable": portable}
    for plan, kwargs in WARP_PLANS.items():
        candidates[plan] = lambda kwargs=kwargs: run_sm90(name, hopper, **kwargs)
    choice = fastest(key, candidates, default)
    if choice != "portable":
        out = candidates[choice]()
        if out is not None:
            return out
    return portable()
