"""The small-M W4A4 GEMV (kernels/w4a4_gemv.py) against the fp32 reference.

Interpreter on the CPU (the dp4a emulated with shifts), CUDA on a GPU (PTX dp4a): small odd
shapes, every weight byte value, outlier activations, unsigned (post-GELU) codes 0..15, K
tails that leave a tile or a half-iteration partly empty, poisoned outputs. A compile check
for sm_90 reads the SASS of the K loop: 16-byte weight loads, dp4a, and no shared memory,
barrier or spill in it (what makes the kernel memory-bound).
"""
from __future__ import annotations

import subprocess

import pytest
import torch

from comfy_lowbit.kernels.w4a4_gemm import w4a4_gemm_reference
from comfy_lowbit.kernels.w4a4_gemv import MAX_ROWS, block_rows, lora_chunks, w4a4_gemv
from comfy_lowbit.kernels.w4a4_quantize import natural_group_order, quantize_activations, quantize_activations_reference

from support import KERNEL_DEVICE, outlier_matrix, relative_error

ON_GPU = KERNEL_DEVICE == "cuda"


def _inputs(m, n, k, r, seed, unsigned=False, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    x = outlier_matrix(m, k, seed=seed, scale=20.0)
    if unsigned:
        x = x.abs()  # post-GELU-like: mostly positive
    x = x.to(dtype).to(KERNEL_DEVICE)
    smooth = (torch.rand(k, generator=gen) + 0.5).to(dtype).to(KERNEL_DEVICE)
    down = (torch.randn(k, r, generator=gen) / 8).to(dtype).to(KERNEL_DEVICE)
    qweight = torch.randint(-128, 128, (n, k // 2), generator=gen, dtype=torch.int8).to(KERNEL_DEVICE)  # all bytes
    wscales = (torch.rand(k // 64, n, generator=gen) / 16 + 1e-3).to(dtype).to(KERNEL_DEVICE)
    up = torch.randn(n, r, generator=gen).to(dtype).to(KERNEL_DEVICE)
    bias = torch.randn(n, generator=gen).to(dtype).to(KERNEL_DEVICE)
    return x, smooth, down, qweight, wscales, up, bias


def _reference(x, smooth, down, qweight, wscales, up, bias, unsigned):
    codes, ascales, lora = quantize_activations_reference(x, smooth, down, unsigned)
    return w4a4_gemm_reference(codes, ascales, qweight, wscales, lora, up, bias, torch.float32)


# Tiles: the default, then narrow ones so that N spans several programs and K several
# iterations with a partly empty last tile (K=320: 5 groups; GROUPS=2 -> 2 iterations of 2 x 2).
CONFIGS = [None, {"BLOCK_N": 8, "GROUPS": 2, "num_warps": 4}, {"BLOCK_N": 4, "GROUPS": 1, "num_warps": 1}]


@pytest.mark.parametrize("m,n,k,r", [(1, 40, 192, 4), (2, 33, 320, 16), (3, 24, 128, 7), (8, 17, 320, 32), (13, 20, 192, 5), (2, 24, 128, 40)])
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_gemv_matches_reference(m, n, k, r, config):
    x, smooth, down, qweight, wscales, up, bias = _inputs(m, n, k, r, seed=m * 100 + n)
    codes, ascales, lora = quantize_activations(x, smooth, down, chunks=lora_chunks(m, k, r))
    poison = torch.full((m, n), float("nan"), dtype=torch.float32, device=KERNEL_DEVICE)
    out = w4a4_gemv(codes, ascales, qweight, wscales, lora, up, bias, torch.float32, config=CONFIGS[config], out=poison)
    ref = _reference(x, smooth, down, qweight, wscales, up, bias, False)
    # Exact integer group sums; fp32 scaling. On a GPU the quantizer may move a code by one
    # step on an exact rounding tie (fp32 division), hence the looser bound there.
    assert relative_error(out, ref) < (2e-3 if ON_GPU else 1e-5)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemv_unsigned_codes_and_dtypes(out_dtype, with_bias):
    """act_unsigned: codes 0..15 (still int8 for dp4a); 16-bit outputs; no bias."""
    m, n, k, r = 2, 48, 256, 8
    x, smooth, down, qweight, wscales, up, bias = _inputs(m, n, k, r, seed=5, unsigned=True)
    bias = bias if with_bias else None
    codes, ascales, lora = quantize_activations(x, smooth, down, True, chunks=lora_chunks(m, k, r))
    assert codes.max() > 7, "the test should reach the unsigned range"
    poison = torch.full((m, n), float("nan"), dtype=out_dtype, device=KERNEL_DEVICE)
    out = w4a4_gemv(codes, ascales, qweight, wscales, lora, up, bias, out_dtype, out=poison)
    ref = _reference(x, smooth, down, qweight, wscales, up, bias, True)
    assert out.dtype == out_dtype and relative_error(out, ref) < 8e-3


def test_gemv_accepts_a_weight_view_at_an_odd_byte_offset():
    """A packed weight sliced out of a larger buffer (as a file loader may hand it over)."""
    m, n, k, r = 1, 24, 128, 4
    x, smooth, down, qweight, wscales, up, bias = _inputs(m, n, k, r, seed=9)
    shifted = torch.empty(n * k // 2 + 1, dtype=torch.int8, device=KERNEL_DEVICE)[1:].view(n, k // 2)
    shifted.copy_(qweight)
    codes, ascales, lora = quantize_activations(x, smooth, down, chunks=lora_chunks(m, k, r))
    out = w4a4_gemv(codes, ascales, shifted, wscales, lora, up, bias, torch.float32)
    assert relative_error(out, _reference(x, smooth, down, qweight, wscales, up, bias, False)) < (2e-3 if ON_GPU else 1e-5)


def test_lora_chunks_bound_the_epilogue_tile():
    for m in range(1, MAX_ROWS + 1):
        for k in (64, 3072, 12288):
            for r in (1, 32, 33, 128, 512):
                c = lora_chunks(m, k, r)
                assert 1 <= c <= k // 64 and c * block_rows(m) * min(triton_next_pow2(r), 32) <= 4096
    assert lora_chunks(1, 12288, 32) == 128


def triton_next_pow2(v):
    return 1 << (v - 1).bit_length()


def test_gemv_errors_say_what_was_expected():
    x, smooth, down, qweight, wscales, up, bias = _inputs(17, 16, 128, 4, seed=1)
    codes, ascales, lora = quantize_activations(x, smooth, down)
    with pytest.raises(ValueError, match="at most 16 rows, got M=17"):
        w4a4_gemv(codes, ascales, qweight, wscales, lora, up, bias, torch.float32)
    with pytest.raises(ValueError, match=r"wscales has shape \(16, 2\), expected \(2, 16\)"):
        w4a4_gemv(codes[:2], ascales[:, :2], qweight, wscales.t(), lora[:, :2], up, bias, torch.float32)
    with pytest.raises(ValueError, match="int8 activation codes"):
        w4a4_gemv(codes[:2].view(torch.uint8), ascales[:, :2], qweight, wscales, lora[:, :2], up, bias, torch.float32)


# ----------------------------------------------------------------------------- sm_90 SASS

_COMPILE_SCRIPT = r"""
import json, re, subprocess, sys, tempfile
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from comfy_lowbit.kernels.w4a4_gemv import default_tile, w4a4_gemv_kernel

cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
result = {}
for rows in (1, 2, 4, 8):
    tile = default_tile(rows, 12288)
    signature = {"a_ptr": "*i32", "ascales_ptr": "*fp32", "w_ptr": "*i32", "wscales_ptr": "*bf16", "lora_ptr": "*fp32",
                 "up_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
                 "R": "i32", "CHUNKS": "i32", "stride_am": "i32", "stride_wn": "i32", "stride_om": "i32"}
    names = list(signature)
    # What a launch at K=3072, N=12288, R=32 specialises: pointers and strides divisible by 16.
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n not in ("M", "CHUNKS")}
    constexprs = dict(BLOCK_M=rows, BLOCK_N=tile["BLOCK_N"], GROUPS=tile["GROUPS"], BLOCK_C=128 // rows,
                      BLOCK_R=32, HAS_BIAS=True, USE_PTX=True, PDL=rows == 1)
    signature.update({n: "constexpr" for n in constexprs})
    source = triton.compiler.ASTSource(w4a4_gemv_kernel, signature, constexprs, attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": tile["num_warps"]})
    if not cuobjdump.exists():
        result[rows] = None
        continue
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([str(cuobjdump), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    code = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass)]
    branches = re.findall(r"/\*([0-9a-f]{4})\*/[^\n]*BRA[^\n]*?0x([0-9a-f]+)", sass)
    loops = [(int(t, 16), int(a, 16)) for a, t in branches if int(t, 16) < int(a, 16)]
    result[rows] = [[op for a, op in code if lo <= a <= hi] for lo, hi in loops]

# The activation quantizer with the inline-PTX division (a benchmark variant): it must build.
from comfy_lowbit.kernels.w4a4_quantize import w4a4_quantize_kernel
signature = {"x_ptr": "*bf16", "smooth_ptr": "*bf16", "down_ptr": "*bf16", "codes_ptr": "*i8", "ascales_ptr": "*fp32",
             "lora_ptr": "*fp32", "M": "i32", "K": "i32", "R": "i32", "GROUPS_PER_CHUNK": "i32", "stride_xm": "i32"}
constexprs = dict(BLOCK_M=32, BLOCK_R=32, UNSIGNED=False, IEEE_DOT=False, STEP_GROUPS=2, FAST_DIV=True,
                  LAUNCH_DEPENDENTS=True)
signature.update({n: "constexpr" for n in constexprs})
kernel = triton.compile(triton.compiler.ASTSource(w4a4_quantize_kernel, signature, constexprs),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
result["quantizer_fast_div"] = kernel.asm["ptx"].count("div.approx.f32")
result["quantizer_launch_dependents"] = kernel.asm["ptx"].count("griddepcontrol.launch_dependents")
print(json.dumps(result))
"""


def test_gemv_compiles_for_sm90_with_a_memory_bound_loop():
    """Built for sm_90 with this Triton (no GPU needed; in a subprocess, since the tests run
    under the interpreter), the K loop at 1, 2, 4 and 8 rows has 16-byte weight loads, 16
    dp4a per row, and no shared memory, barrier or spill. The quantizer's PTX-division variant
    builds too."""
    import json
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result.pop("quantizer_fast_div") > 0 and result.pop("quantizer_launch_dependents") == 1
    for rows, loops in result.items():
        if loops is None:
            pytest.skip("this Triton ships no cuobjdump")
        assert len(loops) == 1, f"{rows} rows: expected one loop, found {len(loops)}"
        loop = loops[0]
        assert loop.count("LDG.E.128") >= 2 and loop.count("IDP.4A.S8.S8") == 16 * int(rows), (rows, loop)
        slow = [op for op in loop if op.startswith(("BAR", "LDS", "STS", "LDL", "STL", "LDSM", "STSM"))]
        assert not slow, f"{rows} rows: shared memory, barriers or spills in the K loop: {slow}"


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.skipif(not ON_GPU, reason="GPU run of the PTX dp4a path")
@pytest.mark.parametrize("m", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("k,n", [(3072, 3072), (3072, 1280), (1280, 3072)])
def test_gemv_on_gpu_flux_sizes(m, k, n):
    r = 32
    x, smooth, down, qweight, wscales, up, bias = _inputs(m, n, k, r, seed=m + k)
    codes, ascales, lora = quantize_activations(x, smooth, down, chunks=lora_chunks(m, k, r))
    poison = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    out = w4a4_gemv(codes, ascales, qweight, wscales, lora, up, bias, torch.bfloat16, out=poison)
    # The same codes for both (the reference takes natural order): this checks the GEMV alone.
    ref = w4a4_gemm_reference(natural_group_order(codes).cpu(), ascales.cpu(), qweight.cpu(), wscales.cpu(),
                              lora.cpu(), up.cpu(), bias.cpu(), torch.float32)
    assert relative_error(out.cpu(), ref) < 8e-3


@pytest.mark.skipif(not ON_GPU, reason="the layout takes the kernel path only on a GPU")
@pytest.mark.parametrize("rows", [1, 5, 8, 9, 16, 17])
def test_layout_gemv_dispatch_on_gpu(rows, monkeypatch):
    """Up to ``GEMV_MAX_ROWS`` rows (2) take the GEMV plan, more the GEMM; raised to the GEMV
    kernel's own limit (16) here so that every row count it serves runs through the layout."""
    from comfy_kitchen.tensor import QuantizedTensor

    from comfy_lowbit.kernels.w4a4_gemv import MAX_ROWS
    from comfy_lowbit.layouts import w4a4
    from comfy_lowbit.layouts.w4a4 import w4a4_linear_reference

    monkeypatch.setattr(w4a4, "GEMV_MAX_ROWS", MAX_ROWS)
    w = (outlier_matrix(320, 768, seed=3, scale=4.0) / 768**0.5).to(torch.bfloat16).cuda()
    qt = QuantizedTensor.from_float(w, "W4A4Layout", rank=32)
    x = (outlier_matrix(rows, 768, seed=4, scale=20.0)).to(torch.bfloat16).cuda()
    bias = torch.randn(320, device="cuda").to(torch.bfloat16)
    with torch.inference_mode():
        out = torch.nn.functional.linear(x, qt, bias)
    ref = w4a4_linear_reference(x, qt, bias).float()
    assert out.shape == (rows, 320) and relative_error(out, ref) < 1e-2


@pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_capability() < (9, 0), reason="programmatic dependent launch: sm_90+")
def test_pdl_plan_is_bit_identical_eager_and_in_a_cuda_graph():
    """The GEMV launched as a programmatic dependent of the quantizer must read the
    quantizer's results only after its griddepcontrol.wait: the same bits as without PDL,
    back to back on the stream (new inputs each time, no sync), and replayed in a CUDA graph."""
    from comfy_kitchen.tensor import QuantizedTensor

    from comfy_lowbit.layouts.w4a4 import _gemv_linear

    w = (outlier_matrix(3072, 3072, seed=8, scale=4.0) / 3072**0.5).to(torch.bfloat16).cuda()
    qt = QuantizedTensor.from_float(w, "W4A4Layout", rank=32)
    q, p = qt._qdata, qt._params
    bias = torch.randn(3072, device="cuda").to(torch.bfloat16)
    xs = [outlier_matrix(rows, 3072, seed=20 + i, scale=20.0).to(torch.bfloat16).cuda()
          for i, rows in enumerate((1, 2, 1, 4, 1, 8, 16) * 4)]
    plain = [_gemv_linear(x, q, p, bias, torch.bfloat16, pdl=False) for x in xs]
    with_pdl = [_gemv_linear(x, q, p, bias, torch.bfloat16, pdl=True) for x in xs]
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(plain, with_pdl))
    x = xs[0].clone()
    _gemv_linear(x, q, p, bias, torch.bfloat16, pdl=True)  # compiled before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _gemv_linear(x, q, p, bias, torch.bfloat16, pdl=True)
    for i in (0, 2, 4):
        x.copy_(xs[i])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, plain[i])
