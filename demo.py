"""Quantize a small random transformer into every format, reload it from disk and compare.

Builds the linear weights of a two-block transformer (attention qkv/out, MLP up/down, with
outlier input channels as real models have), writes each format through the same per-layer
file format the converter uses, loads it back, runs ``F.linear`` through the layouts and
prints: format, bytes vs bf16, relative output error vs float64, and time per call. The
formats come from the format table, so the demo grows as formats land.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .layouts import FORMATS, layer_state_dict, load_layer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, default=512, help="model width (default 512)")
    parser.add_argument("--tokens", type=int, default=256, help="rows of the activation (default 256)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--seed", type=int, default=0)


def random_transformer(hidden: int, blocks: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Linear weights of a small DiT-like stack, bf16, Kaiming-scaled."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"attn.qkv": (3 * hidden, hidden), "attn.proj": (hidden, hidden),
              "mlp.fc1": (4 * hidden, hidden), "mlp.fc2": (hidden, 4 * hidden)}
    sd = {}
    for b in range(blocks):
        for name, (n, k) in shapes.items():
            w = torch.randn(n, k, generator=gen) / k**0.5
            sd[f"blocks.{b}.{name}.weight"] = w.to(torch.bfloat16)
            sd[f"blocks.{b}.{name}.bias"] = (0.01 * torch.randn(n, generator=gen)).to(torch.bfloat16)
    return sd


def outlier_activations(rows: int, k: int, seed: int) -> torch.Tensor:
    """Gaussian activations with a few channels 20x larger, the pattern quantizers struggle with."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen)
    x[:, torch.randperm(k, generator=gen)[: max(1, k // 64)]] *= 20
    return x


def _time_call(fn, device: torch.device, repeats: int = 20) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sd = random_transformer(args.hidden, seed=args.seed)
    layers = [k[: -len(".weight")] for k in sd if k.endswith(".weight")]
    inputs = {layer: outlier_activations(args.tokens, sd[f"{layer}.weight"].shape[1], args.seed + i)
              for i, layer in enumerate(layers)}

    rows = [("format", "bytes vs bf16", "rel. error vs fp64", "time / call")]
    bf16_bytes = sum(sd[f"{layer}.weight"].nbytes for layer in layers)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for fmt, layout in [("bf16", None), *FORMATS.items()]:
            path = Path(tmp) / f"{fmt}.safetensors"
            out = {}
            for layer in layers:
                w = sd[f"{layer}.weight"]
                out[f"{layer}.bias"] = sd[f"{layer}.bias"]
                if layout is None:
                    out[f"{layer}.weight"] = w
                else:
                    from comfy_kitchen.tensor import QuantizedTensor

                    out.update(layer_state_dict(layer, QuantizedTensor.from_float(w.to(device), layout.__name__)))
            save_file({k: v.contiguous().cpu() for k, v in out.items()}, str(path))
            loaded = load_file(str(path), device=str(device))
            nbytes = sum(v.nbytes for k, v in loaded.items() if not k.endswith(".bias") and not k.endswith(".comfy_quant"))

            errors, seconds = [], 0.0
            for layer in layers:
                weight = loaded[f"{layer}.weight"] if layout is None else load_layer(layer, loaded)
                bias = loaded[f"{layer}.bias"].to(dtype)
                x = inputs[layer].to(device, dtype)
                ref = F.linear(inputs[layer].double(), sd[f"{layer}.weight"].double(), sd[f"{layer}.bias"].double())
                w_run = weight.to(dtype) if layout is None else weight
                y = F.linear(x, w_run, bias)
                errors.append(((y.double().cpu() - ref).norm() / ref.norm()).item())
                seconds += _time_call(lambda: F.linear(x, w_run, bias), device)
            rows.append((fmt, f"{nbytes / bf16_bytes:.3f}", f"{max(errors):.4f}", f"{seconds / len(layers) * 1e6:.0f} us"))

    print(f"comfy-lowbit demo: {len(layers)} linear layers, width {args.hidden}, {args.tokens} tokens, "
          f"{device.type} ({dtype}); error = worst layer, ||y - y64|| / ||y64||")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0
