"""Weights given as tensors (numpy arrays, torch tensors on any device) written as a moerunner
layer file (`spec/layer-file.md`) for the loader, which then validates them like any file: one
host copy of the weights through a temporary file (the backends prepare weights on the host)."""

from __future__ import annotations

import json
import struct
from typing import Any

# numpy / torch dtype name → the layer file's (safetensors) dtype.
_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "uint8": "U8",
    "int32": "I32",
}

# Each weight format's natural activation format (what the CLI's make-layer pairs it with).
NATURAL_ACTIVATION = {
    "bf16": "bf16",
    "fp8": "fp8",
    "fp8_block": "fp8_block",
    "mxfp8": "mxfp8",
    "mxfp4": "bf16",
    "nvfp4": "nvfp4",
}


def _bytes_of(name: str, t: Any) -> tuple[str, list[int], bytes]:
    """(dtype, shape, little-endian bytes) of a tensor, array or Python float (a scalar F32), or
    of `(dtype, array)`: raw bits declared as a layer-file dtype (numpy has no bfloat16:
    `("BF16", uint16_array)`)."""
    if isinstance(t, (int, float)):
        return "F32", [], struct.pack("<f", float(t))
    if isinstance(t, tuple) and len(t) == 2 and isinstance(t[0], str):
        import numpy as np

        dtype, a = t
        size = {"F32": 4, "I32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "U8": 1}.get(dtype)
        a = np.ascontiguousarray(a)
        if size is None or a.dtype.itemsize != size:
            raise TypeError(f"{name}: ({dtype!r}, {a.dtype} array) is not a layer-file dtype with its bits")
        return dtype, [int(d) for d in a.shape], a.tobytes()
    dtype_name = str(getattr(t, "dtype", "")).removeprefix("torch.")
    dtype = _DTYPES.get(dtype_name)
    if dtype is None:
        raise TypeError(
            f"{name}: dtype {dtype_name or type(t).__name__} is not one of "
            f"{', '.join(_DTYPES)} (bf16 weights from numpy: ml_dtypes.bfloat16 or torch)"
        )
    shape = [int(d) for d in t.shape]
    if type(t).__module__.startswith("torch"):
        import torch

        flat = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        return dtype, shape, flat.numpy().tobytes()
    import numpy as np

    return dtype, shape, np.ascontiguousarray(t).tobytes()


def write_layer_file(path: str, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """A safetensors file of `tensors` (None values left out) with `metadata`."""
    header: dict[str, Any] = {"__metadata__": metadata}
    blobs = []
    offset = 0
    for name, t in tensors.items():
        if t is None:
            continue
        dtype, shape, data = _bytes_of(name, t)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)
