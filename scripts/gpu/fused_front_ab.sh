#!/usr/bin/env bash
# Runs on the GPU machine (gpu-bin carried, scripts/gpu-build.sh): what turning the fused front on
# needs (docs/cuda.md, "The fused front").
#   1. gpu_fused_front_equals_the_three_launches: the front bit for bit against the three launches;
#   2. `bench` with MOERUNNER_FUSED_FRONT=0 (the three launches) and =64 (the front up to 64 tokens),
#      interleaved off / on / off / on on one binary, the first of each with --stage-times;
# logs and JSON packed into $OUT/front.tgz (the device tool brings back few files).
#
#   scripts/gpu/fused_front_ab.sh [bench args...]   (default: qwen3-30b-a3b and gpt-oss-120b, six weight formats, T = 1, 4, 16, 64)
set -uo pipefail
out=${OUT:-gpu-out}
work=$(mktemp -d)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export MOERUNNER_KERNEL_CACHE=${MOERUNNER_KERNEL_CACHE:-/tmp/moerunner-kernels}
export MOERUNNER_REQUIRE_GPU=1
status=0
timeout 300 gpu-bin/cuda-tests --test-threads=1 --exact gpu_fused_front_equals_the_three_launches --nocapture \
    > "$work/test-front.log" 2>&1 || status=1
tail -n 3 "$work/test-front.log"
args=("$@")
if [[ ${#args[@]} == 0 ]]; then
    args=(--preset qwen3-30b-a3b,gpt-oss-120b --weight-format bf16,fp8,fp8_block,mxfp8,mxfp4,nvfp4 --tokens 1,4,16,64)
fi
for round in 1 2; do
    for front in 0 64; do
        extra=()
        [[ $round == 1 ]] && extra=(--stage-times)
        MOERUNNER_FUSED_FRONT=$front timeout 200 gpu-bin/moerunner bench --backend cuda "${args[@]}" "${extra[@]}" \
            --json "$work/bench-front$front-$round.json" > "$work/bench-front$front-$round.log" 2>&1 || status=1
        echo "front=$front round $round: $(tail -n 1 "$work/bench-front$front-$round.log")"
    done
done
python3 scripts/bench-ab.py --a "$work"/bench-front0-*.json --b "$work"/bench-front64-*.json \
    --labels "three launches" "fused front" | tee "$work/ab.md"
tar -czf "$out/front.tgz" -C "$work" .
exit $status
