"""Helpers the tests share: inputs with outliers and an error measure that NaN cannot pass."""
from __future__ import annotations

import torch

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def outlier_matrix(rows: int, cols: int, *, seed: int, dtype=torch.float32, scale: float = 20.0) -> torch.Tensor:
    """Random normal values with a few columns `scale` times larger (activation-like outliers)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen)
    hot = torch.randperm(cols, generator=gen)[: max(1, cols // 16)]
    x[:, hot] *= scale
    return x.to(dtype)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN/Inf anywhere gives inf so it can never pass."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
