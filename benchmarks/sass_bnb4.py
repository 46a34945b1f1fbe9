"""Offline SASS report for the NF4/FP4 kernels and the int8 GEMV: compile for sm_90 without a GPU.

Why: the v5 kernels were designed and predicted from their SASS before any GPU run
(``benchmarks/NOTES.md``, NF4 v5); this script reproduces those counts. For each kernel
variant it compiles with the installed Triton for ``GPUTarget("cuda", 90, 32)``, disassembles
the cubin with the ``nvdisasm`` Triton ships, and prints registers / stack / shared memory and,
for the main loop (the body of the backward branch), its instruction count and the counts of
LDG by width, BAR.SYNC, PRMT, HADD2 (f16 -> f32 widening), FP32 math and LDL/STL (spills).

    PYTHONPATH=/path/to/triton-3.6:$PYTHONPATH python benchmarks/sass_bnb4.py

Integer kernel arguments that are multiples of 16 at run time (pointers, K/2, strides) are
declared so, as Triton's launcher specialises them.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget

from comfy_lowbit.kernels import bnb4_linear as lin
from comfy_lowbit.kernels import bnb4_quantize as qz

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_sass(jit, signature: dict, constexprs: dict, multiple_of_16: list[str], num_warps: int,
                 num_stages: int = 3, maxnreg: int | None = None) -> tuple[str, str]:
    names = list(inspect.signature(jit.fn).parameters)
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in multiple_of_16}
    src = triton.compiler.ASTSource(jit, sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                                    attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {})))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([os.path.join(TOOLS, "nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
        usage = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True).stdout
    return sass, " ".join(re.findall(r"(REG:\d+|STACK:\d+|SHARED:\d+|LOCAL:\d+)", usage))


def loop_counts(sass: str) -> str:
    """Counts over the largest loop body (from a label to the branch back to it), or over the
    whole kernel when it has no loop (the quantize)."""
    labels, ops = {}, []
    for line in sass.splitlines():
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ops)
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            ops.append((m.group(2), line))
    best: list[str] = []
    for i, (op, line) in enumerate(ops):
        target = re.search(r"(\.L_x_\d+)", line) if op.startswith("BRA") else None
        if target and labels.get(target.group(1), i + 1) <= i:
            body = [o for o, _ in ops[labels[target.group(1)]:i + 1]]
            best = max(best, body, key=len)
    what = "loop"
    if len(best) < 8:  # only the trailing self-branch
        best, what = [o for o, _ in ops], "no loop, kernel"
    base = Counter(o.split(".")[0] for o in best)
    loads = Counter(o for o in best if o.startswith(("LDG", "STG")))
    return (f"{what} {len(best)} instr: {dict(loads)} FSETP {base['FSETP']} FSEL {base['FSEL']} "
            f"BAR {base['BAR']} PRMT {base['PRMT']} HADD2 {base['HADD2']} "
            f"FP32 {base['FFMA'] + base['FMUL'] + base['FADD']} LOP3 {base['LOP3']} SHF {base['SHF']} "
            f"IMAD {base['IMAD']} LDL/STL {base['LDL'] + base['STL']}")


GEMV_SIG = dict(xp_ptr="*i32", packed_ptr="*u8", absmax_ptr="*u8", nested_ptr="*fp32", offset_ptr="*fp32",
                dyn_ptr="*fp32", code_ptr="*fp32", words_ptr="*i32", bias_ptr="*bf16", out_ptr="*bf16", M="i32",
                N="i32", ROW_BYTES="i32", BLOCKS_PER_ROW="i32", stride_xpm="i32", stride_om="i32")
GEMV_16 = ["xp_ptr", "packed_ptr", "absmax_ptr", "out_ptr", "ROW_BYTES", "BLOCKS_PER_ROW", "stride_xpm"]
V4_SIG = dict(xp_ptr="*i32", packed_ptr="*u8", absmax_ptr="*fp32", nested_ptr="*fp32", offset_ptr="*fp32",
              dyn_ptr="*fp32", code_ptr="*fp32", pair_ptr="*i64", bias_ptr="*bf16", out_ptr="*bf16", N="i32", K="i32",
              stride_xpm="i32", stride_om="i32")
QUANT_SIG = dict(xp_ptr="*i32", packed_ptr="*u8", absmax_ptr="*fp32", numel="i32", num_blocks="i32", size_class="i32",
                 tiny="fp32",
                 **{f"t{i}": "fp32" for i in range(15)})


def variants():
    """(name, jit, signature, constexprs, multiple-of-16 args, num_warps): bf16 x, NF4, block 64."""
    for rows in (1, 2, 4):
        for bn, kb, warps in lin._GEMV_LUT_TILES:
            for prefetch in (False, True):
                yield (f"gemv_lut rows={rows} BLOCK_N={bn} KB={kb} warps={warps}{' PREFETCH' if prefetch else ''} "
                       "(double quant)", lin._bnb4_gemv_lut_kernel, GEMV_SIG,
                       dict(QBLOCK=64, ROWS=rows, BLOCK_N=bn, KB=kb, X_KIND=0, HAS_BIAS=False, DOUBLE_QUANT=True,
                            LUT=1, EVEN=True, PREFETCH=prefetch), GEMV_16, warps)
    yield ("gemv v4 BLOCK_N=16 CHUNKS=2 PAIR PREFETCH (fp32 absmax)", lin._bnb4_gemv_kernel,
           V4_SIG, dict(QBLOCK=64, SUB=64, CHUNKS=2, BLOCK_N=16, X_KIND=0, HAS_BIAS=False, DOUBLE_QUANT=False,
                        PAIR=True, PREFETCH=True), ["xp_ptr", "packed_ptr", "absmax_ptr", "out_ptr", "K", "stride_xpm"], 4)
    for order, name in ((0, "nf4"), (qz.quantize_tables("fp4")[1], "fp4")):
        yield (f"quantize {name} 64 blocks/program (unmasked)", qz._bnb4_quantize_kernel, QUANT_SIG,
               dict(QBLOCK=64, BLOCKS_PER_PROGRAM=64, ORDER=order, X_KIND=0, EVEN=True),
               ["xp_ptr", "packed_ptr", "absmax_ptr", "numel"], 4)


MMA_SIG = dict(x_ptr="*bf16", packed_ptr="*u8", absmax_ptr="*u8", nested_ptr="*fp32", offset_ptr="*fp32",
               dyn_ptr="*fp32", code_ptr="*fp32", words_ptr="*i32", bias_ptr="*bf16", out_ptr="*bf16",
               part_ptr="*fp32", count_ptr="*i32", M="i32", N="i32", K="i32", stride_xm="i32", stride_om="i32")
INT8_GEMV_SIG = dict(x_ptr="*bf16", w_ptr="*i8", w_scale_ptr="*fp32", bias_ptr="*bf16", out_ptr="*bf16", N="i32",
                     K="i32", stride_wn="i32", stride_wsn="i32", stride_wsk="i32")


def session5_variants():
    """(name, jit, signature, constexprs, multiple-of-16 args, num_warps, elements per thread
    and loop trip, maxnreg): the NF4 skinny tensor-core kernel and the int8 M=1 GEMV (NOTES.md,
    NF4 v7 and int8 version 5), both compiled with num_stages=1 as they are launched."""
    from comfy_lowbit.kernels import bnb4_mma, int8_gemv

    for tile in bnb4_mma.MMA_TILES_SWEEP:
        bn, step, warps = tile["BLOCK_N"], tile["STEP_BLOCKS"], tile["num_warps"]
        consts = dict(QBLOCK=64, BLOCK_N=bn, BLOCK_M=16, STEP_BLOCKS=step, SPLIT=4, HAS_BIAS=False,
                      DOUBLE_QUANT=True, LUT=1, DOT_FP32=False, PREFETCH=tile.get("PREFETCH", False),
                      AHEAD=tile.get("AHEAD", False))
        yield (f"mma {bnb4_mma.tile_name(tile)} (bf16 x, 16 rows, double quant)", bnb4_mma.bnb4_mma_kernel, MMA_SIG,
               consts, ["x_ptr", "packed_ptr", "out_ptr", "K", "stride_xm"], warps, bn * 64 * step // (32 * warps),
               tile.get("maxnreg"))
    for bn, step, warps in int8_gemv.GEMV_TILES:
        consts = dict(HAS_BIAS=False, QBLOCK=128, SPLIT=1, BLOCK_N=bn, STEP_BLOCKS=step, EVEN=True)
        yield (f"int8 gemv {bn}x{step}x{warps} (bf16 x, block 128, EVEN)", int8_gemv._gemv_kernel, INT8_GEMV_SIG,
               consts, ["x_ptr", "w_ptr", "w_scale_ptr", "out_ptr", "K", "stride_wn"], warps,
               bn * 128 * step // (32 * warps), None)


def main() -> int:
    print(f"triton {triton.__version__}, target sm_90")
    for name, jit, sig, consts, div16, warps in variants():
        sass, usage = compile_sass(jit, sig, consts, div16, warps)
        print(f"{name}: {usage}; {loop_counts(sass)}")
    for name, jit, sig, consts, div16, warps, per_thread, maxnreg in session5_variants():
        sass, usage = compile_sass(jit, sig, consts, div16, warps, num_stages=1, maxnreg=maxnreg)
        counts = loop_counts(sass)
        per_element = int(counts.split()[1]) / per_thread
        print(f"{name}: {usage}; {per_element:.2f} instructions per weight element; {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
