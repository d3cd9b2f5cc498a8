#!/usr/bin/env python3
"""Compile CUDA sources with NVRTC for a given architecture, the way the CUDA backend does at run time,
and print the log. For checking kernels on a machine without a GPU or nvcc (only libnvrtc needed).

usage: nvrtc-check.py [--prepend common.cuh] FILE.cu [--arch sm_90a] [-D NAME=VALUE ...] [--ptx OUT.ptx]
Finds libnvrtc.so.13 through LD_LIBRARY_PATH (or MOERUNNER_NVRTC_LIB)."""
import argparse, ctypes, os, sys

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("-D", action="append", default=[])
    ap.add_argument("--ptx")
    ap.add_argument("--prepend", action="append", default=[], help="sources pasted before FILE, as the backend does")
    a = ap.parse_args()
    lib = ctypes.CDLL(os.environ.get("MOERUNNER_NVRTC_LIB", "libnvrtc.so.13"))
    src = b"".join(open(f, "rb").read() + b"\n" for f in a.prepend + [a.file])
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src, a.file.encode(), 0, None, None)
    assert rc == 0, rc
    opts = [f"--gpu-architecture={a.arch}", "--std=c++17", "-default-device", "-lineinfo"] + [f"-D{d}" for d in a.D]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    if log.value.strip():
        print(log.value.decode(errors="replace"))
    if rc != 0:
        print(f"FAILED ({a.file}, {' '.join(opts)})")
        sys.exit(1)
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetPTX(prog, ptx)
    if a.ptx:
        open(a.ptx, "wb").write(ptx.value)
    print(f"ok ({a.file}, {len(ptx.value)} bytes of PTX)")

main()
