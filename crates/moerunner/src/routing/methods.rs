//! One pure function per routing method (`spec/routing.md`, the table): the function *is* the
//! method's definition, and every backend is checked against it.
//!
//! Each function routes one token: `r` holds its E logits (finite, checked by the caller), and it
//! writes k ids in order of decreasing selection key into `ids` and their f32 weights into `w`.
//! Sums run sequentially in a fixed order (over ids for softmax, over the selected slots for
//! renormalization), so a token's result never depends on threading.

use super::topk::select;
use crate::config::{RoutingConfig, RoutingMethod};

/// The additive constant that keeps the DeepSeek-V3 / MiniMax-M2 denominator non-zero.
const RENORM_EPS: f32 = 1e-20;

/// Per-thread buffers, reused across the tokens of a chunk.
#[derive(Default)]
pub(crate) struct Scratch {
    /// Selection keys of the current token, one per expert.
    keys: Vec<f32>,
    /// DeepSeek-V3 group scores.
    group_scores: Vec<f32>,
    /// DeepSeek-V3 kept groups.
    kept_groups: Vec<i32>,
}

/// Routes one token with `cfg.method`; `bias` (length E) is read only by the methods that use it.
pub(crate) fn route_token(
    cfg: &RoutingConfig,
    r: &[f32],
    bias: Option<&[f32]>,
    s: &mut Scratch,
    ids: &mut [i32],
    w: &mut [f32],
) {
    let rsf = cfg.routed_scaling_factor;
    match cfg.method {
        RoutingMethod::Default => default(r, &mut s.keys, ids, w),
        RoutingMethod::Renormalize => renormalize(r, ids, w),
        RoutingMethod::RenormalizeNaive => renormalize_naive(r, &mut s.keys, ids, w),
        RoutingMethod::DeepseekV3 => {
            deepseek_v3(r, bias, cfg.n_group, cfg.topk_group, rsf, s, ids, w)
        }
        RoutingMethod::Llama4 => llama4(r, ids, w),
        RoutingMethod::TopK => topk(r, ids, w),
        RoutingMethod::SigmoidRenorm => sigmoid_renorm(r, cfg.norm_topk_prob, &mut s.keys, ids, w),
        RoutingMethod::Minimax2 => minimax2(r, bias, rsf, &mut s.keys, ids, w),
        RoutingMethod::Sigmoid => sigmoid_method(r, &mut s.keys, ids, w),
        RoutingMethod::TopkSigmoid => topk_sigmoid(r, ids, w),
    }
}

/// σ(x) = 1 / (1 + e^−x) in f32; saturates to exactly 0 or 1 for large |x|, never NaN for finite x.
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Max-subtracted softmax of `r` into `out` (resized to E); the sum runs in id order.
fn softmax(r: &[f32], out: &mut Vec<f32>) {
    let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    out.clear();
    out.extend(r.iter().map(|&x| (x - max).exp()));
    let sum: f32 = out.iter().sum();
    for p in out.iter_mut() {
        *p /= sum;
    }
}

/// `keys[i] = σ(r_i) + b_i` (b = 0 without a bias).
fn biased_sigmoid_keys(r: &[f32], bias: Option<&[f32]>, keys: &mut Vec<f32>) {
    keys.clear();
    match bias {
        Some(b) => keys.extend(r.iter().zip(b).map(|(&x, &b)| sigmoid(x) + b)),
        None => keys.extend(r.iter().map(|&x| sigmoid(x))),
    }
}

/// `w_j = σ(r_ids[j]) · rsf / (Σ_j σ(r_ids[j]) + 1e−20)`: DeepSeek-V3 and MiniMax-M2, whose weights
/// ignore the bias that steered selection.
fn scaled_sigmoid_weights(r: &[f32], ids: &[i32], rsf: f32, w: &mut [f32]) {
    for (wj, &id) in w.iter_mut().zip(ids) {
        *wj = sigmoid(r[id as usize]);
    }
    let denom = w.iter().sum::<f32>() + RENORM_EPS;
    for wj in w.iter_mut() {
        *wj = *wj * rsf / denom;
    }
}

/// `default`: key softmax(r) over all E; weight the (not renormalized) probability.
pub(crate) fn default(r: &[f32], keys: &mut Vec<f32>, ids: &mut [i32], w: &mut [f32]) {
    softmax(r, keys);
    select(keys, ids);
    for (wj, &id) in w.iter_mut().zip(ids.iter()) {
        *wj = keys[id as usize];
    }
}

/// `renormalize`: key r; weight softmax over the selected k (max-subtracted with the top logit).
pub(crate) fn renormalize(r: &[f32], ids: &mut [i32], w: &mut [f32]) {
    select(r, ids);
    // The first id holds the largest selected logit, the max that keeps every e^x ≤ 1.
    let max = r[ids[0] as usize];
    for (wj, &id) in w.iter_mut().zip(ids.iter()) {
        *wj = (r[id as usize] - max).exp();
    }
    let sum: f32 = w.iter().sum();
    for wj in w.iter_mut() {
        *wj /= sum;
    }
}

/// `renormalize_naive`: key softmax(r) over all E; weight p_i / Σ_S p_j.
pub(crate) fn renormalize_naive(r: &[f32], keys: &mut Vec<f32>, ids: &mut [i32], w: &mut [f32]) {
    softmax(r, keys);
    select(keys, ids);
    for (wj, &id) in w.iter_mut().zip(ids.iter()) {
        *wj = keys[id as usize];
    }
    let sum: f32 = w.iter().sum();
    for wj in w.iter_mut() {
        *wj /= sum;
    }
}

/// `deepseek_v3`: key σ(r) + b with group selection when n_group > 1; weight σ(r_i)·rsf/(Σσ + 1e−20).
#[allow(clippy::too_many_arguments)]
pub(crate) fn deepseek_v3(
    r: &[f32],
    bias: Option<&[f32]>,
    n_group: usize,
    topk_group: usize,
    rsf: f32,
    s: &mut Scratch,
    ids: &mut [i32],
    w: &mut [f32],
) {
    biased_sigmoid_keys(r, bias, &mut s.keys);
    if n_group > 1 {
        mask_groups(
            &mut s.keys,
            n_group,
            topk_group,
            &mut s.group_scores,
            &mut s.kept_groups,
        );
    }
    select(&s.keys, ids);
    scaled_sigmoid_weights(r, ids, rsf, w);
}

/// DeepSeek-V3 group selection: a group (n_group groups of E / n_group consecutive ids) scores the
/// sum of its two largest keys; the `topk_group` best groups survive (ties to the lower group) and
/// every key of the other groups becomes −∞. A group of one expert scores its only key.
fn mask_groups(
    keys: &mut [f32],
    n_group: usize,
    topk_group: usize,
    scores: &mut Vec<f32>,
    kept: &mut Vec<i32>,
) {
    let size = keys.len() / n_group;
    scores.clear();
    scores.extend(keys.chunks_exact(size).map(top_two_sum));
    kept.clear();
    kept.resize(topk_group, 0);
    select(scores, kept);
    for (g, group) in keys.chunks_exact_mut(size).enumerate() {
        if !kept.contains(&(g as i32)) {
            group.fill(f32::NEG_INFINITY);
        }
    }
}

/// The sum of the two largest values (the one value of a singleton).
fn top_two_sum(group: &[f32]) -> f32 {
    let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in group {
        if x > first {
            second = first;
            first = x;
        } else if x > second {
            second = x;
        }
    }
    if group.len() < 2 {
        first
    } else {
        first + second
    }
}

/// `llama4`: key r with k = 1; weight σ(r_i) (applied to GEMM1's input by the backends).
pub(crate) fn llama4(r: &[f32], ids: &mut [i32], w: &mut [f32]) {
    topk_sigmoid(r, ids, w);
}

/// `topk`: key r; weight the raw logit.
pub(crate) fn topk(r: &[f32], ids: &mut [i32], w: &mut [f32]) {
    select(r, ids);
    for (wj, &id) in w.iter_mut().zip(ids.iter()) {
        *wj = r[id as usize];
    }
}

/// `sigmoid_renorm`: key σ(r); weight σ(r_i) / max(Σ_S σ, 1e−20) if `norm`, else σ(r_i).
pub(crate) fn sigmoid_renorm(
    r: &[f32],
    norm: bool,
    keys: &mut Vec<f32>,
    ids: &mut [i32],
    w: &mut [f32],
) {
    sigmoid_method(r, keys, ids, w);
    if norm {
        let denom = w.iter().sum::<f32>().max(RENORM_EPS);
        for wj in w.iter_mut() {
            *wj /= denom;
        }
    }
}

/// `minimax2`: key σ(r) + b (no groups); weight σ(r_i)·rsf/(Σσ + 1e−20).
pub(crate) fn minimax2(
    r: &[f32],
    bias: Option<&[f32]>,
    rsf: f32,
    keys: &mut Vec<f32>,
    ids: &mut [i32],
    w: &mut [f32],
) {
    biased_sigmoid_keys(r, bias, keys);
    select(keys, ids);
    scaled_sigmoid_weights(r, ids, rsf, w);
}

/// `sigmoid`: key σ(r); weight σ(r_i).
pub(crate) fn sigmoid_method(r: &[f32], keys: &mut Vec<f32>, ids: &mut [i32], w: &mut [f32]) {
    biased_sigmoid_keys(r, None, keys);
    select(keys, ids);
    for (wj, &id) in w.iter_mut().zip(ids.iter()) {
        *wj = keys[id as usize];
    }
}

/// `topk_sigmoid`: key r; weight σ(r_i).
pub(crate) fn topk_sigmoid(r: &[f32], ids: &mut [i32], w: &mut [f32]) {
    select(r, ids);
    for (wj, &id) in w.iter_mut().zip(ids.iter()) {
        *wj = sigmoid(r[id as usize]);
    }
}
