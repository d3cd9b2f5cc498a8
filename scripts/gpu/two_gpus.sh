#!/usr/bin/env bash
# Issue "Two GPUs, measured", on a machine with two GPUs (nvidia-h100-x2 / nvidia-h200-x2), from the
# repository root with gpu-bin/ carried (scripts/gpu-build.sh). Logs and JSON under $OUT (or ./gpu-out).
#   1. the two-rank NCCL test against two thread ranks on one GPU, bit for bit, and the reference
#   2. bench, one GPU and the whole layer over two GPUs through NCCL, in the same call:
#      deepseek-v3 fp8_block and mxfp8, qwen3-30b-a3b bf16; EP 2 (all-to-all) and TP 2
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0). The third item of the issue — kill one rank's
# process mid-run — does not apply as written: ranks are threads of one process (docs/parallel.md,
# "Process model"); a failing rank stops the others within --comm-timeout-s (tests/parallel.rs).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-gpu-out}; mkdir -p "$out"
nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${nccl:+:$nccl}
export MOERUNNER_KERNEL_CACHE=/tmp/moerunner-kernels MOERUNNER_REQUIRE_GPU=1 MOERUNNER_REQUIRE_TWO_GPUS=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader | tee "$out/gpus.txt"
timeout 300 gpu-bin/cuda-tests --test-threads=1 --nocapture gpu_two_nccl gpu_nccl > "$out/two-gpu-tests.log" 2>&1
echo "tests rc=$?"; grep -E "^test |err|panicked" "$out/two-gpu-tests.log" | tail -20
T=1,16,128,1024,8192
b() { local name=$1; shift; timeout 240 gpu-bin/moerunner bench --backend cuda --tokens $T --json "$out/bench-$name.json" "$@" > "$out/bench-$name.log" 2>&1; echo "bench $name rc=$?"; grep -E "^(deep|qwen)| ranks: |ceil" "$out/bench-$name.log" | cut -c1-150; }
b one-gpu --preset deepseek-v3,qwen3-30b-a3b --weight-format fp8_block,mxfp8,bf16
b ep2 --preset deepseek-v3,qwen3-30b-a3b --weight-format fp8_block,mxfp8,bf16 --ep-size 2 --comm nccl
b tp2 --preset deepseek-v3,qwen3-30b-a3b --weight-format fp8_block,mxfp8,bf16 --tp-size 2 --comm nccl
