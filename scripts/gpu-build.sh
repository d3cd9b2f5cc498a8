#!/usr/bin/env bash
# Builds, on this machine, everything the GPU machine runs (it has no Rust toolchain): the CUDA test
# binary, the release CLI and the Python package's wheel, copied into gpu-bin/ (git-ignored). Then run on the GPU machine,
# from the repository root, with gpu-bin carried:
#     scripts/gpu-run.sh [tests|tests-each|checks|python|bench|qbench|all] [bench or quantize-bench args...]
# Binaries are stripped of debug information (what travels to the GPU machine is size-limited).
# An optional argument names another output folder (e.g. to carry two builds side by side).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-gpu-bin}
mkdir -p "$bin"
cargo build --release -p moerunner-cli
cp target/release/moerunner "$bin/moerunner"
# Test binaries that run on the GPU machine: the CUDA tests, the parallel tests (GPU transports), and the overflow-rule and fuzz tests
# (run there with MOERUNNER_TEST_BACKENDS / MOERUNNER_FUZZ_BACKEND=cuda and MOERUNNER_BIN).
test_exe() {  # package, test target
    cargo test --release -p "$1" --features moerunner/cuda --test "$2" --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$2"
}
cp "$(test_exe moerunner cuda)" "$bin/cuda-tests"
cp "$(test_exe moerunner overflow)" "$bin/overflow-tests"
cp "$(test_exe moerunner parallel)" "$bin/parallel-tests"
cp "$(test_exe moerunner-cli fuzz)" "$bin/fuzz-tests"
strip --strip-debug "$bin/moerunner" "$bin"/*-tests
# The Python package's wheel (abi3: any CPython >= 3.10 there), built as a user's pip would.
rm -f "$bin"/moerunner-*.whl
MATURIN_PEP517_ARGS="--strip" python3 -m pip wheel --quiet --no-deps --wheel-dir "$bin" ./crates/moerunner-py
# pytest for the GPU machine, which reaches no registry (pure-Python wheels).
python3 -m pip download --quiet --only-binary=:all: --dest "$bin/pywheels" pytest
ls -la "$bin"
