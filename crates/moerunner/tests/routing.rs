//! Routing (`spec/routing.md`): every method on small hand-computed cases, ties, DeepSeek-V3 group
//! masking, every limit and input error, the packed form, determinism across thread counts, and a
//! seeded property test. Expected weights are written as f64 expressions, independent of the f32
//! code under test.

use std::collections::BTreeSet;

use moerunner::rng::SeededRng;
use moerunner::routing::{pack, resolve, route_logits, unpack, Routes, RoutingInput};
use moerunner::{DType, HostTensor, MoeError, RoutingConfig, RoutingMethod as M};

// ---------------------------------------------------------------------------------------------
// Helpers

fn cfg(method: M, k: usize) -> RoutingConfig {
    RoutingConfig::new(method, k)
}

fn ds(k: usize, n_group: usize, topk_group: usize, rsf: f32) -> RoutingConfig {
    RoutingConfig {
        n_group,
        topk_group,
        routed_scaling_factor: rsf,
        ..cfg(M::DeepseekV3, k)
    }
}

fn sig(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Routes `logits` (T rows of E) and compares ids exactly and weights to `weights` (f64) within
/// 1e−6 relative; names the first bad slot.
fn check(
    c: &RoutingConfig,
    e: usize,
    logits: &[f32],
    bias: Option<&[f32]>,
    ids: &[i32],
    weights: &[f64],
) {
    let t = logits.len() / e;
    let r = route_logits(c, logits, t, e, bias).unwrap_or_else(|err| panic!("{c}: {err}"));
    assert_eq!((r.tokens, r.top_k), (t, c.top_k), "{c}");
    assert_eq!(r.ids, ids, "{c}: ids");
    assert_eq!(r.weights.len(), weights.len(), "{c}: weights");
    for (i, (&got, &want)) in r.weights.iter().zip(weights).enumerate() {
        let tol = 1e-6 * want.abs().max(1.0);
        assert!(
            (got as f64 - want).abs() <= tol,
            "{c}: weight [{}, {}] = {got}, want {want}",
            i / c.top_k,
            i % c.top_k
        );
    }
    assert_eq!(
        r.weight_on_input,
        c.method == M::Llama4,
        "{c}: weight_on_input"
    );
}

/// Asserts that `result` failed and its message contains every piece of `want`.
fn check_err<T: std::fmt::Debug>(result: Result<T, MoeError>, want: &[&str]) {
    let msg = match result {
        Ok(v) => panic!("expected an error containing {want:?}, got Ok({v:?})"),
        Err(e) => e.to_string(),
    };
    for w in want {
        assert!(msg.contains(w), "error `{msg}` does not mention `{w}`");
    }
}

fn logits_t(shape: Vec<usize>, v: &[f32]) -> HostTensor {
    HostTensor::from_f32(shape, v)
}

fn resolve_logits(
    c: &RoutingConfig,
    e: usize,
    t: usize,
    x: &HostTensor,
) -> moerunner::Result<Routes> {
    resolve(c, e, t, &RoutingInput::Logits(x), None)
}

fn resolve_topk(
    c: &RoutingConfig,
    e: usize,
    t: usize,
    ids: &HostTensor,
    w: &HostTensor,
) -> moerunner::Result<Routes> {
    resolve(c, e, t, &RoutingInput::TopK { ids, weights: w }, None)
}

fn resolve_packed(
    c: &RoutingConfig,
    e: usize,
    t: usize,
    p: &HostTensor,
) -> moerunner::Result<Routes> {
    resolve(c, e, t, &RoutingInput::Packed(p), None)
}

// ---------------------------------------------------------------------------------------------
// Each method on hand-computed cases

const R4: [f32; 4] = [1.0, 3.0, 2.0, 0.0];

#[test]
fn default_is_softmax_over_all_experts() {
    let s = (0f64).exp() + 1f64.exp() + 2f64.exp() + 3f64.exp();
    check(
        &cfg(M::Default, 2),
        4,
        &R4,
        None,
        &[1, 2],
        &[3f64.exp() / s, 2f64.exp() / s],
    );
}

#[test]
fn renormalize_is_softmax_over_the_selected() {
    let s = 3f64.exp() + 2f64.exp();
    check(
        &cfg(M::Renormalize, 2),
        4,
        &R4,
        None,
        &[1, 2],
        &[3f64.exp() / s, 2f64.exp() / s],
    );
}

#[test]
fn renormalize_naive_equals_renormalize() {
    let s = 3f64.exp() + 2f64.exp() + 1f64.exp();
    let w = [3f64.exp() / s, 2f64.exp() / s, 1f64.exp() / s];
    check(&cfg(M::RenormalizeNaive, 3), 4, &R4, None, &[1, 2, 0], &w);
    check(&cfg(M::Renormalize, 3), 4, &R4, None, &[1, 2, 0], &w);
}

#[test]
fn renormalize_large_logits_do_not_overflow() {
    let s = 1.0 + (-1f64).exp();
    check(
        &cfg(M::Renormalize, 2),
        3,
        &[1000.0, 999.0, -1000.0],
        None,
        &[0, 1],
        &[1.0 / s, (-1f64).exp() / s],
    );
}

#[test]
fn topk_weights_are_raw_logits() {
    check(
        &cfg(M::TopK, 3),
        4,
        &[-1.0, 0.5, 2.0, -3.0],
        None,
        &[2, 1, 0],
        &[2.0, 0.5, -1.0],
    );
}

#[test]
fn topk_sigmoid_selects_by_logit_weighs_by_sigmoid() {
    check(
        &cfg(M::TopkSigmoid, 2),
        4,
        &[-1.0, 0.5, 2.0, -3.0],
        None,
        &[2, 1],
        &[sig(2.0), sig(0.5)],
    );
}

#[test]
fn sigmoid_weights_are_sigmoids() {
    check(
        &cfg(M::Sigmoid, 2),
        4,
        &[-1.0, 0.5, 2.0, -3.0],
        None,
        &[2, 1],
        &[sig(2.0), sig(0.5)],
    );
}

#[test]
fn sigmoid_renorm_normalizes() {
    let s = sig(2.0) + sig(0.5) + sig(-1.0);
    let w = [sig(2.0) / s, sig(0.5) / s, sig(-1.0) / s];
    check(
        &cfg(M::SigmoidRenorm, 3),
        4,
        &[-1.0, 0.5, 2.0, -3.0],
        None,
        &[2, 1, 0],
        &w,
    );
}

#[test]
fn sigmoid_renorm_without_norm_topk_prob() {
    let c = RoutingConfig {
        norm_topk_prob: false,
        ..cfg(M::SigmoidRenorm, 2)
    };
    check(
        &c,
        4,
        &[-1.0, 0.5, 2.0, -3.0],
        None,
        &[2, 1],
        &[sig(2.0), sig(0.5)],
    );
}

#[test]
fn llama4_takes_one_expert_weighted_on_input() {
    check(
        &cfg(M::Llama4, 1),
        3,
        &[0.1, 0.7, -2.0, 5.0, -1.0, 4.0],
        None,
        &[1, 0],
        &[sig(0.7), sig(5.0)],
    );
}

#[test]
fn minimax2_bias_steers_selection_not_weights() {
    let c = RoutingConfig {
        routed_scaling_factor: 2.5,
        ..cfg(M::Minimax2, 2)
    };
    let bias = [0.0, 2.0, 0.0, 0.0];
    let s = sig(-1.0) + sig(2.0);
    let w = [2.5 * sig(-1.0) / s, 2.5 * sig(2.0) / s];
    check(&c, 4, &[1.0, -1.0, 0.5, 2.0], Some(&bias), &[1, 3], &w);
}

#[test]
fn minimax2_without_bias_uses_zero() {
    let s = sig(2.0) + sig(1.0);
    check(
        &cfg(M::Minimax2, 2),
        4,
        &[1.0, -1.0, 0.5, 2.0],
        None,
        &[3, 0],
        &[sig(2.0) / s, sig(1.0) / s],
    );
}

#[test]
fn minimax2_equal_logits_split_rsf() {
    let c = RoutingConfig {
        routed_scaling_factor: 2.5,
        ..cfg(M::Minimax2, 2)
    };
    check(
        &c,
        4,
        &[0.0; 4],
        Some(&[0.0, 0.1, 0.3, 0.2]),
        &[2, 3],
        &[1.25, 1.25],
    );
}

#[test]
fn deepseek_v3_single_group_is_plain_topk_on_biased_sigmoid() {
    let bias = [0.0, 2.0, 0.0, 0.0];
    let s = sig(-1.0) + sig(2.0);
    let w = [1.5 * sig(-1.0) / s, 1.5 * sig(2.0) / s];
    check(
        &ds(2, 1, 1, 1.5),
        4,
        &[1.0, -1.0, 0.5, 2.0],
        Some(&bias),
        &[1, 3],
        &w,
    );
    // n_group = 0 is also "no groups".
    check(
        &ds(2, 0, 0, 1.5),
        4,
        &[1.0, -1.0, 0.5, 2.0],
        Some(&bias),
        &[1, 3],
        &w,
    );
}

#[test]
fn deepseek_v3_without_bias_uses_zero() {
    let s = sig(2.0) + sig(1.0);
    check(
        &ds(2, 1, 1, 1.0),
        4,
        &[1.0, -1.0, 0.5, 2.0],
        None,
        &[3, 0],
        &[sig(2.0) / s, sig(1.0) / s],
    );
}

#[test]
fn deepseek_v3_drops_the_group_of_the_best_expert() {
    // Groups of two: {0,1} scores σ(2)+σ(1.8), {2,3} σ(1.5)+σ(1.4), {4,5} 2σ(0) = 1,
    // {6,7} σ(5)+σ(−6) < 1. Expert 6 has the best key but its group is dropped.
    let r = [2.0, 1.8, 1.5, 1.4, 0.0, 0.0, 5.0, -6.0];
    let s = sig(2.0) + sig(1.8) + sig(1.5);
    let w = [2.5 * sig(2.0) / s, 2.5 * sig(1.8) / s, 2.5 * sig(1.5) / s];
    check(&ds(3, 4, 2, 2.5), 8, &r, None, &[0, 1, 2], &w);
    // With every group kept, expert 6 comes back first.
    let s = sig(5.0) + sig(2.0) + sig(1.8);
    check(
        &ds(3, 4, 4, 1.0),
        8,
        &r,
        None,
        &[6, 0, 1],
        &[sig(5.0) / s, sig(2.0) / s, sig(1.8) / s],
    );
}

#[test]
fn deepseek_v3_group_score_is_top_two_sum_not_max() {
    // Group {0,1,2} has the best single key (σ(3)) but a weak second; group {3,4,5} wins on the sum.
    let r = [3.0, -4.0, -4.0, 1.0, 1.0, -4.0];
    let s = 2.0 * sig(1.0);
    check(
        &ds(2, 2, 1, 1.0),
        6,
        &r,
        None,
        &[3, 4],
        &[sig(1.0) / s, sig(1.0) / s],
    );
}

#[test]
fn deepseek_v3_bias_steers_group_selection() {
    let s = sig(0.0);
    check(
        &ds(1, 2, 1, 1.0),
        4,
        &[0.0; 4],
        Some(&[0.0, 0.0, 0.1, 0.0]),
        &[2],
        &[s / s],
    );
}

#[test]
fn deepseek_v3_groups_of_one_are_plain_topk() {
    let s = sig(3.0) + sig(2.0);
    check(
        &ds(2, 4, 2, 1.0),
        4,
        &[0.0, 3.0, 1.0, 2.0],
        None,
        &[1, 3],
        &[sig(3.0) / s, sig(2.0) / s],
    );
}

#[test]
fn deepseek_v3_several_tokens() {
    let r = [0.0, 1.0, 2.0, 3.0, 3.0, 2.0, 1.0, 0.0];
    let s = sig(3.0) + sig(2.0);
    let w = [sig(3.0) / s, sig(2.0) / s];
    check(
        &ds(2, 2, 1, 1.0),
        4,
        &r,
        None,
        &[3, 2, 0, 1],
        &[w[0], w[1], w[0], w[1]],
    );
}

// ---------------------------------------------------------------------------------------------
// Ties go to the lower id

#[test]
fn tie_equal_logits_lower_ids_first() {
    for m in [
        M::Default,
        M::Renormalize,
        M::RenormalizeNaive,
        M::TopK,
        M::Sigmoid,
        M::TopkSigmoid,
        M::Minimax2,
    ] {
        let c = cfg(m, 3);
        let r = route_logits(&c, &[0.5; 5], 1, 5, None).unwrap();
        assert_eq!(r.ids, [0, 1, 2], "{c}");
    }
    check(
        &cfg(M::Default, 3),
        4,
        &[0.5; 4],
        None,
        &[0, 1, 2],
        &[0.25; 3],
    );
    check(
        &cfg(M::Renormalize, 2),
        4,
        &[1.0, 2.0, 1.0, 2.0],
        None,
        &[1, 3],
        &[0.5, 0.5],
    );
    check(
        &cfg(M::Llama4, 1),
        3,
        &[1.0, 2.0, 2.0],
        None,
        &[1],
        &[sig(2.0)],
    );
}

#[test]
fn tie_after_sigmoid_saturation_follows_the_key() {
    // σ(30), σ(40), σ(50) are all exactly 1.0 in f32: equal keys for `sigmoid`, distinct for `topk_sigmoid`.
    check(
        &cfg(M::Sigmoid, 2),
        3,
        &[30.0, 40.0, 50.0],
        None,
        &[0, 1],
        &[1.0, 1.0],
    );
    check(
        &cfg(M::TopkSigmoid, 2),
        3,
        &[30.0, 40.0, 50.0],
        None,
        &[2, 1],
        &[1.0, 1.0],
    );
}

#[test]
fn tie_equal_group_scores_keep_the_lower_group() {
    // Both groups hold {σ(1), σ(−1)}: equal scores, so group 0 is kept although expert 3 ties expert 0.
    let r = [1.0, -1.0, -1.0, 1.0];
    check(&ds(1, 2, 1, 1.0), 4, &r, None, &[0], &[1.0]);
    let s = sig(1.0) + sig(-1.0);
    check(
        &ds(2, 2, 1, 1.0),
        4,
        &r,
        None,
        &[0, 1],
        &[sig(1.0) / s, sig(-1.0) / s],
    );
    check(&ds(2, 2, 1, 1.0), 4, &[0.0; 4], None, &[0, 1], &[0.5, 0.5]);
}

// ---------------------------------------------------------------------------------------------
// Limits of RoutingConfig::validate, one test per rule

fn limit_err(c: RoutingConfig, e: usize, want: &[&str]) {
    let logits = vec![0.0; e];
    check_err(route_logits(&c, &logits, 1, e, None), want);
    check_err(
        resolve_logits(&c, e, 1, &logits_t(vec![1, e], &logits)),
        want,
    );
}

#[test]
fn limit_top_k_zero() {
    limit_err(cfg(M::Renormalize, 0), 4, &["top_k", "got 0"]);
}

#[test]
fn limit_top_k_above_e() {
    limit_err(cfg(M::Renormalize, 5), 4, &["top_k", "got 5"]);
}

#[test]
fn limit_llama4_needs_k_1() {
    limit_err(cfg(M::Llama4, 2), 4, &["top_k", "llama4"]);
}

#[test]
fn limit_routed_scaling_factor_finite() {
    limit_err(ds(1, 1, 1, f32::NAN), 4, &["routed_scaling_factor"]);
    limit_err(
        RoutingConfig {
            routed_scaling_factor: f32::INFINITY,
            ..cfg(M::Minimax2, 1)
        },
        4,
        &["routed_scaling_factor"],
    );
}

#[test]
fn limit_deepseek_e_divisible_by_n_group() {
    limit_err(ds(1, 3, 1, 1.0), 8, &["n_group", "8", "3"]);
}

#[test]
fn limit_deepseek_topk_group_at_least_1() {
    limit_err(ds(1, 2, 0, 1.0), 8, &["topk_group", "got 0"]);
}

#[test]
fn limit_deepseek_topk_group_at_most_n_group() {
    limit_err(ds(1, 2, 3, 1.0), 8, &["topk_group", "got 3"]);
}

#[test]
fn limit_deepseek_k_within_kept_groups() {
    limit_err(ds(5, 4, 2, 1.0), 8, &["top_k", "5", "4"]);
}

// ---------------------------------------------------------------------------------------------
// Errors of route_logits / resolve, one test per rule

#[test]
fn err_logits_dtype() {
    let c = cfg(M::Renormalize, 1);
    check_err(
        resolve_logits(&c, 2, 1, &HostTensor::from_i32(vec![1, 2], &[0, 1])),
        &["router_logits", "I32"],
    );
    let f16 = HostTensor::encode_f32(DType::F16, vec![1, 2], &[0.0, 1.0]);
    check_err(resolve_logits(&c, 2, 1, &f16), &["router_logits", "F16"]);
}

#[test]
fn err_logits_shape_wrong_e() {
    let c = cfg(M::Renormalize, 1);
    check_err(
        resolve_logits(&c, 2, 1, &logits_t(vec![1, 3], &[0.0; 3])),
        &["router_logits", "[1, 2]", "[1, 3]"],
    );
}

#[test]
fn err_logits_shape_wrong_t() {
    let c = cfg(M::Renormalize, 1);
    check_err(
        resolve_logits(&c, 2, 2, &logits_t(vec![1, 2], &[0.0; 2])),
        &["router_logits", "[2, 2]"],
    );
    check_err(
        resolve_logits(&c, 2, 2, &logits_t(vec![4], &[0.0; 4])),
        &["router_logits", "[2, 2]"],
    );
}

#[test]
fn err_logits_length() {
    check_err(
        route_logits(&cfg(M::Renormalize, 1), &[0.0; 5], 2, 2, None),
        &["router_logits", "5"],
    );
}

#[test]
fn err_logits_nan() {
    let mut v = [0.0f32; 6];
    v[5] = f32::NAN;
    check_err(
        resolve_logits(&cfg(M::Renormalize, 1), 3, 2, &logits_t(vec![2, 3], &v)),
        &["router_logits", "[1, 2]", "NaN"],
    );
}

#[test]
fn err_logits_inf() {
    let mut v = [0.0f32; 6];
    v[1] = f32::NEG_INFINITY;
    check_err(
        route_logits(&cfg(M::TopK, 1), &v, 2, 3, None),
        &["router_logits", "[0, 1]", "inf"],
    );
}

#[test]
fn err_bias_length() {
    check_err(
        route_logits(&ds(1, 1, 1, 1.0), &[0.0; 4], 1, 4, Some(&[0.0; 3])),
        &["router_bias", "[4]", "[3]"],
    );
}

#[test]
fn err_bias_non_finite() {
    let b = [0.0, 0.0, 0.0, f32::NAN];
    check_err(
        route_logits(&cfg(M::Minimax2, 1), &[0.0; 4], 1, 4, Some(&b)),
        &["router_bias", "[3]", "NaN"],
    );
    let ids = HostTensor::from_i32(vec![1, 1], &[0]);
    let x = logits_t(vec![1, 4], &[0.0; 4]);
    check_err(
        resolve(&ds(1, 1, 1, 1.0), 4, 1, &RoutingInput::Logits(&x), Some(&b)),
        &["router_bias", "[3]"],
    );
    let input = RoutingInput::TopK {
        ids: &ids,
        weights: &logits_t(vec![1, 1], &[1.0]),
    };
    check_err(
        resolve(&ds(1, 1, 1, 1.0), 4, 1, &input, Some(&b)),
        &["router_bias"],
    );
}

#[test]
fn err_topk_ids_dtype() {
    let w = logits_t(vec![1, 1], &[1.0]);
    check_err(
        resolve_topk(&cfg(M::TopK, 1), 4, 1, &logits_t(vec![1, 1], &[0.0]), &w),
        &["topk_ids", "I32", "F32"],
    );
}

#[test]
fn err_topk_weights_dtype() {
    let ids = HostTensor::from_i32(vec![1, 1], &[0]);
    check_err(
        resolve_topk(&cfg(M::TopK, 1), 4, 1, &ids, &ids),
        &["topk_weights", "I32"],
    );
    let f16 = HostTensor::encode_f32(DType::F16, vec![1, 1], &[1.0]);
    check_err(
        resolve_topk(&cfg(M::TopK, 1), 4, 1, &ids, &f16),
        &["topk_weights", "F16"],
    );
}

#[test]
fn err_topk_ids_k_differs_from_top_k() {
    let ids = HostTensor::from_i32(vec![1, 3], &[0, 1, 2]);
    let w = logits_t(vec![1, 3], &[1.0; 3]);
    check_err(
        resolve_topk(&cfg(M::TopK, 2), 4, 1, &ids, &w),
        &["topk_ids", "k = 3", "top_k = 2"],
    );
}

#[test]
fn err_topk_ids_wrong_tokens() {
    let ids = HostTensor::from_i32(vec![2, 1], &[0, 1]);
    let w = logits_t(vec![2, 1], &[1.0; 2]);
    check_err(
        resolve_topk(&cfg(M::TopK, 1), 4, 3, &ids, &w),
        &["topk_ids", "[3, 1]", "[2, 1]"],
    );
}

#[test]
fn err_topk_weights_shape() {
    let ids = HostTensor::from_i32(vec![1, 2], &[0, 1]);
    let w = logits_t(vec![1, 1], &[1.0]);
    check_err(
        resolve_topk(&cfg(M::TopK, 2), 4, 1, &ids, &w),
        &["topk_weights", "k = 1", "top_k = 2"],
    );
}

#[test]
fn err_topk_weights_non_finite() {
    let ids = HostTensor::from_i32(vec![2, 2], &[0, 1, 2, 3]);
    let w = logits_t(vec![2, 2], &[1.0, 1.0, 1.0, f32::INFINITY]);
    check_err(
        resolve_topk(&cfg(M::TopK, 2), 4, 2, &ids, &w),
        &["topk_weights", "[1, 1]", "inf"],
    );
    let w = logits_t(vec![2, 2], &[1.0, f32::NAN, 1.0, 1.0]);
    check_err(
        resolve_topk(&cfg(M::TopK, 2), 4, 2, &ids, &w),
        &["topk_weights", "[0, 1]", "NaN"],
    );
}

#[test]
fn err_topk_duplicate_ids() {
    let ids = HostTensor::from_i32(vec![2, 3], &[0, 1, 2, 3, -1, 3]);
    let w = logits_t(vec![2, 3], &[1.0; 6]);
    check_err(
        resolve_topk(&cfg(M::TopK, 3), 4, 2, &ids, &w),
        &["topk_ids", "token 1", "expert 3", "slots 0 and 2"],
    );
}

#[test]
fn err_packed_dtype() {
    check_err(
        resolve_packed(&cfg(M::TopK, 1), 4, 1, &logits_t(vec![1, 1], &[0.0])),
        &["topk_packed", "I32"],
    );
}

#[test]
fn err_packed_k_differs_from_top_k() {
    let p = HostTensor::from_i32(vec![1, 1], &[pack(0, 1.0)]);
    check_err(
        resolve_packed(&cfg(M::TopK, 2), 4, 1, &p),
        &["topk_packed", "k = 1", "top_k = 2"],
    );
}

#[test]
fn err_packed_non_finite_weight() {
    let p = HostTensor::from_i32(vec![1, 2], &[pack(0, 1.0), pack(2, f32::NAN)]);
    check_err(
        resolve_packed(&cfg(M::TopK, 2), 4, 1, &p),
        &["topk_packed", "[0, 1]", "NaN"],
    );
}

#[test]
fn err_packed_duplicate_ids() {
    let p = HostTensor::from_i32(vec![1, 2], &[pack(1, 1.0), pack(1, 0.5)]);
    check_err(
        resolve_packed(&cfg(M::TopK, 2), 4, 1, &p),
        &["topk_packed", "token 0", "expert 1"],
    );
}

// ---------------------------------------------------------------------------------------------
// Routed mode

#[test]
fn routed_ids_and_weights_used_as_given() {
    let ids = HostTensor::from_i32(vec![2, 2], &[3, 0, 1, 2]);
    let w = logits_t(vec![2, 2], &[0.25, -0.5, 7.0, 0.0]);
    let r = resolve_topk(&cfg(M::Renormalize, 2), 4, 2, &ids, &w).unwrap();
    assert_eq!(
        r,
        Routes {
            tokens: 2,
            top_k: 2,
            ids: vec![3, 0, 1, 2],
            weights: vec![0.25, -0.5, 7.0, 0.0],
            weight_on_input: false
        }
    );
}

#[test]
fn routed_bf16_weights() {
    let ids = HostTensor::from_i32(vec![1, 2], &[1, 0]);
    let w = HostTensor::encode_f32(DType::BF16, vec![1, 2], &[0.3, 0.7]);
    let r = resolve_topk(&cfg(M::TopK, 2), 4, 1, &ids, &w).unwrap();
    let bf = |x: f32| half::bf16::from_f32(x).to_f32();
    assert_eq!(r.weights, [bf(0.3), bf(0.7)]);
}

#[test]
fn routed_padding_and_out_of_range_ids_are_kept_with_zero_weight() {
    // −1 padding, E itself and a large negative id are all skipped; their weights are not checked.
    let ids = HostTensor::from_i32(vec![2, 3], &[-1, 2, 4, i32::MIN, -1, 0]);
    let w = logits_t(vec![2, 3], &[f32::NAN, 0.5, 9.0, 1.0, f32::INFINITY, 0.5]);
    let r = resolve_topk(&cfg(M::TopK, 3), 4, 2, &ids, &w).unwrap();
    assert_eq!(r.ids, [-1, 2, 4, i32::MIN, -1, 0]);
    assert_eq!(r.weights, [0.0, 0.5, 0.0, 0.0, 0.0, 0.5]);
    assert_eq!(r.expert_counts(0..4), [1, 0, 1, 0]);
}

#[test]
fn routed_packed_decodes_ids_and_bf16_weights() {
    // A raw −1 (0xFFFFFFFF) is padding whose weight half is a bf16 NaN: accepted, weight 0.
    let p = HostTensor::from_i32(
        vec![2, 2],
        &[pack(3, 0.75), -1, pack(0, 0.3), pack(1, -2.0)],
    );
    let r = resolve_packed(&cfg(M::Renormalize, 2), 4, 2, &p).unwrap();
    assert_eq!(r.ids, [3, -1, 0, 1]);
    assert_eq!(
        r.weights,
        [0.75, 0.0, half::bf16::from_f32(0.3).to_f32(), -2.0]
    );
    assert!(!r.weight_on_input);
}

#[test]
fn routed_llama4_weighs_on_input() {
    let c = cfg(M::Llama4, 1);
    let ids = HostTensor::from_i32(vec![1, 1], &[2]);
    assert!(
        resolve_topk(&c, 4, 1, &ids, &logits_t(vec![1, 1], &[0.5]))
            .unwrap()
            .weight_on_input
    );
    let p = HostTensor::from_i32(vec![1, 1], &[pack(2, 0.5)]);
    assert!(resolve_packed(&c, 4, 1, &p).unwrap().weight_on_input);
    assert!(
        resolve_logits(&c, 4, 1, &logits_t(vec![1, 4], &[0.0; 4]))
            .unwrap()
            .weight_on_input
    );
}

#[test]
fn zero_tokens_in_every_mode() {
    let c = cfg(M::DeepseekV3, 2);
    let empty = |k: usize| Routes {
        tokens: 0,
        top_k: k,
        ids: vec![],
        weights: vec![],
        weight_on_input: false,
    };
    assert_eq!(
        resolve_logits(&c, 4, 0, &logits_t(vec![0, 4], &[])).unwrap(),
        empty(2)
    );
    let ids = HostTensor::from_i32(vec![0, 2], &[]);
    assert_eq!(
        resolve_topk(&c, 4, 0, &ids, &logits_t(vec![0, 2], &[])).unwrap(),
        empty(2)
    );
    assert_eq!(resolve_packed(&c, 4, 0, &ids).unwrap(), empty(2));
}

#[test]
fn bf16_logits_route_like_the_same_f32_values() {
    let mut rng = SeededRng::new(11);
    let (t, e) = (40, 16);
    // Values on the bf16 grid, so both tensors hold exactly the same numbers.
    let v: Vec<f32> = (0..t * e)
        .map(|_| half::bf16::from_f32(rng.normal() * 2.0).to_f32())
        .collect();
    let bf = HostTensor::encode_f32(DType::BF16, vec![t, e], &v);
    let f = logits_t(vec![t, e], &v);
    for &m in M::ALL {
        let c = RoutingConfig {
            n_group: 4,
            topk_group: 2,
            ..cfg(m, if m == M::Llama4 { 1 } else { 3 })
        };
        assert_eq!(
            resolve_logits(&c, e, t, &bf).unwrap(),
            resolve_logits(&c, e, t, &f).unwrap(),
            "{c}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Packed form

#[test]
fn pack_exact_bit_layout() {
    let cases: [(i32, f32, u32); 7] = [
        (5, 1.0, 0x0005_3F80),
        (0, -1.5, 0x0000_BFC0),
        (-1, 0.0, 0xFFFF_0000),
        (-1, -2.0, 0xFFFF_C000),
        (32767, 0.5, 0x7FFF_3F00),
        (-32768, 1.0, 0x8000_3F80),
        (255, -0.0, 0x00FF_8000),
    ];
    for (id, w, bits) in cases {
        assert_eq!(pack(id, w) as u32, bits, "pack({id}, {w})");
        assert_eq!(unpack(bits as i32), (id, w), "unpack({bits:#010x})");
    }
}

#[test]
fn pack_rounds_weight_to_nearest_even_bf16() {
    let w = |bits: u32| f32::from_bits(bits);
    assert_eq!(
        pack(1, w(0x3F80_8000)) & 0xFFFF,
        0x3F80,
        "tie to even (down)"
    );
    assert_eq!(pack(1, w(0x3F81_8000)) & 0xFFFF, 0x3F82, "tie to even (up)");
    assert_eq!(pack(1, w(0x3F80_8001)) & 0xFFFF, 0x3F81, "above half");
    assert_eq!(pack(1, w(0x3F80_7FFF)) & 0xFFFF, 0x3F80, "below half");
}

#[test]
fn pack_round_trip() {
    let ids = [-1, 0, 1, 7, 255, 256, 32766, 32767, -32768, -2];
    let weights = [
        0.0, -0.0, 1.0, -1.0, 0.3, -0.3, 1e-3, -7.25, 65504.0, 3.0e38, 1e-40,
    ];
    for id in ids {
        for w in weights {
            let (got_id, got_w) = unpack(pack(id, w));
            let want = half::bf16::from_f32(w).to_f32();
            assert_eq!(
                (got_id, got_w.to_bits()),
                (id, want.to_bits()),
                "pack({id}, {w})"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Routes helpers

#[test]
fn routes_expert_counts_and_distinct() {
    let r = Routes {
        tokens: 3,
        top_k: 2,
        ids: vec![0, 3, 3, 1, -1, 5],
        weights: vec![1.0; 6],
        weight_on_input: false,
    };
    assert_eq!(r.expert_counts(0..4), [1, 1, 0, 2]);
    assert_eq!(r.expert_counts(2..6), [0, 2, 0, 1]);
    assert_eq!(r.distinct_experts(0..4), 3);
    assert_eq!(r.distinct_experts(4..8), 1);
}

// ---------------------------------------------------------------------------------------------
// Determinism and seeded properties

fn random_logits(seed: u64, t: usize, e: usize) -> Vec<f32> {
    let mut rng = SeededRng::new(seed);
    (0..t * e).map(|_| rng.normal() * 3.0).collect()
}

/// Every method with k experts out of E; DeepSeek-V3 with 8 groups, keeping half of them (all of
/// them when k would not fit in half).
fn all_configs(e: usize, k: usize, rsf: f32) -> Vec<RoutingConfig> {
    let topk_group = if k <= 4 * (e / 8) { 4 } else { 8 };
    M::ALL
        .iter()
        .map(|&m| {
            let k = if m == M::Llama4 { 1 } else { k };
            RoutingConfig {
                n_group: 8,
                topk_group,
                routed_scaling_factor: rsf,
                ..cfg(m, k)
            }
        })
        .collect()
}

#[test]
fn routing_is_independent_of_thread_count() {
    let (t, e) = (1000, 64);
    let seed = 7;
    println!("seed {seed}");
    let logits = random_logits(seed, t, e);
    let bias: Vec<f32> = random_logits(seed + 1, 1, e)
        .iter()
        .map(|b| b * 0.1)
        .collect();
    let pool = |n| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    };
    let (one, three) = (pool(1), pool(3));
    for c in all_configs(e, 6, 2.5) {
        let a = one
            .install(|| route_logits(&c, &logits, t, e, Some(&bias)))
            .unwrap();
        let b = three
            .install(|| route_logits(&c, &logits, t, e, Some(&bias)))
            .unwrap();
        assert_eq!(a.ids, b.ids, "{c}");
        let bits = |r: &Routes| r.weights.iter().map(|w| w.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b), "{c}");
        // The sequential path (a single small batch) agrees with the parallel one token by token.
        let head = route_logits(&c, &logits[..10 * e], 10, e, Some(&bias)).unwrap();
        assert_eq!(head.ids, a.ids[..10 * c.top_k], "{c}");
        assert_eq!(bits(&head), bits(&a)[..10 * c.top_k], "{c}");
    }
}

/// The f64 selection key of expert `i` for `c` (group masking excluded).
fn key64(c: &RoutingConfig, r: &[f32], bias: &[f32], i: usize) -> f64 {
    let x = r[i] as f64;
    match c.method {
        M::Default | M::RenormalizeNaive => {
            let max = r.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            (x - max).exp() / r.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>()
        }
        M::Renormalize | M::Llama4 | M::TopK | M::TopkSigmoid => x,
        M::Sigmoid | M::SigmoidRenorm => sig(x),
        M::DeepseekV3 | M::Minimax2 => sig(x) + bias[i] as f64,
    }
}

/// The f64 weights of the selected `ids` for `c`.
fn weights64(c: &RoutingConfig, r: &[f32], ids: &[i32]) -> Vec<f64> {
    let sel: Vec<f64> = ids.iter().map(|&i| r[i as usize] as f64).collect();
    let rsf = c.routed_scaling_factor as f64;
    let sigs: Vec<f64> = sel.iter().map(|&x| sig(x)).collect();
    let sig_sum: f64 = sigs.iter().sum();
    match c.method {
        M::Default => {
            let s: f64 = r.iter().map(|&v| (v as f64).exp()).sum();
            sel.iter().map(|x| x.exp() / s).collect()
        }
        M::Renormalize | M::RenormalizeNaive => {
            let s: f64 = sel.iter().map(|x| x.exp()).sum();
            sel.iter().map(|x| x.exp() / s).collect()
        }
        M::DeepseekV3 | M::Minimax2 => sigs.iter().map(|s| s * rsf / (sig_sum + 1e-20)).collect(),
        M::TopK => sel,
        M::SigmoidRenorm => sigs.iter().map(|s| s / sig_sum.max(1e-20)).collect(),
        M::Llama4 | M::Sigmoid | M::TopkSigmoid => sigs,
    }
}

#[test]
fn seeded_random_properties() {
    for seed in 100..112u64 {
        let mut rng = SeededRng::new(seed);
        let e = [8, 16, 64, 256][rng.below(4) as usize];
        let k = 1 + rng.below(8) as usize;
        let t = 1 + rng.below(200) as usize;
        let rsf = [1.0, 2.5][rng.below(2) as usize];
        println!("seed {seed}: T={t} E={e} k={k} rsf={rsf}");
        let logits = random_logits(seed, t, e);
        let bias: Vec<f32> = (0..e).map(|_| rng.normal() * 0.2).collect();
        for c in all_configs(e, k, rsf) {
            let r = route_logits(&c, &logits, t, e, Some(&bias))
                .unwrap_or_else(|err| panic!("seed {seed} {c}: {err}"));
            for tok in 0..t {
                let row = &logits[tok * e..(tok + 1) * e];
                let ids = &r.ids[tok * c.top_k..(tok + 1) * c.top_k];
                let w = &r.weights[tok * c.top_k..(tok + 1) * c.top_k];
                let ctx = format!("seed {seed} {c} token {tok}");
                // Distinct, in range, finite.
                for (j, &id) in ids.iter().enumerate() {
                    assert!((0..e as i32).contains(&id), "{ctx}: id {id}");
                    assert!(!ids[..j].contains(&id), "{ctx}: duplicate {id}");
                    assert!(w[j].is_finite(), "{ctx}: weight {}", w[j]);
                }
                // Weights match an f64 evaluation on the selected ids.
                for (j, want) in weights64(&c, row, ids).into_iter().enumerate() {
                    let got = w[j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{ctx}: weight {j} = {got}, want {want}"
                    );
                }
                // Normalized methods sum to 1 (or rsf).
                let target = match c.method {
                    M::Renormalize | M::RenormalizeNaive | M::SigmoidRenorm => Some(1.0),
                    M::DeepseekV3 | M::Minimax2 => Some(rsf as f64),
                    _ => None,
                };
                if let Some(target) = target {
                    let sum: f64 = w.iter().map(|&x| x as f64).sum();
                    assert!(
                        (sum - target).abs() <= 1e-6 * target,
                        "{ctx}: sum {sum}, want {target}"
                    );
                }
                // Selected keys are non-increasing and none is beaten by an unselected expert
                // (within f32 rounding); DeepSeek-V3 compares within the kept groups only.
                let keys: Vec<f64> = (0..e).map(|i| key64(&c, row, &bias, i)).collect();
                let tol = 1e-6;
                for pair in ids.windows(2) {
                    assert!(
                        keys[pair[0] as usize] >= keys[pair[1] as usize] - tol,
                        "{ctx}: order {pair:?}"
                    );
                }
                let weakest = keys[*ids.last().unwrap() as usize];
                let gsize = e / c.n_group;
                let kept_groups: Vec<usize> = ids.iter().map(|&i| i as usize / gsize).collect();
                let grouped = c.method == M::DeepseekV3;
                for i in 0..e as i32 {
                    if ids.contains(&i) || (grouped && !kept_groups.contains(&(i as usize / gsize)))
                    {
                        continue;
                    }
                    assert!(
                        keys[i as usize] <= weakest + tol,
                        "{ctx}: expert {i} beats the selection"
                    );
                }
            }
        }
    }
}

#[test]
fn deepseek_v3_kept_groups_have_the_best_top_two_sums() {
    for seed in 200..210u64 {
        let (t, e, g, tg, k) = (50, 64, 8, 3, 6);
        let gs = e / g;
        println!("seed {seed}");
        let logits = random_logits(seed, t, e);
        let c = ds(k, g, tg, 1.0);
        let r = route_logits(&c, &logits, t, e, None).unwrap();
        for tok in 0..t {
            let row = &logits[tok * e..(tok + 1) * e];
            let score = |grp: usize| {
                let mut k: Vec<f64> = row[grp * gs..(grp + 1) * gs]
                    .iter()
                    .map(|&x| sig(x as f64))
                    .collect();
                k.sort_by(|a, b| b.total_cmp(a));
                k[0] + k[1]
            };
            let used: BTreeSet<usize> = r.ids[tok * k..(tok + 1) * k]
                .iter()
                .map(|&i| i as usize / gs)
                .collect();
            assert!(
                used.len() <= tg,
                "seed {seed} token {tok}: {used:?} spans more than {tg} groups"
            );
            // When every kept group holds a selected expert, the kept groups are exactly `used`.
            if used.len() == tg {
                let worst_used = used
                    .iter()
                    .map(|&grp| score(grp))
                    .fold(f64::INFINITY, f64::min);
                let best_dropped = (0..g)
                    .filter(|grp| !used.contains(grp))
                    .map(score)
                    .fold(f64::NEG_INFINITY, f64::max);
                assert!(
                    best_dropped <= worst_used + 1e-6,
                    "seed {seed} token {tok}: a dropped group beats a kept one"
                );
            }
        }
    }
}

/// `routing::resolve_unless_logits` (for backends that route logits on their own device) refuses
/// exactly what `resolve` refuses, with the same message, and returns routed input's routes
/// unchanged.
#[test]
fn resolve_unless_logits_refuses_what_resolve_refuses() {
    use moerunner::routing::resolve_unless_logits;
    let c = cfg(M::Renormalize, 2);
    let bad_logits = [
        logits_t(vec![2, 4], &[0.0, 1.0, f32::NAN, 2.0, 0.5, 0.5, 0.5, 0.5]),
        logits_t(vec![2, 3], &[0.0; 6]),
        HostTensor::from_i32(vec![2, 4], &[0; 8]),
    ];
    for x in &bad_logits {
        let want = resolve_logits(&c, 4, 2, x)
            .expect_err("resolve refuses")
            .to_string();
        let got = resolve_unless_logits(&c, 4, 2, &RoutingInput::Logits(x), None)
            .expect_err("resolve_unless_logits refuses")
            .to_string();
        assert_eq!(got, want);
    }
    let good = logits_t(vec![2, 4], &R4.repeat(2));
    assert_eq!(
        resolve_unless_logits(&c, 4, 2, &RoutingInput::Logits(&good), None).expect("ok"),
        None
    );
    let bias = [0.0f32, f32::INFINITY, 0.0, 0.0];
    check_err(
        resolve_unless_logits(
            &ds(1, 1, 1, 1.0),
            4,
            2,
            &RoutingInput::Logits(&good),
            Some(&bias),
        ),
        &["bias"],
    );
    let ids = HostTensor::from_i32(vec![2, 2], &[0, 1, 3, -1]);
    let w = HostTensor::from_f32(vec![2, 2], &[0.5, 0.5, 1.0, 0.0]);
    let routed = RoutingInput::TopK {
        ids: &ids,
        weights: &w,
    };
    assert_eq!(
        resolve_unless_logits(&c, 4, 2, &routed, None).expect("ok"),
        Some(resolve_topk(&c, 4, 2, &ids, &w).expect("ok"))
    );
    let dup = HostTensor::from_i32(vec![2, 2], &[1, 1, 0, 2]);
    check_err(
        resolve_unless_logits(
            &c,
            4,
            2,
            &RoutingInput::TopK {
                ids: &dup,
                weights: &w,
            },
            None,
        ),
        &["topk_ids"],
    );
}
