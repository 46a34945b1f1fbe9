"""``int8_lodewise``: int8 weights with one scale per output row per K block; W8A8 on the GPU.

Storage of a linear weight W (N, K), block size B in {64, 128, 256} (default 128), K % B == 0
-------------------------------------------------------------------------------------------
* ``<layer>.weight``       int8 (N, K), row-major; ``q = round_half_away(W / scale)`` clamped
  to [-127, 127] (symmetric: -128 is never written);
* ``<layer>.weight_scale`` float32 (N, K // B), row-major; ``scale[n, b] = max |W[n, bB:(b+1)B]| / 127``
  (0 for an all-zero block); files with bf16/fp16 scales are read too. In memory the
  layout keeps it column-major (``column_major``), which is what the kernels read;
* ``<layer>.comfy_quant``  JSON ``{"format": "int8_lodewise", "block_size": B, "orig_dtype": "bfloat16"}``. Files from
  earlier tools may give the block as ``"group_size"`` at the root or under ``"params"``.

Dequantized weight: ``W[n, k] ~= q[n, k] * scale[n, k // B]`` (in fp32, then the weight's dtype).

Forward ``x @ W.T + bias``
--------------------------
* CUDA, M > ``W8A16_MAX_M`` rows (or fp32 x past the GEMV): W8A8. One Triton pass quantizes
  x with one scale per row per K block (the weight's B), then an int8 tensor-core GEMM scales
  each block's exact int32 partial by ``a_scale[m, b] * w_scale[n, b]`` in fp32
  (``kernels/int8_gemm.py``). This differs from dequantize + ``F.linear`` by the activation
  quantization error (the point of W8A8: half the bytes, twice the tensor-core rate).
* CUDA, M == 1: weight-only GEMV; 1 < M <= ``W8A16_MAX_M`` (bf16/fp16): weight-only W8A16 with
  the codes turned into x's dtype in the main loop. Small M is bound by the weight read,
  where quantizing x costs a launch and buys nothing.
* Elsewhere (CPU, other dtypes): the reference, dequantize + ``F.linear``.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from comfy_kitchen.tensor import BaseLayoutParams, QuantizedTensor

from ..kernels.int8_gemm import w8a8_matmul, w8a16_matmul
from ..kernels.int8_gemv import w8a16_gemv
from ..kernels.int8_quant import BLOCK_SIZES, dequantize_blockwise_reference, quantize_blockwise_reference, quantize_rows
from .base import LowBitLayout, format_error, reference_linear

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 128
# Largest M served weight-only by the tensor-core W8A16 kernel; above it W8A8 wins. Measured
# on the H100 (benchmarks/README.md): W8A16 beat W8A8 at M=16 on all four FLUX shapes and lost
# at M=256 by 1.4-2x; nothing was measured in between, so the cut is a round guess.
W8A16_MAX_M = 32
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BlockWiseINT8LayoutLodeWise(LowBitLayout):
    """int8 (N, K) weight with fp32 scales (N, K // block_size); see the module docstring."""

    FORMAT: ClassVar[str] = "int8_lodewise"
    QUANTIZE_INPUT: ClassVar[bool] = False  # the layout quantizes activations itself

    @dataclasses.dataclass(frozen=True)
    class Params(BaseLayoutParams):
        block_size: int = DEFAULT_BLOCK_SIZE
        transposed: bool = False

    # ------------------------------------------------------------------ quantize / dequantize

    @classmethod
    def quantize(
        cls,
        tensor: torch.Tensor,
        block_size: int = DEFAULT_BLOCK_SIZE,
        scale: torch.Tensor | str | None = None,
        stochastic_rounding: int | bool | None = 0,
        inplace_ops: bool = False,
        layer: str | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Params]:
        """Round-to-nearest int8 with per-row per-block absmax scales.

        ComfyUI's re-quantize keywords are accepted: ``scale="recalculate"`` (scales are
        always recomputed from the tensor), ``stochastic_rounding=<seed>`` (> 0 rounds
        stochastically with that seed, as ComfyUI does for LoRA-patched weights) and
        ``inplace_ops`` (the input is never modified, so it changes nothing).
        """
        if kwargs:
            logger.debug("int8_lodewise quantize ignores %s", sorted(kwargs))
        check_quantizable(tensor, block_size, layer)
        if isinstance(scale, torch.Tensor):
            raise format_error(layer, "int8_lodewise computes its own scales; pass scale=None or 'recalculate'")
        generator = None
        if stochastic_rounding and int(stochastic_rounding) > 0:
            generator = torch.Generator(device=tensor.device).manual_seed(int(stochastic_rounding))
        q, w_scale = quantize_blockwise_reference(tensor, block_size, generator=generator)
        params = cls.Params(scale=column_major(w_scale), orig_dtype=tensor.dtype, orig_shape=tuple(tensor.shape), block_size=block_size)
        return q, params

    @classmethod
    def dequantize(cls, qdata: torch.Tensor, params: Params) -> torch.Tensor:
        return dequantize_blockwise_reference(qdata, params.scale, params.block_size).to(params.orig_dtype)

    @classmethod
    def requantize_kwargs(cls, qtensor: QuantizedTensor) -> dict[str, Any]:
        return {"block_size": qtensor._params.block_size}

    # ------------------------------------------------------------------ files

    @classmethod
    def state_dict_tensors(cls, qdata: torch.Tensor, params: Params) -> dict[str, torch.Tensor]:
        return {"": qdata, "_scale": params.scale.contiguous()}  # row-major (N, K // B) on disk

    @classmethod
    def comfy_quant_config(cls, params: Params) -> dict[str, Any]:
        return {"format": cls.FORMAT, "block_size": params.block_size, "orig_dtype": str(params.orig_dtype).removeprefix("torch.")}

    @classmethod
    def from_state_dict(
        cls, layer: str, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]
    ) -> QuantizedTensor:
        block_size = block_size_from_config(layer, config)
        weight = tensors[""]
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise format_error(layer, f"{layer}.weight must be a 2-D int8 tensor, got {weight.dtype} {tuple(weight.shape)}")
        n, k = weight.shape
        if k % block_size:
            raise format_error(layer, f"K={k} of {layer}.weight is not a multiple of block_size {block_size}")
        if "_scale" not in tensors:
            raise format_error(layer, f"missing {layer}.weight_scale (int8_lodewise needs fp32 scales ({n}, {k // block_size}))")
        scale = tensors["_scale"]
        expected = (n, k // block_size)
        if tuple(scale.shape) != expected:
            raise format_error(
                layer,
                f"{layer}.weight_scale has shape {tuple(scale.shape)}, expected {expected} "
                f"(N, K // block_size) for weight {(n, k)} and block_size {block_size}",
            )
        if scale.dtype not in SCALE_DTYPES:
            raise format_error(layer, f"{layer}.weight_scale must be float32/bfloat16/float16, got {scale.dtype}")
        scale = column_major(scale.float())
        if not torch.isfinite(scale).all() or (scale < 0).any():
            raise format_error(layer, f"{layer}.weight_scale holds negative, NaN or Inf values")
        orig_dtype = _dtype_from_config(layer, config)
        params = cls.Params(scale=scale, orig_dtype=orig_dtype, orig_shape=(n, k), block_size=block_size)
        return QuantizedTensor(weight.contiguous(), cls.__name__, params)

    # ------------------------------------------------------------------ forward

    @classmethod
    def linear(cls, x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.device.type != "cuda" or x.dtype not in FLOAT_DTYPES or weight._qdata.device != x.device:
            return reference_linear(x, weight, bias)
        params = weight._params
        n, k = params.orig_shape
        if x.shape[-1] != k:
            raise ValueError(f"linear: x has {x.shape[-1]} features, the int8_lodewise weight expects {k}")
        x2 = x.reshape(-1, k)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        m = x2.shape[0]
        if bias is not None:
            bias = bias.to(device=x.device)
        w_q, w_scale, block = weight._qdata, params.scale, params.block_size
        if m == 1:
            out = w8a16_gemv(x2, w_q, w_scale, block, bias)
        elif m <= W8A16_MAX_M and x.dtype != torch.float32:
            out = w8a16_matmul(x2, w_q, w_scale, block, bias)
        else:
            a_q, a_scale_t = quantize_rows(x2, block)
            out = _w8a8(a_q, a_scale_t, w_q, w_scale, block, bias, x.dtype)
        return out.reshape(*x.shape[:-1], n)


# The Hopper kernel (split warpgroups) serves from SM90_MIN_M rows (below, its 128-row tiles
# are mostly padding). On the H100 its GPU time beat the portable W8A8 kernel at every
# measured FLUX shape from 1024 rows (W8A8 incl. quantization 0.75-1.10x bf16 against
# 0.72-0.76x; benchmarks/NOTES.md, int8 version 4), so it is not timed per shape: timing in
# isolation charged it ~150 us more launch overhead per call and chose the portable kernel at
# 1024 rows, which was slower on the GPU and no faster in the eager FLUX block.
SM90_MIN_M = 1024
SM90_PLAN = "sm90_split"


def _w8a8(a_q, a_scale_t, w_q, w_scale, block, bias, out_dtype):
    """The Hopper GEMM (rescales overlapped with the MMAs, kernels/int8_gemm_sm90.py) where it
    serves, else the portable one; both compute the same sums."""
    from ..kernels.sm90 import WARP_PLANS, run_sm90, sm90_kernels_enabled

    def portable():
        return w8a8_matmul(a_q, a_scale_t, w_q, w_scale, block, bias, out_dtype=out_dtype)

    if a_q.shape[0] < SM90_MIN_M or not sm90_kernels_enabled(a_q.device):
        return portable()
    from ..kernels import int8_gemm_sm90

    if not int8_gemm_sm90.accepts(a_q, w_q, w_scale, block):
        return portable()
    out = run_sm90("int8_lodewise W8A8", int8_gemm_sm90.w8a8_matmul_sm90, a_q, a_scale_t, w_q, w_scale, block,
                   bias, out_dtype, **WARP_PLANS[SM90_PLAN])
    return out if out is not None else portable()


# ---------------------------------------------------------------------- checks


def column_major(scale: torch.Tensor) -> torch.Tensor:
    """The (N, K // B) scale with K blocks outermost in memory (strides (1, N)).

    Same values and shape; the kernels then read the BLOCK_N scales of one K block as one
    contiguous vector instead of BLOCK_N scattered words.
    """
    return scale.t().contiguous().t()


def check_quantizable(tensor: torch.Tensor, block_size: int, layer: str | None = None) -> None:
    """Reject what int8_lodewise cannot represent, with the tensor's name in the message."""
    if block_size not in BLOCK_SIZES:
        raise format_error(layer, f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    if not isinstance(tensor, torch.Tensor) or tensor.dtype not in FLOAT_DTYPES:
        got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise format_error(layer, f"int8_lodewise quantizes float32/bfloat16/float16 weights, got {got}")
    if tensor.dim() != 2:
        raise format_error(layer, f"int8_lodewise quantizes 2-D linear weights (N, K), got shape {tuple(tensor.shape)}")
    k = tensor.shape[1]
    if k % block_size:
        raise format_error(layer, f"K={k} (weight {tuple(tensor.shape)}) is not a multiple of block_size {block_size}")
    if not torch.isfinite(tensor).all():
        raise format_error(layer, f"weight {tuple(tensor.shape)} holds NaN or Inf; int8 scales would be undefined")


def block_size_from_config(layer: str, config: Mapping[str, Any]) -> int:
    """The block size from our ``block_size`` key or an earlier tool's ``group_size``.

    ``group_size`` may sit at the root (convert_to_quant before 0.4) or under ``"params"``
    (0.4). All the keys present must agree; with none, the default 128.
    """
    nested = config.get("params") if isinstance(config.get("params"), Mapping) else {}
    found = {
        key: value
        for key, value in (
            ("block_size", config.get("block_size")),
            ("group_size", config.get("group_size")),
            ("params.block_size", nested.get("block_size")),
            ("params.group_size", nested.get("group_size")),
        )
        if value is not None
    }
    values = set(found.values())
    if len(values) > 1:
        raise format_error(layer, f"comfy_quant gives conflicting block sizes {found}")
    block = values.pop() if values else DEFAULT_BLOCK_SIZE
    if isinstance(block, bool) or not isinstance(block, int) or block not in BLOCK_SIZES:
        raise format_error(layer, f"comfy_quant block size must be one of {BLOCK_SIZES}, got {block!r} ({found})")
    return block


def _dtype_from_config(layer: str, config: Mapping[str, Any]) -> torch.dtype:
    name = config.get("orig_dtype", "bfloat16")
    dtype = getattr(torch, str(name), None)
    if dtype not in FLOAT_DTYPES:
        raise format_error(layer, f"comfy_quant orig_dtype must be one of float32/bfloat16/float16, got {name!r}")
    return dtype
