"""The package on numpy arrays (CPU backend): agreement with the CLI on the same files, every
routing form, T = 0, dtypes, `out=`, parallel slices, and every argument error naming the argument."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import moerunner
from conftest import call, cli, layer_file_as_kwargs, read_safetensors


def load(case, **kw):
    return moerunner.MoeLayer.from_file(case.layer, device=kw.pop("device", "cpu"), **kw)


# --- agreement with the CLI ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["bf16", "fp8_block", "mxfp4", "nvfp4"])
@pytest.mark.parametrize("routing", ["logits", "topk", "packed"])
def test_agrees_with_the_cli_bit_for_bit(files, fmt, routing):
    case = files(fmt, tokens=7, routing=routing)
    y = call(load(case), case.inputs)
    assert y.dtype == np.float32 and y.shape == case.expected.shape
    np.testing.assert_array_equal(y, case.expected)


@pytest.mark.parametrize("dtype,np_dtype", [("f32", np.float32), ("f16", np.float16)])
def test_output_has_the_dtype_of_hidden_states(files, dtype, np_dtype):
    case = files(dtype=dtype)
    x = case.inputs["hidden_states"]
    assert x.dtype == np_dtype
    y = call(load(case), case.inputs)
    assert y.dtype == np_dtype
    np.testing.assert_array_equal(y, case.expected)


def test_zero_tokens_give_an_empty_output(files):
    case = files(tokens=0)
    y = call(load(case), case.inputs)
    assert y.shape == (0, 256) and y.dtype == np.float32


@pytest.mark.parametrize("routing", ["logits", "topk", "packed"])
def test_zero_tokens_in_every_routing_form(files, routing):
    case = files(tokens=0, routing=routing)
    assert call(load(case), case.inputs).shape == (0, 256)


def test_out_is_written_and_returned(files):
    case = files()
    out = np.full_like(case.expected, np.nan)
    y = call(load(case), case.inputs, out=out)
    assert y is out
    np.testing.assert_array_equal(out, case.expected)


def test_one_token(files):
    case = files(tokens=1)
    np.testing.assert_array_equal(call(load(case), case.inputs), case.expected)


def test_expert_parallel_ranks_agree_with_the_cli(files, tmp_path):
    case = files(tokens=6)
    parts = []
    for rank in range(2):
        ref = tmp_path / f"ep{rank}.safetensors"
        cli("run", "--layer", str(case.layer), "--input", str(case.input), "--output", str(ref),
            "--backend", "cpu", "--ep-size", "2", "--ep-rank", str(rank))
        y = call(load(case, ep_size=2, ep_rank=rank), case.inputs)
        np.testing.assert_array_equal(y, read_safetensors(ref)["output"])
        parts.append(y)
    np.testing.assert_allclose(parts[0] + parts[1], case.expected, rtol=1e-4, atol=1e-4)


def test_tensor_parallel_ranks_sum_to_the_whole_layer(files):
    case = files(tokens=6)
    total = sum(call(load(case, tp_size=2, tp_rank=r), case.inputs) for r in range(2))
    np.testing.assert_allclose(total, case.expected, rtol=1e-3, atol=1e-3)


def test_reference_is_within_the_formats_tolerance(files):
    case = files(fmt="fp8_block")
    ref = moerunner.reference(case.layer, case.inputs["hidden_states"], case.inputs["router_logits"])
    err = np.abs(ref - case.expected).max() / np.abs(ref).max()
    assert err < 2e-2


def test_layer_description(files):
    layer = load(files())
    assert (layer.hidden_size, layer.intermediate_size, layer.num_experts, layer.top_k) == (256, 128, 8, 2)
    assert layer.config["weight_format"] == "bf16"
    assert layer.backend == "cpu" and layer.device == "cpu"
    assert "bf16" in repr(layer)
    layer.reserve(64)  # nothing on the CPU
    assert layer.workspace_bytes(64) == 0  # no device workspace on the CPU


def test_auto_device_runs_somewhere(files):
    case = files()
    layer = load(case, device="auto")
    assert layer.backend in ("cpu", "cuda")


def test_info_lists_the_backends():
    info = moerunner.info()
    names = [b["name"] for b in info["backends"]]
    assert names == ["cuda", "cpu", "reference"]
    cpu = info["backends"][1]
    assert cpu["available"] and cpu["devices"]
    assert info["version"] == moerunner.__version__


# --- from_tensors --------------------------------------------------------------------------------


def test_from_tensors_is_the_layer_file(files):
    case = files("mxfp4", tokens=6)
    layer = moerunner.MoeLayer.from_tensors(**layer_file_as_kwargs(case.layer), device="cpu")
    np.testing.assert_array_equal(call(layer, case.inputs), case.expected)


def test_from_tensors_refuses_a_bad_dtype(files):
    kw = layer_file_as_kwargs(files("mxfp4").layer)
    kw["w13"] = kw["w13"].astype(np.uint16)
    with raises(TypeError, "w13", "uint16"):
        moerunner.MoeLayer.from_tensors(**kw, device="cpu")


def test_from_tensors_refuses_a_bad_shape(files):
    kw = layer_file_as_kwargs(files("mxfp4").layer)
    kw["w2"] = kw["w2"][:, :, :-1].copy()
    with raises(moerunner.MoeError, "w2"):
        moerunner.MoeLayer.from_tensors(**kw, device="cpu")


def test_from_tensors_refuses_a_missing_scale(files):
    kw = layer_file_as_kwargs(files("mxfp4").layer)
    del kw["w13_scale"]
    with raises(moerunner.MoeError, "w13_scale"):
        moerunner.MoeLayer.from_tensors(**kw, device="cpu")


def test_from_tensors_refuses_an_unknown_key(files):
    kw = layer_file_as_kwargs(files("mxfp4").layer)
    with raises(moerunner.MoeError, "expert_count"):
        moerunner.MoeLayer.from_tensors(**kw, expert_count=3, device="cpu")


# --- argument errors: each names the argument ---------------------------------------------------


@pytest.fixture(scope="module")
def bf16_case(files):
    return files()


@pytest.fixture(scope="module")
def layer(bf16_case):
    return load(bf16_case)


def x_and_logits(case):
    return case.inputs["hidden_states"], case.inputs["router_logits"]


def raises(exc, *words):
    """pytest.raises whose message must contain every word."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(w)})" for w in words))


def test_hidden_states_not_a_tensor(layer, bf16_case):
    with raises(TypeError, "hidden_states", "__dlpack__"):
        layer([[1.0] * 256], bf16_case.inputs["router_logits"])


def test_hidden_states_wrong_width(layer, bf16_case):
    x, logits = x_and_logits(bf16_case)
    with raises(ValueError, "hidden_states", "[T, 256]"):
        layer(np.zeros((5, 255), np.float32), logits)


def test_hidden_states_not_two_dimensional(layer, bf16_case):
    _, logits = x_and_logits(bf16_case)
    with raises(ValueError, "hidden_states"):
        layer(np.zeros((256,), np.float32), logits)


def test_hidden_states_float64(layer, bf16_case):
    x, logits = x_and_logits(bf16_case)
    with raises(TypeError, "hidden_states", "float64"):
        layer(x.astype(np.float64), logits)


def test_hidden_states_int32(layer, bf16_case):
    x, logits = x_and_logits(bf16_case)
    with raises(moerunner.MoeError, "hidden_states"):
        layer(x.astype(np.int32), logits, out=np.empty(x.shape, np.int32))


def test_hidden_states_not_contiguous(layer, bf16_case):
    x, logits = x_and_logits(bf16_case)
    wide = np.zeros((5, 512), np.float32)
    with raises(ValueError, "hidden_states", "contiguous"):
        layer(wide[:, ::2], logits, out=np.empty((5, 256), np.float32))


def test_hidden_states_with_nan(layer, bf16_case):
    x, logits = x_and_logits(bf16_case)
    x = x.copy()
    x[2, 3] = np.nan
    with raises(moerunner.MoeError, "hidden_states", "[2, 3]"):
        layer(x, logits)


def test_router_logits_wrong_shape(layer, bf16_case):
    x, logits = x_and_logits(bf16_case)
    with raises(ValueError, "router_logits", "[T, E]"):
        layer(x, logits[:, :7].copy())


def test_router_logits_wrong_token_count(layer, bf16_case):
    x, logits = x_and_logits(bf16_case)
    with raises(ValueError, "router_logits"):
        layer(x, logits[:4].copy())


def test_router_logits_float16(layer, bf16_case):
    x, logits = x_and_logits(bf16_case)
    with raises(moerunner.MoeError, "router_logits"):
        layer(x, logits.astype(np.float16))


def test_router_logits_with_nan(layer, bf16_case):
    x, logits = x_and_logits(bf16_case)
    logits = logits.copy()
    logits[1, 1] = np.inf
    with raises(moerunner.MoeError, "router_logits"):
        layer(x, logits)


def topk(case):
    c = case
    return c.inputs["hidden_states"], c.inputs["topk_ids"], c.inputs["topk_weights"]


@pytest.fixture(scope="module")
def topk_case(files):
    return files(routing="topk")


def test_topk_ids_without_weights(layer, topk_case):
    x, ids, _ = topk(topk_case)
    with raises(TypeError, "topk_ids", "topk_weights"):
        layer(x, topk_ids=ids)


def test_topk_weights_without_ids(layer, topk_case):
    x, _, w = topk(topk_case)
    with raises(TypeError, "topk_ids", "topk_weights"):
        layer(x, topk_weights=w)


def test_topk_ids_int64(layer, topk_case):
    x, ids, w = topk(topk_case)
    with raises(TypeError, "topk_ids", "int64"):
        layer(x, topk_ids=ids.astype(np.int64), topk_weights=w)


def test_topk_ids_repeated_in_a_token(layer, topk_case):
    x, ids, w = topk(topk_case)
    ids = ids.copy()
    ids[0, 1] = ids[0, 0]
    with raises(moerunner.MoeError, "topk_ids"):
        layer(x, topk_ids=ids, topk_weights=w)


def test_topk_weights_with_nan(layer, topk_case):
    x, ids, w = topk(topk_case)
    w = w.copy()
    w[3, 0] = np.nan
    with raises(moerunner.MoeError, "topk_weights"):
        layer(x, topk_ids=ids, topk_weights=w)


def test_topk_ids_outside_the_experts_are_padding(layer, topk_case):
    x, ids, w = topk(topk_case)
    ids = ids.copy()
    ids[:, 1] = -1
    alone = layer(x, topk_ids=ids, topk_weights=w)
    ids[:, 1] = 8
    np.testing.assert_array_equal(layer(x, topk_ids=ids, topk_weights=w), alone)


def test_topk_wrong_k(layer, topk_case):
    x, ids, w = topk(topk_case)
    with raises(ValueError, "topk_ids", "[T, top_k]"):
        layer(x, topk_ids=np.ascontiguousarray(ids[:, :1]), topk_weights=w)


def test_topk_packed_wrong_dtype(layer, files):
    case = files(routing="packed")
    x, packed = case.inputs["hidden_states"], case.inputs["topk_packed"]
    with raises(moerunner.MoeError, "topk_packed"):
        layer(x, topk_packed=packed.astype(np.float32))


def test_two_routing_forms(layer, topk_case, bf16_case):
    x, ids, w = topk(topk_case)
    with raises(TypeError, "exactly one"):
        layer(x, bf16_case.inputs["router_logits"], topk_ids=ids, topk_weights=w)


def test_no_routing_without_a_router(layer, bf16_case):
    x, _ = x_and_logits(bf16_case)
    with raises(TypeError, "router_logits"):
        layer(x)


def test_out_wrong_dtype(layer, bf16_case):
    x, logits = x_and_logits(bf16_case)
    with raises(TypeError, "out", "dtype"):
        layer(x, logits, out=np.empty(x.shape, np.float16))


def test_out_wrong_shape(layer, bf16_case):
    x, logits = x_and_logits(bf16_case)
    with raises(ValueError, "out"):
        layer(x, logits, out=np.empty((5, 128), np.float32))


def test_out_read_only(layer, bf16_case):
    x, logits = x_and_logits(bf16_case)
    out = np.empty(x.shape, np.float32)
    out.flags.writeable = False
    with raises((ValueError, TypeError, BufferError), "out"):
        layer(x, logits, out=out)


def test_out_is_hidden_states(layer, bf16_case):
    x, logits = x_and_logits(bf16_case)
    x = x.copy()
    with raises(ValueError, "out", "hidden_states"):
        layer(x, logits, out=x)


def test_out_not_a_tensor(layer, bf16_case):
    x, logits = x_and_logits(bf16_case)
    with raises(TypeError, "out"):
        layer(x, logits, out=[0.0])


# --- load errors --------------------------------------------------------------------------------


def test_unknown_device(bf16_case):
    with raises(ValueError, "device", "tpu"):
        moerunner.MoeLayer.from_file(bf16_case.layer, device="tpu")


def test_bad_cuda_ordinal(bf16_case):
    with raises(ValueError, "device"):
        moerunner.MoeLayer.from_file(bf16_case.layer, device="cuda:x")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with raises(moerunner.MoeError, "nope.safetensors"):
        moerunner.MoeLayer.from_file(missing, device="cpu")


def test_rank_out_of_range(bf16_case):
    with raises(moerunner.MoeError, "ep_rank"):
        moerunner.MoeLayer.from_file(bf16_case.layer, device="cpu", ep_size=2, ep_rank=2)


def test_missing_checkpoint(tmp_path):
    with raises(moerunner.MoeError, "config.json"):
        moerunner.MoeLayer.from_checkpoint(tmp_path, 0, device="cpu")


def test_bad_quantize_name(tmp_path):
    with raises(ValueError, "quantize"):
        moerunner.MoeLayer.from_checkpoint(tmp_path, 0, device="cpu", quantize="int3")


# --- checkpoints ----------------------------------------------------------------------------------


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits (truncated: exact for the values it keeps)."""
    return (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)


@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory):
    """A tiny Qwen3-MoE folder (config.json + model.safetensors, BF16), and its layer's tensors."""
    from moerunner._tensors import write_layer_file

    d = tmp_path_factory.mktemp("qwen3")
    e, h, i, k = 8, 256, 128, 2
    config = {"model_type": "qwen3_moe", "num_experts": e, "num_experts_per_tok": k, "hidden_size": h,
              "moe_intermediate_size": i, "norm_topk_prob": True, "num_hidden_layers": 1,
              "hidden_act": "silu"}
    (d / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(5)
    gate, up = bf16_bits(rng.normal(0, 0.05, (e, i, h))), bf16_bits(rng.normal(0, 0.05, (e, i, h)))
    down, router = bf16_bits(rng.normal(0, 0.05, (e, h, i))), bf16_bits(rng.normal(0, 0.05, (e, h)))
    p = "model.layers.0.mlp."
    tensors = {f"{p}gate.weight": ("BF16", router)}
    for x in range(e):
        tensors[f"{p}experts.{x}.gate_proj.weight"] = ("BF16", gate[x])
        tensors[f"{p}experts.{x}.up_proj.weight"] = ("BF16", up[x])
        tensors[f"{p}experts.{x}.down_proj.weight"] = ("BF16", down[x])
    write_layer_file(str(d / "model.safetensors"), tensors, {"format": "pt"})
    w13 = np.concatenate([gate, up], axis=1)  # [E, 2I, H]: gate rows, then up rows
    return d, {"w13": ("BF16", w13), "w2": ("BF16", down), "router": router}


def bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def test_from_checkpoint_routes_with_its_router(qwen3_checkpoint):
    d, t = qwen3_checkpoint
    layer = moerunner.MoeLayer.from_checkpoint(d, 0, device="cpu")
    assert (layer.num_experts, layer.top_k, layer.config["routing"]) == (8, 2, "renormalize")
    x = np.random.default_rng(6).normal(0, 1, (5, 256)).astype(np.float32)
    logits = x @ bits_to_f32(t["router"]).T
    y = layer(x)  # the checkpoint's router
    np.testing.assert_allclose(y, layer(x, logits), rtol=1e-5, atol=1e-6)
    stacked = moerunner.MoeLayer.from_tensors(w13=t["w13"], w2=t["w2"], top_k=2, device="cpu")
    np.testing.assert_array_equal(layer(x, logits), stacked(x, logits))


def test_from_checkpoint_ranks_sum_to_the_whole(qwen3_checkpoint):
    d, _ = qwen3_checkpoint
    x = np.random.default_rng(7).normal(0, 1, (3, 256)).astype(np.float32)
    whole = moerunner.MoeLayer.from_checkpoint(d, 0, device="cpu")(x)
    parts = [moerunner.MoeLayer.from_checkpoint(d, 0, device="cpu", ep_size=2, ep_rank=r)(x) for r in range(2)]
    np.testing.assert_allclose(parts[0] + parts[1], whole, rtol=1e-4, atol=1e-5)


def test_from_checkpoint_quantizes_at_load(qwen3_checkpoint):
    d, _ = qwen3_checkpoint
    layer = moerunner.MoeLayer.from_checkpoint(d, 0, device="cpu", quantize="mxfp8")
    assert layer.config["weight_format"] == "mxfp8"
    x = np.random.default_rng(8).normal(0, 1, (4, 256)).astype(np.float32)
    whole = moerunner.MoeLayer.from_checkpoint(d, 0, device="cpu")(x)
    # mxfp8 keeps 3 mantissa bits of weights and activations: a few percent off bf16.
    err = np.linalg.norm(layer(x) - whole) / np.linalg.norm(whole)
    assert 0 < err < 0.1


def test_from_checkpoint_layer_out_of_range(qwen3_checkpoint):
    d, _ = qwen3_checkpoint
    with raises(moerunner.MoeError, "layer 3"):
        moerunner.MoeLayer.from_checkpoint(d, 3, device="cpu")


@pytest.mark.parametrize("fmt", ["mxfp8", "fp8_block", "mxfp4"])
def test_quantize_weights_is_the_checkpoint_quantizer(qwen3_checkpoint, fmt):
    d, t = qwen3_checkpoint
    w = {
        **moerunner.quantize_weights(bits_to_f32(t["w13"][1]), fmt),
        **moerunner.quantize_weights(bits_to_f32(t["w2"][1]), fmt, name="w2"),
    }
    assert set(w) >= {"w13", "w13_scale", "w2", "w2_scale"}
    mine = moerunner.MoeLayer.from_tensors(**w, weight_format=fmt, top_k=2, device="cpu")
    theirs = moerunner.MoeLayer.from_checkpoint(d, 0, device="cpu", quantize=fmt)
    x = np.random.default_rng(9).normal(0, 1, (4, 256)).astype(np.float32)
    logits = x @ bits_to_f32(t["router"]).T
    np.testing.assert_array_equal(mine(x, logits), theirs(x, logits))


def test_quantize_weights_nvfp4_has_global_scales(qwen3_checkpoint):
    _, t = qwen3_checkpoint
    w = moerunner.quantize_weights(bits_to_f32(t["w2"][1]), "nvfp4", name="w2")
    assert w["w2"].shape == (8, 256, 64) and w["w2"].dtype == np.uint8  # e2m1 pairs
    dtype, scale = w["w2_scale"]
    assert dtype == "F8_E4M3" and scale.shape == (8, 256, 8)
    assert w["w2_global_scale"].shape == (8,) and (w["w2_global_scale"] > 0).all()


def test_quantize_weights_refusals():
    with raises(ValueError, "weight_format"):
        moerunner.quantize_weights(np.zeros((1, 128, 128), np.float32), "int3")
    with raises(ValueError, "weights", "[E, rows, cols]"):
        moerunner.quantize_weights(np.zeros((128, 128), np.float32), "mxfp8")
    with raises(moerunner.MoeError, "weights"):
        moerunner.quantize_weights(np.zeros((1, 128, 128), np.int32), "mxfp8")


def test_from_file_routes_with_the_router_convert_wrote(qwen3_checkpoint, tmp_path):
    """`moerunner convert` writes the checkpoint's router beside the layer; a layer loaded from that
    file routes hidden states alone as the checkpoint does, bit for bit."""
    d, _ = qwen3_checkpoint
    out = tmp_path / "layer.safetensors"
    cli("convert", "--checkpoint", str(d), "--layer", "0", "--out", str(out))
    x = np.random.default_rng(7).normal(0, 1, (5, 256)).astype(np.float32)
    from_ckpt = moerunner.MoeLayer.from_checkpoint(d, 0, device="cpu")(x)
    from_file = moerunner.MoeLayer.from_file(out, device="cpu")(x)
    np.testing.assert_array_equal(from_file, from_ckpt)
