//! Routing (`spec/routing.md`): from router logits (or caller-chosen top-k) to per-token expert ids
//! and weights. One pure function per method defines its meaning (`methods`); ties go to the lower
//! expert id (`topk`); caller-chosen and packed top-k live in `routed`.
//!
//! Design decision: a token's routing depends on that token's logits only, computed by one
//! sequential function, so splitting tokens over threads can never change a bit of the result.

mod methods;
mod routed;
mod topk;

use std::ops::Range;

use rayon::prelude::*;

use crate::config::{RoutingConfig, RoutingMethod};
use crate::error::{MoeError, Result};
use crate::tensor::{DType, HostTensor};

pub use routed::{pack, unpack};

/// The routing decision for a batch: `ids[t * top_k + j]`, `weights[t * top_k + j]`.
///
/// From logits, ids are k distinct experts in order of decreasing selection key and every weight is
/// finite. In routed mode ids are kept as the caller gave them: an id outside `[0, E)` (e.g. −1
/// padding) contributes nothing — backends must skip such a slot — and its weight is stored as 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Routes {
    pub tokens: usize,
    pub top_k: usize,
    pub ids: Vec<i32>,
    pub weights: Vec<f32>,
    /// Llama-4: the weight scales GEMM1's accumulator and combine uses 1 (`spec/layer.md` step 7).
    pub weight_on_input: bool,
}

impl Routes {
    /// How many (token, slot) pairs route to each expert of `experts` (index `id − experts.start`);
    /// ids outside the range (other ranks' experts, padding) are not counted.
    pub fn expert_counts(&self, experts: Range<usize>) -> Vec<usize> {
        let mut counts = vec![0; experts.len()];
        for &id in &self.ids {
            if id >= 0 && experts.contains(&(id as usize)) {
                counts[id as usize - experts.start] += 1;
            }
        }
        counts
    }

    /// How many experts of `experts` receive at least one token (the weights a layer must read).
    pub fn distinct_experts(&self, experts: Range<usize>) -> usize {
        self.expert_counts(experts)
            .iter()
            .filter(|&&c| c > 0)
            .count()
    }
}

/// Where the routing of a forward call comes from (`spec/layer-file.md`, input file).
#[derive(Clone, Copy, Debug)]
pub enum RoutingInput<'a> {
    /// F32 or BF16 `[T, E]`.
    Logits(&'a HostTensor),
    /// I32 `[T, k]` ids and F32 or BF16 `[T, k]` weights.
    TopK {
        ids: &'a HostTensor,
        weights: &'a HostTensor,
    },
    /// I32 `[T, k]`, FlashInfer's packed form.
    Packed(&'a HostTensor),
}

/// Tokens per parallel work item: large enough to amortize rayon's scheduling and the scratch
/// buffers, small enough to balance a few thousand tokens over the cores.
const CHUNK_TOKENS: usize = 64;

/// Routes `tokens` rows of f32 logits `[tokens, num_experts]` with `cfg`.
/// `bias` is the router bias `[E]`; methods without a bias ignore it, methods with one read b = 0
/// when it is `None`. Logits and bias must be finite.
pub fn route_logits(
    cfg: &RoutingConfig,
    logits: &[f32],
    tokens: usize,
    num_experts: usize,
    bias: Option<&[f32]>,
) -> Result<Routes> {
    cfg.validate(num_experts)?;
    check_bias(bias, num_experts)?;
    let e = num_experts;
    check_logits(logits, tokens, e)?;
    let k = cfg.top_k;
    let bias = if cfg.uses_bias() { bias } else { None };
    let mut ids = vec![0i32; tokens * k];
    let mut weights = vec![0f32; tokens * k];
    let route_chunk = |((ids, w), r): ((&mut [i32], &mut [f32]), &[f32])| {
        let mut scratch = methods::Scratch::default();
        for ((ids, w), r) in ids
            .chunks_exact_mut(k)
            .zip(w.chunks_exact_mut(k))
            .zip(r.chunks_exact(e))
        {
            methods::route_token(cfg, r, bias, &mut scratch, ids, w);
        }
    };
    let (step_ids, step_logits) = (CHUNK_TOKENS * k, CHUNK_TOKENS * e);
    if tokens <= CHUNK_TOKENS {
        route_chunk(((&mut ids[..], &mut weights[..]), logits));
    } else {
        ids.par_chunks_mut(step_ids)
            .zip(weights.par_chunks_mut(step_ids))
            .zip(logits.par_chunks(step_logits))
            .for_each(route_chunk);
    }
    Ok(Routes {
        tokens,
        top_k: k,
        ids,
        weights,
        weight_on_input: cfg.method == RoutingMethod::Llama4,
    })
}

/// The router bias must hold E finite values when given.
fn check_bias(bias: Option<&[f32]>, num_experts: usize) -> Result<()> {
    let Some(b) = bias else { return Ok(()) };
    if b.len() != num_experts {
        return Err(MoeError::shape(
            "router_bias",
            format!("[{num_experts}] ([E])"),
            &[b.len()],
        ));
    }
    if let Some(i) = b.iter().position(|v| !v.is_finite()) {
        return Err(MoeError::invalid(
            "tensor `router_bias`",
            format!("element [{i}] is {}, not a finite number", b[i]),
        ));
    }
    Ok(())
}

/// The logits fill `[tokens, E]` and are finite. Checked up front and in order, so the reported
/// element is the first bad one whatever the threading, and the methods may assume finite input.
fn check_logits(logits: &[f32], tokens: usize, e: usize) -> Result<()> {
    if Some(logits.len()) != tokens.checked_mul(e) {
        return Err(MoeError::invalid(
            "tensor `router_logits`",
            format!(
                "{} values do not fill [T, E] = [{tokens}, {e}]",
                logits.len()
            ),
        ));
    }
    if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
        return Err(MoeError::invalid(
            "tensor `router_logits`",
            format!(
                "element [{}, {}] is {}, not a finite number",
                i / e,
                i % e,
                logits[i]
            ),
        ));
    }
    Ok(())
}

/// The `router_logits` tensor as f32, after its dtype and shape checks.
fn logits_f32(t: &HostTensor, tokens: usize, num_experts: usize) -> Result<Vec<f32>> {
    let name = "router_logits";
    t.expect_dtype(name, &[DType::F32, DType::BF16])?;
    t.expect_shape(name, &[tokens, num_experts])?;
    t.to_f32_vec(name)
}

/// Every check of [`resolve`], without routing logits: for a backend that routes on its own device.
/// Returns the routes of routed input (ids + weights, packed) and `None` for logits.
pub fn resolve_unless_logits(
    cfg: &RoutingConfig,
    num_experts: usize,
    tokens: usize,
    input: &RoutingInput<'_>,
    bias: Option<&[f32]>,
) -> Result<Option<Routes>> {
    match *input {
        RoutingInput::Logits(t) => {
            cfg.validate(num_experts)?;
            check_bias(bias, num_experts)?;
            check_logits(&logits_f32(t, tokens, num_experts)?, tokens, num_experts)?;
            Ok(None)
        }
        _ => resolve(cfg, num_experts, tokens, input, bias).map(Some),
    }
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
    cfg.validate(num_experts)?;
    check_bias(bias, num_experts)?;
    let on_input = cfg.method == RoutingMethod::Llama4;
    match *input {
        RoutingInput::Logits(t) => route_logits(
            cfg,
            &logits_f32(t, tokens, num_experts)?,
            tokens,
            num_experts,
            bias,
        ),
        RoutingInput::TopK { ids, weights } => {
            routed::from_topk(ids, weights, num_experts, tokens, cfg.top_k, on_input)
        }
        RoutingInput::Packed(t) => routed::from_packed(t, num_experts, tokens, cfg.top_k, on_input),
    }
}
