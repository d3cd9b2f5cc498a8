//! Routing (`spec/routing.md`): from router logits (or caller-chosen top-k) to per-token expert ids
//! and weights. One pure function per method defines its meaning; ties go to the lower expert id.

use crate::config::{RoutingConfig, RoutingMethod};
use crate::error::{MoeError, Result};
use crate::tensor::HostTensor;

/// The routing decision for a batch: `ids[t * top_k + j]`, `weights[t * top_k + j]`.
/// An id outside `[0, E)` (e.g. −1 padding in routed mode) contributes nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct Routes {
    pub tokens: usize,
    pub top_k: usize,
    pub ids: Vec<i32>,
    pub weights: Vec<f32>,
    /// Llama-4: the weight scales GEMM1's accumulator and combine uses 1 (`spec/layer.md` step 7).
    pub weight_on_input: bool,
}

/// Where the routing of a forward call comes from (`spec/layer-file.md`, input file).
#[derive(Clone, Copy, Debug)]
pub enum RoutingInput<'a> {
    /// F32 or BF16 `[T, E]`.
    Logits(&'a HostTensor),
    /// I32 `[T, k]` ids and F32 or BF16 `[T, k]` weights.
    TopK { ids: &'a HostTensor, weights: &'a HostTensor },
    /// I32 `[T, k]`, FlashInfer's packed form.
    Packed(&'a HostTensor),
}

/// Routes `tokens` rows of f32 logits `[tokens, num_experts]` with `cfg`.
/// `bias` is the router bias `[E]` for methods that use it.
pub fn route_logits(
    cfg: &RoutingConfig,
    logits: &[f32],
    tokens: usize,
    num_experts: usize,
    bias: Option<&[f32]>,
) -> Result<Routes> {
    let _ = (cfg, logits, tokens, num_experts, bias, RoutingMethod::Default);
    Err(MoeError::Unsupported("routing not implemented yet".into()))
}

/// Checks a routing input's dtypes and shapes against T, E and k, decodes it and returns the routes.
/// Errors name the tensor (`router_logits`, `topk_ids`, `topk_weights`, `topk_packed`).
pub fn resolve(
    cfg: &RoutingConfig,
    num_experts: usize,
    tokens: usize,
    input: &RoutingInput<'_>,
    bias: Option<&[f32]>,
) -> Result<Routes> {
    let _ = (cfg, num_experts, tokens, input, bias);
    Err(MoeError::Unsupported("routing not implemented yet".into()))
}

/// Packs an expert id and weight into FlashInfer's routed int32 form.
pub fn pack(id: i32, weight: f32) -> i32 {
    let _ = (id, weight);
    0
}

/// Unpacks FlashInfer's routed int32 form into (id, weight).
pub fn unpack(packed: i32) -> (i32, f32) {
    let _ = packed;
    (0, 0.0)
}
