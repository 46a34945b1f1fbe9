"""Print what a safetensors checkpoint holds: metadata, model families, and each layer's format and size.

Recognises our per-layer format, bitsandbytes/diffusers/Forge 4-bit and convert_to_quant 0.4
files, and names what it found; reads only the header and the small ``comfy_quant`` entries.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help=".safetensors file")
    parser.add_argument("--all", action="store_true", help="list every tensor, not only the quantized layers")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def describe(path: str, *, show_all: bool = False) -> str:
    """The report ``comfy-lowbit inspect`` prints, as a string."""
    from .families import detect_components
    from .readers import find_quantized_layers
    from .safetensors_file import SafetensorsFile

    lines = []
    with SafetensorsFile(path) as f:
        keys = f.keys()
        total = sum(f.info(k).nbytes for k in keys)
        lines.append(f"{path}: {len(keys)} tensors, {_size(total)} of data")
        if f.metadata:
            lines.append("metadata:")
            for key, value in sorted(f.metadata.items()):
                value = value if len(value) <= 160 else value[:157] + "..."
                lines.append(f"  {key}: {value}")
        comps = detect_components(keys)
        lines.append("families: " + (", ".join(c.describe() for c in comps) or "none recognised"))

        quantized = find_quantized_layers(keys, f.read, lambda key: f.info(key).torch_dtype)
        owner = {key: item for item in quantized.values() for key in item.keys}
        by_format: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # format -> [count, bytes]
        for key in keys:
            if key in owner:
                continue
            info = f.info(key)
            kind = f"plain {info.dtype}" + (" 2-D weight" if key.endswith(".weight") and len(info.shape) == 2 else "")
            by_format[kind][0] += 1
            by_format[kind][1] += info.nbytes
        layer_rows = []
        for item in quantized.values():
            nbytes = sum(f.info(k).nbytes for k in item.keys)
            by_format[item.describe][0] += 1
            by_format[item.describe][1] += nbytes
            config = item.config or {}
            shape = config.get("orig_shape") or config.get("shape")
            layer_rows.append((item.layer, item.describe + (f" {list(shape)}" if shape else ""), nbytes))
        lines.append("contents (tensors, or layers for quantized formats):")
        for kind, (count, nbytes) in sorted(by_format.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"  {count:6d}  {_size(nbytes):>9}  {kind}")
        if layer_rows:
            lines.append("quantized layers:")
            for layer, fmt, nbytes in layer_rows:
                lines.append(f"  {layer}  {fmt}  {_size(nbytes)}")
        if show_all:
            lines.append("tensors:")
            for key in keys:
                info = f.info(key)
                lines.append(f"  {key}  {info.dtype} {list(info.shape)}  {_size(info.nbytes)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..layouts import QuantFormatError
    from .safetensors_file import SafetensorsError

    try:
        print(describe(args.file, show_all=args.all))
    except (SafetensorsError, QuantFormatError) as exc:
        print(f"comfy-lowbit inspect: {exc}", file=sys.stderr)
        return 1
    return 0
