"""The streaming converter: a safetensors checkpoint in, a quantized safetensors out.

One pass over the input, one tensor (or one quantized layer's few entries) in memory at a
time: read it, decide (family keep rules, ``--exclude``/``--include``), quantize it on the
chosen device or copy its bytes unchanged, append it to the output writer. The writer
publishes the output only when every tensor made it (see ``writer``); anything else (a bad
tensor, a read error, a full disk, Ctrl-C) leaves no output and raises, naming the tensor.

Per quantized layer the relative weight error ``||dequantize(Q(W)) - W||_F / ||W||_F`` is
measured in float32; the summary lists its statistics and the ten worst layers.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from comfy_kitchen.tensor import QuantizedTensor

from ..layouts import LowBitLayout, QuantFormatError, layer_state_dict
from .families import KeepRules
from .options import layout_kwargs, resolve_format, takes_layer_name
from .readers import FLOAT8, FOREIGN, QuantizedLayer, find_quantized_layers, to_quantized
from .safetensors_file import SafetensorsError, SafetensorsFile
from .writer import OutputExistsError, SafetensorsWriter, WriteError

# (bytes done, bytes total, current tensor). It may raise to cancel (ComfyUI's interrupt does):
# the exception propagates unchanged and no output is left.
ProgressCallback = Callable[[int, int, str], None]


class ConversionError(RuntimeError):
    """The conversion stopped; the message names the tensor and the cause. No output exists."""


class ConversionInterrupted(ConversionError):
    """Ctrl-C during the conversion; no output exists."""


@dataclass
class ConvertOptions:
    format: str
    block_size: int | None = None
    double_quant: bool = False
    rank: int | None = None
    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    device: str | None = None
    dry_run: bool = False
    overwrite: bool = False
    keep_quantized: bool = False
    optimize: bool = False


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, ...]
    rel_error: float
    plain_rel_error: float | None = None  # with --optimize: the plain encoder's error


@dataclass
class ConvertSummary:
    input: str
    output: str | None
    format: str
    options: dict
    families: list
    input_bytes: int = 0
    output_bytes: int = 0
    seconds: float = 0.0
    quantized: list[LayerResult] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    passed_through: list[tuple[str, str]] = field(default_factory=list)  # (layer, format)
    dry_run: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds (read, quantize, ...)
    layer_config: dict | None = None  # comfy_quant JSON of the first quantized layer

    def timed(self, phase: str):
        """Context manager adding the block's wall time to ``timings[phase]``."""
        return _Timer(self.timings, phase)

    @property
    def ratio(self) -> float:
        return self.output_bytes / self.input_bytes if self.input_bytes else math.nan

    def error_stats(self) -> dict:
        errors = [r.rel_error for r in self.quantized]
        if not errors:
            return {}
        stats = {"layers": len(errors), "mean": statistics.fmean(errors), "median": statistics.median(errors),
                 "max": max(errors), "min": min(errors)}
        plain = [r.plain_rel_error for r in self.quantized if r.plain_rel_error is not None]
        if plain:
            stats["plain_encoder_mean"] = statistics.fmean(plain)
            stats["optimize_reduction"] = 1 - stats["mean"] / stats["plain_encoder_mean"]
        return stats

    def worst(self, n: int = 10) -> list[LayerResult]:
        return sorted(self.quantized, key=lambda r: r.rel_error, reverse=True)[:n]

    def to_json(self) -> dict:
        return {
            "input": self.input, "output": self.output, "format": self.format, "options": self.options,
            "families": self.families, "dry_run": self.dry_run,
            "input_bytes": self.input_bytes, "output_bytes": self.output_bytes,
            "ratio": self.ratio, "seconds": self.seconds, "timings": self.timings,
            "error": self.error_stats(),
            "worst": [r.__dict__ for r in self.worst()],
            "quantized": [r.__dict__ for r in self.quantized],
            "kept": [{"key": k, "reason": r} for k, r in self.kept],
            "passed_through": [{"layer": k, "format": f} for k, f in self.passed_through],
        }

    def format_text(self) -> str:
        lines = [f"{self.input} -> {self.output or '(dry run)'}: {self.format}"
                 + (f" {self.options}" if self.options else "")]
        lines.append("families: " + (", ".join(f"{f['family']} at '{f['prefix']}'" if f["prefix"] else f["family"]
                                                for f in self.families) or "none recognised (generic rules only)"))
        verb = "would quantize" if self.dry_run else "quantized"
        lines.append(f"{verb} {len(self.quantized)} layers; kept {len(self.kept)} tensors as they are:")
        by_reason: dict[str, list[str]] = {}
        for key, reason in self.kept:
            by_reason.setdefault(reason, []).append(key)
        for reason, keys in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            examples = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            lines.append(f"  {len(keys):6d}  {reason}  ({examples})")
        if self.passed_through:
            counts = Counter(f for _, f in self.passed_through)
            lines.append("passed through already-quantized layers: "
                         + ", ".join(f"{n} {f}" for f, n in counts.most_common()))
        if self.dry_run:
            return "\n".join(lines)
        speed = self.input_bytes / self.seconds / 1e6 if self.seconds else math.inf
        lines.append(f"size: {_size(self.input_bytes)} -> {_size(self.output_bytes)} (ratio {self.ratio:.3f}) "
                     f"in {self.seconds:.1f} s ({speed:.0f} MB/s read)")
        if self.timings:
            lines.append("time: " + ", ".join(f"{phase} {sec:.1f} s" for phase, sec in self.timings.items()))
        stats = self.error_stats()
        if stats:
            lines.append(f"relative weight error ||Q(W) - W|| / ||W|| over {stats['layers']} layers: "
                         f"mean {stats['mean']:.4f}, median {stats['median']:.4f}, max {stats['max']:.4f}")
            if "plain_encoder_mean" in stats:
                lines.append(f"--optimize: mean error {stats['plain_encoder_mean']:.4f} (plain encoder) -> "
                             f"{stats['mean']:.4f}, {100 * stats['optimize_reduction']:.1f}% lower")
            lines.append("worst layers:")
            for r in self.worst():
                lines.append(f"  {r.rel_error:.4f}  {r.name} {tuple(r.shape)}")
        return "\n".join(lines)


class _Timer:
    def __init__(self, timings: dict[str, float], phase: str):
        self.timings, self.phase = timings, phase

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.phase] = self.timings.get(self.phase, 0.0) + time.perf_counter() - self.start


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n} B"


# ---- planning -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One unit of work: keep a tensor, quantize a weight, or carry a quantized layer over."""

    kind: str  # "keep", "quantize", "quantized"
    key: str  # the tensor (for a quantized layer: its weight key)
    reason: str = ""
    layer: QuantizedLayer | None = None


def plan(f: SafetensorsFile, rules: KeepRules, quantized: dict[str, QuantizedLayer]) -> list[Step]:
    grouped = {key: item for item in quantized.values() for key in item.keys}
    steps, seen = [], set()
    for key in f.keys():
        if key in grouped:
            item = grouped[key]
            if item.layer not in seen:
                seen.add(item.layer)
                steps.append(Step("quantized", f"{item.layer}.weight", item.describe, item))
            continue
        info = f.info(key)
        reason = rules.keep_reason(key, info.shape, info.is_float)
        steps.append(Step("keep", key, reason) if reason else Step("quantize", key))
    return steps


def _metadata(f: SafetensorsFile, layout: type[LowBitLayout], options: ConvertOptions, kwargs: dict,
              rules: KeepRules) -> dict[str, str]:
    from .. import __version__

    ours = {
        "comfy_lowbit.version": __version__,
        "comfy_lowbit.format": layout.FORMAT,
        "comfy_lowbit.block_size": str(options.block_size) if options.block_size else "format default",  # see _used_config
        "comfy_lowbit.quantize_kwargs": json.dumps(kwargs, sort_keys=True),
        "comfy_lowbit.optimize": str(bool(options.optimize)).lower(),
        "comfy_lowbit.families": json.dumps(rules.describe()),
        "comfy_lowbit.exclude": json.dumps(list(options.exclude)),
        "comfy_lowbit.include": json.dumps(list(options.include)),
    }
    return {**f.metadata, **ours}


def _used_config(layout: type[LowBitLayout], summary: ConvertSummary) -> dict[str, str]:
    """Metadata from the layer configs actually written (the block size the layout chose)."""
    if summary.layer_config is None:
        return {}
    config = {k: v for k, v in summary.layer_config.items() if k not in ("orig_shape", "shape")}  # per layer
    block = next((config[k] for k in ("block_size", "blocksize", "group_size") if k in config), None)
    out = {"comfy_lowbit.layer_config": json.dumps(config, sort_keys=True)}
    if block is not None:
        out["comfy_lowbit.block_size"] = str(block)
    return out


# ---- quantizing one weight ------------------------------------------------------------------
ERROR_CHUNK = 1 << 22  # values per step of the error measurement: float32 temporaries of 16 MB


def relative_error(weight: torch.Tensor, restored: torch.Tensor) -> float:
    """``||restored - weight||_F / ||weight||_F`` in float32, a few million values at a time.

    Chunked so that measuring a layer never makes a float32 copy of it (a 12288 x 3072 bf16
    weight would need 150 MB per copy, more than the rest of the conversion step).
    """
    w, r = weight.reshape(-1), restored.reshape(-1)
    diff_sq = ref_sq = 0.0
    for start in range(0, w.numel(), ERROR_CHUNK):
        wc = w[start:start + ERROR_CHUNK].float()
        diff_sq += (r[start:start + ERROR_CHUNK].float() - wc).square_().sum().item()
        ref_sq += wc.square_().sum().item()
    if not math.isfinite(diff_sq):
        return math.inf
    return math.sqrt(diff_sq / ref_sq) if ref_sq else (0.0 if diff_sq == 0 else math.inf)


def check_finite(key: str, tensor: torch.Tensor) -> None:
    """Refuse NaN/Inf weights. min and max propagate NaN, so one pass without a mask suffices."""
    low, high = torch.aminmax(tensor)
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return
    bad = (~torch.isfinite(tensor)).sum().item()
    if bad:
        raise ConversionError(f"tensor '{key}': {bad} of {tensor.numel()} values are NaN or Inf; "
                              "refusing to quantize a broken weight")


def quantize_weight(weight: torch.Tensor, layout: type[LowBitLayout], kwargs: dict, optimize: bool):
    """(QuantizedTensor, plain encoder's QuantizedTensor or None) for one weight."""
    if "layer" in kwargs and not takes_layer_name(layout):
        kwargs = {k: v for k, v in kwargs.items() if k != "layer"}
    if optimize:
        from .optimize import optimized_quantize

        return optimized_quantize(weight, layout, kwargs)
    return QuantizedTensor.from_float(weight, layout.__name__, **kwargs), None


def _misfit(layout: type[LowBitLayout], exc: Exception) -> str:
    """The keep reason for a weight the format cannot hold, without the layer's name (so the
    summary groups all layers kept for the same reason)."""
    detail = re.sub(r"^(layer '[^']*'|quantized weight): ", "", str(exc))
    return f"does not fit {layout.FORMAT}: {detail}"


def _fits(layout: type[LowBitLayout], kwargs: dict, shape: tuple[int, ...]) -> str | None:
    """None if the layout can hold a weight of this shape, else its reason (tried on a few rows)."""
    probe = torch.randn(min(shape[0], 256), shape[1], dtype=torch.bfloat16)
    try:
        QuantizedTensor.from_float(probe, layout.__name__, **kwargs)
    except (QuantFormatError, ValueError) as exc:
        return _misfit(layout, exc)
    return None


def _dry_run(f: SafetensorsFile, steps: list[Step], layout, kwargs: dict, summary: ConvertSummary) -> None:
    """Fill ``summary`` with the plan, trying each new weight shape on the layout once."""
    fits: dict[tuple[int, ...], str | None] = {}
    for step in steps:
        if step.kind == "keep":
            summary.kept.append((step.key, step.reason))
        elif step.kind == "quantized":
            summary.passed_through.append((step.layer.layer, step.layer.describe))
        else:
            shape = f.info(step.key).shape
            if shape not in fits:
                fits[shape] = _fits(layout, kwargs, shape)
            if fits[shape]:
                summary.kept.append((step.key, fits[shape]))
            else:
                summary.quantized.append(LayerResult(step.key[: -len(".weight")], shape, math.nan))


# ---- the loop -------------------------------------------------------------------------------
def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike | None, options: ConvertOptions, *,
                       progress: ProgressCallback | None = None, show_progress: bool = True) -> ConvertSummary:
    """Convert ``src`` into ``dst`` (or only plan it with ``options.dry_run``); see the module doc."""
    start = time.perf_counter()
    layout = resolve_format(options.format)
    kwargs = layout_kwargs(layout, block_size=options.block_size, double_quant=options.double_quant,
                           rank=options.rank)
    if options.optimize and layout.FORMAT not in ("bnb_nf4", "bnb_fp4"):
        raise ValueError(f"--optimize applies to bnb_nf4 and bnb_fp4, not {layout.FORMAT}")
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this torch build sees no CUDA device; use --device cpu")
    src = Path(src)
    if dst is not None and not options.dry_run:
        dst = Path(dst)
        if dst.exists() and (dst.resolve() == src.resolve() or os.path.samefile(dst, src)):
            raise ValueError(f"{dst}: output is the input; the input is never modified")
        if dst.exists() and not options.overwrite:
            raise OutputExistsError(f"{dst} exists; pass --overwrite to replace it")

    with SafetensorsFile(src) as f:
        quantized = find_quantized_layers(f.keys(), f.read, lambda key: f.info(key).torch_dtype)
        if quantized and not options.keep_quantized:
            examples = ", ".join(f"{q.layer} ({q.describe})" for q in list(quantized.values())[:3])
            raise ConversionError(
                f"{src} already holds {len(quantized)} quantized layers, e.g. {examples}; pass --keep-quantized "
                "to carry them over as they are and quantize only the rest")
        rules = KeepRules(f.keys(), exclude=options.exclude, include=options.include)
        steps = plan(f, rules, quantized)
        summary = ConvertSummary(
            str(src), None if options.dry_run else str(dst), layout.FORMAT, kwargs, rules.describe(),
            input_bytes=os.path.getsize(src), dry_run=options.dry_run)

        if options.dry_run:
            _dry_run(f, steps, layout, kwargs, summary)
            summary.seconds = time.perf_counter() - start
            return summary

        metadata = _metadata(f, layout, options, kwargs, rules)
        with SafetensorsWriter(dst, metadata=metadata, overwrite=options.overwrite) as writer:
            _run_steps(f, steps, writer, layout, kwargs, options, device, summary, progress, show_progress)
            writer.metadata.update(_used_config(layout, summary))
            with summary.timed("commit"):
                writer.commit()
    summary.output_bytes = os.path.getsize(dst)
    summary.seconds = time.perf_counter() - start
    return summary


def _run_steps(f, steps, writer, layout, kwargs, options, device, summary, progress, show_progress):
    from tqdm import tqdm

    total = sum(f.info(k).nbytes for k in f.keys())
    done = 0
    step = steps[0] if steps else Step("keep", "(none)")
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not show_progress,
               desc="converting", dynamic_ncols=True)
    try:
        for index, step in enumerate(steps, 1):
            try:
                nbytes = _run_step(f, step, writer, layout, kwargs, options, device, summary)
            except (ConversionError, WriteError, KeyboardInterrupt):
                raise
            except (QuantFormatError, SafetensorsError, ValueError, RuntimeError, TypeError, OSError) as exc:
                named = f"'{step.key}'" in str(exc) or (step.layer and f"'{step.layer.layer}'" in str(exc))
                raise ConversionError(str(exc) if named else f"tensor '{step.key}': {exc}") from exc
            done += nbytes
            bar.update(nbytes)
            bar.set_postfix_str(f"{index}/{len(steps)} tensors", refresh=False)
            if progress is not None:
                progress(done, total, step.key)
    except KeyboardInterrupt:
        raise ConversionInterrupted(f"interrupted while converting tensor '{step.key}'; no output written") from None
    finally:
        bar.close()


def _run_step(f, step: Step, writer, layout, kwargs, options, device, summary) -> int:
    """Do one step; return the input bytes it consumed."""
    if step.kind == "keep":
        info = f.info(step.key)
        with summary.timed("copy"):
            writer.add_raw(step.key, info.dtype, info.shape, f.raw_chunks(step.key))
        summary.kept.append((step.key, step.reason))
        return info.nbytes

    if step.kind == "quantized":
        item = step.layer
        nbytes = sum(f.info(k).nbytes for k in item.keys)
        if item.source in ("ours", FOREIGN, FLOAT8):  # ours, or formats we only carry: copy the bytes
            for key in item.keys:
                info = f.info(key)
                writer.add_raw(key, info.dtype, info.shape, f.raw_chunks(key))
        else:
            weight = to_quantized(item, {key: f.read(key) for key in item.keys})
            for key, tensor in layer_state_dict(item.layer, weight).items():
                writer.add(key, tensor)
        summary.passed_through.append((item.layer, item.describe))
        return nbytes

    info = f.info(step.key)
    layer = step.key[: -len(".weight")]
    with summary.timed("read"):
        weight = f.read(step.key, device)
    with summary.timed("check"):
        check_finite(step.key, weight)
    try:
        with summary.timed("quantize"):
            qt, plain = quantize_weight(weight, layout, {**kwargs, "layer": layer}, options.optimize)
    except QuantFormatError as exc:  # the format cannot hold this shape: keep the weight as it is
        reason = _misfit(layout, exc)
        writer.add_raw(step.key, info.dtype, info.shape, f.raw_chunks(step.key))
        summary.kept.append((step.key, reason))
        return info.nbytes
    with summary.timed("measure error"):
        rel = relative_error(weight, qt.dequantize())
        plain_rel = relative_error(weight, plain.dequantize()) if plain is not None else None
    if not math.isfinite(rel):
        raise ConversionError(f"tensor '{step.key}': quantized weight decodes to non-finite values")
    with summary.timed("write"):
        for key, tensor in layer_state_dict(layer, qt).items():
            writer.add(key, tensor)
    summary.quantized.append(LayerResult(layer, info.shape, rel, plain_rel))
    if summary.layer_config is None:
        summary.layer_config = layout.comfy_quant_config(qt._params)
    return info.nbytes
