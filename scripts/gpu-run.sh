#!/usr/bin/env bash
# Runs on the GPU machine (see gpu-build.sh): the CUDA tests (`tests`: one process; `tests-each`: a
# process per test), the standalone kernel checks, the
# Python package's tests (its wheel installed into a virtualenv that sees the system's torch)
# and/or the benchmark (or `qbench`: moerunner quantize-bench), logs under $OUT (or ./gpu-out). NVRTC and cuBLASLt come from /usr/local/cuda.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# NCCL for the NCCL tests: the machine's torch environment ships it (nvidia/nccl/lib)
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)
[ -n "$nccl_lib" ] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$nccl_lib"
export MOERUNNER_KERNEL_CACHE=${MOERUNNER_KERNEL_CACHE:-/tmp/moerunner-kernels}
export PYTHONUNBUFFERED=1
# On this machine a GPU test that skips (no GPU, no NVRTC) fails instead (tests/cuda.rs, skip).
export MOERUNNER_REQUIRE_GPU=1
export MOERUNNER_REQUIRE_NVRTC=1
what=${1:-all}
shift || true
status=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$out/gpu.txt"
if [[ $what == checks || $what == all ]]; then
    for s in scripts/gpu/check_*.py; do
        timeout 300 python3 "$s" > "$out/$(basename "$s" .py).log" 2>&1 || status=1
        echo "== $s: $(tail -n 25 "$out/$(basename "$s" .py).log")"
    done
fi
if [[ $what == tests-each ]]; then
    # Every gpu_ test in a process of its own (a crash or hang names its test; ~3 minutes on an H100),
    # one line per test in $out/summary.txt, the logs in $out/test-logs.tgz.
    for t in $(gpu-bin/cuda-tests --list 2>/dev/null | grep -E '^gpu_.*: test$' | sed 's/: test$//'); do
        t0=$(date +%s)
        timeout 200 gpu-bin/cuda-tests --test-threads=1 --exact "$t" --nocapture > "$out/t-$t.log" 2>&1
        rc=$?
        echo "$t rc=$rc $(( $(date +%s) - t0 )) s" | tee -a "$out/summary.txt"
        [ $rc -ne 0 ] && { status=1; grep -A3 panicked "$out/t-$t.log" | head -6; }
    done
    tar czf "$out/test-logs.tgz" -C "$out" $(cd "$out" && ls t-*.log) && rm -f "$out"/t-*.log
fi
if [[ $what == tests || $what == all ]]; then
    timeout 500 gpu-bin/cuda-tests --test-threads=1 --nocapture > "$out/cuda-tests.log" 2>&1 || status=1
    grep -E "^test |FAIL|panicked|test result" "$out/cuda-tests.log" | tail -n 30
fi
if [[ $what == python || $what == all ]]; then
    # The GPU machine's python3 is itself a virtualenv holding torch (a venv made from it with
    # --system-site-packages would see the base interpreter's packages, not torch): install the wheel
    # into a folder of its own on PYTHONPATH instead.
    pydir=/tmp/moerunner-py
    python3 -m pip install --quiet --no-deps --upgrade --target "$pydir" gpu-bin/moerunner-*.whl
    python3 -c 'import pytest' 2>/dev/null \
        || python3 -m pip install --quiet --no-index --find-links gpu-bin/pywheels --target "$pydir" pytest
    PYTHONPATH="$pydir" MOERUNNER_BIN=gpu-bin/moerunner timeout 500 python3 -m pytest -q -rs -p no:cacheprovider \
        crates/moerunner-py/tests > "$out/python-tests.log" 2>&1 || status=1
    tail -n 30 "$out/python-tests.log"
fi
if [[ $what == bench || $what == all ]]; then
    timeout 500 gpu-bin/moerunner bench --backend cuda --json "$out/bench.json" "$@" > "$out/bench.log" 2>&1 || status=1
    tail -n 40 "$out/bench.log"
fi
exit $status
