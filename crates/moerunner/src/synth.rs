//! Seeded random layers and inputs for `make-layer`, `make-input`, `check`, `bench` and tests.
//! Weights are generated and quantized one expert at a time (in parallel), so a layer never needs
//! an f32 copy of all its experts.

use rayon::prelude::*;

use crate::config::{ActivationFormat, LayerConfig, RoutingMethod, WeightFormat};
use crate::error::{MoeError, Result};
use crate::formats::quantize_weights;
use crate::rng::SeededRng;
use crate::routing::{self, RoutingInput};
use crate::size::{self, Bytes};
use crate::tensor::{DType, HostTensor};
use crate::weights::{LayerWeights, MoeLayer, QuantizedTensor};

/// Amplitude of synthetic hidden states: x ~ U(−X_AMP, X_AMP).
pub const X_AMP: f32 = 2.0;

/// Derives an independent stream for (seed, purpose, index).
fn stream(seed: u64, purpose: u64, index: u64) -> SeededRng {
    let mix = seed
        ^ purpose.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
    SeededRng::new(mix)
}

/// Random weights `[E, rows, cols]` ~ U(−a, a), a = √(3/cols) (unit-variance outputs for unit
/// inputs), quantized to the config's weight format one expert at a time.
fn random_projection(
    config: &LayerConfig,
    rows: usize,
    cols: usize,
    seed: u64,
    purpose: u64,
    expert_done: &(dyn Fn() + Sync),
) -> Result<QuantizedTensor> {
    let amp = (3.0 / cols as f32).sqrt();
    let experts: Result<Vec<QuantizedTensor>> = config
        .local_experts
        .clone()
        .into_par_iter()
        .map(|e| {
            let mut rng = stream(seed, purpose, e as u64);
            let mut w = vec![0f32; rows * cols];
            for v in &mut w {
                *v = rng.uniform(-amp, amp);
            }
            let q = quantize_weights(config.weight_format, 1, rows, cols, &w, None);
            expert_done();
            q
        })
        .collect();
    QuantizedTensor::concat_experts(experts?)
}

/// Bytes of one projection `[experts, rows, cols]` in `format`: elements and scales.
fn projection_bytes(format: WeightFormat, experts: usize, rows: usize, cols: usize) -> Bytes {
    let elems = Bytes::of(&[experts, rows, cols]);
    let (num, den) = match format {
        WeightFormat::Bf16 => (2, 1),
        WeightFormat::Fp8 => (1, 1),
        WeightFormat::Fp8Block => (16384 + 4, 16384),
        WeightFormat::Mxfp8 => (32 + 1, 32),
        WeightFormat::Mxfp4 => (16 + 1, 32),
        WeightFormat::Nvfp4 => (8 + 1, 16),
    };
    elems.frac(num, den).plus(Bytes::of(&[experts, 8]))
}

/// What [`random_layer`] holds for `config` at its peak: the weights twice (the per-expert parts
/// and their concatenation: freed parts stay in the allocator's arenas, so the resident peak is
/// about twice the weights, as measured), one f32 expert per worker thread while quantizing, biases.
pub fn layer_bytes(config: &LayerConfig, biases: bool) -> Bytes {
    let (e, m, h, i) = (
        config.num_local_experts(),
        config.w13_rows(),
        config.hidden,
        config.intermediate,
    );
    let f = config.weight_format;
    let weights = projection_bytes(f, e, m, h).plus(projection_bytes(f, e, h, i));
    let scratch = Bytes::of(&[m.max(h), h.max(i), 4]).times(rayon::current_num_threads());
    let bias = if biases {
        Bytes::of(&[e, m + h, 4])
    } else {
        Bytes::ZERO
    };
    weights
        .times(2)
        .plus(scratch)
        .plus(bias)
        .plus(Bytes::of(&[config.num_experts, 4]))
}

/// What [`random_input`] allocates for `tokens` rows at its peak: the f32 values and the encoded
/// hidden states, and the routing tensors (logits, or ids and weights and their packed copy).
pub fn input_bytes(config: &LayerConfig, tokens: usize, dtype: DType) -> Bytes {
    let (h, e, k) = (config.hidden, config.num_experts, config.routing.top_k);
    Bytes::of(&[tokens, h, 4 + dtype.size()])
        .plus(Bytes::of(&[tokens, e.max(k), 8]))
        .plus(Bytes::of(&[tokens, k, 16]))
}

/// A random layer for `config` (holding `config.local_experts`), deterministic from `seed`.
/// `biases` adds random W13/W2 biases. Static input scales are calibrated for inputs of amplitude
/// [`X_AMP`] and intermediates of amplitude ~8.
pub fn random_layer(config: &LayerConfig, seed: u64, biases: bool) -> Result<MoeLayer> {
    random_layer_with_progress(config, seed, biases, &|| {})
}

/// [`random_layer`], calling `expert_done` (from any thread) as each expert's W13 and each
/// expert's W2 is generated and quantized: 2 × the local expert count in all, for a progress bar.
pub fn random_layer_with_progress(
    config: &LayerConfig,
    seed: u64,
    biases: bool,
    expert_done: &(dyn Fn() + Sync),
) -> Result<MoeLayer> {
    config.validate()?;
    size::check(
        layer_bytes(config, biases),
        &format!("a random layer {config}"),
        "its E, H and I",
    )?;
    let (m, h, i) = (config.w13_rows(), config.hidden, config.intermediate);
    let w13 = random_projection(config, m, h, seed, 1, expert_done)?;
    let w2 = random_projection(config, h, i, seed, 2, expert_done)?;
    let n_local = config.num_local_experts();
    let mut rng = stream(seed, 3, 0);
    let mut vec_of =
        |n: usize, amp: f32| -> Vec<f32> { (0..n).map(|_| rng.uniform(-amp, amp)).collect() };
    let (w13_bias, w2_bias) = if biases {
        (
            Some(vec_of(n_local * m, 0.5)),
            Some(vec_of(n_local * h, 0.5)),
        )
    } else {
        (None, None)
    };
    let router_bias = config
        .routing
        .uses_bias()
        .then(|| vec_of(config.num_experts, 0.1));
    let (w13_input_scale, w2_input_scale) = match config.activation_format {
        ActivationFormat::Fp8 => (Some(X_AMP / 448.0), Some(8.0 / 448.0)),
        ActivationFormat::Nvfp4 => (Some(X_AMP / 2688.0), Some(8.0 / 2688.0)),
        _ => (None, None),
    };
    let weights = LayerWeights {
        w13,
        w2,
        w13_bias,
        w2_bias,
        w13_input_scale,
        w2_input_scale,
        router_bias,
    };
    MoeLayer::new(config.clone(), weights)
}

/// How a synthetic input carries its routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutingMode {
    Logits,
    TopK,
    Packed,
}

/// A synthetic input file's tensors.
#[derive(Clone, Debug)]
pub struct SynthInput {
    pub hidden: HostTensor,
    pub router_logits: Option<HostTensor>,
    pub topk_ids: Option<HostTensor>,
    pub topk_weights: Option<HostTensor>,
    pub topk_packed: Option<HostTensor>,
}

impl SynthInput {
    pub fn routing_input(&self) -> RoutingInput<'_> {
        match (
            &self.router_logits,
            &self.topk_ids,
            &self.topk_weights,
            &self.topk_packed,
        ) {
            (Some(l), _, _, _) => RoutingInput::Logits(l),
            (_, Some(ids), Some(w), _) => RoutingInput::TopK { ids, weights: w },
            (_, _, _, Some(p)) => RoutingInput::Packed(p),
            _ => unreachable!("SynthInput always carries one routing source"),
        }
    }
}

/// A random input of `tokens` rows for `config`: hidden ~ U(−X_AMP, X_AMP) in `dtype`, logits ~ N(0, 1)
/// (f32), or caller top-k (distinct random ids, weights in (0, 1]) in the chosen form.
pub fn random_input(
    config: &LayerConfig,
    tokens: usize,
    mode: RoutingMode,
    dtype: DType,
    seed: u64,
) -> Result<SynthInput> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(MoeError::dtype("hidden_states", "F32, F16 or BF16", dtype));
    }
    config.validate()?;
    size::check(
        input_bytes(config, tokens, dtype),
        &format!("a random input of {tokens} tokens for {config}"),
        "its token count",
    )?;
    let (h, e, k) = (config.hidden, config.num_experts, config.routing.top_k);
    let mut rng = stream(seed, 10, 0);
    let x: Vec<f32> = (0..tokens * h)
        .map(|_| rng.uniform(-X_AMP, X_AMP))
        .collect();
    let hidden = HostTensor::encode_f32(dtype, vec![tokens, h], &x);
    let mut out = SynthInput {
        hidden,
        router_logits: None,
        topk_ids: None,
        topk_weights: None,
        topk_packed: None,
    };
    if mode == RoutingMode::Logits {
        let logits: Vec<f32> = (0..tokens * e).map(|_| rng.normal()).collect();
        out.router_logits = Some(HostTensor::from_f32(vec![tokens, e], &logits));
        return Ok(out);
    }
    let k = if config.routing.method == RoutingMethod::Llama4 {
        1
    } else {
        k
    };
    let mut ids = Vec::with_capacity(tokens * k);
    let mut weights = Vec::with_capacity(tokens * k);
    let mut chosen = Vec::with_capacity(k);
    for _ in 0..tokens {
        chosen.clear();
        while chosen.len() < k {
            let id = rng.below(e as u64) as i32;
            if !chosen.contains(&id) {
                chosen.push(id);
            }
        }
        ids.extend_from_slice(&chosen);
        weights.extend((0..k).map(|_| rng.uniform(0.05, 1.0)));
    }
    match mode {
        RoutingMode::TopK => {
            out.topk_ids = Some(HostTensor::from_i32(vec![tokens, k], &ids));
            out.topk_weights = Some(HostTensor::from_f32(vec![tokens, k], &weights));
        }
        RoutingMode::Packed => {
            let packed: Vec<i32> = ids
                .iter()
                .zip(&weights)
                .map(|(&id, &w)| routing::pack(id, w))
                .collect();
            out.topk_packed = Some(HostTensor::from_i32(vec![tokens, k], &packed));
        }
        RoutingMode::Logits => unreachable!(),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn progress_reports_each_expert_projection_once_and_changes_nothing() {
        let mut config = crate::presets::preset("qwen3-30b-a3b")
            .map(|p| p.config(crate::config::WeightFormat::Fp8Block, None))
            .unwrap();
        (config.num_experts, config.hidden, config.intermediate) = (6, 128, 128);
        config.routing.top_k = 2;
        config.local_experts = 0..6;
        let done = AtomicUsize::new(0);
        let a = random_layer_with_progress(&config, 5, false, &|| {
            done.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(done.into_inner(), 2 * 6);
        let b = random_layer(&config, 5, false).unwrap();
        assert_eq!(a.weights().w13.data[..], b.weights().w13.data[..]);
        assert_eq!(a.weights().w2.data[..], b.weights().w2.data[..]);
    }
}
