//! Routed mode (`spec/routing.md`, "Routed mode"): top-k chosen by the caller, as ids + weights or
//! in FlashInfer's packed int32 form. Ids outside [0, E) are padding: kept, but they weigh nothing.

use half::bf16;

use super::Routes;
use crate::error::{MoeError, Result};
use crate::tensor::{DType, HostTensor};

/// Packs an expert id and weight into FlashInfer's routed int32 form:
/// `(id << 16) | (bf16_bits(w) & 0xFFFF)`, the weight rounded to bf16 to nearest even.
/// The id must fit in 16 signed bits (−32768..=32767, −1 for padding); higher bits are lost.
pub fn pack(id: i32, weight: f32) -> i32 {
    (id << 16) | i32::from(bf16::from_f32(weight).to_bits())
}

/// Unpacks FlashInfer's routed int32 form into (id, weight): the id by an arithmetic shift, so
/// negative ids (padding) survive, and the weight from the bf16 bits of the low half.
pub fn unpack(packed: i32) -> (i32, f32) {
    (packed >> 16, bf16::from_bits(packed as u16).to_f32())
}

/// Checks that `t` is I32-or-float `[tokens, top_k]`, saying both k's when only k differs.
fn check_shape(name: &str, t: &HostTensor, tokens: usize, top_k: usize) -> Result<()> {
    match t.shape[..] {
        [rows, k] if rows == tokens && k == top_k => Ok(()),
        [rows, k] if rows == tokens => Err(MoeError::shape(
            name,
            format!("[{tokens}, {top_k}]: k = {k} must equal the layer's top_k = {top_k}"),
            &t.shape,
        )),
        _ => Err(MoeError::shape(
            name,
            format!("[{tokens}, {top_k}] ([T, top_k])"),
            &t.shape,
        )),
    }
}

/// Ids `[T, k]` and weights `[T, k]` as given by the caller.
pub(crate) fn from_topk(
    ids: &HostTensor,
    weights: &HostTensor,
    num_experts: usize,
    tokens: usize,
    top_k: usize,
    weight_on_input: bool,
) -> Result<Routes> {
    ids.expect_dtype("topk_ids", &[DType::I32])?;
    check_shape("topk_ids", ids, tokens, top_k)?;
    weights.expect_dtype("topk_weights", &[DType::F32, DType::BF16])?;
    check_shape("topk_weights", weights, tokens, top_k)?;
    let ids_v = ids.to_i32_vec("topk_ids")?;
    let w_v = weights.to_f32_vec("topk_weights")?;
    build(
        ids_v,
        w_v,
        num_experts,
        tokens,
        top_k,
        weight_on_input,
        "topk_ids",
        "topk_weights",
    )
}

/// Packed int32 `[T, k]`.
pub(crate) fn from_packed(
    packed: &HostTensor,
    num_experts: usize,
    tokens: usize,
    top_k: usize,
    weight_on_input: bool,
) -> Result<Routes> {
    let name = "topk_packed";
    packed.expect_dtype(name, &[DType::I32])?;
    check_shape(name, packed, tokens, top_k)?;
    let (ids, weights) = packed.to_i32_vec(name)?.into_iter().map(unpack).unzip();
    build(
        ids,
        weights,
        num_experts,
        tokens,
        top_k,
        weight_on_input,
        name,
        name,
    )
}

/// Checks the decoded pairs and builds the routes. A valid slot (id in [0, E)) needs a finite
/// weight and an id unique within its token. A padding slot is not checked at all (a packed −1
/// carries the bf16 NaN pattern 0xFFFF in its weight half) and its weight is stored as 0, so no
/// non-finite value ever reaches a backend.
#[allow(clippy::too_many_arguments)]
fn build(
    ids: Vec<i32>,
    mut weights: Vec<f32>,
    num_experts: usize,
    tokens: usize,
    top_k: usize,
    weight_on_input: bool,
    ids_name: &str,
    weights_name: &str,
) -> Result<Routes> {
    // `seen_slot[e]` is expert e's slot in token `seen_token[e]`: duplicate detection in O(k) per
    // token even when k is large, without clearing anything between tokens.
    let mut seen_token = vec![usize::MAX; num_experts];
    let mut seen_slot = vec![0usize; num_experts];
    for t in 0..tokens {
        for j in 0..top_k {
            let i = t * top_k + j;
            let id = ids[i];
            if id < 0 || id as usize >= num_experts {
                weights[i] = 0.0;
                continue;
            }
            let e = id as usize;
            if seen_token[e] == t {
                return Err(MoeError::invalid(
                    format!("tensor `{ids_name}`"),
                    format!(
                        "token {t}: expert {id} appears twice, in slots {} and {j}",
                        seen_slot[e]
                    ),
                ));
            }
            seen_token[e] = t;
            seen_slot[e] = j;
            if !weights[i].is_finite() {
                return Err(MoeError::invalid(
                    format!("tensor `{weights_name}`"),
                    format!(
                        "element [{t}, {j}] (expert {id}) has weight {}, not a finite number",
                        weights[i]
                    ),
                ));
            }
        }
    }
    Ok(Routes {
        tokens,
        top_k,
        ids,
        weights,
        weight_on_input,
    })
}
