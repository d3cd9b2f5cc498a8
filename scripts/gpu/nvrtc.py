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


def compile(source, name, opts, output="cubin"):
    """Compiles `source` (str or bytes) as `name` with `opts`; returns (code, log), code being the
    CUBIN (`output="cubin"`) or the PTX text (`output="ptx"`) as bytes."""
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
        if output == "cubin":
            get_size, get = lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN
        elif output == "ptx":
            get_size, get = lib.nvrtcGetPTXSize, lib.nvrtcGetPTX
        else:
            raise ValueError(f"output must be 'cubin' or 'ptx', not {output!r}")
        get_size(prog, ctypes.byref(size))
        code = ctypes.create_string_buffer(size.value)
        get(prog, code)
        # PTX is NUL-terminated text; a CUBIN is binary of exactly `size` bytes.
        return (code.raw if output == "cubin" else code.value), log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
