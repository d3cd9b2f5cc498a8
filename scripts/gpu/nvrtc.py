"""NVRTC through ctypes, with the CUDA backend's options (crates/moerunner/src/backend/cuda/nvrtc.rs):
the one compile path of the kernel scripts (scripts/nvrtc-check.py, scripts/gpu/check_*.py), so what
they check is what the backend loads.

Finds libnvrtc.so.13 from MOERUNNER_NVRTC_LIB, the loader path, /usr/local/cuda/lib64 or an
installed nvidia-cuda-nvrtc wheel. Needs no GPU and no other package. The ctypes calls release the
GIL, so programs compile in parallel from threads."""
import ctypes
import glob
import os
import sys
import threading

# The backend's options after `--gpu-architecture` (no fast math: kernels must match the CPU's bits).
BACKEND_OPTIONS = ("--std=c++17", "-default-device", "-lineinfo")


class NvrtcError(RuntimeError):
    """A program that did not compile (the message holds NVRTC's log), or no library."""


_lib = None
_lock = threading.Lock()


def library():
    """The loaded libnvrtc (loaded once)."""
    global _lib
    with _lock:
        if _lib is None:
            candidates = [os.environ.get("MOERUNNER_NVRTC_LIB", ""), "libnvrtc.so.13",
                          "/usr/local/cuda/lib64/libnvrtc.so.13"]
            for sp in sys.path:
                candidates += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "lib", "libnvrtc.so.*")))
            tried = []
            for cand in filter(None, candidates):
                try:
                    _lib = ctypes.CDLL(cand)
                    break
                except OSError as e:
                    tried.append(f"  {cand}: {e}")
            if _lib is None:
                raise NvrtcError("libnvrtc not found (set MOERUNNER_NVRTC_LIB):\n" + "\n".join(tried))
        return _lib


def options(arch="sm_90a", defines=()):
    """The backend's options for `arch`, plus `-D` for each "NAME=VALUE" in `defines`."""
    return [f"--gpu-architecture={arch}", *BACKEND_OPTIONS, *(f"-D{d}" for d in defines)]


KERNEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "crates", "moerunner", "src", "backend", "cuda", "kernels")


def _read_kernel_file(rel):
    path = os.path.join(KERNEL_DIR, rel)
    return open(path).read() if os.path.isfile(path) else None


def translation_unit(file, text=None, read=_read_kernel_file):
    """The source the backend compiles for kernel `file` ("moe_gemm.cu"), as `kernels::translation_unit`
    builds it: common.cuh, then the file with each `#include "gemm/x.cuh"` (or "x.cu") pasted in place between
    `#line` directives — once for a `#pragma once` header, at every include for a fragment. `text`
    defaults to the file's own; `read(rel)` gives the text of a file of the kernels directory or None
    (default: this checkout's)."""
    def paste(out, name, body, seen, open_):
        out.append(f'#line 1 "{name}"\n')
        for i, line in enumerate(body.splitlines(keepends=True)):
            t = line.strip()
            inc = t[len('#include "'):-1] if t.startswith('#include "') and t.endswith('"') else None
            # (a whole kernel file is a piece too: front.cu includes routing.cu, sort.cu and quant.cu)
            hdr = read(inc) if inc and inc.endswith((".cuh", ".cu")) and inc != "common.cuh" else None
            if hdr is None:
                out.append(line)
            elif inc in seen or inc in open_:
                out.append("\n")
            else:
                if any(l.strip() == "#pragma once" for l in hdr.splitlines()):
                    seen.add(inc)
                paste(out, inc, hdr, seen, open_ | {inc})
                out.append(f'\n#line {i + 2} "{name}"\n')
    out = [read("common.cuh") + "\n"]
    paste(out, file, read(file) if text is None else text, set(), frozenset())
    return "".join(out)


def compile(source, name, opts, output="cubin"):
    """Compiles `source` (str or bytes) as `name` with `opts`; returns (code, log), code being the
    CUBIN (`output="cubin"`), the PTX text (`output="ptx"`) as bytes, or both (`output="both"`:
    (cubin, ptx))."""
    lib = library()
    src = source.encode() if isinstance(source, str) else source
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src, name.encode(), 0, None, None)
    if rc != 0:
        raise NvrtcError(f"nvrtcCreateProgram({name}) returned {rc}")
    try:
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        log = log.value.decode(errors="replace")
        if rc != 0:
            raise NvrtcError(f"NVRTC failed on {name} ({' '.join(opts)}):\n{log}")
        def get(what):
            if what == "cubin":
                get_size, get = lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN
            elif what == "ptx":
                get_size, get = lib.nvrtcGetPTXSize, lib.nvrtcGetPTX
            else:
                raise ValueError(f"output must be 'cubin', 'ptx' or 'both', not {output!r}")
            get_size(prog, ctypes.byref(size))
            code = ctypes.create_string_buffer(size.value)
            get(prog, code)
            # PTX is NUL-terminated text; a CUBIN is binary of exactly `size` bytes.
            return code.raw if what == "cubin" else code.value
        return ((get("cubin"), get("ptx")) if output == "both" else get(output)), log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
