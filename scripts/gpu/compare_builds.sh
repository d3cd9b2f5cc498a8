#!/usr/bin/env bash
# Runs on the GPU machine: two builds of the CLI on the same layer and input files, their outputs
# compared bit for bit (compare_outputs.py --exact). For a change that must not move any kernel's
# result (e.g. a restructuring). Layers and inputs are made once, by the NEW build.
#
#   scripts/gpu/compare_builds.sh OLD_BIN NEW_BIN "PRESET:FORMAT ..." "T ..." [make-layer args...]
#
# Logs and a summary under $OUT (or ./gpu-out); exit status 1 if any pair differs or fails.
set -uo pipefail
old=$1 new=$2 cases=$3 tokens=$4
shift 4
out=${OUT:-gpu-out}
work=${WORK:-/tmp/compare-builds}
mkdir -p "$out" "$work"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export MOERUNNER_KERNEL_CACHE=${MOERUNNER_KERNEL_CACHE:-/tmp/moerunner-kernels}
here=$(cd "$(dirname "$0")" && pwd)
status=0
summary="$out/compare-builds.txt"
for case in $cases; do
    preset=${case%%:*} format=${case##*:}
    layer="$work/$preset-$format.safetensors"
    "$new" make-layer --preset "$preset" --weight-format "$format" --seed 11 --out "$layer" "$@" \
        > "$out/make-$preset-$format.log" 2>&1 || { echo "$case: make-layer failed" | tee -a "$summary"; status=1; continue; }
    for t in $tokens; do
        input="$work/in-$preset-$format-$t.safetensors"
        "$new" make-input --layer "$layer" --tokens "$t" --routing logits --dtype bf16 --seed $((t + 3)) --out "$input" \
            > /dev/null 2>&1 || { echo "$case T=$t: make-input failed" | tee -a "$summary"; status=1; continue; }
        for build in old new; do
            bin=$old; [[ $build == new ]] && bin=$new
            "$bin" run --backend cuda --layer "$layer" --input "$input" --save-routing \
                --output "$work/out-$build-$preset-$format-$t.safetensors" > "$out/run-$build-$preset-$format-$t.log" 2>&1 \
                || { echo "$case T=$t: $build run failed: $(tail -n 2 "$out/run-$build-$preset-$format-$t.log")" | tee -a "$summary"; status=1; }
        done
        python3 "$here/compare_outputs.py" --exact "$work/out-old-$preset-$format-$t.safetensors" \
            "$work/out-new-$preset-$format-$t.safetensors" 2>&1 | sed "s|$work/||g" | tee -a "$summary"
        [[ ${PIPESTATUS[0]} == 0 ]] || status=1
        rm -f "$work"/out-*-"$preset-$format-$t".safetensors "$input"
    done
    rm -f "$layer"
done
exit $status
