"""One FLUX-size double-stream transformer block: bf16 vs each of our formats, forward time and VRAM.

    python benchmarks/bench_block.py [--tokens 4096] [--txt-tokens 512] [--formats a,b] [--compile]
    python benchmarks/bench_block.py --small      # CPU smoke run (tiny dims, TRITON_INTERPRET=1)

The block is FLUX.1's ``DoubleStreamBlock`` at its real size, written out in plain PyTorch
(no ComfyUI needed): hidden 3072, 24 heads of 128, MLP 12288, an image stream of ``--tokens``
tokens (4096 = a 1024x1024 image) and a text stream of ``--txt-tokens`` (512, T5's length).
Its 10 linear layers (per stream: modulation 3072->18432, qkv 3072->9216, proj 3072->3072,
MLP 3072->12288->3072) hold 2 x (56.6 + 28.3 + 9.4 + 37.7 + 37.7) M = 340 M parameters,
679 MB in bf16. Weights are random N(0, 1/K); every linear is run through
``F.linear`` so a QuantizedTensor weight dispatches to its layout (as in ComfyUI).

For bf16 and each format in the table it prints, in one process on one GPU:
* ``ms``: median forward time (``triton.testing.do_bench``, L2 flushed between repetitions;
  the block's weights, 679 MB in bf16, exceed the 50 MB L2 anyway);
* ``weights MB``: memory the block's parameters take on the GPU (``memory_allocated`` delta);
* ``peak MB``: ``max_memory_allocated`` during one forward, weights and activations included;
* ``rel err``: ||out - out_bf16|| / ||out_bf16|| on the image stream (fresh inputs);
* ``compile``: with ``--compile``, whether ``torch.compile`` of the block ran, and its time.
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import time
import traceback

import torch
import torch.nn.functional as F

from comfy_kitchen.tensor import QuantizedTensor

from comfy_lowbit.layouts import FORMATS

HIDDEN, HEADS, MLP = 3072, 24, 12288


def make_weights(hidden: int, heads: int, mlp: int, device, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shapes = {"mod": (hidden, 6 * hidden), "qkv": (hidden, 3 * hidden), "proj": (hidden, hidden),
              "mlp_in": (hidden, mlp), "mlp_out": (mlp, hidden)}
    weights = {}
    for stream in ("img", "txt"):
        for name, (k, n) in shapes.items():
            weights[f"{stream}.{name}.weight"] = (torch.randn(n, k, generator=gen) / k**0.5).to(device, torch.bfloat16)
            weights[f"{stream}.{name}.bias"] = (0.02 * torch.randn(n, generator=gen)).to(device, torch.bfloat16)
        for norm in ("q_norm", "k_norm"):
            scale = 1 + 0.1 * torch.randn(hidden // heads, generator=gen)
            weights[f"{stream}.{norm}"] = scale.to(device, torch.bfloat16)
    return weights


class DoubleStreamBlock(torch.nn.Module):
    """FLUX.1's double-stream block: modulated LayerNorm -> joint attention -> MLP, two streams."""

    def __init__(self, weights: dict[str, torch.Tensor], heads: int):
        super().__init__()
        self.heads = heads
        self.w = weights

    def lin(self, name, x):
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def forward(self, img, txt, vec):
        mods = {}
        for stream in ("img", "txt"):
            mods[stream] = self.lin(f"{stream}.mod", F.silu(vec))[:, None, :].chunk(6, dim=-1)
        qkvs = []
        for stream, x in (("txt", txt), ("img", img)):
            shift, scale, _, _, _, _ = mods[stream]
            h = (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift
            q, k, v = self.lin(f"{stream}.qkv", h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
            q = F.rms_norm(q, q.shape[-1:], self.w[f"{stream}.q_norm"], eps=1e-6)
            k = F.rms_norm(k, k.shape[-1:], self.w[f"{stream}.k_norm"], eps=1e-6)
            qkvs.append((q, k, v))
        q, k, v = (torch.cat(parts, dim=2) for parts in zip(*qkvs))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        out = []
        for stream, x, a in (("img", img, img_attn), ("txt", txt, txt_attn)):
            _, _, gate1, shift2, scale2, gate2 = mods[stream]
            x = x + gate1 * self.lin(f"{stream}.proj", a)
            h = (1 + scale2) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift2
            x = x + gate2 * self.lin(f"{stream}.mlp_out", F.gelu(self.lin(f"{stream}.mlp_in", h), approximate="tanh"))
            out.append(x)
        return tuple(out)


def quantized(weights, fmt):
    layout = FORMATS[fmt].__name__
    return {k: QuantizedTensor.from_float(v, layout) if k.endswith(".weight") else v for k, v in weights.items()}


def timed_ms(fn) -> float:
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=50, return_mode="median")
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--txt-tokens", type=int, default=512)
    parser.add_argument("--formats", default=",".join(sorted(FORMATS)))
    parser.add_argument("--compile", action="store_true", help="also try torch.compile of the block")
    parser.add_argument("--small", action="store_true", help="tiny dims for a CPU smoke run")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hidden, heads, mlp = (256, 2, 1024) if args.small else (HIDDEN, HEADS, MLP)
    tokens, txt_tokens = (64, 16) if args.small else (args.tokens, args.txt_tokens)
    formats = [f for f in args.formats.split(",") if f]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise SystemExit(f"unknown formats {unknown}; known: {sorted(FORMATS)}")

    print(f"# FLUX double-stream block: hidden {hidden}, {heads} heads, MLP {mlp}, "
          f"{tokens} image + {txt_tokens} text tokens, bf16 activations")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# device {gpu}; torch {torch.__version__}; python {platform.python_version()}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    gen = torch.Generator(device="cpu").manual_seed(1)
    img = torch.randn(1, tokens, hidden, generator=gen).to(device, torch.bfloat16)
    txt = torch.randn(1, txt_tokens, hidden, generator=gen).to(device, torch.bfloat16)
    vec = torch.randn(1, hidden, generator=gen).to(device, torch.bfloat16)

    header = f"{'format':<16}{'ms':>10}{'vs bf16':>9}{'weights MB':>12}{'peak MB':>10}{'rel err':>10}"
    if args.compile:
        header += f"{'compiled ms':>13}  compile"
    print(header)
    ref = None
    base_ms = None
    for fmt in ["bf16", *formats]:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        weights = make_weights(hidden, heads, mlp, device)
        if fmt != "bf16":
            weights = quantized(weights, fmt)
        if device.type == "cuda":
            torch.cuda.synchronize()
        weight_mb = ((torch.cuda.memory_allocated() - before) / 2**20) if device.type == "cuda" else float("nan")
        block = DoubleStreamBlock(weights, heads)
        with torch.inference_mode():
            # First call: kernels compile and the per-shape timings (kernels/fastest.py) run,
            # whose benchmark scratch must not count as the block's peak.
            block(img, txt, vec)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            out = block(img, txt, vec)[0]
            peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20 if device.type == "cuda" else float("nan")
            ms = timed_ms(lambda: block(img, txt, vec))
        if ref is None:
            ref, base_ms = out.float(), ms
        line = (f"{fmt:<16}{ms:>10.3f}{ms / base_ms:>8.2f}x{weight_mb:>12.1f}{peak_mb:>10.1f}"
                f"{rel_err(out, ref):>10.4f}")
        if args.compile:
            try:
                compiled = torch.compile(block)
                with torch.inference_mode():
                    c_out = compiled(img, txt, vec)[0]
                    c_ms = timed_ms(lambda: compiled(img, txt, vec))
                line += f"{c_ms:>13.3f}  ok (rel err vs eager {rel_err(c_out, out):.2e})"
            except Exception as exc:  # report, don't hide: this is the documented status
                text = " ".join(traceback.format_exception_only(type(exc), exc)).split("\n")
                reason = " | ".join(line.strip() for line in text if line.strip())[:400]
                line += f"{'-':>13}  FAILED: {reason}"
            torch._dynamo.reset()
        print(line, flush=True)
        del weights, block, out
    print("# weights MB / peak MB: CUDA allocator deltas; peak = weights + activations of one forward.")
    print("# rel err: image-stream output vs the bf16 block on the same inputs.")


if __name__ == "__main__":
    main()
