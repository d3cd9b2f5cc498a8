//! The inputs and outputs of one forward call, and the checks every backend shares before it runs.

use crate::error::{MoeError, Result};
use crate::routing::{self, Routes, RoutingInput};
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
    let name = "hidden_states";
    hidden.expect_dtype(name, &[DType::BF16, DType::F16, DType::F32])?;
    let h = layer.config().hidden;
    if hidden.shape.len() != 2 || hidden.shape[1] != h {
        return Err(MoeError::shape(name, format!("[T, {h}]"), &hidden.shape));
    }
    let x = hidden.to_f32_vec(name)?;
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(MoeError::invalid(
            format!("tensor `{name}`"),
            format!(
                "element [{}, {}] is {}, not a finite number",
                i / h,
                i % h,
                x[i]
            ),
        ));
    }
    Ok((x, hidden.shape[0]))
}

/// The common front of every backend on the host: hidden states as f32 plus resolved routes.
pub fn prepare(layer: &MoeLayer, input: &ForwardInput<'_>) -> Result<(Vec<f32>, Routes)> {
    let (x, tokens) = hidden_as_f32(layer, input.hidden)?;
    let cfg = layer.config();
    let bias = layer.weights().router_bias.as_deref();
    let routes = routing::resolve(&cfg.routing, cfg.num_experts, tokens, &input.routing, bias)?;
    Ok((x, routes))
}

/// The checks of [`prepare`] for a backend that routes logits itself: the token count, and the
/// routes when the caller gave them (`None` for logits, which are only checked).
pub fn check(layer: &MoeLayer, input: &ForwardInput<'_>) -> Result<(usize, Option<Routes>)> {
    let (_, tokens) = hidden_as_f32(layer, input.hidden)?;
    let cfg = layer.config();
    let bias = layer.weights().router_bias.as_deref();
    let routes = routing::check(&cfg.routing, cfg.num_experts, tokens, &input.routing, bias)?;
    Ok((tokens, routes))
}

/// Encodes an f32 `[T, H]` result in the dtype of the input hidden states.
pub fn output_like(hidden: &HostTensor, values: &[f32], tokens: usize, h: usize) -> HostTensor {
    HostTensor::encode_f32(hidden.dtype, vec![tokens, h], values)
}
