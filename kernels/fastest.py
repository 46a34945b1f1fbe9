"""Choose among equivalent launches by timing them once per shape, on the GPU that runs them.

Some choices depend on the shape and the GPU by more than a rule written from one H100 run
captures: the Hopper GEMM or the portable one, with or without its producer warp. On the
H100 the Hopper int8 GEMM won at 4096 rows on every FLUX shape but at 1024 rows on only two
of four, and the producer warp sped the W4A4 GEMM up by 1.3-1.5x except at the smallest
shape, where it lost (benchmarks/README.md). So, like Triton's autotuner does for tile
sizes, the first call for a key times every candidate (``triton.testing.do_bench`` medians,
L2 flushed) and later calls take the winner.

Off (each caller's measured rule, ``default``) when autotuning is off
(``COMFY_LOWBIT_AUTOTUNE=0``, the interpreter) and while a CUDA graph is being captured.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch
import triton

logger = logging.getLogger(__name__)

_WINNERS: dict[tuple, str] = {}


def tuning_enabled() -> bool:
    """Time candidates on the GPU unless ``COMFY_LOWBIT_AUTOTUNE=0``; never under the interpreter."""
    return os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("COMFY_LOWBIT_AUTOTUNE", "1") != "0"


def m_bucket(m: int) -> int:
    """Autotune key for M: the next power of two, capped, so new batch sizes reuse a tuning."""
    return min(triton.next_power_of_2(max(m, 1)), 8192)


def _median_ms(launch: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(launch, warmup=5, rep=20)


def fastest(key: tuple, candidates: dict[str, Callable[[], torch.Tensor | None]], default: str) -> str:
    """The name of the fastest candidate for ``key`` (timed on its first call), or ``default``.

    A candidate that returns None on its first run declines (a Hopper kernel this Triton
    cannot build, see ``sm90.run_sm90``) and is not timed. Exceptions propagate: equivalent
    launches that fail are bugs, not slow candidates.
    """
    winner = _WINNERS.get(key)
    if winner is not None:
        return winner
    if not tuning_enabled() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return default
    times = {}
    for name, launch in candidates.items():
        if launch() is not None:
            times[name] = _median_ms(launch)
    winner = min(times, key=times.get) if times else default
    _WINNERS[key] = winner
    logger.debug("comfy_lowbit: %s -> %s (%s)", key, winner, ", ".join(f"{n} {t * 1e3:.1f} us" for n, t in times.items()))
    return winner
