"""The Python package's overhead per call over the Rust library's, on the same files.

    python crates/moerunner-py/bench_overhead.py LAYER INPUT [--device cpu|cuda:0] [--iters N]

Prints the median µs per call of `MoeLayer.__call__` (output allocated, and with `out=`) and of
`NativeLayer.forward` (no Python wrapper). On the CPU compare with
`cargo run --release -p moerunner --example file_forward LAYER INPUT cpu` (the library's call on
the same tensors); the difference is the package's overhead. On CUDA the times are host times
of an enqueue (the GPU runs behind; a synchronisation closes each batch, outside the timing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
from conftest import read_safetensors, to_torch  # noqa: E402

import moerunner  # noqa: E402


def median_us(fn, iters: int, sync=lambda: None) -> float:
    for _ in range(50):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    sync()
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("layer")
    p.add_argument("input")
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=2000)
    a = p.parse_args()
    layer = moerunner.MoeLayer.from_file(a.layer, device=a.device)
    inputs = read_safetensors(Path(a.input))
    sync, stream = (lambda: None), None
    if a.device.startswith("cuda"):
        import torch

        inputs = {k: to_torch(v, a.device) for k, v in inputs.items()}
        sync = torch.cuda.synchronize
        stream = torch.cuda.current_stream().cuda_stream
    x = inputs["hidden_states"]
    logits = inputs.get("router_logits")
    if logits is None:
        sys.exit("the input file must carry router_logits (make-input --routing logits)")
    out = layer(x, logits)
    rows = {
        "MoeLayer.__call__": median_us(lambda: layer(x, logits), a.iters, sync),
        "MoeLayer.__call__(out=)": median_us(lambda: layer(x, logits, out=out), a.iters, sync),
        "NativeLayer.forward": median_us(
            lambda: layer._native.forward(x, out, logits, None, None, None, stream), a.iters, sync
        ),
    }
    print(f"{layer!r}, T = {x.shape[0]}, {type(x).__module__} {x.dtype}:")
    for name, us in rows.items():
        print(f"  {name:26s} median {us:8.1f} µs")


if __name__ == "__main__":
    main()
