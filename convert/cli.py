"""Convert a safetensors checkpoint (diffusion model, text encoder or full checkpoint) to a quantized one.

Streams the input one tensor at a time; keeps the layers that quantize badly (norms, biases,
embeddings, embedders, first and last layers, chosen per model family) as they are; writes the
output atomically (nothing is left behind on failure or Ctrl-C). Exit status: 0 on success,
1 on a conversion error, 2 on bad arguments, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import json
import sys

from .options import ALIASES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="input .safetensors file (never modified)")
    parser.add_argument("-o", "--output", help="output .safetensors file (required unless --dry-run)")
    parser.add_argument("--format", required=True,
                        help=f"target format: {', '.join(ALIASES)} or a format name (bnb_nf4, ...)")
    parser.add_argument("--block-size", type=int, help="quantization block (group) size; the format's default if omitted")
    parser.add_argument("--double-quant", action="store_true", help="NF4/FP4: quantize the block scales too")
    parser.add_argument("--rank", type=int, help="W4A4: rank of the low-rank branch")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="GLOB",
                        help="keep layers matching GLOB (layer or key name) in their original precision")
    parser.add_argument("--include", nargs="+", default=[], metavar="GLOB",
                        help="quantize layers matching GLOB even if a family rule would keep them")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="where to quantize (default: cuda when present)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be quantized or kept; write nothing")
    parser.add_argument("--report", metavar="JSON", help="write the summary (sizes, per-layer errors, kept layers) as JSON")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--keep-quantized", action="store_true",
                        help="carry already-quantized layers over (foreign 4-bit formats re-encoded to ours)")
    parser.add_argument("--optimize", action="store_true",
                        help="NF4/FP4: choose each block's scale and codes to minimise its squared error")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..layouts import QuantFormatError
    from .converter import ConversionError, ConversionInterrupted, ConvertOptions, convert_checkpoint
    from .safetensors_file import SafetensorsError
    from .writer import OutputExistsError, WriteError

    if not args.output and not args.dry_run:
        print("comfy-lowbit convert: -o/--output is required (or pass --dry-run)", file=sys.stderr)
        return 2
    options = ConvertOptions(
        format=args.format, block_size=args.block_size, double_quant=args.double_quant, rank=args.rank,
        exclude=tuple(args.exclude), include=tuple(args.include), device=args.device, dry_run=args.dry_run,
        overwrite=args.overwrite, keep_quantized=args.keep_quantized, optimize=args.optimize)
    try:
        summary = convert_checkpoint(args.input, args.output, options, show_progress=not args.quiet)
    except ConversionInterrupted as exc:
        print(f"comfy-lowbit convert: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("comfy-lowbit convert: interrupted; no output written", file=sys.stderr)
        return 130
    except (ConversionError, SafetensorsError, QuantFormatError, OutputExistsError, WriteError,
            FileNotFoundError, ValueError) as exc:
        print(f"comfy-lowbit convert: {exc}", file=sys.stderr)
        return 1
    print(summary.format_text())
    if args.report:
        with open(args.report, "w") as fh:
            json.dump(summary.to_json(), fh, indent=1)
        print(f"report written to {args.report}")
    return 0
