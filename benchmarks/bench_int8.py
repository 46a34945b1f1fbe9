"""int8_lodewise vs bf16 cuBLAS, comfy-kitchen's INT8 W8A8 and raw torch._int_mm, in one process.

    python benchmarks/bench_int8.py [--quick] [--shapes 3072x12288,...] [--ms 1,16,...]

For each FLUX linear shape (K, N) and batch M it times the GPU time of one call: a CUDA
graph runs the call once on each of several weight copies (over 128 MB in all, so every
weight comes from DRAM, not the 50 MB L2); the median replay over the copies is the time.
The ``eager_us`` column is ``triton.testing.do_bench`` of a plain Python call (CPU launch
and dispatch overhead included, L2 flushed) for bf16, comfy-kitchen and our ``F.linear``.
Methods:

* ``bf16``      ``F.linear(x, w, b)``, cuBLAS;
* ``ck_w8a8``   comfy-kitchen ``TensorWiseINT8Layout(per_channel=True)``: per-row activation
  scale, per-channel weight scale (``F.linear`` on its QuantizedTensor);
* ``int_mm``    raw ``torch._int_mm`` on pre-quantized operands (no quantization, no scales);
* ``w8a8``      ours: activation quantization kernel + int8 GEMM with per-block scales;
* ``w8a8_sm90`` ours on Hopper: the same quantization + the Gluon GEMM that overlaps each
  block's rescale with the next block's MMA (kernels/int8_gemm_sm90.py), with the warp plan the
  layout takes (``int8_lodewise.SM90_PLAN``; bench_sm90_plans.py compares plans);
* ``gemm_sm90`` that GEMM alone on pre-quantized activations (where the time goes);
* ``w8a16``     ours weight-only (GEMV for M <= 4, tensor-core W8A16 above);
* ``gemv_fixup`` M=1: the GEMV with its K slices summed in the same launch (experimental);
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
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from comfy_kitchen.tensor import QuantizedTensor  # noqa: E402

from comfy_lowbit.kernels.int8_gemm import w8a8_matmul, w8a16_matmul  # noqa: E402
from comfy_lowbit.kernels.int8_gemv import w8a16_gemv  # noqa: E402
from comfy_lowbit.kernels.int8_quant import quantize_rows  # noqa: E402
from comfy_lowbit.kernels.sm90 import WARP_PLANS, hopper_with_gluon  # noqa: E402
from comfy_lowbit.layouts import int8_lodewise  # noqa: E402
from tuning_log import format_tunings, log_tunings  # noqa: E402

SM90_PLAN = WARP_PLANS[int8_lodewise.SM90_PLAN]
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


def weight_copies(weight_bytes: int) -> int:
    """Enough distinct weights that cycling through them evicts each from the 50 MB L2."""
    return max(2, -(-128 * 2**20 // weight_bytes))


def make_methods(w, bias, gemv_splits=()):
    """name -> (prepare(x, copies) -> [callable per weight copy], bytes(m), kind)."""
    n, k = w.shape
    ours = QuantizedTensor.from_float(w, LAYOUT, block_size=BLOCK)
    methods = {}

    def bf16(x, copies):
        ws = [w.clone() for _ in range(copies)]
        return [lambda w_=w_: F.linear(x, w_, bias) for w_ in ws]

    methods["bf16"] = (bf16, lambda m: 2 * (m * k + n * k + m * n), "bf16")
    try:
        ck = QuantizedTensor.from_float(w, "TensorWiseINT8Layout", per_channel=True)

        def ck_w8a8(x, copies):
            return [lambda q_=q_: F.linear(x, q_, bias) for q_ in [ck.clone() for _ in range(copies)]]

        methods["ck_w8a8"] = (ck_w8a8, lambda m: 2 * m * k + n * k + 2 * m * n, "int8")
    except Exception as exc:  # a peer that fails to build is reported, not fatal
        print(f"# comfy-kitchen INT8 unavailable: {exc!r}")

    def int_mm(x, copies):
        a_q, _ = quantize_rows(x, BLOCK)
        return [lambda w_=w_: torch._int_mm(a_q, w_.t()) for w_ in [ours._qdata.clone() for _ in range(copies)]]

    methods["int_mm"] = (int_mm, lambda m: m * k + n * k + 4 * m * n, "int8")

    def ours_copies(copies):
        return [ours.clone() for _ in range(copies)]

    def w8a8(x, copies):
        return [lambda q_=q_: w8a8_matmul(*quantize_rows(x, BLOCK), q_._qdata, q_._params.scale, BLOCK, bias, x.dtype)
                for q_ in ours_copies(copies)]

    def w8a8_sm90(x, copies):
        from comfy_lowbit.kernels.int8_gemm_sm90 import w8a8_matmul_sm90
        return [lambda q_=q_: w8a8_matmul_sm90(*quantize_rows(x, BLOCK), q_._qdata, q_._params.scale, BLOCK, bias, x.dtype,
                                               **SM90_PLAN)
                for q_ in ours_copies(copies)]

    def gemm_sm90(x, copies):
        from comfy_lowbit.kernels.int8_gemm_sm90 import w8a8_matmul_sm90
        a_q, a_scale_t = quantize_rows(x, BLOCK)
        return [lambda q_=q_: w8a8_matmul_sm90(a_q, a_scale_t, q_._qdata, q_._params.scale, BLOCK, bias, x.dtype,
                                               **SM90_PLAN)
                for q_ in ours_copies(copies)]

    def w8a16(x, copies):
        if x.shape[0] == 1:
            return [lambda q_=q_: w8a16_gemv(x, q_._qdata, q_._params.scale, BLOCK, bias) for q_ in ours_copies(copies)]
        return [lambda q_=q_: w8a16_matmul(x, q_._qdata, q_._params.scale, BLOCK, bias) for q_ in ours_copies(copies)]

    def gemv_fixup(x, copies):  # M=1 only: split-K summed inside the GEMV launch (experimental)
        if x.shape[0] != 1:
            raise ValueError("the single-launch split-K GEMV serves M=1")
        return [lambda q_=q_: w8a16_gemv(x, q_._qdata, q_._params.scale, BLOCK, bias, fixup=True)
                for q_ in ours_copies(copies)]

    def gemv_split(split):  # M=1 only: the GEMV with a forced number of K slices (--gemv-splits)
        def prepare(x, copies):
            if x.shape[0] != 1:
                raise ValueError("the GEMV serves M=1")
            return [lambda q_=q_: w8a16_gemv(x, q_._qdata, q_._params.scale, BLOCK, bias, split=split)
                    for q_ in ours_copies(copies)]
        return prepare

    def dispatched(x, copies):
        return [lambda q_=q_: F.linear(x, q_, bias) for q_ in ours_copies(copies)]

    int8_bytes = lambda m: 2 * m * k + n * k + 4 * n * (k // BLOCK) + 2 * m * n  # noqa: E731
    methods["w8a8"] = (w8a8, int8_bytes, "int8")
    if hopper_with_gluon(w.device):
        methods["w8a8_sm90"] = (w8a8_sm90, int8_bytes, "int8")
        methods["gemm_sm90"] = (gemm_sm90, int8_bytes, "int8")
    methods["w8a16"] = (w8a16, int8_bytes, "w8a16")
    methods["gemv_fixup"] = (gemv_fixup, int8_bytes, "w8a16")
    for split in gemv_splits:
        methods[f"gemv_s{split}"] = (gemv_split(split), int8_bytes, "w8a16")
    methods["ours"] = (dispatched, int8_bytes, "int8")
    return methods


def graph_time(fns) -> float:
    """Microseconds per call: one CUDA graph runs every callable once (a different weight copy
    each), so the replay holds no Python or launch overhead and each weight comes from DRAM."""
    for fn in fns:
        fn()  # compiles / autotunes outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    return sorted(times)[len(times) // 2]


# W8A8 GEMM tile variants timed on pre-quantized operands (BLOCK_M, BLOCK_N, warps, stages,
# exact conversion, quantization block): what the autotuner chooses among, and a few more.
VARIANTS = [
    (64, 128, 4, 4, False, 128, None), (64, 128, 4, 4, True, 128, None), (64, 128, 4, 3, False, 128, 168),
    (128, 64, 4, 3, False, 128, 168), (64, 64, 4, 3, False, 128, 128), (128, 128, 8, 3, False, 128, None),
    (64, 128, 4, 4, False, 64, None), (128, 128, 8, 3, False, 256, None), (64, 128, 4, 3, False, 256, 168),
]


@triton.jit
def _unscaled_int8_gemm(a_ptr, w_ptr, sa_ptr, sw_ptr, out_ptr, M, N, K,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Ceiling: the same int8 tiles with ONE scale per row and column (per-channel W8A8), i.e.
    our kernel without the per-K-block rescaling; int32 accumulates across all of K."""
    pid_m = tl.program_id(0) % tl.cdiv(M, BLOCK_M)
    pid_n = tl.program_id(0) // tl.cdiv(M, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :] * K + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for _ in range(0, K // BLOCK_K):
        acc = tl.dot(tl.load(a_ptrs), tl.load(w_ptrs), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out = acc.to(tl.float32) * tl.load(sa_ptr + offs_m)[:, None] * tl.load(sw_ptr + offs_n)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], out.to(tl.bfloat16))


def run_variants(shapes, m: int, dev) -> None:
    print(f"\n# W8A8 GEMM variants, M={m}, activations pre-quantized (us, TOP/s; do_bench, L2 flushed)")
    for k, n in shapes:
        w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        for bm, bn, warps, stages, exact, block, maxnreg in VARIANTS:
            a_q, a_s = quantize_rows(x, block)
            w_s = (torch.rand(k // block, n, device=dev) + 0.5).t()  # column-major, as the layout keeps it
            config = {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8, "num_warps": warps, "num_stages": stages}
            if maxnreg:  # a register cap that lets 3 programs share an SM (MMA of one overlaps scaling of another)
                config["maxnreg"] = maxnreg
            label = f"{bm}x{bn} w{warps} s{stages} B{block}{' exact' if exact else ''}{f' r{maxnreg}' if maxnreg else ''}"
            try:
                fn = lambda: w8a8_matmul(a_q, a_s, w, w_s, block, None, torch.bfloat16, exact_cvt=exact, config=config)  # noqa: E731
                fn()
                us = bench(fn)
                print(f"{k:>6} {n:>6} {label:<32} {us:8.1f} {2 * m * n * k / us / 1e6:7.0f}", flush=True)
            except Exception as exc:
                print(f"{k:>6} {n:>6} {label:<32} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
        if hopper_with_gluon(w.device):
            from comfy_lowbit.kernels.int8_gemm_sm90 import w8a8_matmul_sm90
            for block, stages, producer in [(b, s, p) for b in (64, 128) for s in (3, 4, 5) for p in (False, True)]:
                a_q, a_s = quantize_rows(x, block)
                w_s = (torch.rand(k // block, n, device=dev) + 0.5).t()
                label = f"sm90 128x128 w8 s{stages} B{block}{' +producer warp' if producer else ''}"
                try:
                    fn = lambda: w8a8_matmul_sm90(a_q, a_s, w, w_s, block, None, torch.bfloat16, stages=stages,  # noqa: E731
                                                  producer_warp=producer)
                    fn()
                    us = bench(fn)
                    print(f"{k:>6} {n:>6} {label:<32} {us:8.1f} {2 * m * n * k / us / 1e6:7.0f}", flush=True)
                except Exception as exc:
                    print(f"{k:>6} {n:>6} {label:<32} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
        a_q, _ = quantize_rows(x, 128)
        sa, sw = torch.rand(m, device=dev), torch.rand(n, device=dev)
        out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
        for bm, bn, warps, stages in ((64, 128, 4, 4), (128, 128, 8, 3), (128, 256, 8, 3)):
            grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
            fn = lambda: _unscaled_int8_gemm[grid](a_q, w, sa, sw, out, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128,  # noqa: E731
                                                   num_warps=warps, num_stages=stages)
            fn()
            us = bench(fn)
            print(f"{k:>6} {n:>6} {'ceiling ' + f'{bm}x{bn} w{warps} s{stages} per-channel':<32} {us:8.1f} {2 * m * n * k / us / 1e6:7.0f}", flush=True)
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
    parser.add_argument("--gemv-splits", default="", help="also time the M=1 GEMV with these K slice counts, e.g. 1,2,4,8")
    args = parser.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    batches = [int(v) for v in args.ms.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    gemv_splits = [int(v) for v in args.gemv_splits.split(",") if v]

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
    header = (f"{'K':>6} {'N':>6} {'M':>6} {'method':>10} {'us':>9} {'TOP/s':>7} {'GB/s':>7} {'floor_us':>9} {'x_floor':>7} "
              f"{'vs_bf16':>7} {'eager_us':>9}")
    print(header)
    from comfy_lowbit.kernels import int8_gemv as gemv_module
    tunings: list = []
    if hasattr(gemv_module._gemv_tuned, "cache"):
        log_tunings(gemv_module._gemv_tuned, "gemv", tunings)
    for k, n in shapes:
        gen = torch.Generator().manual_seed(k + n)
        w = (torch.randn(n, k, generator=gen) / k**0.5).to(dev, torch.bfloat16)
        bias = (0.1 * torch.randn(n, generator=gen)).to(dev, torch.bfloat16)
        methods = {name: spec for name, spec in make_methods(w, bias, gemv_splits).items() if name not in skip}
        # Accuracy vs float64 of the unquantized operands on two outlier patterns: 1/16 of the
        # channels 20x (tests/support.py's), and 1/256 of the channels 100x (rarer, larger).
        for pattern, (frac, scale) in {"1/16x20": (16, 20.0), "1/256x100": (256, 100.0)}.items():
            gen_x = torch.Generator().manual_seed(1)
            x_err = torch.randn(256, k, generator=gen_x)
            x_err[:, torch.randperm(k, generator=gen_x)[: k // frac]] *= scale
            x_err = x_err.to(dev, torch.bfloat16)
            ref = x_err.double() @ w.double().t() + bias.double()
            for name in ("bf16", "ck_w8a8", "w8a8", "w8a8_sm90", "w8a16"):
                if name in methods:
                    errors.append((k, n, pattern, name, relative_error(methods[name][0](x_err, 1)[0](), ref)))
        for m in batches:
            x = outlier_activations(m, k, seed=2, dev=dev)
            flops = 2 * m * n * k
            base = None
            for name, (prepare, nbytes, kind) in methods.items():
                copies = 1 if dev.type != "cuda" else weight_copies(nbytes(0))
                try:
                    fns = prepare(x, copies)
                    try:
                        us = graph_time(fns) if dev.type == "cuda" else bench(fns[0])
                    except Exception as exc:  # a peer that cannot be captured: eager time, flagged
                        torch.cuda.synchronize()
                        print(f"# {name} not capturable ({type(exc).__name__}); its us column is eager")
                        us = bench(fns[0])
                    eager = bench(fns[0]) if name in ("bf16", "ours", "ck_w8a8") else float("nan")
                except Exception as exc:  # e.g. torch._int_mm refuses M <= 16
                    print(f"{k:>6} {n:>6} {m:>6} {name:>10}   n/a ({type(exc).__name__}: {str(exc).splitlines()[0][:60]})")
                    continue
                base = us if name == "bf16" else base
                floor = max(flops / rate[kind] / 1e6, nbytes(m) / peaks["copy_TBps"] / 1e6)
                line = (f"{k:>6} {n:>6} {m:>6} {name:>10} {us:9.1f} {flops / us / 1e6:7.1f} {nbytes(m) / us / 1e3:7.0f} "
                        f"{floor:9.1f} {us / floor:7.2f} {(base / us if base else float('nan')):7.2f} {eager:9.1f}")
                print(line, flush=True)
                rows.append((k, n, m, name, us))

    print("\n# relative output error vs float64, x (256, K) bf16 with outlier channels (target <= 0.03)")
    for k, n, pattern, name, err in errors:
        print(f"{k:>6} {n:>6} {pattern:>10} {name:>9} {err:.4f}")
    print("\n".join(format_tunings(tunings)))
    from comfy_lowbit.kernels import int8_gemm, int8_gemv
    for label, tuner in (("w8a8", int8_gemm._w8a8_tuned), ("w8a16", int8_gemm._w8a16_tuned), ("gemv", int8_gemv._gemv_tuned)):
        for key, config in getattr(tuner, "cache", {}).items():
            print(f"# tuned {label} {key}: {config}")

    print("\n# summary: speed-up vs bf16 (bf16 time / method time); targets: M>=1024 >= 1.3 (w8a8 incl. quant), M=1 >= 1.7")
    names = [nm for nm in ("ck_w8a8", "int_mm", "w8a8", "w8a8_sm90", "gemm_sm90", "w8a16", "gemv_fixup",
                           *(f"gemv_s{split}" for split in gemv_splits), "ours") if nm not in skip]
    print(f"{'K':>6} {'N':>6} {'M':>6} {'bf16_us':>8} " + " ".join(f"{nm:>10}" for nm in names))
    table = {(k, n, m, nm): us for k, n, m, nm, us in rows}
    for k, n in shapes:
        for m in batches:
            b = table.get((k, n, m, "bf16"))
            if b is None:
                continue
            cells = [f"{b / table[(k, n, m, nm)]:10.2f}" if (k, n, m, nm) in table else f"{'-':>10}" for nm in names]
            print(f"{k:>6} {n:>6} {m:>6} {b:8.1f} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
