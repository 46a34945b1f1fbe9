"""W4A4Layout: SVDQuant int4 weights x int4 activations plus a 16-bit low-rank branch.

Storage (per linear weight (N, K), identical to comfy-kitchen's ``TensorCoreSVDQuantW4A4Layout``
so files move between the two unchanged; key suffixes relative to ``<layer>.weight``):

    ""                qweight        (N, K/2)   int8   byte j of row n: bits 0..3 = code of column 2j,
                                                       bits 4..7 = column 2j+1; two's-complement -8..7
    "_scale"          wscales        (K/64, N)  bf16/fp16 (the compute dtype)
    "_proj_down"      proj_down      (K, R)     same dtype
    "_proj_up"        proj_up        (N, R)     same dtype
    "_smooth_factor"  smooth_factor  (K,)       same dtype
    ``<layer>.comfy_quant``: {"format": "svdquant_w4a4"} (+ "act_unsigned": true for layers
    whose input is post-GELU and quantized on the unsigned grid, nunchaku's fc2 convention)

Forward (comfy-kitchen's math):

    out = Q4(x / smooth) @ (W4 * wscales).T  +  (x @ proj_down) @ proj_up.T  +  bias

with Q4 per-row, per-64-group symmetric int4 (scale = absmax / 7; see
``kernels/w4a4_quantize.py``). The effective weight is therefore

    W_eff[n, k] = W4[n, k] * wscales[k // 64, n] / smooth[k]  +  (proj_up @ proj_down.T)[n, k]

which ``dequantize`` returns (rounded to the storage dtype, then to the logical dtype).

Quantizer (ours; comfy-kitchen's raises): SmoothQuant smoothing ``s = a^alpha / w^(1-alpha)``
per input channel, with ``a`` the calibrated activation absmax (``act_absmax``) or 1 when
data-free and ``w`` the weight's column absmax; rank-R SVD of the smoothed weight ``W * s``
for the low-rank branch; the residual quantized to int4 per (row, 64-group) with the clip
ratio that minimises the group's squared error.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from comfy_kitchen.tensor import BaseLayoutParams, QuantizedTensor

from ..kernels.fastest import fastest, m_bucket
from ..kernels.w4a4_gemm import GROUP, pack_int4, unpack_int4, unpack_weight, w4a4_gemm, w4a4_gemm_reference
from ..kernels.w4a4_gemv import MAX_ROWS as GEMV_KERNEL_MAX_ROWS
from ..kernels.w4a4_gemv import lora_chunks, w4a4_gemv
from ..kernels.w4a4_quantize import quantize_activations, quantize_activations_reference
from .base import LowBitLayout, format_error

logger = logging.getLogger(__name__)

# ComfyUI passes these when it requantizes a patched weight; they mean nothing for W4A4.
_IGNORED_COMFY_KWARGS = ("scale", "stochastic_rounding", "inplace_ops")
_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
_FULL_SVD_MAX_DIM = 2048
_SUFFIXES = ("", "_scale", "_proj_down", "_proj_up", "_smooth_factor")
# From this many input rows on, expand the weight to 8-bit codes once per call and run the
# streaming GEMM (benchmarks/NOTES.md, W4A4: the fused in-register unpack loses there).
UNPACK_MIN_ROWS = 256
# Up to GEMV_MAX_ROWS_TIMED rows (the GEMV kernel's limit) the dp4a GEMV plan and the GEMM
# plan are timed per shape on the first call (kernels/fastest.py); untimed, the GEMV plan up to
# GEMV_MAX_ROWS: on the H100, in CUDA graphs, it beat the GEMM plan at 1 and 2 rows on every
# FLUX shape, and from 4 rows only at 3072x12288 (benchmarks/NOTES.md, W4A4 GEMV v4).
GEMV_MAX_ROWS = 2
GEMV_MAX_ROWS_TIMED = GEMV_KERNEL_MAX_ROWS
# Where the candidates are not timed (kernels/fastest.py), the Hopper GEMM from this much work
# (M * N * K): on the H100 it beat the portable GEMM on every measured call this large
# (1.06-1.39x) and lost below, at M=1024, K=N=3072.
SM90_MIN_WORK = 1024 * 3072 * 12288


@functools.lru_cache(maxsize=None)
def _dot_kind(device: torch.device) -> str:
    """e4m3 MMA where the GPU has it (sm_89+; measured faster on the H100), int8 MMA elsewhere."""
    return "fp8" if torch.cuda.get_device_capability(device) >= (8, 9) else "int8"


def _storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """comfy-kitchen keeps the side tensors in the compute dtype, bf16 or fp16."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def smoothing_factor(w: torch.Tensor, act_absmax: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factor, normalised to geometric mean 1 (fp32, (K,)).

    x / s and W * s leave x @ W.T unchanged; alpha moves quantization difficulty from the
    activation (alpha -> 1) to the weight (alpha -> 0). Without calibration the activation
    absmax is taken as uniform.
    """
    w_absmax = w.abs().amax(dim=0).clamp_min(1e-8)
    a = act_absmax.float().clamp_min(1e-5) if act_absmax is not None else torch.ones_like(w_absmax)
    s = a.pow(alpha) / w_absmax.pow(1.0 - alpha)
    return s / s.log().mean().exp()


def _low_rank(ws: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` factors of ws (N, K): (U * S) (N, R) and V (K, R)."""
    if min(ws.shape) <= _FULL_SVD_MAX_DIM:
        u, s, vh = torch.linalg.svd(ws, full_matrices=False)
        return u[:, :rank] * s[:rank], vh[:rank].t()
    # Randomised SVD on big weights; a fixed seed keeps the quantizer deterministic.
    devices = [ws.device] if ws.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(ws, q=rank + 16, niter=4)
    return u[:, :rank] * s[:rank], v[:, :rank]


def _quantize_groups(residual: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual (N, K) -> (codes (N, K) int8 in -8..7, wscales (K/64, N) in ``dtype``).

    Per (row, group) the scale is ``clip * absmax / 7`` rounded to the storage dtype, with the
    clip ratio from ``_CLIP_RATIOS`` that gives the smallest squared error.
    """
    n, k = residual.shape
    groups = residual.view(n, k // GROUP, GROUP)
    absmax = groups.abs().amax(dim=-1).clamp_min(1e-12)
    best_err = best_scale = None
    for ratio in _CLIP_RATIOS:
        scale = (absmax * (ratio / 7.0)).to(dtype).float().clamp_min(torch.finfo(dtype).tiny)
        q = (groups / scale.unsqueeze(-1)).round().clamp(-8, 7)
        err = (q * scale.unsqueeze(-1) - groups).square().sum(dim=-1)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
    codes = (groups / best_scale.unsqueeze(-1)).round().clamp(-8, 7).to(torch.int8).view(n, k)
    return codes, best_scale.t().contiguous().to(dtype)


class W4A4Layout(LowBitLayout):
    """SVDQuant W4A4 (see the module docstring for storage and math)."""

    FORMAT: ClassVar[str] = "svdquant_w4a4"
    QUANTIZE_INPUT: ClassVar[bool] = False  # the forward quantizes x itself, fused with the low-rank branch
    MIN_SM_VERSION = (8, 0)

    @dataclass(frozen=True)
    class Params(BaseLayoutParams):
        """``scale`` is wscales (K/64, N); ``alpha`` is kept only to requantize the same way."""

        proj_down: torch.Tensor
        proj_up: torch.Tensor
        smooth_factor: torch.Tensor
        act_unsigned: bool = False
        alpha: float = 0.5
        transposed: bool = False

        def _tensor_fields(self) -> list[str]:
            return ["scale", "proj_down", "proj_up", "smooth_factor"]

        def _validate_tensor_fields(self):
            return  # per-group scales stay in the compute dtype, like comfy-kitchen's

    # ---------------------------------------------------------------- quantize / dequantize

    @classmethod
    def quantize(
        cls,
        tensor: torch.Tensor,
        rank: int = 32,
        act_absmax: torch.Tensor | None = None,
        alpha: float = 0.5,
        smooth_factor: torch.Tensor | None = None,
        act_unsigned: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Params]:
        """Quantize a float (N, K) weight. ``smooth_factor`` reuses a given smoothing (requantize)."""
        unknown = sorted(set(kwargs) - set(_IGNORED_COMFY_KWARGS))
        if unknown:
            raise TypeError(f"W4A4Layout.quantize: unknown keyword(s) {unknown}; "
                            "accepted: rank, act_absmax, alpha, smooth_factor, act_unsigned")
        if tensor.dim() != 2 or tensor.shape[1] % GROUP:
            raise format_error(None, f"W4A4 needs a 2-D (N, K) weight with K a multiple of {GROUP}, got {tuple(tensor.shape)}")
        n, k = tensor.shape
        if not 1 <= rank <= min(n, k):
            raise format_error(None, f"W4A4 rank must be in 1..{min(n, k)} for a {tuple(tensor.shape)} weight, got {rank}")
        if not 0.0 <= alpha <= 1.0:
            raise format_error(None, f"W4A4 alpha must be in [0, 1], got {alpha}")
        for name, value in (("act_absmax", act_absmax), ("smooth_factor", smooth_factor)):
            if value is not None and tuple(value.shape) != (k,):
                raise format_error(None, f"W4A4 {name} must have shape ({k},) (one per input channel), got {tuple(value.shape)}")
        dtype = _storage_dtype(tensor.dtype)
        w = tensor.detach().float()
        if smooth_factor is None:
            act = None if act_absmax is None else act_absmax.to(w.device)
            smooth_factor = smoothing_factor(w, act, alpha)
        smooth = smooth_factor.to(w.device, dtype)
        s = smooth.float()
        up, down = _low_rank(w * s, rank)
        proj_up = up.to(dtype)
        proj_down = (down / s[:, None]).to(dtype)
        # The residual is taken against the *stored* (rounded) branch, which it then absorbs.
        residual = w * s - proj_up.float() @ (proj_down.float() * s[:, None]).t()
        codes, wscales = _quantize_groups(residual, dtype)
        params = cls.Params(
            scale=wscales, orig_dtype=tensor.dtype, orig_shape=tuple(tensor.shape),
            proj_down=proj_down, proj_up=proj_up.contiguous(), smooth_factor=smooth,
            act_unsigned=bool(act_unsigned), alpha=float(alpha),
        )
        return pack_int4(codes), params

    @classmethod
    def dequantize(cls, qdata: torch.Tensor, params: Params) -> torch.Tensor:
        """W_eff (see module docstring) in fp32, rounded to the storage dtype, then to orig_dtype."""
        n, k = qdata.shape[0], qdata.shape[1] * 2
        codes = unpack_int4(qdata).float().view(n, k // GROUP, GROUP)
        w = (codes * params.scale.float().t().unsqueeze(-1)).view(n, k) / params.smooth_factor.float()
        w = w + params.proj_up.float() @ params.proj_down.float().t()
        return w.to(params.scale.dtype).to(params.orig_dtype)

    @classmethod
    def state_dict_tensors(cls, qdata: torch.Tensor, params: Params) -> dict[str, torch.Tensor]:
        return dict(zip(_SUFFIXES, (qdata, params.scale, params.proj_down, params.proj_up, params.smooth_factor)))

    @classmethod
    def requantize_kwargs(cls, qtensor: QuantizedTensor) -> dict[str, Any]:
        """Same rank, alpha and smoothing (a calibrated smoothing survives LoRA patching)."""
        p = qtensor._params
        return {"rank": p.proj_up.shape[1], "alpha": p.alpha, "smooth_factor": p.smooth_factor, "act_unsigned": p.act_unsigned}

    # ---------------------------------------------------------------- files

    @classmethod
    def comfy_quant_config(cls, params: Params) -> dict[str, Any]:
        config: dict[str, Any] = {"format": cls.FORMAT}
        if params.act_unsigned:
            config["act_unsigned"] = True
        return config

    @classmethod
    def from_state_dict(cls, layer: str, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> QuantizedTensor:
        missing = [f"{layer}.weight{s}" for s in _SUFFIXES if s not in tensors]
        if missing:
            raise format_error(layer, f"{cls.FORMAT} needs {', '.join(missing)}")
        qweight, wscales, down, up, smooth = (tensors[s] for s in _SUFFIXES)
        if qweight.dim() != 2 or qweight.dtype not in (torch.int8, torch.uint8):
            raise format_error(
                layer, f"{layer}.weight must be (N, K/2) int8 packed int4 (comfy-kitchen's natural layout; "
                f"tile-packed 4-D weights are not supported), got {tuple(qweight.shape)} {qweight.dtype}")
        n, k = qweight.shape[0], qweight.shape[1] * 2
        if k % GROUP:
            raise format_error(layer, f"{layer}.weight has K={k} columns, not a multiple of {GROUP}")
        r = down.shape[-1] if down.dim() == 2 else -1
        expected = {"_scale": (k // GROUP, n), "_proj_down": (k, r), "_proj_up": (n, r), "_smooth_factor": (k,)}
        for suffix, shape in expected.items():
            t = tensors[suffix]
            if tuple(t.shape) != shape or not t.is_floating_point():
                raise format_error(layer, f"{layer}.weight{suffix} must be a float tensor of shape {shape} "
                                          f"for a ({n}, {k}) weight, got {tuple(t.shape)} {t.dtype}")
        params = cls.Params(
            scale=wscales, orig_dtype=wscales.dtype, orig_shape=(n, k),
            proj_down=down, proj_up=up, smooth_factor=smooth,
            act_unsigned=bool(config.get("act_unsigned", False)),
        )
        return QuantizedTensor(qweight.view(torch.int8), cls.__name__, params)

    # ---------------------------------------------------------------- forward

    @classmethod
    def linear(cls, x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
        p = weight._params
        n, k = p.orig_shape
        if x.shape[-1] != k:
            raise ValueError(f"W4A4 linear: input has {x.shape[-1]} features, weight expects {k}")
        x2d = x.reshape(-1, k)
        qweight = weight._qdata
        if x.is_cuda and qweight.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
            m = x2d.shape[0]
            if m <= GEMV_MAX_ROWS_TIMED:
                plans = {"gemv": lambda: _gemv_linear(x2d, qweight, p, bias, x.dtype),
                         "gemm": lambda: _gemm_linear(x2d, qweight, p, bias, x.dtype)}
                key = ("W4A4 small M", m, n, k, p.proj_up.shape[1], x.dtype, bias is not None, x.device)
                out = plans[fastest(key, plans, default="gemv" if m <= GEMV_MAX_ROWS else "gemm")]()
            else:
                out = _gemm_linear(x2d, qweight, p, bias, x.dtype)
        else:
            logger.debug("W4A4 linear on %s: plain-PyTorch reference", x.device)
            out = w4a4_linear_reference(x2d, weight, bias)
        return out.reshape(*x.shape[:-1], n)


@functools.lru_cache(maxsize=None)
def _has_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch (griddepcontrol) exists from sm_90 on."""
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _gemv_linear(x2d: torch.Tensor, qweight: torch.Tensor, p: W4A4Layout.Params, bias: torch.Tensor | None,
                 dtype: torch.dtype, pdl: bool | None = None) -> torch.Tensor:
    """Small M: two launches, the quantizer (int8 codes, few low-rank partials) and the GEMV,
    which with ``pdl`` (default: on sm_90+) starts fetching its weight while the quantizer runs."""
    m, k = x2d.shape
    pdl = _has_pdl(x2d.device) if pdl is None else pdl
    codes, ascales, lora = quantize_activations(x2d, p.smooth_factor, p.proj_down, p.act_unsigned,
                                                chunks=lora_chunks(m, k, p.proj_down.shape[1]), codes_dtype=torch.int8,
                                                config={"launch_dependents": pdl})
    return w4a4_gemv(codes, ascales, qweight, p.scale, lora, p.proj_up, bias, dtype, pdl=pdl)


def _gemm_linear(x2d: torch.Tensor, qweight: torch.Tensor, p: W4A4Layout.Params, bias: torch.Tensor | None,
                 dtype: torch.dtype) -> torch.Tensor:
    """The GEMM plan: the activation quantizer, then the tensor-core GEMM (the weight unpacked
    once per call from UNPACK_MIN_ROWS rows; the Hopper GEMM where it serves)."""
    dot = _dot_kind(x2d.device)
    code_dtype = torch.float8_e4m3fn if dot == "fp8" else torch.int8
    codes, ascales, lora = quantize_activations(x2d, p.smooth_factor, p.proj_down, p.act_unsigned, codes_dtype=code_dtype)
    unpacked = unpack_weight(qweight, code_dtype) if x2d.shape[0] >= UNPACK_MIN_ROWS else None

    def portable():
        return w4a4_gemm(codes, ascales, qweight, p.scale, lora, p.proj_up, bias, dtype, dot=dot, unpacked=unpacked)

    if unpacked is not None and _sm90_takes(codes, unpacked, p.proj_up):
        return _fastest_streaming_gemm(portable, codes, ascales, unpacked, p, lora, bias, dtype)
    return portable()


def _fastest_streaming_gemm(portable, codes, ascales, unpacked, p: W4A4Layout.Params, lora, bias, dtype):
    """The fastest of the portable GEMM and the Hopper one (with or without its producer warp)
    for this shape, timed on the first call (``kernels/fastest.py``); untimed, the H100 rule:
    the Hopper GEMM with its producer warp from SM90_MIN_WORK."""
    from ..kernels import w4a4_gemm_sm90
    from ..kernels.sm90 import fastest_of_portable_and_hopper

    def hopper(**warps):
        return w4a4_gemm_sm90.w4a4_gemm_sm90(codes, ascales, unpacked, p.scale, lora, p.proj_up, bias, dtype, **warps)

    m, (n, k) = codes.shape[0], p.orig_shape
    key = ("W4A4 GEMM", m_bucket(m), n, k, p.proj_up.shape[1], dtype, bias is not None, codes.device)
    return fastest_of_portable_and_hopper("W4A4 GEMM", key, portable, hopper,
                                          default="sm90_producer" if m * n * k >= SM90_MIN_WORK else "portable")


def _sm90_takes(codes: torch.Tensor, unpacked: torch.Tensor, proj_up: torch.Tensor) -> bool:
    """Whether the Hopper GEMM (group rescales overlapped with the fp8 MMAs) serves this
    streaming-path call."""
    from ..kernels.sm90 import sm90_kernels_enabled

    if not sm90_kernels_enabled(codes.device):
        return False
    try:
        from ..kernels.w4a4_gemm_sm90 import accepts
    except (ImportError, AttributeError):  # a Gluon whose API this kernel does not match
        return False
    return accepts(codes, unpacked, proj_up)


def w4a4_linear_reference(x2d: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The forward in plain PyTorch (fp32): what the kernels are tested against, and the CPU path."""
    p = weight._params
    codes, ascales, lora = quantize_activations_reference(x2d, p.smooth_factor, p.proj_down, p.act_unsigned)
    return w4a4_gemm_reference(codes, ascales, weight._qdata, p.scale, lora, p.proj_up, bias, x2d.dtype)

