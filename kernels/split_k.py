"""Arrival counters for single-launch split-K: the last program of an output tile sums the partials.

Why one launch: a second, tiny reduction kernel costs about as much as a skinny GEMV of a FLUX
layer itself (benchmarks/NOTES.md, int8 M=1). The kernels (``int8_gemv``, ``bnb4_mma``) count
each finished program in with an acquire-release atomic and leave every counter at zero
again, so the counters are zeroed once here and CUDA-graph replays stay correct.
"""
from __future__ import annotations

import torch

_COUNTERS: dict[tuple, torch.Tensor] = {}
# Counters replaced by larger ones stay alive: a captured CUDA graph may still point at them.
_RETIRED: list[torch.Tensor] = []


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least ``count`` int32 zeros on ``device``, one set per device and stream (so that
    kernels on two streams never share one), kept between calls."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < count:
        if counters is not None:
            _RETIRED.append(counters)
        counters = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = counters
    return counters
