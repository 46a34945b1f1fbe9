"""The NF4/FP4 Triton kernels against their plain-PyTorch references (``bnb4_codec``).

Linear: every path (gemv, fused GEMM, dequantize + cuBLAS) on M in {1, 3, 16, 17, 100}, K and
N odd multiples of the block (plus an N that is a multiple of nothing), both codebooks, double
quant on and off, fp16/bf16/fp32 activations, bias, 3-D inputs. Outputs are poisoned with NaN
first; ``relative_error`` turns any NaN/Inf into inf, so an unwritten element cannot pass.
Tolerances (||y - y_ref|| / ||y_ref|| against the float32 reference) per activation dtype:
fp32 1e-5 (float32 accumulation, different summation order); fp16 3e-3 and bf16 1.2e-2 (the
dequantized weight is rounded to the activation dtype before the tensor-core product and the
output is rounded once: about 2^-11 and 2^-8 relative per element).

Dequantize (the first half of the cuBLAS path) and quantize are compared bit for bit.

On the CPU these run under TRITON_INTERPRET=1 (set in conftest.py), so sizes are kept small.
"""
from __future__ import annotations

import pytest
import torch

from comfy_lowbit.kernels import bnb4_codec
from comfy_lowbit.kernels.bnb4_linear import Bnb4Weight, bnb4_linear, choose_path, dequantize, reference_bnb4_linear, reference_dequantize
from comfy_lowbit.kernels.bnb4_quantize import bnb4_quantize
from support import KERNEL_DEVICE, outlier_matrix, relative_error

BLOCK = 64
K = 5 * BLOCK
N = 3 * BLOCK  # odd multiples of the block: not a multiple of the 128-wide N tiles
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.2e-2}
PATHS = ("gemv", "gemv_lut", "mma", "fused", "dequant_cublas", "dequant_cublas_overlap")


def make_weight(n: int, k: int, quant_type: str, double_quant: bool, seed: int, block: int = BLOCK) -> Bnb4Weight:
    w = outlier_matrix(n, k, seed=seed, scale=8.0) * 0.05
    packed, absmax = bnb4_codec.quantize_4bit(w, block, quant_type)
    if double_quant:
        codes, nested, offset = bnb4_codec.quantize_nested_absmax(absmax)
        weight = Bnb4Weight(packed, codes, (n, k), block, quant_type, nested, offset)
    else:
        weight = Bnb4Weight(packed, absmax, (n, k), block, quant_type)
    return to_device(weight)


def to_device(w: Bnb4Weight) -> Bnb4Weight:
    move = lambda t: None if t is None else t.to(KERNEL_DEVICE)  # noqa: E731
    return Bnb4Weight(move(w.packed), move(w.absmax), w.shape, w.block_size, w.quant_type,
                      move(w.nested_absmax), move(w.offset))


def check_linear(x, weight, bias, path, dtype):
    m = x.reshape(-1, x.shape[-1]).shape[0]
    out = torch.full((m, weight.shape[0]), float("nan"), device=KERNEL_DEVICE, dtype=dtype)
    y = bnb4_linear(x, weight, bias, path=path, out=out)
    ref = reference_bnb4_linear(x.cpu(), to_cpu(weight), None if bias is None else bias.cpu())
    assert y.shape == (*x.shape[:-1], weight.shape[0]) and y.dtype == dtype
    err = relative_error(y.cpu(), ref)
    assert err <= TOLERANCE[dtype], f"{path} M={m} {weight.quant_type} dq={weight.double_quant} {dtype}: rel. error {err:.3g}"


def to_cpu(w: Bnb4Weight) -> Bnb4Weight:
    move = lambda t: None if t is None else t.cpu()  # noqa: E731
    return Bnb4Weight(move(w.packed), move(w.absmax), w.shape, w.block_size, w.quant_type,
                      move(w.nested_absmax), move(w.offset))


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 100])
@pytest.mark.parametrize("path", PATHS)
def test_linear_matches_reference(path, m, quant_type, double_quant):
    if path == "gemv_lut" and m > 17:
        pytest.skip("the M=1 GEMV: 17 rows of x already cover the row axis (keeps CI fast)")
    if path == "mma" and m > 32:
        pytest.skip("the skinny tensor-core kernel serves up to 32 rows")
    weight = make_weight(N, K, quant_type, double_quant, seed=m)
    x = outlier_matrix(m, K, seed=100 + m).to(KERNEL_DEVICE, torch.bfloat16)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(m)).to(KERNEL_DEVICE, torch.bfloat16)
    check_linear(x, weight, bias if m % 2 else None, path, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("path", PATHS)
def test_linear_activation_dtypes(path, quant_type, double_quant, dtype):
    if path == "mma" and dtype == torch.float32:
        pytest.skip("the skinny tensor-core kernel takes 16-bit x (test_mma_refuses_what_it_cannot_serve)")
    weight = make_weight(N, K, quant_type, double_quant, seed=7)
    x = outlier_matrix(3, K, seed=8).to(KERNEL_DEVICE, dtype)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(9)).to(KERNEL_DEVICE, dtype)
    check_linear(x, weight, bias, path, dtype)


@pytest.mark.parametrize("path", PATHS)
def test_linear_3d_input_odd_n_and_large_block(path):
    """N = 37 (a multiple of nothing), block 128 with K = 3 blocks, x of shape (2, 3, K)."""
    weight = make_weight(37, 3 * 128, "nf4", True, seed=11, block=128)
    x = outlier_matrix(6, 3 * 128, seed=12).reshape(2, 3, 3 * 128).to(KERNEL_DEVICE, torch.bfloat16)
    bias = torch.randn(37, generator=torch.Generator().manual_seed(13)).to(KERNEL_DEVICE, torch.bfloat16)
    check_linear(x, weight, bias, path, torch.bfloat16)


@pytest.mark.parametrize("rows,split,block_n,step,prefetch,ahead,maxnreg", [
    (3, 5, 64, 1, False, False, None), (3, 2, 32, 2, False, False, None), (3, 1, 128, 2, False, False, None),
    (3, 5, 64, 1, True, False, None), (3, 1, 32, 1, True, False, None), (3, 5, 128, 1, False, False, 96),
    (3, 5, 64, 1, False, True, None), (3, 2, 32, 2, False, True, None), (3, 1, 64, 1, True, True, None),
    (24, 5, 128, 1, False, True, None), (32, 1, 64, 2, False, False, None)])
def test_mma_split_k_in_one_launch(rows, split, block_n, step, prefetch, ahead, maxnreg):
    """K split in slices whose partials the last program of each column tile sums. Twice in a
    row: the arrival counters it leaves behind must be zero again, or the second call fails.
    AHEAD/PREFETCH load the next block early: a slice of one block and slices of several
    (the last block's "next" is itself) must both come out right; 24 and 32 rows take the
    32-row tile (the dispatch's rule on large layers)."""
    from comfy_lowbit.kernels.bnb4_linear import _launch_mma
    from comfy_lowbit.kernels.split_k import arrival_counters

    k = 4 * BLOCK if step == 2 else K
    weight = make_weight(N, k, "nf4", True, seed=split)
    for seed in (1, 2):
        x = outlier_matrix(rows, k, seed=seed).to(KERNEL_DEVICE, torch.bfloat16)
        bias = torch.randn(N, generator=torch.Generator().manual_seed(seed)).to(KERNEL_DEVICE, torch.bfloat16)
        out = torch.full((rows, N), float("nan"), device=KERNEL_DEVICE, dtype=torch.bfloat16)
        _launch_mma(x, weight, bias, out, config=dict(BLOCK_N=block_n, STEP_BLOCKS=step, SPLIT=split, PREFETCH=prefetch,
                                                      AHEAD=ahead, maxnreg=maxnreg))
        err = relative_error(out.cpu(), reference_bnb4_linear(x.cpu(), to_cpu(weight), bias.cpu()))
        assert err <= TOLERANCE[torch.bfloat16], f"split {split}: rel. error {err:.3g}"
    assert int(arrival_counters(out.device, 1).abs().sum()) == 0


def test_mma_split_keeps_whole_steps_in_one_wave():
    """The split divides the steps, its programs fit in one wave of PROGRAMS_PER_SM per SM, and
    no larger divisor would (session 6: 1.09 waves cost 4-18%)."""
    from comfy_lowbit.kernels.bnb4_mma import PROGRAMS_PER_SM, split_for

    slots = PROGRAMS_PER_SM * 132
    for n, k in ((3072, 3072), (12288, 3072), (3072, 12288), (18432, 3072), (64, 64 * 96)):
        steps, tiles = k // 64 // 2, -(-n // 128)
        split = split_for(n, k, 64, 128, 2, 132)
        assert steps % split == 0
        assert split == 1 or tiles * split <= slots
        assert all(steps % d or tiles * d > slots for d in range(split + 1, steps + 1))
    assert split_for(3072, 12288, 64, 128, 1, 132) == 16  # 24 tiles x 16 = 384 <= 528; 24 would be 576
    assert split_for(12288, 3072, 64, 128, 1, 132) == 4  # 96 tiles x 4 = 384; 6 would be 576


def test_mma_refuses_what_it_cannot_serve():
    from comfy_lowbit.kernels.bnb4_linear import _launch_mma

    weight = make_weight(N, K, "nf4", False, seed=3)
    x = torch.randn(2, K).to(KERNEL_DEVICE, torch.bfloat16)
    out = torch.empty(2, N, device=KERNEL_DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="a divisor of the 5 steps"):
        _launch_mma(x, weight, None, out, config=dict(BLOCK_N=64, STEP_BLOCKS=1, SPLIT=3))
    for x in (torch.randn(33, K), torch.randn(2, K, dtype=torch.float32)):
        with pytest.raises(ValueError, match="at most 32 rows of float16/bfloat16"):
            bnb4_linear(x.to(KERNEL_DEVICE, x.dtype if x.shape[0] == 2 else torch.bfloat16), weight, path="mma")


def test_gemv_without_prefetch(monkeypatch):
    """The GEMV's un-pipelined variant (an autotune candidate) on the fixed-config path."""
    import comfy_lowbit.kernels.bnb4_linear as lin

    if lin.AUTOTUNE:
        pytest.skip("runs with COMFY_LOWBIT_AUTOTUNE=0 or the interpreter")
    monkeypatch.setitem(lin._FIXED_GEMV, "PREFETCH", False)
    weight = make_weight(N, K, "fp4", True, seed=61)
    x = outlier_matrix(3, K, seed=62).to(KERNEL_DEVICE, torch.float16)
    check_linear(x, weight, None, "gemv", torch.float16)


@pytest.mark.parametrize("n,k,m,quant_type", [(192, 2048, 1, "nf4"), (37, 1536, 3, "fp4"), (192, 2048, 6, "nf4")])
def test_gemv_lut_with_prefetch(monkeypatch, n, k, m, quant_type):
    """The v5 GEMV's prefetching variant (an autotune candidate) on the fixed-config path:
    even tiles (the next step's load wraps past the last one) and masked ones, one to two
    row groups, more than one step per program."""
    import comfy_lowbit.kernels.bnb4_linear as lin

    if lin.AUTOTUNE:
        pytest.skip("runs with COMFY_LOWBIT_AUTOTUNE=0 or the interpreter")
    monkeypatch.setitem(lin._FIXED_GEMV_LUT, "PREFETCH", True)
    assert k // 32 > lin._FIXED_GEMV_LUT["KB"], "the loop must take several steps"
    weight = make_weight(n, k, quant_type, True, seed=n + k)
    x = outlier_matrix(m, k, seed=m + 80).to(KERNEL_DEVICE, torch.bfloat16)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(81)).to(KERNEL_DEVICE, torch.bfloat16)
    check_linear(x, weight, bias, "gemv_lut", torch.bfloat16)


@pytest.mark.parametrize("n,k,double_quant", [(600, 384, True), (300, 640, False)])
def test_overlapped_dequant_cublas_in_several_row_ranges(n, k, double_quant):
    """Ranges that start on nested-block boundaries (double quant) and end short of a whole
    range; both buffers reused; bias sliced per range."""
    from comfy_lowbit.kernels.bnb4_linear import overlap_row_ranges

    ranges = overlap_row_ranges(n, k, BLOCK)
    assert len(ranges) >= 3 and ranges[-1][1] == n and all(r0 % 128 == 0 for r0, _ in ranges)
    weight = make_weight(n, k, "nf4", double_quant, seed=n)
    x = outlier_matrix(5, k, seed=n + 1).to(KERNEL_DEVICE, torch.bfloat16)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(KERNEL_DEVICE, torch.bfloat16)
    check_linear(x, weight, bias, "dequant_cublas_overlap", torch.bfloat16)


def test_weight_rows_refuse_a_split_inside_a_nested_block():
    from comfy_lowbit.kernels.bnb4_linear import weight_rows

    weight = make_weight(600, 384, "nf4", True, seed=3)
    with pytest.raises(ValueError, match="nested block"):
        weight_rows(weight, 64, 128)  # row 64 = block 384, inside the second nested block


def test_gemv_lut_even_tiles_through_the_dispatch():
    """The v5 GEMV where its tile divides the shape (the unmasked EVEN variant: N = 192 rows,
    K = 512 = 16 chunks of 16 bytes) with 1, 2 and 4 rows of x per program, reached through
    the dispatch."""
    assert [choose_path(m) for m in (1, 2, 8, 9)] == ["gemv_lut"] * 3 + ["dequant_cublas"]
    weight = make_weight(N, 8 * BLOCK, "nf4", True, seed=71)
    for m in (1, 2, 4):
        x = outlier_matrix(m, 8 * BLOCK, seed=72 + m).to(KERNEL_DEVICE, torch.bfloat16)
        check_linear(x, weight, None, None, torch.bfloat16)


def test_dispatch_takes_the_tensor_core_kernel_for_3_to_16_rows_of_16_bit_x(monkeypatch):
    from comfy_lowbit.kernels import bnb4_linear as lin

    weight = make_weight(N, K, "nf4", True, seed=23)
    ran = []
    monkeypatch.setattr(lin, "_launch_mma", lambda *a, _l=lin._launch_mma, **k: ran.append(a[0].shape[0]) or _l(*a, **k))
    for m, dtype in ((3, torch.bfloat16), (16, torch.float16), (1, torch.bfloat16), (4, torch.float32)):
        x = outlier_matrix(m, K, seed=24 + m).to(KERNEL_DEVICE, dtype)
        check_linear(x, weight, None, None, dtype)
    assert ran == [3, 16]


def test_dispatch_takes_the_tensor_core_kernel_up_to_32_rows_on_large_layers(monkeypatch):
    """17-32 rows: the 32-row tile on layers of LARGE_LAYER weights and more, the timed choice
    below that (checked without launching: the dispatch decides from the shapes)."""
    from comfy_lowbit.kernels import bnb4_linear as lin
    from comfy_lowbit.kernels.bnb4_mma import LARGE_LAYER

    monkeypatch.setattr(lin, "_fastest_path", lambda *a: "timed")
    small = make_weight(N, K, "nf4", False, seed=5)
    large = lin.Bnb4Weight(small.packed, small.absmax, (LARGE_LAYER // 4096, 4096), 64, "nf4")
    x = torch.empty(24, 4096, dtype=torch.bfloat16)
    assert lin.dispatch_path(x, large) == "mma"
    assert lin.dispatch_path(x[:, :K], small) == "timed"
    assert lin.dispatch_path(torch.empty(33, 4096, dtype=torch.bfloat16), large) == "timed"
    assert lin.dispatch_path(x.float(), large) == "timed"


def test_dispatch_covers_every_m():
    assert [choose_path(m) for m in (1, 2, 16, 256, 257, 16384)][0] == "gemv_lut"
    assert {choose_path(m) for m in (1, 2, 100, 5000)} <= set(PATHS)
    weight = make_weight(N, K, "nf4", False, seed=21)
    x = outlier_matrix(2, K, seed=22).to(KERNEL_DEVICE, torch.bfloat16)
    check_linear(x, weight, None, None, torch.bfloat16)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("fp4", True)])
def test_dequantize_bit_exact(quant_type, double_quant):
    weight = make_weight(N, K, quant_type, double_quant, seed=31)
    out = torch.full((N, K), float("nan"), device=KERNEL_DEVICE)
    got = dequantize(weight, torch.float32, out=out)
    ref = reference_dequantize(to_cpu(weight))
    # double quant: the kernel may fuse the absmax decode's multiply-add (1 ulp of absmax)
    if double_quant:
        torch.testing.assert_close(got.cpu(), ref, rtol=3e-7, atol=0)
    else:
        assert torch.equal(got.cpu(), ref)


def test_bad_inputs_name_what_was_expected():
    weight = make_weight(N, K, "nf4", False, seed=41)
    with pytest.raises(ValueError, match=f"activation last dim: expected {K}"):
        bnb4_linear(torch.zeros(2, K + 1, device=KERNEL_DEVICE), weight)
    with pytest.raises(ValueError, match="activation dtype"):
        bnb4_linear(torch.zeros(2, K, device=KERNEL_DEVICE, dtype=torch.int32), weight)
    with pytest.raises(ValueError, match=r"bias shape: expected \(192,\)"):
        bnb4_linear(torch.zeros(2, K, device=KERNEL_DEVICE), weight, torch.zeros(3, device=KERNEL_DEVICE))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype,shape,block", [
    (torch.bfloat16, (160, 192), 64),
    (torch.float32, (7, 37), 64),  # odd numel: a partial last block and a padded last nibble
    (torch.float16, (3, 256), 128),
    (torch.bfloat16, (64, 128), 64),  # 8192 values: whole programs on the GPU too (the unmasked variant)
])
@pytest.mark.parametrize("nested", [False, True])
def test_quantize_bit_exact(quant_type, dtype, shape, block, nested):
    x = outlier_matrix(*shape, seed=51).to(dtype)
    x[0, :5] = 0.0  # exact zeros and a value on a code point
    x[1, 0] = x[1].abs().max()
    if shape[1] >= 2 * block:  # an all-zero block: absmax 0
        x[2, :block] = 0.0
    numel = x.numel()
    poisoned = (torch.full(((numel + 1) // 2, 1), 0xAA, dtype=torch.uint8, device=KERNEL_DEVICE),
                torch.full((-(-numel // block),), float("nan"), device=KERNEL_DEVICE))
    got = bnb4_quantize(x.to(KERNEL_DEVICE), block, quant_type, nested=nested, out=poisoned)
    packed_ref, absmax_ref = bnb4_codec.quantize_4bit(x, block, quant_type)
    assert torch.equal(got[0].cpu(), packed_ref), "packed codes differ"
    if nested:  # the nested step is the codec's own code, run on the kernel's device
        ref_nested = bnb4_codec.quantize_nested_absmax(absmax_ref.to(KERNEL_DEVICE))
        assert torch.equal(got[1], ref_nested[0]) and torch.equal(got[2], ref_nested[1]) and torch.equal(got[3], ref_nested[2])
        assert torch.equal(bnb4_codec.dequantize_nested_absmax(*got[1:]).cpu(),
                           bnb4_codec.dequantize_nested_absmax(*ref_nested).cpu())
    else:
        assert torch.equal(got[1].cpu(), absmax_ref)


@pytest.mark.parametrize("block", [64, 256, 4096])
def test_every_tuned_quantize_tile_is_bit_exact(block):
    """On the GPU the quantizer's tile is autotuned (never under the interpreter or with
    COMFY_LOWBIT_AUTOTUNE=0), so each tile the pruning keeps runs here, pinned: masked and
    unmasked programs, bit-exact with the codec. The pruning keeps 2K-16K elements per
    program (one block when a block is larger) and at most 64 elements per thread."""
    from comfy_lowbit.kernels.bnb4_quantize import _prune_quantize, _quantize_configs

    kept = _prune_quantize(_quantize_configs(), {}, QBLOCK=block)
    assert kept
    for config in kept:
        elements = config.kwargs["BLOCKS_PER_PROGRAM"] * block
        assert (2048 <= elements <= 16384 and elements <= 64 * 32 * config.num_warps) or len(kept) == 1
    x = outlier_matrix(5, 3 * 4096 + 2 * block, seed=block).to(torch.bfloat16)  # not a multiple of any tile
    packed_ref, absmax_ref = bnb4_codec.quantize_4bit(x, block, "nf4")
    for per_program in sorted({c.kwargs["BLOCKS_PER_PROGRAM"] for c in kept}):
        for rows in (x, x[:4, :4096].contiguous()):  # masked tiles; then 16384 values: whole tiles (EVEN)
            ref = (packed_ref, absmax_ref) if rows is x else bnb4_codec.quantize_4bit(rows, block, "nf4")
            got = bnb4_quantize(rows.to(KERNEL_DEVICE), block, "nf4", blocks_per_program=per_program)
            assert torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[1].cpu(), ref[1]), per_program


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_midpoint_ties_bit_exact(quant_type):
    """Every midpoint between codebook values, and its float32 neighbours, as scaled values
    (a block whose absmax is 1.0 scales by exactly 1): ties take the lower code, as the codec."""
    from comfy_lowbit.kernels.bnb4_quantize import quantize_tables

    mids = torch.tensor(quantize_tables(quant_type)[0], dtype=torch.float32)
    probes = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
                        torch.tensor([1.0, -1.0, 0.0, -0.0])])
    x = torch.zeros(2 * BLOCK)
    x[:probes.numel()] = probes
    x[BLOCK:BLOCK + probes.numel()] = -probes.flip(0)
    got = bnb4_quantize(x.to(KERNEL_DEVICE), BLOCK, quant_type)
    packed_ref, absmax_ref = bnb4_codec.quantize_4bit(x, BLOCK, quant_type)
    assert torch.equal(got[0].cpu(), packed_ref) and torch.equal(got[1].cpu(), absmax_ref)


# ----------------------------------------------------------------------------- Hopper (Gluon)

from comfy_lowbit.kernels.sm90 import hopper_with_gluon  # noqa: E402
from sm90_support import assert_async_and_unspilled, bnb4_build, build_ptx, needs_gluon  # noqa: E402

SM90 = KERNEL_DEVICE == "cuda" and hopper_with_gluon(torch.device(KERNEL_DEVICE))


@needs_gluon
@pytest.mark.parametrize("double_quant,dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_sm90_w4a16_compiles_for_hopper(double_quant, dtype):
    """CI has no GPU: build the Gluon kernel for sm_90 from a launch's arguments and check
    ptxas kept the wgmma asynchronous and spilled nothing."""
    ptx = build_ptx(*bnb4_build(64, double_quant, dtype))
    assert ptx.count("wgmma.mma_async") >= 8 and "wgmma.wait_group.sync.aligned 1" in ptx
    assert_async_and_unspilled(ptx)


@pytest.mark.skipif(not SM90, reason="the Gluon kernel needs a Hopper GPU")
@pytest.mark.parametrize("m,n,k,block", [(300, 200, 1024, 64), (513, 136, 384, 128), (257, 37, 256, 256), (1, 128, 64, 64)])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False), ("nf4", False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sm90_w4a16_matches_reference(m, n, k, block, quant_type, double_quant, dtype):
    weight = make_weight(n, k, quant_type, double_quant, seed=m + n, block=block)
    x = outlier_matrix(m, k, seed=m * 3 + k).to(KERNEL_DEVICE, dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(KERNEL_DEVICE, dtype) if m % 2 else None
    check_linear(x, weight, bias, "fused_sm90", dtype)


@needs_gluon
def test_sm90_path_only_when_enabled_and_large(monkeypatch):
    """The dispatch rule on the CPU (the kernel is not run): opt-in, M >= 512, enough tiles."""
    from comfy_lowbit.kernels import bnb4_linear as lin
    from comfy_lowbit.kernels import sm90

    weight = make_weight(4096, 128, "nf4", False, seed=1)
    big, small = torch.zeros(4096, 128, dtype=torch.bfloat16), torch.zeros(256, 128, dtype=torch.bfloat16)
    monkeypatch.setattr(sm90, "hopper_with_gluon", lambda device: True)
    monkeypatch.setenv("COMFY_LOWBIT_EXPERIMENTAL", "1")
    assert lin._sm90_path(big, weight) == "fused_sm90"
    assert lin._sm90_path(small, weight) is None
    assert lin._sm90_path(big.float(), weight) is None  # fp32 activations: no bf16/fp16 MMA operand
    monkeypatch.setenv("COMFY_LOWBIT_EXPERIMENTAL", "0")  # measured slower than dequantize + cuBLAS
    assert lin._sm90_path(big, weight) is None
