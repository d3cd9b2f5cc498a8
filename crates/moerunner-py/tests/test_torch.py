"""The package on torch CPU tensors: bf16 and every routing form against the CLI bit for bit,
T = 0, out=, refusals naming the argument, and the torch.library op under torch.compile.
Skipped (with the reason) where torch is not installed; CI installs torch from PyPI and runs them on the CPU."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

import moerunner  # noqa: E402
from conftest import call, layer_file_as_kwargs, to_torch  # noqa: E402
from moerunner.torch_op import moe_layer  # noqa: E402


def inputs_of(case) -> dict:
    return {k: to_torch(v) for k, v in case.inputs.items()}


def expected_of(case) -> "torch.Tensor":
    return to_torch(case.expected)


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("routing", ["logits", "topk", "packed"])
def test_agrees_with_the_cli_bit_for_bit(files, dtype, routing):
    case = files("fp8_block", tokens=9, routing=routing, dtype=dtype)
    layer = moerunner.MoeLayer.from_file(case.layer, device="cpu")
    t = inputs_of(case)
    y = call(layer, t)
    want = expected_of(case)
    assert y.dtype == t["hidden_states"].dtype == want.dtype
    assert torch.equal(y, want)


def test_zero_tokens(files):
    case = files(tokens=0, dtype="bf16")
    layer = moerunner.MoeLayer.from_file(case.layer, device="cpu")
    y = call(layer, inputs_of(case))
    assert y.shape == (0, 256) and y.dtype == torch.bfloat16


def test_out_is_honoured(files):
    case = files(dtype="bf16")
    layer = moerunner.MoeLayer.from_file(case.layer, device="cpu")
    out = torch.full((5, 256), float("nan"), dtype=torch.bfloat16)
    assert call(layer, inputs_of(case), out=out) is out
    assert torch.equal(out, expected_of(case))


def test_refusals_name_the_argument(files):
    case = files(dtype="bf16", routing="topk")
    layer = moerunner.MoeLayer.from_file(case.layer, device="cpu")
    t = inputs_of(case)
    x, ids, w = t["hidden_states"], t["topk_ids"], t["topk_weights"]
    with pytest.raises(TypeError, match="topk_ids.*int64"):
        layer(x, topk_ids=ids.long(), topk_weights=w)
    with pytest.raises(ValueError, match="hidden_states.*contiguous"):
        layer(torch.zeros(256, 5, dtype=torch.bfloat16).t(), topk_ids=ids, topk_weights=w,
              out=torch.empty(5, 256, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="out.*dtype"):
        layer(x, topk_ids=ids, topk_weights=w, out=torch.empty(5, 256))
    with pytest.raises(ValueError, match="out.*hidden_states"):
        layer(x, topk_ids=ids, topk_weights=w, out=x)


def test_bf16_topk_weights_on_the_cpu(files):
    case = files(dtype="bf16", routing="topk")
    layer = moerunner.MoeLayer.from_file(case.layer, device="cpu")
    t = inputs_of(case)
    w16 = t["topk_weights"].to(torch.bfloat16)
    y = layer(t["hidden_states"], topk_ids=t["topk_ids"], topk_weights=w16)
    torch.testing.assert_close(y, expected_of(case), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fmt", ["bf16", "fp8_block"])
def test_from_tensors_takes_stacked_torch_weights(files, fmt):
    case = files(fmt, dtype="bf16")
    kw = layer_file_as_kwargs(case.layer)
    for k, v in list(kw.items()):
        if not isinstance(v, str):
            kw[k] = to_torch(v)
    if fmt == "fp8_block":
        kw["w13"], kw["w2"] = kw["w13"].view(torch.float8_e4m3fn), kw["w2"].view(torch.float8_e4m3fn)
    assert kw["w13"].shape == (8, 256, 256) and kw["w2"].shape == (8, 256, 128)  # [E, 2I, H], [E, H, I]
    layer = moerunner.MoeLayer.from_tensors(**kw, device="cpu")
    assert torch.equal(call(layer, inputs_of(case)), expected_of(case))


def test_custom_op_is_one_opaque_op_under_compile(files):
    case = files(dtype="bf16")
    layer = moerunner.MoeLayer.from_file(case.layer, device="cpu")
    t = inputs_of(case)

    def block(x, logits):
        return moe_layer(layer, x, logits) * 2

    eager = block(t["hidden_states"], t["router_logits"])
    assert torch.equal(eager, expected_of(case) * 2)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(t["hidden_states"], t["router_logits"]), eager)
    torch.library.opcheck(
        torch.ops.moerunner.moe_layer.default,
        (layer._handle, t["hidden_states"], t["router_logits"], None, None, None),
        test_utils=("test_schema", "test_faketensor"),
    )
