#!/usr/bin/env bash
# Issue "Two GPUs, measured", on a machine with two GPUs (nvidia-h100-x2 / nvidia-h200-x2), from the
# repository root with gpu-bin/ carried (scripts/gpu-build.sh). Logs and JSON under $OUT (or ./gpu-out).
#   1. the two-rank NCCL test against two thread ranks on one GPU, bit for bit, and the reference
#   2. bench, one GPU and the whole layer over two GPUs through NCCL, in the same call:
#      deepseek-v3 fp8_block and mxfp8, qwen3-30b-a3b bf16; EP 2 (all-to-all on the host, and on the
#      device: --ep-mode device-all-to-all) and TP 2
#   3. kill one rank's process mid-run: gpu_a_killed_nccl_process_rank_stops_its_peer (this test's
#      rank 0 on GPU 0, `moerunner run --comm nccl-process` as rank 1 on GPU 1, killed once their
#      NCCL group is up: rank 0 must stop within 10 s naming rank 1), and `run --comm nccl-process`
#      against `run --comm nccl`, bit for bit (docs/parallel.md, "Process ranks")
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-gpu-out}; mkdir -p "$out"
nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${nccl:+:$nccl}
export MOERUNNER_KERNEL_CACHE=/tmp/moerunner-kernels MOERUNNER_REQUIRE_GPU=1 MOERUNNER_REQUIRE_TWO_GPUS=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader | tee "$out/gpus.txt"
timeout 300 gpu-bin/cuda-tests --test-threads=1 --nocapture gpu_two_nccl gpu_nccl gpu_device_all_to_all > "$out/two-gpu-tests.log" 2>&1
echo "tests rc=$?"; grep -E "^test |err|panicked" "$out/two-gpu-tests.log" | tail -20
# last and alone: it leaves a killed peer's NCCL group behind in its process
MOERUNNER_BIN=gpu-bin/moerunner timeout 180 gpu-bin/cuda-tests --test-threads=1 --nocapture --exact \
  gpu_a_killed_nccl_process_rank_stops_its_peer > "$out/killed-rank.log" 2>&1
echo "killed-rank test rc=$?"; grep -E "^test |stopped after|panicked" "$out/killed-rank.log"
gpu-bin/moerunner make-layer --preset qwen3-30b-a3b --weight-format fp8_block --out /tmp/q.safetensors > /dev/null
gpu-bin/moerunner make-input --layer /tmp/q.safetensors --tokens 1024 --out /tmp/q-in.safetensors > /dev/null
for comm in nccl nccl-process; do
  timeout 120 gpu-bin/moerunner run --layer /tmp/q.safetensors --input /tmp/q-in.safetensors \
    --output /tmp/q-$comm.safetensors --backend cuda --ep 2 --comm $comm 2>&1 | tail -2
done
cmp /tmp/q-nccl.safetensors /tmp/q-nccl-process.safetensors && echo "nccl-process output = nccl output"
T=1,16,128,1024,8192
b() { local name=$1; shift; timeout 240 gpu-bin/moerunner bench --backend cuda --tokens $T --json "$out/bench-$name.json" "$@" > "$out/bench-$name.log" 2>&1; echo "bench $name rc=$?"; grep -E "^(deep|qwen)| ranks: |ceil" "$out/bench-$name.log" | cut -c1-150; }
b one-gpu --preset deepseek-v3,qwen3-30b-a3b --weight-format fp8_block,mxfp8,bf16
b ep2 --preset deepseek-v3,qwen3-30b-a3b --weight-format fp8_block,mxfp8,bf16 --ep-size 2 --comm nccl
b ep2-device --preset deepseek-v3,qwen3-30b-a3b --weight-format fp8_block,mxfp8,bf16 --ep-size 2 --comm nccl --ep-mode device-all-to-all
b tp2 --preset deepseek-v3,qwen3-30b-a3b --weight-format fp8_block,mxfp8,bf16 --tp-size 2 --comm nccl
