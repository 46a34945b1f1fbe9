"""Converter throughput: generate a bf16 checkpoint of a given size, convert it, print the phases.

    python benchmarks/bench_convert.py --gb 2 --format nf4 --device cpu

The checkpoint has FLUX-like blocks (attention qkv/proj, MLP up/down of width 3072, biases,
norms) until it reaches ``--gb`` GiB; every block holds different random values (so nothing
is cached between layers). Prints the converter's own summary (sizes, ratio, error
statistics) and where the time went (read, NaN check, quantize, error measurement, write,
commit), plus the peak resident set of this process.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from comfy_lowbit.convert.converter import ConvertOptions, convert_checkpoint
from comfy_lowbit.convert.writer import SafetensorsWriter

WIDTH = 3072
BLOCK = {"attn.qkv": (3 * WIDTH, WIDTH), "attn.proj": (WIDTH, WIDTH), "mlp.0": (4 * WIDTH, WIDTH), "mlp.2": (WIDTH, 4 * WIDTH)}


def generate(path: Path, gib: float, seed: int = 0) -> int:
    """Write a FLUX-like bf16 checkpoint of about ``gib`` GiB; return its size in bytes."""
    gen = torch.Generator().manual_seed(seed)
    budget, written, block = int(gib * 2**30), 0, 0
    with SafetensorsWriter(path, overwrite=True) as writer:
        while written < budget:
            prefix = f"double_blocks.{block}."
            for name, (n, k) in BLOCK.items():
                w = torch.randn(n, k, generator=gen).div_(k**0.5).to(torch.bfloat16)
                writer.add(prefix + name + ".weight", w)
                writer.add(prefix + name + ".bias", w[0])
                written += w.nbytes + w[0].nbytes
            writer.add(prefix + "norm.scale", torch.ones(128, dtype=torch.bfloat16))
            block += 1
        writer.commit()
    return path.stat().st_size


def peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="checkpoint size in GiB (default 2)")
    parser.add_argument("--format", default="nf4")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--optimize", action="store_true")
    parser.add_argument("--dir", default=None, help="where to write the files (default: a temporary directory)")
    args = parser.parse_args()

    print(f"# bench_convert {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"
          + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        src, dst = Path(tmp) / "in.safetensors", Path(tmp) / "out.safetensors"
        start = time.perf_counter()
        size = generate(src, args.gb)
        print(f"generated {size / 2**30:.2f} GiB in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        summary = convert_checkpoint(src, dst, ConvertOptions(format=args.format, device=args.device,
                                                              optimize=args.optimize), show_progress=False)
        seconds = time.perf_counter() - start
        print(summary.format_text())
        print(f"RESULT format={summary.format} device={args.device} input={size / 2**30:.2f}GiB "
              f"seconds={seconds:.1f} MB/s={size / seconds / 1e6:.0f} peak_rss={peak_rss_mb():.0f}MB")


if __name__ == "__main__":
    main()
