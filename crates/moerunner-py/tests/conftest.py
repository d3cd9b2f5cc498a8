"""Fixtures of the Python package's tests: layer and input files made by the CLI (`moerunner
make-layer` / `make-input`), its outputs (`moerunner run`) to agree with, and a small safetensors
reader (numpy only).

The CLI is `MOERUNNER_BIN`, else the workspace's `target/release/moerunner` (`cargo test
--workspace --release` builds it). GPU tests skip with a printed reason without torch or a GPU,
and fail instead under MOERUNNER_REQUIRE_GPU=1.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]


def cli_path() -> Path:
    env = os.environ.get("MOERUNNER_BIN")
    path = Path(env) if env else REPO / "target" / "release" / "moerunner"
    if not path.exists():
        pytest.fail(f"no moerunner CLI at {path}: build it (cargo build --release) or set MOERUNNER_BIN")
    return path


def cli(*args: str) -> None:
    subprocess.run([str(cli_path()), *args], check=True, capture_output=True, text=True)


_NP = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I32": np.int32,
    "U8": np.uint8,
    "F8_E4M3": np.uint8,
}


def _header(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata."""
    return _header(path.read_bytes()).get("__metadata__", {})


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file; BF16 as its uint16 bits, F8_E4M3 as uint8 bytes."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = _header(data)
    body = data[8 + n :]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        out[name] = np.frombuffer(body[start:end], dtype=_NP[t["dtype"]]).reshape(t["shape"]).copy()
    return out


def layer_file_as_kwargs(path: Path) -> dict:
    """A layer file's tensors (numpy) and metadata as `MoeLayer.from_tensors` keywords."""
    meta = {k.removeprefix("moerunner."): v for k, v in read_metadata(path).items()}
    meta.pop("version")
    return {**read_safetensors(path), **meta}


class Case:
    """A layer file, an input file and the CLI's CPU output for them."""

    def __init__(self, tmp: Path, name: str, layer_args: list[str], tokens: int, routing: str, dtype: str):
        self.layer = tmp / f"{name}.layer.safetensors"
        self.input = tmp / f"{name}.{routing}.{dtype}.{tokens}.in.safetensors"
        self.output = tmp / f"{name}.{routing}.{dtype}.{tokens}.out.safetensors"
        if not self.layer.exists():
            cli("make-layer", *layer_args, "--seed", "11", "--out", str(self.layer))
        cli("make-input", "--layer", str(self.layer), "--tokens", str(tokens), "--routing", routing,
            "--dtype", dtype, "--seed", "12", "--out", str(self.input))
        cli("run", "--layer", str(self.layer), "--input", str(self.input), "--output", str(self.output),
            "--backend", "cpu")
        self.inputs = read_safetensors(self.input)
        self.expected = read_safetensors(self.output)["output"]


SMALL = ["--experts", "8", "--hidden", "256", "--intermediate", "128", "--top-k", "2"]
FORMATS = {
    "bf16": SMALL + ["--weight-format", "bf16"],
    "fp8_block": SMALL + ["--weight-format", "fp8_block"],
    "mxfp8": SMALL + ["--weight-format", "mxfp8"],
    "mxfp4": SMALL + ["--weight-format", "mxfp4"],
    "nvfp4": SMALL + ["--weight-format", "nvfp4"],
}


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moerunner")
    made: dict[tuple, Case] = {}

    def make(fmt: str = "bf16", tokens: int = 5, routing: str = "logits", dtype: str = "f32") -> Case:
        key = (fmt, tokens, routing, dtype)
        if key not in made:
            made[key] = Case(tmp, fmt, FORMATS[fmt], tokens, routing, dtype)
        return made[key]

    return make


def call(layer, inputs: dict, **kw):
    """The layer on an input file's tensors (numpy or torch), in the routing form they hold."""
    x = inputs["hidden_states"]
    if "router_logits" in inputs:
        return layer(x, inputs["router_logits"], **kw)
    if "topk_packed" in inputs:
        return layer(x, topk_packed=inputs["topk_packed"], **kw)
    return layer(x, topk_ids=inputs["topk_ids"], topk_weights=inputs["topk_weights"], **kw)


def to_torch(a: np.ndarray, device="cpu"):
    """A numpy array as a torch tensor on `device`; uint16 arrays are bf16 bits."""
    import torch

    t = torch.from_numpy(a.copy())
    if a.dtype == np.uint16:
        t = t.view(torch.int16).view(torch.bfloat16)
    return t.to(device)


def require_gpu(reason: str) -> None:
    """Skips a GPU test with its reason, or fails it under MOERUNNER_REQUIRE_GPU=1."""
    if os.environ.get("MOERUNNER_REQUIRE_GPU") == "1":
        pytest.fail(f"MOERUNNER_REQUIRE_GPU=1 but {reason}")
    pytest.skip(reason)
