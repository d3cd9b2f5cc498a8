#!/usr/bin/env bash
# Runs on the GPU machine (gpu-bin carried, scripts/gpu-build.sh): the GPU checks of what landed
# without a GPU, each test in its own process with its own limit, so a hang or a failure in one
# does not hide the others. Written 2026-12-08; remove a line once its check has passed on a GPU
# and its result is committed.
#   tests  gpu_fused_front_equals_the_three_launches   (front.cu; off by default until it passes)
#          gpu_device_all_to_all_meets_the_reference   (ep.cu, parallel/device_ep.rs)
#          gpu_device_resident_ranks_equal_host_tensor_ranks (forward_rank_device, routing on the device)
#          gpu_stage_times_cover_the_standard_pipeline (bench --stage-times)
#          gpu_workspace_bytes_are_what_reserve_allocates (CudaLayer::workspace_bytes)
#          check --comm device --ep-mode device-all-to-all, 200 seeded cases
#          (and `scripts/gpu-run.sh python`: test_workspace_bytes_are_known_before_they_are_allocated)
#   bench  device all-to-all on one GPU (two ranks sharing it: a check that it runs and what its
#          steps cost, not a speed-up) beside the host all-to-all and the unsplit layer, qwen3-30b-a3b
#          bf16 and fp8_block, T = 1, 128, 1024
# then scripts/gpu/fused_front_ab.sh for the fused front's A/B. Logs packed into $OUT/pending.tgz.
#
#   scripts/gpu/pending.sh [tests|bench|all]
set -uo pipefail
what=${1:-all}
out=${OUT:-gpu-out}
work=$(mktemp -d)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export MOERUNNER_KERNEL_CACHE=${MOERUNNER_KERNEL_CACHE:-/tmp/moerunner-kernels}
export MOERUNNER_REQUIRE_GPU=1 NCCL_NVLS_ENABLE=0
status=0
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader | tee "$work/gpus.txt"
if [[ $what == tests || $what == all ]]; then
    for t in gpu_fused_front_equals_the_three_launches gpu_device_all_to_all_meets_the_reference \
             gpu_stage_times_cover_the_standard_pipeline gpu_workspace_bytes_are_what_reserve_allocates \
             gpu_device_resident_ranks_equal_host_tensor_ranks; do
        start=$(date +%s)
        timeout 240 gpu-bin/cuda-tests --test-threads=1 --exact "$t" --nocapture > "$work/t-$t.log" 2>&1
        rc=$?
        [[ $rc == 0 ]] || status=1
        echo "$t rc=$rc $(( $(date +%s) - start )) s: $(grep -E '^test result|panicked' "$work/t-$t.log" | head -n 2 | tr '\n' ' ')"
    done
    # the seeded matrix through device all-to-all (every case without TP; unsplit ones as one rank)
    timeout 240 gpu-bin/moerunner check --backend cuda --comm device --ep-mode device-all-to-all --cases 200 \
        > "$work/check-device-a2a.log" 2>&1 || status=1
    echo "check device-all-to-all: $(tail -n 1 "$work/check-device-a2a.log")"
fi
if [[ $what == bench || $what == all ]]; then
    b() {
        local name=$1; shift
        timeout 200 gpu-bin/moerunner bench --backend cuda --preset qwen3-30b-a3b --weight-format bf16,fp8_block \
            --tokens 1,128,1024 --json "$work/bench-$name.json" "$@" > "$work/bench-$name.log" 2>&1 || status=1
        echo "bench $name: $(tail -n 1 "$work/bench-$name.log")"
    }
    b one-gpu
    b ep2-host-a2a --ep-size 2 --comm device
    b ep2-device-a2a --ep-size 2 --comm device --ep-mode device-all-to-all
    python3 scripts/bench-ab.py --a "$work/bench-ep2-host-a2a.json" --b "$work/bench-ep2-device-a2a.json" \
        --labels "host all-to-all" "device all-to-all" | tee "$work/ab-ep2.md"
fi
tar -czf "$out/pending.tgz" -C "$work" .
exit $status
