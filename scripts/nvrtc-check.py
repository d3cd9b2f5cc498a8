#!/usr/bin/env python3
"""Compile CUDA sources with NVRTC for a given architecture, the way the CUDA backend does at run time
(scripts/gpu/nvrtc.py), and print the log. For checking kernels on a machine without a GPU or nvcc
(only libnvrtc needed).

usage: nvrtc-check.py [--common | --prepend FILE.cuh] FILE.cu [--arch sm_90a] [-D NAME=VALUE ...] [--ptx OUT.ptx]
Finds libnvrtc.so.13 through MOERUNNER_NVRTC_LIB, LD_LIBRARY_PATH, /usr/local/cuda or the nvidia wheel."""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu"))
import nvrtc  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("-D", action="append", default=[])
    ap.add_argument("--ptx")
    ap.add_argument("--prepend", action="append", default=[], help="sources pasted before FILE")
    ap.add_argument("--common", action="store_true",
                    help="compile as the backend does: common.cuh first, #include \"gemm/...\" pieces resolved")
    a = ap.parse_args()
    src = b"".join(open(f, "rb").read() + b"\n" for f in a.prepend + [a.file])
    if a.common:  # the backend's translation unit: common.cuh, the file, its gemm/ pieces pasted in place
        src = nvrtc.translation_unit(os.path.basename(a.file), src.decode()).encode()
    try:
        ptx, log = nvrtc.compile(src, a.file, nvrtc.options(a.arch, a.D), output="ptx")
    except nvrtc.NvrtcError as e:
        print(e)
        print(f"FAILED ({a.file})")
        sys.exit(1)
    if log.strip():
        print(log)
    if a.ptx:
        open(a.ptx, "wb").write(ptx)
    print(f"ok ({a.file}, {len(ptx)} bytes of PTX)")


main()
