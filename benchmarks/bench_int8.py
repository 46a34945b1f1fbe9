"""int8_lodewise vs bf16 cuBLAS, comfy-kitchen's INT8 W8A8 and raw torch._int_mm, in one process.

    python benchmarks/bench_int8.py [--quick] [--shapes 3072x12288,...] [--ms 1,16,...]

For each FLUX linear shape (K, N) and batch M it times, with ``triton.testing.do_bench``
medians (L2 flushed before every repetition by do_bench's 256 MB cache clear):

* ``bf16``      ``F.linear(x, w, b)``, cuBLAS;
* ``ck_w8a8``   comfy-kitchen ``TensorWiseINT8Layout(per_channel=True)``: per-row activation
  scale, per-channel weight scale (``F.linear`` on its QuantizedTensor);
* ``int_mm``    raw ``torch._int_mm`` on pre-quantized operands (no quantization, no scales);
* ``w8a8``      ours: activation quantization kernel + int8 GEMM with per-block scales;
* ``w8a8_cvt``  the same with the int32->fp32 conversion instruction instead of the exact
  integer-add trick (variant);
* ``w8a16``     ours weight-only (GEMV for M <= 4, tensor-core W8A16 above);
* ``ours``      what ``F.linear`` on our QuantizedTensor dispatches to.

Also printed: TFLOP/s (TOP/s), the floor of each from peaks measured in this run (bytes /
copy bandwidth, flops / the best matmul rate measured at 8192^3), ratios to bf16, and the
relative output error vs float64 on activations with outlier channels.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from comfy_kitchen.tensor import QuantizedTensor  # noqa: E402

from comfy_lowbit.kernels.int8_gemm import w8a8_matmul, w8a16_matmul  # noqa: E402
from comfy_lowbit.kernels.int8_gemv import GEMV_MAX_ROWS, w8a16_gemv  # noqa: E402
from comfy_lowbit.kernels.int8_quant import quantize_rows  # noqa: E402
from comfy_lowbit.layouts.int8_lodewise import W8A16_MAX_M  # noqa: E402

FLUX_SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072), (3072, 18432)]
BATCHES = [1, 16, 256, 1024, 4096, 16384]
LAYOUT = "BlockWiseINT8LayoutLodeWise"
BLOCK = 128


def bench(fn) -> float:
    """Median microseconds (on the CPU, for a smoke run under TRITON_INTERPRET=1: one call)."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def measure_peaks(dev) -> dict[str, float]:
    src = torch.empty(1 << 28, dtype=torch.uint8, device=dev)  # 256 MB
    src.random_(0, 255)
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src))
    peaks = {"copy_TBps": 2 * src.numel() / us / 1e6}
    n = 8192 if dev.type == "cuda" else 256
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    peaks["bf16_TFLOPs"] = 2 * n**3 / bench(lambda: a @ b.t()) / 1e6
    ai = torch.randint(-127, 128, (n, n), device=dev, dtype=torch.int8)
    bi = torch.randint(-127, 128, (n, n), device=dev, dtype=torch.int8)
    peaks["int_mm_TOPs"] = 2 * n**3 / bench(lambda: torch._int_mm(ai, bi.t())) / 1e6
    sa = torch.rand(n // BLOCK, n, device=dev) + 0.5
    sw = torch.rand(n, n // BLOCK, device=dev) + 0.5
    peaks["ours_gemm_TOPs"] = 2 * n**3 / bench(lambda: w8a8_matmul(ai, sa, bi, sw, BLOCK)) / 1e6
    peaks["int8_TOPs"] = max(peaks["int_mm_TOPs"], peaks["ours_gemm_TOPs"])
    return peaks


def outlier_activations(m: int, k: int, seed: int, dev) -> torch.Tensor:  # timing input
    """Gaussian with 1/16 of the channels 20x larger (tests/support.py's pattern)."""
    from support import outlier_matrix

    return outlier_matrix(m, k, seed=seed, scale=20.0).to(dev, torch.bfloat16)


def relative_error(out, ref) -> float:
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def make_methods(w, bias, dev):
    """name -> (prepare(x) -> callable, bytes(m), kind) for one weight."""
    n, k = w.shape
    ours = QuantizedTensor.from_float(w, LAYOUT, block_size=BLOCK)
    w_q, w_s = ours._qdata, ours._params.scale
    methods = {}

    methods["bf16"] = (lambda x: (lambda: F.linear(x, w, bias)), lambda m: 2 * (m * k + n * k + m * n), "bf16")
    try:
        ck = QuantizedTensor.from_float(w, "TensorWiseINT8Layout", per_channel=True)
        methods["ck_w8a8"] = (lambda x: (lambda: F.linear(x, ck, bias)), lambda m: 2 * m * k + n * k + 2 * m * n, "int8")
    except Exception as exc:  # a peer that fails to build is reported, not fatal
        print(f"# comfy-kitchen INT8 unavailable: {exc!r}")

    def int_mm(x):
        a_q, _ = quantize_rows(x, BLOCK)
        return lambda: torch._int_mm(a_q, w_q.t())

    methods["int_mm"] = (int_mm, lambda m: m * k + n * k + 4 * m * n, "int8")

    def w8a8(x, exact=True):
        return lambda: w8a8_matmul(*quantize_rows(x, BLOCK), w_q, w_s, BLOCK, bias, x.dtype, exact_cvt=exact)

    def w8a16(x):
        if x.shape[0] <= GEMV_MAX_ROWS:
            return lambda: w8a16_gemv(x, w_q, w_s, BLOCK, bias)
        return lambda: w8a16_matmul(x, w_q, w_s, BLOCK, bias)

    int8_bytes = lambda m: 2 * m * k + n * k + 4 * n * (k // BLOCK) + 2 * m * n  # noqa: E731
    methods["w8a8"] = (w8a8, int8_bytes, "int8")
    methods["w8a8_cvt"] = (lambda x: w8a8(x, exact=False), int8_bytes, "int8")
    methods["w8a16"] = (w8a16, int8_bytes, "w8a16")

    def dispatched(x):
        def run():
            with torch.inference_mode():
                return F.linear(x, ours, bias)
        return run

    methods["ours"] = (dispatched, int8_bytes, "int8")
    return methods


# W8A8 GEMM tile variants timed on pre-quantized operands (BLOCK_M, BLOCK_N, warps, stages,
# extra constexprs, quantization block): what the autotuner chooses among, and what it doesn't.
VARIANTS = [
    (128, 128, 8, 3, {}, 128), (128, 128, 8, 4, {}, 128), (128, 128, 8, 3, {"EXACT_CVT": False}, 128),
    (128, 128, 8, 3, {"SKEW": True}, 128), (128, 256, 8, 3, {"SPLIT_N": 2}, 128),
    (128, 256, 8, 3, {"SPLIT_N": 2, "EXACT_CVT": False}, 128), (128, 256, 8, 3, {}, 128),
    (256, 128, 8, 3, {}, 128), (64, 128, 4, 4, {}, 128), (64, 256, 4, 3, {"SPLIT_N": 2}, 128),
    (128, 128, 4, 4, {}, 128), (128, 128, 8, 3, {}, 256), (128, 256, 8, 2, {"SPLIT_N": 2}, 256),
]


def run_variants(shapes, m: int, dev) -> None:
    print(f"\n# W8A8 GEMM variants, M={m}, activations pre-quantized (us, TOP/s)")
    for k, n in shapes:
        w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        for bm, bn, warps, stages, extra, block in VARIANTS:
            a_q, a_s = quantize_rows(x, block)
            w_s = torch.rand(n, k // block, device=dev) + 0.5
            config = {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8, "num_warps": warps, "num_stages": stages}
            exact = extra.get("EXACT_CVT", True)
            config.update({key: v for key, v in extra.items() if key != "EXACT_CVT"})
            label = f"{bm}x{bn} w{warps} s{stages} B{block} {extra}"
            try:
                fn = lambda: w8a8_matmul(a_q, a_s, w, w_s, block, None, torch.bfloat16, exact_cvt=exact, config=config)  # noqa: E731
                fn()
                us = bench(fn)
                print(f"{k:>6} {n:>6} {label:<48} {us:8.1f} {2 * m * n * k / us / 1e6:7.0f}", flush=True)
            except Exception as exc:
                print(f"{k:>6} {n:>6} {label:<48} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
    report_compiled()


def report_compiled() -> None:
    """Registers, spills, shared memory and whether wgmma was emitted, per compiled W8A8 kernel."""
    from comfy_lowbit.kernels.int8_gemm import _w8a8_kernel

    for caches in getattr(_w8a8_kernel, "device_caches", {}).values():
        for key, compiled in caches[0].items():
            ptx = compiled.asm.get("ptx", "")
            consts = {k: v for k, v in getattr(compiled.src, "constants", {}).items()} if hasattr(compiled, "src") else {}
            print(f"# compiled w8a8: regs {getattr(compiled, 'n_regs', '?')} spills {getattr(compiled, 'n_spills', '?')} "
                  f"smem {getattr(compiled.metadata, 'shared', '?')} warps {compiled.metadata.num_warps} "
                  f"stages {compiled.metadata.num_stages} wgmma {'wgmma' in ptx} cvt.rn.f32.s32 {ptx.count('cvt.rn.f32.s32')} "
                  f"{consts or str(key)[-160:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in FLUX_SHAPES), help="KxN list")
    parser.add_argument("--ms", default=",".join(map(str, BATCHES)))
    parser.add_argument("--skip", default="", help="comma-separated methods to skip")
    parser.add_argument("--variants", type=int, default=0, help="also time W8A8 tile variants at this M")
    args = parser.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    batches = [int(v) for v in args.ms.split(",")]
    skip = set(filter(None, args.skip.split(",")))

    from importlib.metadata import version
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (smoke run, not a measurement)"
    print(f"# bench_int8 {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {gpu}")
    print(f"# torch {torch.__version__}, triton {triton.__version__}, comfy-kitchen {version('comfy-kitchen')}, "
          f"python {platform.python_version()}, block {BLOCK}, W8A16 up to M={W8A16_MAX_M}")
    peaks = measure_peaks(dev)
    print("# peaks: " + ", ".join(f"{k} {v:.1f}" if "TB" in k else f"{k} {v:.0f}" for k, v in peaks.items()))
    rate = {"bf16": peaks["bf16_TFLOPs"], "int8": peaks["int8_TOPs"], "w8a16": peaks["bf16_TFLOPs"]}

    if args.variants:
        run_variants(shapes, args.variants, dev)
    torch.inference_mode().__enter__()  # as ComfyUI runs models: aten.linear reaches the layouts
    rows = []
    errors = []
    header = f"{'K':>6} {'N':>6} {'M':>6} {'method':>9} {'us':>9} {'TOP/s':>7} {'GB/s':>7} {'floor_us':>9} {'x_floor':>7} {'vs_bf16':>7}"
    print(header)
    for k, n in shapes:
        gen = torch.Generator().manual_seed(k + n)
        w = (torch.randn(n, k, generator=gen) / k**0.5).to(dev, torch.bfloat16)
        bias = (0.1 * torch.randn(n, generator=gen)).to(dev, torch.bfloat16)
        methods = {name: spec for name, spec in make_methods(w, bias, dev).items() if name not in skip}
        # Accuracy vs float64 of the unquantized operands on two outlier patterns: 1/16 of the
        # channels 20x (tests/support.py's), and 1/256 of the channels 100x (rarer, larger).
        for pattern, (frac, scale) in {"1/16x20": (16, 20.0), "1/256x100": (256, 100.0)}.items():
            gen_x = torch.Generator().manual_seed(1)
            x_err = torch.randn(256, k, generator=gen_x)
            x_err[:, torch.randperm(k, generator=gen_x)[: k // frac]] *= scale
            x_err = x_err.to(dev, torch.bfloat16)
            ref = x_err.double() @ w.double().t() + bias.double()
            for name in ("bf16", "ck_w8a8", "w8a8", "w8a16"):
                if name in methods:
                    errors.append((k, n, pattern, name, relative_error(methods[name][0](x_err)(), ref)))
        for m in batches:
            x = outlier_activations(m, k, seed=2, dev=dev)
            flops = 2 * m * n * k
            base = None
            for name, (prepare, nbytes, kind) in methods.items():
                try:
                    fn = prepare(x)
                    fn()
                    us = bench(fn)
                except Exception as exc:  # e.g. torch._int_mm refuses M <= 16
                    print(f"{k:>6} {n:>6} {m:>6} {name:>9}   n/a ({type(exc).__name__}: {str(exc).splitlines()[0][:60]})")
                    continue
                base = us if name == "bf16" else base
                floor = max(flops / rate[kind] / 1e6, nbytes(m) / peaks["copy_TBps"] / 1e6)
                line = (f"{k:>6} {n:>6} {m:>6} {name:>9} {us:9.1f} {flops / us / 1e6:7.1f} {nbytes(m) / us / 1e3:7.0f} "
                        f"{floor:9.1f} {us / floor:7.2f} {(base / us if base else float('nan')):7.2f}")
                print(line, flush=True)
                rows.append((k, n, m, name, us))

    print("\n# relative output error vs float64, x (256, K) bf16 with outlier channels (target <= 0.03)")
    for k, n, pattern, name, err in errors:
        print(f"{k:>6} {n:>6} {pattern:>10} {name:>9} {err:.4f}")
    from comfy_lowbit.kernels import int8_gemm, int8_gemv
    for label, tuner in (("w8a8", int8_gemm._w8a8_tuned), ("w8a16", int8_gemm._w8a16_tuned), ("gemv", int8_gemv._gemv_tuned)):
        for key, config in getattr(tuner, "cache", {}).items():
            print(f"# tuned {label} {key}: {config}")

    print("\n# summary: speed-up vs bf16 (bf16 time / method time); targets: M>=1024 >= 1.3 (w8a8 incl. quant), M=1 >= 1.7")
    names = [nm for nm in ("ck_w8a8", "int_mm", "w8a8", "w8a8_cvt", "w8a16", "ours") if nm not in skip]
    print(f"{'K':>6} {'N':>6} {'M':>6} {'bf16_us':>8} " + " ".join(f"{nm:>9}" for nm in names))
    table = {(k, n, m, nm): us for k, n, m, nm, us in rows}
    for k, n in shapes:
        for m in batches:
            b = table.get((k, n, m, "bf16"))
            if b is None:
                continue
            cells = [f"{b / table[(k, n, m, nm)]:9.2f}" if (k, n, m, nm) in table else f"{'-':>9}" for nm in names]
            print(f"{k:>6} {n:>6} {m:>6} {b:8.1f} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
