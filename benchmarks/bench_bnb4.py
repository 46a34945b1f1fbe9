"""NF4 W4A16 linear side by side: bf16 cuBLAS ``F.linear``, bitsandbytes ``matmul_4bit``, ours.

One process, one GPU. For M in {1, 4, 16, 64, 256, 1024, 4096, 16384} and the four FLUX-size
(K, N) layers, every method runs on the same NF4 weights (block 64, float32 absmax; bitsandbytes
quantizes them, our kernels read the same bytes) and is timed with ``triton.testing.do_bench``
medians (it flushes L2 before each call) while also rotating among enough weight copies that
their total exceeds 2x the 50 MB L2. The same run measures the two ceilings the floors use:
device copy bandwidth (bytes read + written) and bf16 cuBLAS peak (8192^3).

Per row: times (us), our TFLOP/s and GB/s of weight traffic, our floor = max(bytes / copy
bandwidth, flops / bf16 peak), ratios, and which path ours took; for M >= 64 the fused and the
dequantize + cuBLAS paths are both timed so the dispatch thresholds rest on this table.
Also: GPU quantize (bf16 -> NF4) vs copy bandwidth, and our output vs bitsandbytes'.

    python benchmarks/bench_bnb4.py [--out DIR] [--quick] [--shapes 3072x12288,...] [--ms 1,16]
                                    [--double-quant] [--paths gemv,gemv_lut] [--no-quantize]

(--shapes as KxN; set COMFY_LOWBIT_EXPERIMENTAL=1 to dispatch to kernels not yet measured.)

Writes ``bnb4.csv``, ``bnb4.txt`` and ``bnb4_speedup.png`` under --out (default $OUT or .).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from comfy_lowbit.kernels.bnb4_linear import Bnb4Weight, bnb4_linear, dequantize, dispatch_path
from comfy_lowbit.kernels.bnb4_quantize import bnb4_quantize
from comfy_lowbit.kernels.sm90 import hopper_with_gluon
from tuning_log import format_tunings, log_tunings

SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072), (3072, 18432)]  # (K, N)
MS = [1, 4, 16, 64, 256, 1024, 4096, 16384]
L2_BYTES = 50 * 2**20
LINES: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def median_us(fn) -> float:
    """Eager time per call: do_bench median (L2 flushed before each call). Includes the host's
    launch overhead whenever that exceeds the flush kernel's ~85 us."""
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def graph_us(fns: list, replays: int = 15) -> float:
    """GPU time per call: the calls over all weight copies captured once in a CUDA graph,
    replayed; median replay time / number of calls. The copies together exceed 2x L2, so
    each call reads its weight from DRAM; host launch overhead is not in the number."""
    for fn in fns:  # compile / autotune / allocate outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for fn in fns:
                fn()
    except Exception as exc:  # a peer that cannot be captured: time it eagerly, and say so
        say(f"  (CUDA graph capture failed: {type(exc).__name__}: {str(exc)[:120]}; eager timing)")
        torch.cuda.synchronize()
        return median_us(rotating(fns))
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    return sorted(times)[len(times) // 2]


def rotating(fns: list):
    """A callable that runs fns[0], fns[1], ... in turn, so no weight copy stays in L2."""
    state = {"i": 0}

    def call():
        fn = fns[state["i"] % len(fns)]
        state["i"] += 1
        return fn()

    return call


def copies_needed(nbytes: int) -> int:
    return max(2, -(-2 * L2_BYTES // nbytes))


def measure_ceilings() -> tuple[float, float]:
    src = torch.randn(2**28 // 2, device="cuda", dtype=torch.bfloat16)  # 256 MiB
    dst = torch.empty_like(src)
    bw = 2 * src.nbytes / (median_us(lambda: dst.copy_(src)) * 1e-6)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    peak = 2 * 8192**3 / (median_us(lambda: a @ b) * 1e-6)
    return bw, peak


def bnb_weight(w_bf16: torch.Tensor, double_quant: bool = False):
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w_bf16, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    if double_quant:  # uint8 absmax codes, one float32 per 256 of them, and the offset
        ours = Bnb4Weight(packed, state.absmax, tuple(w_bf16.shape), 64, "nf4", state.state2.absmax, state.offset)
    else:
        ours = Bnb4Weight(packed, state.absmax, tuple(w_bf16.shape), 64, "nf4")
    return packed, state, ours


def clone_weight(w: Bnb4Weight) -> Bnb4Weight:
    nested = None if w.nested_absmax is None else w.nested_absmax.clone()
    return Bnb4Weight(w.packed.clone(), w.absmax.clone(), w.shape, w.block_size, w.quant_type, nested, w.offset)


def weight_bytes(w: Bnb4Weight) -> int:
    return w.packed.nbytes + w.absmax.nbytes + (0 if w.nested_absmax is None else w.nested_absmax.nbytes)


PATHS = ("gemv", "gemv_lut", "mma", "fused", "dequant_cublas", "dequant_cublas_overlap")


def bench_shape(k: int, n: int, bw: float, peak: float, rows: list[dict], ms: list[int],
                double_quant: bool = False, paths: tuple[str, ...] = PATHS) -> None:
    import bitsandbytes as bnb

    gen = torch.Generator(device="cuda").manual_seed(k * 7 + n)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(torch.bfloat16)
    packed, state, ours_w = bnb_weight(w, double_quant)
    w_deq = dequantize(ours_w, torch.bfloat16)  # bf16 baseline on the same (dequantized) weights
    nf4_bytes = weight_bytes(ours_w)
    bf16_copies = [w_deq.clone() for _ in range(copies_needed(w_deq.nbytes))]
    nf4_copies = [(packed.clone(), state, clone_weight(ours_w)) for _ in range(copies_needed(nf4_bytes))]
    for m in ms:
        x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
        y_bnb = bnb.matmul_4bit(x, packed.t(), quant_state=state)
        y_ours = bnb4_linear(x, ours_w)
        err = ((y_ours.float() - y_bnb.float()).norm() / y_bnb.float().norm()).item()
        bf16_fns = [lambda wc=wc: F.linear(x, wc) for wc in bf16_copies]
        bnb_fns = [lambda p=p, s=s: bnb.matmul_4bit(x, p.t(), quant_state=s) for p, s, _ in nf4_copies]
        ours_fns = [lambda o=o: bnb4_linear(x, o) for _, _, o in nf4_copies]
        t_bf16, t_bnb, t_ours = graph_us(bf16_fns), graph_us(bnb_fns), graph_us(ours_fns)
        eager = {name: median_us(rotating(fns)) for name, fns in (("bf16", bf16_fns), ("bnb", bnb_fns), ("ours", ours_fns))}
        variants = {}
        for path in paths:
            if ((path == "gemv" and m > 16) or (path == "gemv_lut" and m > 8) or (path == "fused" and m > 4096)
                    or (path == "mma" and m > 32)):
                continue
            variants[path] = graph_us([lambda o=o, path=path: bnb4_linear(x, o, path=path) for _, _, o in nf4_copies])
        if m >= 256 and hopper_with_gluon(x.device):  # the Hopper fused GEMM, opt-in in the dispatch
            variants["fused_sm90"] = graph_us([lambda o=o: bnb4_linear(x, o, path="fused_sm90") for _, _, o in nf4_copies])
        flops = 2 * m * n * k
        traffic = nf4_bytes + x.nbytes + m * n * 2
        floor = max(traffic / bw, flops / peak) * 1e6
        row = dict(K=k, N=n, M=m, bf16_us=t_bf16, bnb_us=t_bnb, ours_us=t_ours, path=dispatch_path(x, ours_w),
                   gemv_us=variants.get("gemv"), gemv_lut_us=variants.get("gemv_lut"), mma_us=variants.get("mma"),
                   fused_us=variants.get("fused"),
                   dequant_cublas_us=variants.get("dequant_cublas"), overlap_us=variants.get("dequant_cublas_overlap"),
                   fused_sm90_us=variants.get("fused_sm90"),
                   ours_tflops=flops / t_ours / 1e6, ours_weight_gbs=nf4_bytes / t_ours / 1e3,
                   floor_us=floor, floor_frac=floor / t_ours, vs_bf16=t_bf16 / t_ours, vs_bnb=t_bnb / t_ours,
                   bnb_vs_bf16=t_bf16 / t_bnb, err_vs_bnb=err, eager_bf16_us=eager["bf16"],
                   eager_bnb_us=eager["bnb"], eager_ours_us=eager["ours"])
        rows.append(row)
        fmt = lambda v: "-" if v is None else f"{v:8.1f}"  # noqa: E731
        say(f"{k:5d} {n:5d} {m:5d} | {t_bf16:8.1f} {t_bnb:8.1f} {t_ours:8.1f} {row['path']:>22s} | "
            f"{fmt(variants.get('gemv'))} {fmt(variants.get('gemv_lut'))} {fmt(variants.get('mma'))} {fmt(variants.get('fused'))} "
            f"{fmt(variants.get('dequant_cublas'))} {fmt(variants.get('dequant_cublas_overlap'))} | "
            f"{row['ours_tflops']:6.1f} {row['ours_weight_gbs']:7.0f} {floor:8.1f} {row['floor_frac']:5.2f} | "
            f"{row['vs_bf16']:5.2f} {row['vs_bnb']:5.2f} {row['bnb_vs_bf16']:5.2f} | "
            f"{eager['bf16']:7.1f} {eager['bnb']:7.1f} {eager['ours']:7.1f} | {err:.1e} | {fmt(variants.get('fused_sm90'))}")


def bench_mma_tiles(shapes, ms: list[int], double_quant: bool) -> None:
    """GPU time (CUDA graphs) of every skinny tensor-core tile, each with the launcher's K split
    (one wave at 4 programs per SM), half of it and one wave at 6 per SM: the eager timing
    ``fastest`` does is mostly host time at these sizes."""
    from comfy_lowbit.kernels import bnb4_mma
    from comfy_lowbit.kernels.bnb4_linear import _launch_mma

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for k, n in shapes:
        w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
        _, _, ours_w = bnb_weight(w, double_quant)
        copies = [clone_weight(ours_w) for _ in range(copies_needed(weight_bytes(ours_w)))]
        for m in ms:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            cells = []
            for base in bnb4_mma.MMA_TILES_SWEEP:
                bn, step = base["BLOCK_N"], base["STEP_BLOCKS"]
                auto = bnb4_mma.split_for(n, k, 64, bn, step, sms)  # one wave at 4 programs per SM
                steps = k // 64 // step
                half = max(d for d in range(1, auto // 2 + 1) if steps % d == 0) if auto > 1 else 1
                for split in sorted({auto, half, bnb4_mma.split_for(n, k, 64, bn, step, sms, programs_per_sm=6)}):
                    tile = {**base, "SPLIT": split}
                    us = graph_us([lambda o=o, tile=tile: _launch_mma(x, o, None, out, config=tile) for o in copies])
                    cells.append(f"{bnb4_mma.tile_name(base)}/s{split} {us:.1f}")
            say(f"# mma tiles K={k} N={n} M={m}: " + ", ".join(cells))


def bench_quantize(bw: float) -> list[dict]:
    out = []
    for k, n in [(3072, 12288), (12288, 3072)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        packed, absmax = bnb4_quantize(w, 64, "nf4")
        import bitsandbytes.functional as bnbf

        bp, bs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        exact = torch.equal(packed, bp) and torch.equal(absmax, bs.absmax)
        copies = [w.clone() for _ in range(copies_needed(w.nbytes))]
        t = graph_us([lambda c=c: bnb4_quantize(c, 64, "nf4") for c in copies])
        t_bnb = graph_us([lambda c=c: bnbf.quantize_4bit(c, blocksize=64, quant_type="nf4") for c in copies])
        t_dq = graph_us([lambda c=c: bnb4_quantize(c, 64, "nf4", nested=True) for c in copies])
        w_nf4 = Bnb4Weight(packed, absmax, (n, k), 64, "nf4")
        t_deq = graph_us([lambda: dequantize(w_nf4, torch.bfloat16, scratch=True)])
        deq_bytes = packed.nbytes + absmax.nbytes + w.nbytes
        say(f"dequantize NF4 {n}x{k} -> bf16 (scratch): {t_deq:.1f} us, {deq_bytes / t_deq / 1e3:.0f} GB/s, "
            f"{deq_bytes / (t_deq * 1e-6) / bw:.2f} of copy")
        nbytes = w.nbytes + packed.nbytes + absmax.nbytes
        frac = nbytes / (t * 1e-6) / bw
        say(f"quantize bf16 {n}x{k} -> NF4: ours {t:.1f} us ({nbytes / t / 1e3:.0f} GB/s, {frac:.2f} of copy), "
            f"+nested {t_dq:.1f} us, bitsandbytes {t_bnb:.1f} us; bit-exact with bitsandbytes CUDA: {exact}")
        out.append(dict(K=k, N=n, ours_us=t, nested_us=t_dq, bnb_us=t_bnb, gbs=nbytes / t / 1e3, frac_copy=frac, exact=exact))
    return out


def report_kernels() -> None:
    """Autotune picks and each compiled variant's registers/spills/shared memory, plus PTX counts
    of the instructions that matter (gathers, shared-memory traffic, MMA flavour)."""
    from comfy_lowbit.kernels import bnb4_linear as lin
    from comfy_lowbit.kernels import bnb4_quantize as qz

    for name in ("_gemv", "_gemv_lut", "_matmul"):
        tuner = getattr(lin, name)
        for key, config in getattr(tuner, "cache", {}).items():
            say(f"autotune {name} {key[:4]} -> {config}")
    kernels = [lin._bnb4_gemv_kernel, lin._bnb4_gemv_lut_kernel, lin._bnb4_matmul_kernel, lin._bnb4_dequantize_kernel, qz._bnb4_quantize_kernel]
    for jit in kernels:
        for caches in getattr(jit, "device_caches", {}).values():
            for compiled in caches[0].values():
                ptx = compiled.asm.get("ptx", "")
                counts = {op: ptx.count(op) for op in ("ld.global", "ld.shared", "st.shared", "bar.sync",
                                                        "wgmma.mma_async", "mma.sync", "cp.async", "local")}
                meta = getattr(compiled, "metadata", None)
                say(f"{jit.fn.__name__}: regs {compiled.n_regs} spills {compiled.n_spills} "
                    f"smem {getattr(meta, 'shared', '?')} warps {getattr(meta, 'num_warps', '?')} "
                    f"consts {str(getattr(meta, 'constants', ''))[:160]} ptx {counts}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, n in SHAPES:
        sel = [r for r in rows if r["K"] == k and r["N"] == n]
        if not sel:
            continue
        line, = ax.plot([r["M"] for r in sel], [r["vs_bf16"] for r in sel], marker="o", label=f"ours K={k} N={n}")
        ax.plot([r["M"] for r in sel], [r["bnb_vs_bf16"] for r in sel], marker="x", ls="--", color=line.get_color(), alpha=0.6)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (rows of x)")
    ax.set_ylabel("speed-up vs bf16 cuBLAS F.linear")
    ax.set_title(f"NF4 W4A16 on {torch.cuda.get_device_name()} (dashed: bitsandbytes)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="one shape, three M (smoke run)")
    parser.add_argument("--shapes", help="comma-separated KxN (default: the four FLUX shapes)")
    parser.add_argument("--ms", help="comma-separated M (default: the full sweep)")
    parser.add_argument("--double-quant", action="store_true", help="double-quantized absmax (uint8 + nested)")
    parser.add_argument("--paths", default=",".join(PATHS), help="the forced paths to time besides the dispatched one ('none': only that one)")
    parser.add_argument("--no-quantize", action="store_true", help="skip the quantize/dequantize timings")
    parser.add_argument("--mma-tiles", action="store_true", help="only the skinny tensor-core tile sweep (CUDA graphs)")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import bitsandbytes

    say(f"bench_bnb4: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"bitsandbytes {bitsandbytes.__version__}, python {platform.python_version()}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    bw, peak = measure_ceilings()
    say(f"ceilings: copy bandwidth {bw / 1e12:.2f} TB/s (read+write), bf16 cuBLAS {peak / 1e12:.0f} TFLOP/s (8192^3)")
    say(f"NF4 block 64, {'double-quantized' if args.double_quant else 'fp32'} absmax, "
        f"COMFY_LOWBIT_EXPERIMENTAL={os.environ.get('COMFY_LOWBIT_EXPERIMENTAL', '0')}. Times in us: CUDA-graph replays over rotating weight copies (> 2x L2), "
        "median per call = GPU time; e:* = eager do_bench medians (host launch overhead included when it "
        "exceeds the L2 flush). gemv/fused/dq+cuBLAS/overlap = our paths forced (overlap: the dequantize of the next row range "
        "on a side stream beside cuBLAS); ours = the dispatched one (timed per shape on its first call).")
    say(f"{'K':>5} {'N':>5} {'M':>5} | {'bf16':>8} {'bnb':>8} {'ours':>8} {'path':>22} | {'gemv':>8} {'gemv_lut':>8} {'mma':>8} {'fused':>8} "
        f"{'dq+cuBLAS':>8} {'overlap':>8} | {'TF/s':>6} {'W GB/s':>7} {'floor':>8} {'fl/t':>5} | {'xbf16':>5} {'xbnb':>5} {'bnb/bf':>5} | "
        f"{'e:bf16':>7} {'e:bnb':>7} {'e:ours':>7} | err | {'sm90':>8}")
    rows: list[dict] = []
    shapes = SHAPES[1:2] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [1, 16, 4096] if args.quick else MS
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]
    from comfy_lowbit.kernels import bnb4_linear as lin
    import logging

    class _Say(logging.Handler):  # the per-shape timings of kernels/fastest.py, into the report
        def emit(self, record):
            say(f"# fastest: {record.getMessage()}")

    fastest_log = logging.getLogger("comfy_lowbit.kernels.fastest")
    fastest_log.setLevel(logging.DEBUG)
    fastest_log.addHandler(_Say())
    tunings: list = []
    for name in ("_gemv", "_gemv_lut"):
        if hasattr(getattr(lin, name), "cache"):
            log_tunings(getattr(lin, name), name, tunings)
    if args.mma_tiles:
        bench_mma_tiles(shapes, ms, args.double_quant)
        (out_dir / "bnb4.txt").write_text("\n".join(LINES) + "\n")
        return 0
    for k, n in shapes:
        paths = tuple(p for p in args.paths.split(",") if p and p != "none")
        bench_shape(k, n, bw, peak, rows, ms, args.double_quant, paths)
    for line in format_tunings(tunings):
        say(line)
    qrows = [] if args.no_quantize else bench_quantize(bw)
    try:
        report_kernels()
    except Exception as exc:  # diagnostics only
        say(f"kernel report failed: {type(exc).__name__}: {exc}")
    with open(out_dir / "bnb4.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if qrows:
        with open(out_dir / "bnb4_quantize.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(qrows[0]))
            writer.writeheader()
            writer.writerows(qrows)
    try:
        plot(rows, out_dir / "bnb4_speedup.png")
    except ImportError as exc:
        say(f"no plot: {exc}")
    (out_dir / "bnb4.txt").write_text("\n".join(LINES) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
