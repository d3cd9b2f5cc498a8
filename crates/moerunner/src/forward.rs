//! The inputs and outputs of one forward call, and the checks every backend shares before it runs.

use crate::config::LayerConfig;
use crate::error::{MoeError, Result};
use crate::routing::{self, Routes, RoutingInput};
use crate::size::Bytes;
use crate::tensor::{DType, HostTensor};
use crate::weights::MoeLayer;

/// One forward call's inputs: hidden states `[T, H]` (BF16, F16 or F32) and the routing source.
#[derive(Clone, Copy, Debug)]
pub struct ForwardInput<'a> {
    pub hidden: &'a HostTensor,
    pub routing: RoutingInput<'a>,
}

/// The output `[T, H]` in the dtype of the hidden states, and the routes the layer used.
#[derive(Clone, Debug)]
pub struct ForwardOutput {
    pub output: HostTensor,
    pub routes: Routes,
}

/// Validates `hidden_states` (dtype, shape, finite values) against the layer and returns it as f32
/// with the token count.
pub fn hidden_as_f32(layer: &MoeLayer, hidden: &HostTensor) -> Result<(Vec<f32>, usize)> {
    let tokens = check_hidden(layer, hidden)?;
    Ok((hidden.to_f32_vec(HIDDEN)?, tokens))
}

const HIDDEN: &str = "hidden_states";

/// The checks of [`hidden_as_f32`] without the conversion: dtype, shape `[T, H]` and every element
/// finite (read from the stored bits: a backend that takes the tensor as it is copies nothing).
/// Returns T.
pub fn check_hidden(layer: &MoeLayer, hidden: &HostTensor) -> Result<usize> {
    hidden.expect_dtype(HIDDEN, &[DType::BF16, DType::F16, DType::F32])?;
    let h = layer.config().hidden;
    if hidden.shape.len() != 2 || hidden.shape[1] != h {
        return Err(MoeError::shape(HIDDEN, format!("[T, {h}]"), &hidden.shape));
    }
    if let Some(i) = first_nonfinite(hidden) {
        let size = hidden.dtype.size();
        let one = HostTensor {
            dtype: hidden.dtype,
            shape: vec![1],
            bytes: hidden.bytes[i * size..(i + 1) * size].to_vec().into(),
        };
        let value = one.to_f32_vec(HIDDEN)?.first().copied().unwrap_or(f32::NAN);
        return Err(MoeError::invalid(
            format!("tensor `{HIDDEN}`"),
            format!(
                "element [{}, {}] is {value}, not a finite number",
                i / h,
                i % h
            ),
        ));
    }
    Ok(hidden.shape[0])
}

/// The index of the first element of a float tensor (F32, F16, BF16) that is ±inf or NaN, read
/// from the stored bits; None for other dtypes.
fn first_nonfinite(t: &HostTensor) -> Option<usize> {
    // An all-ones exponent field is an infinity or a NaN in each of the three dtypes.
    let b = &t.bytes[..];
    match t.dtype {
        DType::F32 => b.chunks_exact(4).position(|c| {
            u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7F80_0000 == 0x7F80_0000
        }),
        DType::F16 => b
            .chunks_exact(2)
            .position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7C00 == 0x7C00),
        DType::BF16 => b
            .chunks_exact(2)
            .position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7F80 == 0x7F80),
        _ => None,
    }
}

/// The overflow rule at run time (docs/robustness.md), kept by every backend through the runner:
/// inputs and weights are finite (checked at load and by [`check_hidden`]), so a non-finite
/// output element means the layer's products overflowed f32 or the output dtype for that token.
/// That is an error naming the token and column, never NaN or inf handed back as data.
pub fn check_output(output: &ForwardOutput) -> Result<()> {
    let out = &output.output;
    let Some(i) = first_nonfinite(out) else {
        return Ok(());
    };
    let h = out.shape.get(1).copied().unwrap_or(1).max(1);
    let size = out.dtype.size();
    let one = HostTensor {
        dtype: out.dtype,
        shape: vec![1],
        bytes: out.bytes[i * size..(i + 1) * size].to_vec().into(),
    };
    let value = one
        .to_f32_vec("output")?
        .first()
        .copied()
        .unwrap_or(f32::NAN);
    Err(MoeError::Overflow {
        token: i / h,
        column: i % h,
        value: value.to_string(),
        dtype: format!("{} (accumulated in f32)", out.dtype),
    })
}

/// The common front of every backend on the host: hidden states as f32 plus resolved routes.
pub fn resolve_input(layer: &MoeLayer, input: &ForwardInput<'_>) -> Result<(Vec<f32>, Routes)> {
    let (x, tokens) = hidden_as_f32(layer, input.hidden)?;
    let cfg = layer.config();
    let bias = layer.weights().router_bias.as_deref();
    let routes = routing::resolve(&cfg.routing, cfg.num_experts, tokens, &input.routing, bias)?;
    Ok((x, routes))
}

/// The checks of [`resolve_input`] for a backend that routes logits itself: the token count, and
/// the routes when the caller gave them (`None` for logits, which are only checked).
pub fn validate_input(
    layer: &MoeLayer,
    input: &ForwardInput<'_>,
) -> Result<(usize, Option<Routes>)> {
    let tokens = check_hidden(layer, input.hidden)?;
    let cfg = layer.config();
    let bias = layer.weights().router_bias.as_deref();
    let routes = routing::resolve_unless_logits(
        &cfg.routing,
        cfg.num_experts,
        tokens,
        &input.routing,
        bias,
    )?;
    Ok((tokens, routes))
}

/// Encodes an f32 `[T, H]` result in the dtype of the input hidden states.
pub fn output_like(hidden: &HostTensor, values: &[f32], tokens: usize, h: usize) -> HostTensor {
    HostTensor::encode_f32(hidden.dtype, vec![tokens, h], values)
}

/// An estimate of a forward call's host buffers for `tokens` rows: hidden states and output in f32
/// and the encoded output, and per routed (token, slot) pair its GEMM1 row in f32 (what the CPU
/// backend holds at once; measured: T = 20000, H = 2048, I = 768, k = 2 peaks at 525 MiB beside
/// the mapped files, for an estimate of 703 MiB).
pub fn forward_bytes(config: &LayerConfig, tokens: usize) -> Bytes {
    let (h, m, k) = (config.hidden, config.w13_rows(), config.routing.top_k);
    Bytes::of(&[tokens, h, 12]).plus(Bytes::of(&[tokens, k, 4]).times(m))
}
