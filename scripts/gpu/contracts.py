"""The CUDA kernels' contracts as the Rust side declares them (`moerunner info --kernels-json`):
every `.cu` entry with its parameters (names and C types, in order) and every compiled form of the
GEMM the backend may load. The kernel checks call kernels through `Kernel`, by parameter name, so a
signature lives only in the Rust launcher (crates/moerunner/src/backend/cuda/kernels/<stem>.rs) and
the `.cu` (checked against each other by tests/kernel_contracts.rs).

The JSON comes from MOERUNNER_KERNELS_JSON (a file), else from running MOERUNNER_BIN (default: the
first of gpu-bin/moerunner and target/release/moerunner that exists) with `info --kernels-json`."""
import functools
import json
import os
import subprocess

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@functools.lru_cache(maxsize=1)
def load():
    path = os.environ.get("MOERUNNER_KERNELS_JSON")
    if path:
        with open(path) as f:
            return json.load(f)
    candidates = [os.environ.get("MOERUNNER_BIN", ""), os.path.join(ROOT, "gpu-bin", "moerunner"),
                  os.path.join(ROOT, "target", "release", "moerunner")]
    for exe in filter(None, candidates):
        if os.path.exists(exe):
            return json.loads(subprocess.check_output([exe, "info", "--kernels-json"]))
    raise RuntimeError("no moerunner binary for the kernel contracts: set MOERUNNER_BIN or "
                       "MOERUNNER_KERNELS_JSON (scripts/gpu-build.sh makes gpu-bin/moerunner)")


def signature(entry):
    """[(name, C type)] of an entry, in declaration order."""
    for src in load()["sources"]:
        for e in src["entries"]:
            if e["entry"] == entry:
                return [(p["name"], p["type"]) for p in e["params"]]
    raise KeyError(f"no kernel entry `{entry}` in the contracts")


def gemm_variants():
    """Every GEMM form the backend may launch: dicts with label, format, stage, bm, bn, main_loop
    and the defines it is compiled with."""
    return load()["gemm_variants"]


def _cast(ctype, value):
    if ctype.endswith("*"):
        return np.uint64(0) if value is None else value
    return {"int": np.int32, "long long": np.int64, "float": np.float32}[ctype](value)


class Kernel:
    """A kernel of a loaded module (cupy RawModule), called with its parameters by name:
    `k(grid, block, shared_mem=..., T=..., logits=...)`. A missing or unknown name is an error;
    `None` is a null pointer."""

    def __init__(self, module, entry):
        self.entry = entry
        self.fn = module.get_function(entry)

    def args(self, **kw):
        return pack(self.entry, **kw)

    def __call__(self, grid, block, shared_mem=0, **kw):
        self.fn(grid, block, self.args(**kw), shared_mem=shared_mem)


def pack(entry, **kw):
    """The argument tuple of `entry` from its parameters by name (for launchers that call the raw
    function themselves)."""
    params = signature(entry)
    missing = [n for n, _ in params if n not in kw]
    extra = sorted(set(kw) - {n for n, _ in params})
    if missing or extra:
        raise TypeError(f"{entry}: missing {missing}, unknown {extra}")
    return tuple(_cast(t, kw[n]) for n, t in params)


def host_gemm_defines(fmt, stage, bm, bn, main_loop):
    """The defines the backend compiles the GEMM form (format name, stage as the JSON spells it, BM,
    BN, main loop) with, or None when the backend never launches that form."""
    for v in gemm_variants():
        if (v["format"], v["stage"], v["bm"], v["bn"], v["main_loop"]) == (fmt, stage, bm, bn, main_loop):
            return [d[2:] if d.startswith("-D") else d for d in v["defines"]]
    return None
