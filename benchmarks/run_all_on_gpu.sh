#!/usr/bin/env bash
# Every GPU check and benchmark of the package, for a lent GPU machine:
#   bash benchmarks/run_all_on_gpu.sh OUT_DIR [PEERS_TARBALL]
# Runs from the repository root. PEERS_TARBALL (bitsandbytes + comfy-kitchen for the machine's
# Python, ../shared/tools/peer-wheels.sh builds it) is unpacked to /tmp/site. Writes one file
# per step into OUT_DIR; a failing step is recorded and the next one still runs. About 25
# minutes on an H100 in all; the device tool allows 10 minutes per call and every step's
# timeout is at most 9.5 minutes, so run one or two steps per call, e.g. STEPS="env tests" and
# STEPS="tests2" (the GPU test suite's two halves; whole it ran past 9.5 min), STEPS="int8", STEPS="bnb4", STEPS="bnb4small w4a4", STEPS="bnb4mma",
# STEPS="w4a4small block", STEPS="sm90plans host", STEPS="experimental diag", STEPS="ncu"; STEPS="pytest" with
# TESTS="tests/test_x.py ..." re-runs chosen tests.
set -u
out=${1:?usage: run_all_on_gpu.sh OUT_DIR [PEERS_TARBALL]}
peers=${2:-.peers/site.tar.xz}
mkdir -p "$out" /tmp/pp
if [ -f "$peers" ]; then tar xJf "$peers" -C /tmp; else echo "no $peers: bitsandbytes/comfy-kitchen peers missing"; fi
ln -sfn "$PWD" /tmp/pp/comfy_lowbit
export PYTHONPATH=/tmp/pp:/tmp/site PYTHONUNBUFFERED=1 OUT="$out"
steps=${STEPS:-"env tests tests2 experimental diag int8 bnb4 bnb4small bnb4mma ncu sm90plans w4a4 w4a4small block block_experimental host"}

step() {  # name, timeout seconds, command...
    local name=$1 limit=$2
    shift 2
    case " $steps " in *" $name "*) ;; *) return ;; esac
    echo "== $name: $*" | tee "$out/$name.txt"
    timeout "$limit" "$@" >>"$out/$name.txt" 2>&1
    echo "== $name exit $?" | tee -a "$out/$name.txt"
}

step env 60 bash -c 'nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"'
# The GPU suite in two halves, one device call each: whole, it outgrew one call's 10 minutes in
# session 6 (929 of 1011 tests in 560 s). tests: the NF4/FP4, int8 and converter files;
# tests2: the layouts, nodes and W4A4.
first_half=$(ls tests/test_[a-k]*.py)
second_half=$(ls tests/test_[l-z]*.py)
step tests 560 env COMFY_LOWBIT_AUTOTUNE=0 python3 -m pytest -v -rf --tb=short --durations=15 -p no:cacheprovider $first_half
step tests2 560 env COMFY_LOWBIT_AUTOTUNE=0 python3 -m pytest -v -rf --tb=short --durations=15 -p no:cacheprovider $second_half
# Chosen tests only (TESTS="tests/test_x.py::test_y ..."), e.g. to re-check fixes
step pytest 300 env COMFY_LOWBIT_AUTOTUNE=0 python3 -m pytest -v -rf --tb=short -p no:cacheprovider ${TESTS:-tests}
# The layouts' dispatch with the opt-in kernels switched on (kernels/experimental.py; the
# kernel tests above already call those kernels directly).
step experimental 300 env COMFY_LOWBIT_EXPERIMENTAL=1 COMFY_LOWBIT_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider \
    tests/test_layout_contract.py tests/test_bnb4_layout.py tests/test_int8_lodewise.py tests/test_w4a4_layout.py \
    tests/test_bnb4_kernels.py tests/test_w4a4_gemv.py
# Which feature of the Hopper block-scaled GEMM faults, if one does (one process per case)
step diag 120 python3 benchmarks/diag_sm90.py
step int8 420 python3 benchmarks/bench_int8.py --variants 4096
step bnb4 420 python3 benchmarks/bench_bnb4.py
# The v5 register-LUT GEMV against v4 at 1-8 rows, with double-quantised absmax (the case)
step bnb4small 240 python3 benchmarks/bench_bnb4.py --out "$out/bnb4small" --ms 1,2,4,8 \
    --double-quant --paths gemv,gemv_lut --no-quantize
# The NF4 skinny tensor-core kernel: every tile and K split in CUDA graphs, then 1-32 rows against
# the GEMV and dequantize + cuBLAS (what its tile rule and the dispatch's row range rest on)
step bnb4mma 300 bash -c 'python3 benchmarks/bench_bnb4.py --out "$OUT/bnb4mma_tiles" --ms 1,4,16,32 --double-quant --mma-tiles \
    && python3 benchmarks/bench_bnb4.py --out "$OUT/bnb4mma" --ms 1,2,4,8,16,32 --double-quant --paths gemv_lut,mma,dequant_cublas --no-quantize'
# Nsight Compute on the skinny NF4 kernels (one launch each): warp stall reasons, per SASS line
step ncu 300 bash -c 'ncu --clock-control none --profile-from-start off --set full --import-source no \
    -f -o "$OUT/nf4-skinny" python3 benchmarks/profile_ncu.py ${NCU_CASES:+--cases $NCU_CASES} \
    && ncu -i "$OUT/nf4-skinny.ncu-rep" --page details --csv > "$OUT/nf4-skinny-details.csv" \
    && ncu -i "$OUT/nf4-skinny.ncu-rep" --page source --print-source sass --csv > "$OUT/nf4-skinny-sass.csv"'
# The block-scaled Hopper GEMM's warp plans (in step, producer warp, split warpgroups) side by side
step sm90plans 300 python3 benchmarks/bench_sm90_plans.py --ms 1024,4096 --stages 4,6
step w4a4 300 python3 benchmarks/bench_w4a4.py
step w4a4small 240 bash -c 'python3 benchmarks/bench_w4a4.py --small-m && python3 benchmarks/bench_w4a4.py --quant --batches 4096'
step block 240 python3 benchmarks/bench_block.py
# Host (CPU) time per launch of our GPU kernels, and where it goes
step host 120 python3 benchmarks/profile_host.py
# The FLUX block again with the not-yet-measured kernels switched on: what they change end to end
step block_experimental 240 env COMFY_LOWBIT_EXPERIMENTAL=1 python3 benchmarks/bench_block.py
