"""The package on torch CUDA tensors (the device-memory entry, on torch's current stream): the
same bytes as the host entry of the same GPU layer, every routing form and dtype, T = 0, out=,
another stream, CUDA-graph capture and replay, no host synchronisation inside a call, refusals
naming the argument, and the Python overhead per call. Skipped with the reason without torch, a
GPU or the CUDA backend; under MOERUNNER_REQUIRE_GPU=1 those skips are failures."""

from __future__ import annotations

import time

import pytest

from conftest import call, require_gpu, to_torch

try:
    import torch
except ImportError:  # pragma: no cover - depends on the machine
    torch = None

import moerunner

# The GPU formats of README's support matrix, with their tolerance against the CPU.
GPU_FORMATS = {"bf16": 1e-2, "fp8_block": 2e-2, "mxfp8": 2e-2, "mxfp4": 1e-2, "nvfp4": 5e-2}


@pytest.fixture(scope="module")
def gpu():
    if torch is None:
        require_gpu("torch is not installed")
    if not torch.cuda.is_available():
        require_gpu("torch sees no CUDA device")
    cuda = moerunner.info()["backends"][0]
    if not cuda["available"]:
        require_gpu(f"the CUDA backend is unavailable: {cuda['reason']}")
    return torch.device("cuda:0")


def tensors(case, device):
    return {k: to_torch(v, device) for k, v in case.inputs.items()}


@pytest.mark.parametrize("fmt", list(GPU_FORMATS))
@pytest.mark.parametrize("routing", ["logits", "topk", "packed"])
@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
def test_device_entry_gives_the_host_entrys_bytes(gpu, files, fmt, routing, dtype):
    case = files(fmt, tokens=37, routing=routing, dtype=dtype)
    layer = moerunner.MoeLayer.from_file(case.layer, device="cuda:0")
    assert layer.backend == "cuda"
    on_gpu = call(layer, tensors(case, gpu))
    assert on_gpu.is_cuda and on_gpu.dtype == tensors(case, "cpu")["hidden_states"].dtype
    host = call(layer, tensors(case, "cpu"))  # the same GPU layer through its host entry
    assert torch.equal(on_gpu.cpu(), host)
    cpu = to_torch(case.expected)
    err = (on_gpu.cpu().float() - cpu.float()).abs().max() / cpu.float().abs().max()
    assert err < GPU_FORMATS[fmt]


def test_zero_tokens_and_out(gpu, files):
    case = files(tokens=0, dtype="bf16")
    layer = moerunner.MoeLayer.from_file(case.layer, device="cuda:0")
    assert call(layer, tensors(case, gpu)).shape == (0, 256)
    case = files(tokens=5, dtype="bf16")
    t = tensors(case, gpu)
    out = torch.full_like(t["hidden_states"], float("nan"))
    assert call(layer, t, out=out) is out
    assert torch.equal(out, call(layer, t))


def test_runs_on_torchs_current_stream(gpu, files):
    case = files(tokens=64, dtype="bf16")
    layer = moerunner.MoeLayer.from_file(case.layer, device="cuda:0")
    t = tensors(case, gpu)
    want = call(layer, t)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        assert moerunner._stream_of(t["hidden_states"]) == side.cuda_stream
        got = call(layer, t)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, want)


def test_cuda_graph_capture_and_replay(gpu, files):
    case = files(tokens=16, dtype="bf16")
    layer = moerunner.MoeLayer.from_file(case.layer, device="cuda:0")
    t = tensors(case, gpu)
    x, logits = t["hidden_states"].clone(), t["router_logits"].clone()
    out = torch.empty_like(x)
    layer.reserve(16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer(x, logits, out=out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, layer(t["hidden_states"], t["router_logits"]))
    # New inputs in the captured buffers: the replay computes them.
    x.copy_(torch.randn_like(x))
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, layer(x.clone(), logits.clone()))


def test_workspace_bytes_are_known_before_they_are_allocated(gpu, files):
    layer = moerunner.MoeLayer.from_file(files(tokens=16, dtype="bf16").layer, device="cuda:0")
    small, large = layer.workspace_bytes(16), layer.workspace_bytes(4096)
    assert 0 < small < large
    # bounded: a call of any size runs in slices of one launch sequence's tokens
    assert layer.workspace_bytes(10**9) == layer.workspace_bytes(10**8)
    # (that `reserve` allocates exactly these bytes is checked in Rust: tests/cuda.rs,
    # gpu_workspace_bytes_are_what_reserve_allocates)
    layer.reserve(4096)


def test_a_capture_without_reserve_is_refused_with_advice(gpu, files):
    case = files(tokens=300, dtype="bf16")
    layer = moerunner.MoeLayer.from_file(case.layer, device="cuda:0")
    t = tensors(case, gpu)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(moerunner.MoeError, match="reserve"):
        with torch.cuda.graph(graph):
            call(layer, t)


def test_no_host_synchronisation_inside_a_call(gpu, files):
    case = files(tokens=16, dtype="bf16")
    layer = moerunner.MoeLayer.from_file(case.layer, device="cuda:0")
    t = tensors(case, gpu)
    out = torch.empty_like(t["hidden_states"])
    call(layer, t, out=out)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued ahead of the call
    start = time.perf_counter()
    call(layer, t, out=out)
    took = time.perf_counter() - start
    still_busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert still_busy and took < 0.1, f"the call took {took * 1e3:.1f} ms behind a busy stream"


def test_refusals_name_the_argument(gpu, files):
    case = files(tokens=5, dtype="bf16", routing="topk")
    t = tensors(case, gpu)
    x, ids, w = t["hidden_states"], t["topk_ids"], t["topk_weights"]
    cpu_layer = moerunner.MoeLayer.from_file(case.layer, device="cpu")
    with pytest.raises(ValueError, match="hidden_states.*cuda"):
        cpu_layer(x, topk_ids=ids, topk_weights=w)
    layer = moerunner.MoeLayer.from_file(case.layer, device="cuda:0")
    with pytest.raises(ValueError, match="topk_ids.*cpu"):
        layer(x, topk_ids=ids.cpu(), topk_weights=w)
    with pytest.raises(TypeError, match="topk_weights.*F32"):
        layer(x, topk_ids=ids, topk_weights=w.to(torch.bfloat16))
    with pytest.raises(TypeError, match="topk_ids.*int64"):
        layer(x, topk_ids=ids.long(), topk_weights=w)
    with pytest.raises(ValueError, match="hidden_states.*contiguous"):
        wide = torch.zeros(5, 512, dtype=torch.bfloat16, device=gpu)
        layer(wide[:, ::2], topk_ids=ids, topk_weights=w, out=torch.empty_like(x))
    with pytest.raises(TypeError, match="router_logits"):
        layer(x)


def test_python_overhead_per_call(gpu, files, capsys):
    """Host time of one call at T = 1 (enqueue only: the GPU runs behind), printed."""
    case = files(tokens=1, dtype="bf16")
    layer = moerunner.MoeLayer.from_file(case.layer, device="cuda:0")
    t = tensors(case, gpu)
    x, logits = t["hidden_states"], t["router_logits"]
    out = torch.empty_like(x)
    for _ in range(50):
        layer(x, logits, out=out)
    torch.cuda.synchronize()
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        layer(x, logits, out=out)
    per_call = (time.perf_counter() - start) / n
    torch.cuda.synchronize()
    stream = torch.cuda.current_stream().cuda_stream
    start = time.perf_counter()
    for _ in range(n):
        layer._native.forward(x, out, logits, None, None, None, stream)
    native = (time.perf_counter() - start) / n
    torch.cuda.synchronize()
    with capsys.disabled():
        print(f"\nT = 1 host time per call: MoeLayer.__call__ {per_call * 1e6:.1f} µs, "
              f"NativeLayer.forward {native * 1e6:.1f} µs")
