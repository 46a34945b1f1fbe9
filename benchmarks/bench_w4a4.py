"""W4A4 side by side on one GPU: bf16 cuBLAS F.linear, comfy-kitchen's CUDA SVDQuant W4A4, ours.

One process, FLUX linear shapes, M in {1, 16, 256, 1024, 4096, 16384}. Times are medians of
``triton.testing.do_bench`` (CUDA events; it zeroes a 256 MB buffer before every repetition,
so the weights never sit in the 50 MB L2). Ceilings are measured first in the same run (copy
bandwidth, bf16 and int8 matmul peaks) and each row prints its floor:
max(bytes / bandwidth, ops / peak), where ours counts int8 tensor-core ops (int4 has no MMA
on Hopper) and bytes = x read + packed weight + side tensors + output written.

Accuracy: relative Frobenius error vs float64 on activations with outlier channels (x20 on
1/16 of the channels, lognormal per-channel spread), ours data-free and with ``act_absmax``
from a separate calibration batch, beside bitsandbytes NF4 (weight-only) and comfy-kitchen
running our calibrated weights.

Usage: python benchmarks/bench_w4a4.py [--quick] [--variants] [--shapes 3072x12288,...] [--batches 1,16,...]
       python benchmarks/bench_w4a4.py --small-m [--shapes ...]   (only the M <= 16 section)
       python benchmarks/bench_w4a4.py --quant [--shapes ...] [--batches ...]   (quantizer variants)

``--small-m``: the M <= 16 plans in CUDA graphs (what a sampler loop replays), on rotating
copies of the weights (> 120 MB per replay, so no copy is still in L2): bf16 F.linear, our
GEMM plan (quantizer + split-K GEMM + memset + cast) and the dp4a GEMV plan (quantizer + one
GEMV; up to 16 rows the dispatch times both plans on the first call per shape), with the GEMV's
parts timed alone and a sweep of its tiles at M=1.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import math
import platform
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from comfy_kitchen.tensor import QuantizedTensor
from comfy_kitchen.tensor.svdquant_w4a4 import TensorCoreSVDQuantW4A4Layout

import comfy_lowbit  # noqa: F401  (registers W4A4Layout)
from comfy_lowbit.kernels import w4a4_gemm as gemm_mod
from comfy_lowbit.kernels import w4a4_gemv as gemv_mod
from comfy_lowbit.kernels.sm90 import hopper_with_gluon
from comfy_lowbit.kernels.w4a4_quantize import quantize_activations
from comfy_lowbit.layouts import w4a4 as w4a4_layout

SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072)]  # (K, N): FLUX attn proj, mlp up, mlp down
BATCHES = [1, 16, 256, 1024, 4096, 16384]
RANK = 32


def median_us(fn, rep=100):
    return do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3


def ceilings():
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(big)
    bw = 2 * big.numel() / (median_us(lambda: dst.copy_(big)) * 1e-6)
    del big, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bf16 = 2 * 8192**3 / (median_us(lambda: a @ a) * 1e-6)
    i8 = torch.randint(-127, 127, (8192, 8192), device="cuda", dtype=torch.int8)
    i8t = i8.t().contiguous().t()
    int8 = 2 * 8192**3 / (median_us(lambda: torch._int_mm(i8, i8t)) * 1e-6)
    return bw, bf16, int8


def outlier_activations(m, k, seed, hot, spread):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g)
    x[:, hot] *= 20.0
    return (x * spread).to(torch.bfloat16)


def as_ck(qt):
    p = qt._params
    params = TensorCoreSVDQuantW4A4Layout.Params(
        scale=p.scale, orig_dtype=p.orig_dtype, orig_shape=p.orig_shape,
        proj_down=p.proj_down, proj_up=p.proj_up, smooth_factor=p.smooth_factor)
    return QuantizedTensor(qt._qdata, "TensorCoreSVDQuantW4A4Layout", params)


def guarded(fn):
    """A peer failing must not end the run: report it and give NaN."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        print(f"# peer failed: {type(exc).__name__}: {str(exc)[:200]}")
        return float("nan")


def rel(out, ref):
    out = out.double()
    return float("inf") if not torch.isfinite(out).all() else ((out - ref).norm() / ref.norm()).item()


def nf4_error(w, x, ref):
    try:
        import bitsandbytes.functional as bnbf
    except Exception as exc:  # noqa: BLE001 - the peer is optional on a machine
        return f"n/a ({type(exc).__name__})"
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64)
    return f"{rel(F.linear(x, bnbf.dequantize_4bit(packed, state)), ref):.4f}"


def graph_us(fns):
    """Median us per call of ``fns`` replayed in one CUDA graph, in turn (rotating copies)."""
    return do_bench_cudagraph(lambda: [f() for f in fns], rep=100, return_mode="median") * 1e3 / len(fns)


def copies_for(nbytes, total=120e6):
    return max(2, math.ceil(total / nbytes))


def clone_weight(qt):
    p = qt._params
    fields = {name: getattr(p, name).clone() for name in ("scale", "proj_down", "proj_up", "smooth_factor")}
    return QuantizedTensor(qt._qdata.clone(), "W4A4Layout", dataclasses.replace(p, **fields))


def small_m_section(shapes, batches):
    """bf16 vs our GEMM plan (quantizer + GEMM) vs the dp4a GEMV plan at M <= 16, CUDA graphs,
    rotating weights; the dispatch times both per shape on the first call (``kernels/fastest.py``)."""
    print("\n## Small M in CUDA graphs (us per linear; weights rotated so none is in L2)")
    print("| K | N | M | bf16 | ours GEMM plan | ours GEMV plan | GEMV plan vs bf16 | GEMV plan without PDL | quant alone "
          "| GEMV alone | err GEMV vs GEMM plan | eager bf16 / GEMM plan / GEMV plan |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, n in shapes:
        w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
        qt = QuantizedTensor.from_float(w, "W4A4Layout", rank=RANK)
        ws = [w] + [w.clone() for _ in range(copies_for(w.numel() * 2) - 1)]
        qts = [qt] + [clone_weight(qt) for _ in range(copies_for(n * k // 2) - 1)]
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            with torch.inference_mode():
                t_bf16 = graph_us([lambda w=w: F.linear(x, w, bias) for w in ws])
                gemm_plan = lambda q: w4a4_layout._gemm_linear(x, q._qdata, q._params, bias, x.dtype)  # noqa: E731
                gemv_plan = lambda q: w4a4_layout._gemv_linear(x, q._qdata, q._params, bias, x.dtype)  # noqa: E731
                ref = gemm_plan(qt).float()
                t_def = graph_us([lambda q=q: gemm_plan(q) for q in qts])
                t_gemv = t_nopdl = err = t_q = t_k = e_gemv = float("nan")
                e_bf16, e_def = median_us(lambda: F.linear(x, w, bias)), median_us(lambda: gemm_plan(qt))
                if m <= gemv_mod.MAX_ROWS:
                    err = rel(gemv_plan(qt), ref.double())
                    e_gemv = median_us(lambda: gemv_plan(qt))
                    t_gemv = guarded(lambda: graph_us([lambda q=q: gemv_plan(q) for q in qts]))
                    t_nopdl = guarded(lambda: graph_us([lambda q=q: w4a4_layout._gemv_linear(x, q._qdata, q._params, bias, x.dtype,
                                                                                             pdl=False) for q in qts]))
                    p = qt._params
                    chunks = gemv_mod.lora_chunks(m, k, RANK)
                    q = quantize_activations(x, p.smooth_factor, p.proj_down, chunks=chunks)
                    t_q = graph_us([lambda: quantize_activations(x, p.smooth_factor, p.proj_down, chunks=chunks)])
                    t_k = graph_us([lambda q2=q2: gemv_mod.w4a4_gemv(*q[:2], q2._qdata, q2._params.scale, q[2],
                                                                     q2._params.proj_up, bias, x.dtype) for q2 in qts])
            print(f"| {k} | {n} | {m} | {t_bf16:.1f} | {t_def:.1f} | {t_gemv:.1f} | {t_bf16 / t_gemv:.2f}x | {t_nopdl:.1f} | "
                  f"{t_q:.1f} | {t_k:.1f} | {err:.1e} | {e_bf16:.1f} / {e_def:.1f} / {e_gemv:.1f} |", flush=True)
        # Tile sweep of the GEMV alone (bytes: packed weight + scales; floor at 3.0 TB/s).
        floor = (n * k // 2 + (k // 64) * n * 2 + n * RANK * 2) / 3.0e12 * 1e6
        p = qt._params
        for m, tiles in GEMV_TILES.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q = quantize_activations(x, p.smooth_factor, p.proj_down, chunks=gemv_mod.lora_chunks(m, k, RANK))
            for bn, groups, warps in tiles:
                cfg = {"BLOCK_N": bn, "GROUPS": groups, "num_warps": warps}
                t = graph_us([lambda q2=q2: gemv_mod.w4a4_gemv(*q[:2], q2._qdata, q2._params.scale, q[2], q2._params.proj_up,
                                                               bias, x.dtype, config=dict(cfg)) for q2 in qts])
                print(f"GEMV tile K={k} N={n} M={m} {cfg}: {t:.1f} us (floor {floor:.1f} us at 3.0 TB/s)", flush=True)


# (BLOCK_N, GROUPS, num_warps) per M; the first of each is ``default_tile`` at N=12288. Tiles
# that break the kernel's layout rule still run (slower: shared memory in the loop).
GEMV_TILES = {
    1: ((8, 8, 4), (16, 4, 4), (16, 4, 2), (8, 4, 2), (4, 8, 1), (32, 2, 4)),
    8: ((64, 1, 4), (32, 1, 4), (32, 1, 2), (128, 1, 8), (16, 1, 1)),
}


# Chosen from the sm_90 SASS of the loop (benchmarks/NOTES.md, W4A4 v4 quantizer): fewer
# instructions and barriers per element, fewer re-reads of proj_down (one per row tile).
QUANT_VARIANTS = [
    {},  # v3 default: 16 rows, 4 warps
    {"FAST_DIV": True},
    {"BLOCK_M": 32, "num_warps": 8},
    {"FAST_DIV": True, "BLOCK_M": 32, "num_warps": 8},
    {"FAST_DIV": True, "BLOCK_M": 64, "num_warps": 8},
    {"FAST_DIV": True, "BLOCK_M": 64},
    {"FAST_DIV": True, "BLOCK_M": 32, "num_warps": 8, "programs": 2048},
    {"FAST_DIV": True, "BLOCK_M": 64, "num_warps": 8, "programs": 512},
    {"FAST_DIV": True, "BLOCK_M": 32, "num_warps": 8, "num_stages": 4},
    {"FAST_DIV": True, "STEP_GROUPS": 2},
]


def quant_section(ks, batches):
    """Activation-quantizer variants (kernels/w4a4_quantize.py ``config``) in CUDA graphs (no
    launch overhead in the figure): time, bandwidth, floor, codes changed vs the default."""
    print("\n## Activation quantizer variants (CUDA graphs; bytes = x + codes + scales + low-rank partials)")
    for k in ks:
        smooth = (torch.rand(k, device="cuda") + 0.5).to(torch.bfloat16)
        down = (torch.randn(k, RANK, device="cuda") / 8).to(torch.bfloat16)
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xs = [x] + [x.clone() for _ in range(copies_for(x.numel() * 2) - 1)]  # none left in L2
            base = quantize_activations(x, smooth, down, codes_dtype=torch.float8_e4m3fn)
            for cfg in QUANT_VARIANTS:
                try:
                    q = quantize_activations(x, smooth, down, codes_dtype=torch.float8_e4m3fn, config=cfg)
                    t = graph_us([lambda xi=xi: quantize_activations(xi, smooth, down, codes_dtype=torch.float8_e4m3fn, config=cfg)
                                  for xi in xs])
                except Exception as exc:  # noqa: BLE001 - a variant may not compile or fit
                    print(f"quant K={k} M={m} {cfg}: failed ({type(exc).__name__}: {str(exc)[:160]})")
                    continue
                nbytes = m * k * 2 + m * k + (k // 64) * m * 4 + q[2].numel() * 4
                changed = (q[0].float() != base[0].float()).float().mean().item()
                print(f"quant K={k} M={m} {cfg or 'v3 default'}: {t:7.1f} us  {nbytes / t / 1e3:6.0f} GB/s  "
                      f"floor {nbytes / 3.0e12 * 1e6:5.1f} us  codes changed vs default {changed:.1e}", flush=True)


def parse_shapes(text):
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one shape, fewer batches")
    ap.add_argument("--variants", action="store_true", help="also time fixed GEMM configs and the I2F conversion")
    ap.add_argument("--shapes", type=parse_shapes, help="KxN list, e.g. 3072x12288,12288x3072")
    ap.add_argument("--batches", type=lambda t: [int(v) for v in t.split(",")], help="M list, e.g. 1,4096")
    ap.add_argument("--small-m", action="store_true", help="only the M <= 16 CUDA-graph section (GEMV plan vs default)")
    ap.add_argument("--quant", action="store_true", help="only the activation-quantizer variants (K of --shapes, M of --batches)")
    args = ap.parse_args()
    shapes, batches = (SHAPES[1:2], [1, 4096]) if args.quick else (SHAPES, BATCHES)
    shapes = args.shapes or shapes
    batches = args.batches or batches
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    from comfy_kitchen.backends import cuda as ck_cuda
    ck_ok = bool(getattr(ck_cuda, "_EXT_AVAILABLE", False))
    print(f"# W4A4 benchmark  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}  {dev}")
    print(f"# python {platform.python_version()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"comfy-kitchen {importlib.metadata.version('comfy-kitchen')} (CUDA ext: {ck_ok})")
    fp8_ok = torch.cuda.get_device_capability() >= (8, 9)
    if args.small_m:
        small_m_section(shapes, args.batches or [1, 2, 4, 8, 16])
        return 0
    if args.quant:
        quant_section(sorted({k for k, _ in (args.shapes or SHAPES)}), args.batches or [4096, 16384])
        return 0
    bw, bf16_peak, int8_peak = ceilings()
    print(f"# ceilings: copy {bw / 1e12:.2f} TB/s, bf16 mm {bf16_peak / 1e12:.0f} TFLOP/s, int8 _int_mm {int8_peak / 1e12:.0f} TOP/s")

    rows = []
    acc_lines = []
    for k, n in shapes:
        w = (torch.randn(n, k, device="cuda") / k**0.5)
        w[:, torch.randperm(k, device="cuda")[: k // 32]] *= 4.0
        w = w.to(torch.bfloat16)
        hot = torch.randperm(k, device="cuda")[: k // 16]
        spread = torch.exp(torch.randn(k, device="cuda") * 0.5)
        calib = outlier_activations(512, k, 1, hot, spread)
        ours_free = QuantizedTensor.from_float(w, "W4A4Layout", rank=RANK)
        ours = QuantizedTensor.from_float(w, "W4A4Layout", rank=RANK, act_absmax=calib.abs().amax(0).float())
        ck = as_ck(ours)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)

        xt = outlier_activations(256, k, 2, hot, spread)
        ref = xt.double() @ w.double().t()
        with torch.inference_mode():
            errs = {
                "bf16": rel(F.linear(xt, w), ref),
                "ours calibrated": rel(F.linear(xt, ours), ref),
                "ours data-free": rel(F.linear(xt, ours_free), ref),
                "ck CUDA (our calibrated weights)": guarded(lambda: rel(F.linear(xt, ck), ref)) if ck_ok else float("nan"),
            }
        acc_lines.append(f"K={k} N={n}: " + ", ".join(f"{name} {e:.4f}" for name, e in errs.items())
                         + f", bnb NF4 (weight-only) {nf4_error(w, xt, ref)}")

        for m in batches:
            x = outlier_activations(m, k, 3 + m, hot, spread)
            flops = 2 * m * n * k
            with torch.inference_mode():
                t_bf16 = median_us(lambda: F.linear(x, w, bias))
                t_ours = median_us(lambda: F.linear(x, ours, bias))
                t_ck = guarded(lambda: median_us(lambda: F.linear(x, ck, bias), rep=50)) if ck_ok else float("nan")
                # The layout's own plan, in parts: quantize, (unpack), GEMM.
                p = ours._params
                dot = w4a4_layout._dot_kind(x.device)
                cdt = torch.float8_e4m3fn if dot == "fp8" else torch.int8
                codes, ascales, lora = quantize_activations(x, p.smooth_factor, p.proj_down, codes_dtype=cdt)
                t_q = median_us(lambda: quantize_activations(x, p.smooth_factor, p.proj_down, codes_dtype=cdt))
                w8 = gemm_mod.unpack_weight(ours._qdata, cdt) if m >= w4a4_layout.UNPACK_MIN_ROWS else None
                t_u = median_us(lambda: gemm_mod.unpack_weight(ours._qdata, cdt)) if w8 is not None else 0.0
                t_g = median_us(lambda: gemm_mod.w4a4_gemm(codes, ascales, ours._qdata, p.scale, lora, p.proj_up, bias,
                                                           x.dtype, dot=dot, unpacked=w8))
                g_bf16 = g_ours = float("nan")
                if m <= 16:  # launch overhead dominates here: also time CUDA-graph replays
                    g_bf16 = do_bench_cudagraph(lambda: F.linear(x, w, bias), rep=100, return_mode="median") * 1e3
                    g_ours = do_bench_cudagraph(lambda: F.linear(x, ours, bias), rep=100, return_mode="median") * 1e3
            w_bytes = n * k // 2 + (k // 64) * n * 2 + (k + n) * RANK * 2 + k * 2
            io_bytes = m * k * 2 + m * n * 2
            floor_ours = max((w_bytes + io_bytes) / bw, flops / int8_peak) * 1e6
            floor_bf16 = max((n * k * 2 + io_bytes) / bw, flops / bf16_peak) * 1e6
            rows.append((k, n, m, t_bf16, floor_bf16, t_ck, t_ours, t_q, t_g, floor_ours, g_bf16, g_ours, t_u))
            if w8 is not None and dot == "fp8" and hopper_with_gluon(x.device):  # the Hopper GEMM, opt-in
                from comfy_lowbit.kernels.w4a4_gemm_sm90 import w4a4_gemm_sm90
                with torch.inference_mode():
                    err90 = rel(w4a4_gemm_sm90(codes, ascales, w8, p.scale, lora, p.proj_up, bias, torch.float32),
                                gemm_mod.w4a4_gemm(codes, ascales, ours._qdata, p.scale, lora, p.proj_up, bias,
                                                   torch.float32, dot=dot, unpacked=w8).double())
                    for producer in (False, True):
                        t90 = median_us(lambda: w4a4_gemm_sm90(codes, ascales, w8, p.scale, lora, p.proj_up, bias, x.dtype,
                                                               producer_warp=producer))
                        total = t_q + t_u + t90
                        print(f"K={k:5d} N={n:5d} M={m:5d}  sm90 gemm{' +producer warp' if producer else ''} {t90:8.1f} "
                              f"({flops / t90 / 1e6:6.0f} TOP/s, vs portable {err90:.1e})  quant+unpack+sm90 {total:8.1f}  "
                              f"{t_bf16 / total:5.2f}x bf16  {t_ck / total:6.1f}x ck", flush=True)
            print(f"K={k:5d} N={n:5d} M={m:5d}  bf16 {t_bf16:8.1f}  ck {t_ck:9.1f}  ours {t_ours:8.1f} "
                  f"(quant {t_q:6.1f} + unpack {t_u:5.1f} + gemm {t_g:7.1f})  floor {floor_ours:7.1f}  "
                  f"{t_bf16 / t_ours:5.2f}x bf16  {t_ck / t_ours:6.1f}x ck"
                  + (f"  graphs: bf16 {g_bf16:.1f} ours {g_ours:.1f} ({g_bf16 / g_ours:.2f}x)" if m <= 16 else ""),
                  flush=True)

        if args.variants and (k, n) == (3072, 12288):
            x = outlier_activations(4096, k, 99, hot, spread)
            p = ours._params
            codes, ascales, lora = quantize_activations(x, p.smooth_factor, p.proj_down)
            ref_out = gemm_mod.w4a4_gemm(codes, ascales, ours._qdata, p.scale, lora, p.proj_up, bias, torch.float32)
            m_var = 4096
            a8 = torch.randint(-7, 8, (m_var, k), device="cuda", dtype=torch.int8)
            b8 = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8)
            t_int = median_us(lambda: torch._int_mm(a8, b8.t()))
            print(f"variant M={m_var} K={k} N={n} torch._int_mm (cuBLAS int8, no scales): {t_int:8.1f} us  {2 * m_var * n * k / t_int / 1e6:6.0f} TOP/s")
            if fp8_ok:
                a_f8, b_f8 = a8.to(torch.float8_e4m3fn), b8.to(torch.float8_e4m3fn)
                one = torch.ones((), device="cuda")
                t_f8mm = guarded(lambda: median_us(lambda: torch._scaled_mm(a_f8, b_f8.t(), one, one, out_dtype=torch.bfloat16)))
                print(f"variant M={m_var} K={k} N={n} torch._scaled_mm (cuBLAS fp8, per-tensor): {t_f8mm:8.1f} us  {2 * m_var * n * k / t_f8mm / 1e6:6.0f} TOP/s")
            for m_var, cfgs, plans in (
                (4096, gemm_mod._CONFIGS["large"][:3], [(d, True) for d in ("int8", "fp8")]),
                (1, gemm_mod._CONFIGS["gemv"], [("fp8", False)]),
            ):
                xv = x[:m_var]
                quant = {d: quantize_activations(xv, p.smooth_factor, p.proj_down,
                                                 codes_dtype=torch.float8_e4m3fn if d == "fp8" else torch.int8)
                         for d in ("int8", "fp8") if d == "int8" or fp8_ok}
                ref_v = gemm_mod.w4a4_gemm(*quant["int8"][:2], ours._qdata, p.scale, quant["int8"][2], p.proj_up, bias, torch.float32)
                for i, cfg in enumerate(cfgs):
                    c = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                    runs = [(d, u, False) for d, u in plans if u or i == 0 or m_var == 1]
                    if m_var == 4096 and i == 0:
                        runs += [("fp8", True, True)]
                    for dot, unpack, no_scales in runs:
                        if dot not in quant:
                            continue
                        cv, av, lv = quant[dot]
                        w8 = gemm_mod.unpack_weight(ours._qdata, cv.dtype) if unpack else None
                        run = lambda: gemm_mod.w4a4_gemm(cv, av, ours._qdata, p.scale, lv, p.proj_up, bias,  # noqa: E731
                                                         x.dtype, config=dict(c), dot=dot, unpacked=w8, timing_no_scales=no_scales)
                        label = f"variant M={m_var} K={k} N={n} {c} dot={dot} unpacked={unpack}" + (" NO-SCALES diagnostic" if no_scales else "")
                        try:
                            err = rel(run(), ref_v.double())
                            t = median_us(run)
                            print(f"{label}: {t:8.1f} us  {2 * m_var * n * k / t / 1e6:6.0f} TOP/s  err vs int8 fused {err:.1e}", flush=True)
                        except Exception as exc:  # noqa: BLE001 - a config may not fit shared memory
                            print(f"{label}: failed ({type(exc).__name__}: {str(exc)[:160]})")

    print("\n## Accuracy (relative error vs float64, outlier-channel activations, M=256)")
    for line in acc_lines:
        print(line)
    print("\n## Summary (us; ratios >1 mean ours is faster)")
    print("| K | N | M | bf16 | ck W4A4 | ours | ours quant+unpack+gemm | floor ours | vs bf16 | vs ck | graphs bf16/ours | TOP/s ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, n, m, tb, fb, tc, to, tq, tg, fo, gb, go, tu in rows:
        print(f"| {k} | {n} | {m} | {tb:.1f} | {tc:.1f} | {to:.1f} | {tq:.1f}+{tu:.1f}+{tg:.1f} | {fo:.1f} | "
              f"{tb / to:.2f}x | {tc / to:.1f}x | " + (f"{gb:.1f}/{go:.1f} ({gb / go:.2f}x)" if m <= 16 else "-")
              + f" | {2 * m * n * k / to / 1e6:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
