//! Random cases across the whole support matrix against the float64 reference (`moerunner check`
//! and the seeded matrix tests share this).
//!
//! Design decision: a case is a pure function of one `u64` seed. [`Case::generate`] draws every
//! choice (formats, routing, activation, order, shapes, routing input, dtype, biases, T, EP/TP)
//! from that seed, and the layer and input are synthesized from it too, so a printed seed reruns
//! a failure alone (`moerunner check --case SEED`).

use std::fmt;

use crate::config::{
    tolerance, Activation, ActivationFormat, LayerConfig, Parallelism, RoutingConfig,
    RoutingMethod, W13Order, WeightFormat,
};
use crate::error::{MoeError, Result};
use crate::forward::{ForwardInput, ForwardOutput};
use crate::reference;
use crate::rng::SeededRng;
use crate::routing;
use crate::runner::{BackendChoice, Runner};
use crate::shard::shard;
use crate::synth::{random_input, random_layer, RoutingMode, SynthInput};
use crate::tensor::{DType, HostTensor};
use crate::weights::MoeLayer;

/// One randomly drawn case: a whole (unsharded) layer, its input, and how it is split.
#[derive(Clone, Debug)]
pub struct Case {
    pub seed: u64,
    /// The whole layer (all experts, the full I).
    pub config: LayerConfig,
    pub tokens: usize,
    pub mode: RoutingMode,
    pub dtype: DType,
    pub biases: bool,
    /// Routed modes only: some slots are replaced by −1 (padding).
    pub padding: bool,
    /// Every (ep_rank, tp_rank) of this grid runs; their outputs add up to the result.
    pub ep_size: usize,
    pub tp_size: usize,
}

/// The outcome of one case.
#[derive(Clone, Debug)]
pub struct CaseResult {
    pub seed: u64,
    /// The case as printed by [`Case`]'s `Display` (enough to recognise it; the seed reproduces it).
    pub description: String,
    pub weight_format: WeightFormat,
    pub activation_format: ActivationFormat,
    /// ‖out − ref‖₂ / ‖ref‖₂ in f64 (NaN if the output had one; ∞ if the reference is all zero
    /// and the output is not).
    pub rel_err: f64,
    pub tolerance: f64,
    pub passed: bool,
    /// Why the case could not be run or compared (a failure too).
    pub error: Option<String>,
}

/// The seed of case `index` of a run started from `base`: well mixed, so neighbouring runs do not
/// share cases (SplitMix64's finalizer).
pub fn case_seed(base: u64, index: u64) -> u64 {
    let mut z = base.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn pick<T: Copy>(rng: &mut SeededRng, items: &[T]) -> T {
    items[rng.below(items.len() as u64) as usize]
}

/// Uniform integer in `lo..=hi`.
fn between(rng: &mut SeededRng, lo: usize, hi: usize) -> usize {
    lo + rng.below((hi - lo + 1) as u64) as usize
}

/// True with probability `p`.
fn chance(rng: &mut SeededRng, p: f32) -> bool {
    rng.unit_f32() < p
}

impl Case {
    /// Draws a case from `seed`. Every choice is legal by construction (the formats pair, the
    /// routing parameters satisfy `spec/routing.md`'s limits, shapes fit the formats' blocks and
    /// the TP slices fall on scale-block boundaries).
    pub fn generate(seed: u64) -> Case {
        let mut rng = SeededRng::new(seed);
        let weight_format = pick(&mut rng, WeightFormat::ALL);
        let activation_format = pick(&mut rng, weight_format.legal_activation_formats());
        let activation = match rng.below(4) {
            0 => Activation::Swiglu,
            1 => Activation::Geglu,
            2 if chance(&mut rng, 0.5) => Activation::OAI_DEFAULT,
            2 => Activation::SwigluOai {
                alpha: rng.uniform(0.5, 2.5),
                beta: rng.uniform(0.0, 1.5),
                limit: rng.uniform(1.0, 10.0),
            },
            _ => Activation::Relu2,
        };
        // Non-gated layers have no order; keep the printed form canonical.
        let w13_order = if activation.is_gated() {
            pick(&mut rng, W13Order::ALL)
        } else {
            W13Order::GateUp
        };

        // Parallelism: mostly one device; sometimes EP, TP or both.
        let (ep_size, tp_size) = match rng.below(20) {
            0 | 1 => (pick(&mut rng, &[2, 4]), 1),
            2 | 3 => (1, pick(&mut rng, &[2, 2, 4])),
            4 => (2, 2),
            _ => (1, 1),
        };

        let (hidden, intermediate) = shapes(&mut rng, weight_format, tp_size);
        // Synthesizing and quantizing the weights dominates a case's time: big experts come in
        // small numbers so that the default 2000 cases stay fast.
        let max_experts = if hidden * intermediate > 200 * 200 {
            12
        } else {
            32
        };
        let num_experts =
            between(&mut rng, 4usize.div_ceil(ep_size), max_experts / ep_size) * ep_size;

        let method = pick(&mut rng, RoutingMethod::ALL);
        let mut routing = RoutingConfig::new(method, 1);
        let mut max_k = num_experts.min(8);
        if method == RoutingMethod::DeepseekV3 && chance(&mut rng, 0.6) {
            let divisors: Vec<usize> = [2, 4, 8]
                .into_iter()
                .filter(|g| num_experts.is_multiple_of(*g))
                .collect();
            if !divisors.is_empty() {
                routing.n_group = pick(&mut rng, &divisors);
                routing.topk_group = between(&mut rng, 1, routing.n_group);
                max_k = max_k.min(routing.topk_group * num_experts / routing.n_group);
            }
        }
        routing.top_k = if method == RoutingMethod::Llama4 {
            1
        } else {
            between(&mut rng, 1, max_k)
        };
        if matches!(method, RoutingMethod::DeepseekV3 | RoutingMethod::Minimax2) {
            let random = rng.uniform(0.5, 3.0);
            routing.routed_scaling_factor = pick(&mut rng, &[1.0, 2.5, random]);
        }
        if method == RoutingMethod::SigmoidRenorm {
            routing.norm_topk_prob = chance(&mut rng, 0.5);
        }

        let mode = pick(
            &mut rng,
            &[
                RoutingMode::Logits,
                RoutingMode::Logits,
                RoutingMode::TopK,
                RoutingMode::Packed,
            ],
        );
        let padding = mode != RoutingMode::Logits && chance(&mut rng, 0.25);
        let dtype = pick(&mut rng, &[DType::F32, DType::BF16, DType::F16]);
        let biases = chance(&mut rng, 0.3);
        let tokens = match rng.below(20) {
            0 | 1 => 0,
            2..=4 => 1,
            5 => between(&mut rng, 200, 400),
            _ => between(&mut rng, 2, 40),
        };

        let config = LayerConfig {
            num_experts,
            hidden,
            intermediate,
            weight_format,
            activation_format,
            activation,
            w13_order,
            routing,
            local_experts: 0..num_experts,
            parallelism: Parallelism::default(),
        };
        Case {
            seed,
            config,
            tokens,
            mode,
            dtype,
            biases,
            padding,
            ep_size,
            tp_size,
        }
    }

    /// The whole layer.
    pub fn layer(&self) -> Result<MoeLayer> {
        random_layer(&self.config, self.seed, self.biases)
    }

    /// The input, with padding slots (−1) written over some routed slots when the case asks.
    pub fn input(&self) -> Result<SynthInput> {
        let mut input = random_input(
            &self.config,
            self.tokens,
            self.mode,
            self.dtype,
            self.seed ^ 0x5EED_1A7E,
        )?;
        if self.padding {
            let mut rng = SeededRng::new(self.seed ^ 0x9AD);
            if let Some(ids) = &mut input.topk_ids {
                let mut v = ids.to_i32_vec("topk_ids")?;
                v.iter_mut()
                    .filter(|_| chance(&mut rng, 0.2))
                    .for_each(|id| *id = -1);
                *ids = HostTensor::from_i32(ids.shape.clone(), &v);
            }
            if let Some(packed) = &mut input.topk_packed {
                let mut v = packed.to_i32_vec("topk_packed")?;
                for p in v.iter_mut() {
                    if chance(&mut rng, 0.2) {
                        let (_, w) = routing::unpack(*p);
                        *p = routing::pack(-1, w);
                    }
                }
                *packed = HostTensor::from_i32(packed.shape.clone(), &v);
            }
        }
        Ok(input)
    }

    /// Every rank of the EP × TP grid.
    pub fn ranks(&self) -> Vec<Parallelism> {
        let mut out = Vec::new();
        for ep_rank in 0..self.ep_size {
            for tp_rank in 0..self.tp_size {
                out.push(Parallelism {
                    ep_size: self.ep_size,
                    ep_rank,
                    tp_size: self.tp_size,
                    tp_rank,
                });
            }
        }
        out
    }
}

/// H and I for a case: multiples of 32 (every format's block), small; sometimes H = I = 160;
/// fp8_block sometimes gets H with a partial 128-block (352 = 2.75 blocks, GPT-OSS's 2880 scaled
/// down). Under TP, I is R slices that each start on a scale-block boundary.
fn shapes(rng: &mut SeededRng, wf: WeightFormat, tp: usize) -> (usize, usize) {
    let mut hidden = 32 * between(rng, 1, 6);
    let mut inter = 32 * between(rng, 1, 6);
    if chance(rng, 0.1) {
        (hidden, inter) = (160, 160);
    }
    if wf == WeightFormat::Fp8Block && chance(rng, 0.2) {
        hidden = 352;
    }
    if tp > 1 {
        let align = if wf == WeightFormat::Fp8Block {
            128
        } else {
            32
        };
        let per_rank = align * between(rng, 1, if align == 128 { 1 } else { 3 });
        inter = per_rank * tp;
    }
    (hidden, inter)
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.mode {
            RoutingMode::Logits => "logits",
            RoutingMode::TopK => "topk",
            RoutingMode::Packed => "packed",
        };
        write!(
            f,
            "{} T={} input={mode}{} x={}",
            self.config,
            self.tokens,
            if self.padding { "+padding" } else { "" },
            self.dtype
        )?;
        if self.biases {
            f.write_str(" biases")?;
        }
        if self.ep_size > 1 || self.tp_size > 1 {
            write!(f, " ep_size={} tp_size={}", self.ep_size, self.tp_size)?;
        }
        Ok(())
    }
}

/// The relative-norm error every check of this project uses (`config::relative_error`).
pub use crate::config::relative_error;

/// Runs case `seed` on `backend` through a fresh [`Runner`].
pub fn run_case(seed: u64, backend: &BackendChoice) -> CaseResult {
    run_case_on(&Runner::new(), seed, backend)
}

/// Runs case `seed` on `backend` of an existing runner (share one across many cases).
pub fn run_case_on(runner: &Runner, seed: u64, backend: &BackendChoice) -> CaseResult {
    run_case_with(seed, |layer, input| {
        runner.load(layer, backend)?.forward(input)
    })
}

/// Runs case `seed` with `run` standing in for a backend (load one rank's layer, run the input),
/// and compares against the reference. Tests pass a deliberately wrong `run` to check the checker.
pub fn run_case_with<F>(seed: u64, run: F) -> CaseResult
where
    F: Fn(MoeLayer, &ForwardInput<'_>) -> Result<ForwardOutput>,
{
    let case = Case::generate(seed);
    let cfg = &case.config;
    let tol = tolerance(cfg.weight_format, cfg.activation_format);
    let mut result = CaseResult {
        seed,
        description: case.to_string(),
        weight_format: cfg.weight_format,
        activation_format: cfg.activation_format,
        rel_err: f64::NAN,
        tolerance: tol,
        passed: false,
        error: None,
    };
    match compare(&case, run) {
        Ok(err) => {
            result.rel_err = err;
            result.passed = err <= tol; // NaN compares false: NaN never passes.
        }
        Err(e) => result.error = Some(e.to_string()),
    }
    result
}

/// Runs case `seed` with `run` given the whole layer once (a driver that splits it over the
/// case's ranks itself and talks between them: `moerunner check --comm thread` through
/// `parallel::forward_threads`), and compares the output against the same oracle as
/// [`run_case_with`].
pub fn run_case_whole<F>(seed: u64, run: F) -> CaseResult
where
    F: Fn(&Case, MoeLayer, &ForwardInput<'_>) -> Result<ForwardOutput>,
{
    let case = Case::generate(seed);
    let tol = tolerance(case.config.weight_format, case.config.activation_format);
    let mut result = CaseResult {
        seed,
        description: case.to_string(),
        weight_format: case.config.weight_format,
        activation_format: case.config.activation_format,
        rel_err: f64::NAN,
        tolerance: tol,
        passed: false,
        error: None,
    };
    let outcome = (|| -> Result<f64> {
        let layer = case.layer()?;
        let input = case.input()?;
        let (want, fwd_hidden) = (oracle(&case, &layer, &input)?, &input.hidden);
        let fwd = ForwardInput {
            hidden: fwd_hidden,
            routing: input.routing_input(),
        };
        let out = run(&case, layer, &fwd)?;
        check_output_form(&case, &out, "")?;
        let got: Vec<f64> = out
            .output
            .to_f32_vec("output")?
            .into_iter()
            .map(f64::from)
            .collect();
        Ok(relative_error(&got, &want))
    })();
    match outcome {
        Ok(err) => {
            result.rel_err = err;
            result.passed = err <= tol;
        }
        Err(e) => result.error = Some(e.to_string()),
    }
    result
}

/// The output of a case's run has the case's dtype and shape [T, H] (`who`: a prefix naming the
/// rank, or empty).
fn check_output_form(case: &Case, out: &ForwardOutput, who: &str) -> Result<()> {
    let (t, h) = (case.tokens, case.config.hidden);
    if out.output.dtype != case.dtype || out.output.shape != [t, h] {
        return Err(MoeError::invalid(
            "output",
            format!(
                "{who}got {} {:?}, expected {} [{t}, {h}]",
                out.output.dtype, out.output.shape, case.dtype
            ),
        ));
    }
    Ok(())
}

/// The float64 oracle of a case: the whole layer's reference, or, for per-token nvfp4 under TP,
/// the sum of every rank's own reference (see [`compare`]).
fn oracle(case: &Case, layer: &MoeLayer, input: &SynthInput) -> Result<Vec<f64>> {
    let cfg = layer.config();
    let x = input.hidden.to_f32_vec("hidden_states")?;
    let routes = routing::resolve(
        &cfg.routing,
        cfg.num_experts,
        case.tokens,
        &input.routing_input(),
        layer.weights().router_bias.as_deref(),
    )?;
    if case.tp_size > 1 && cfg.activation_format == ActivationFormat::Nvfp4PerToken {
        let mut want = vec![0f64; case.tokens * cfg.hidden];
        for par in case.ranks() {
            for (w, v) in want
                .iter_mut()
                .zip(reference::forward(&shard(layer, par)?, &x, &routes)?)
            {
                *w += v;
            }
        }
        return Ok(want);
    }
    reference::forward(layer, &x, &routes)
}

/// The relative error of the (summed over ranks) backend output against the reference.
///
/// The oracle is the whole layer's reference, with one exception: per-token nvfp4 under TP. Each
/// rank then takes GEMM2's per-row global scale over its own slice of I (as a real TP deployment
/// does), which quantizes the intermediate differently than one device would — a few percent,
/// about the size of the tolerance itself. There the oracle is the sum of every rank's own
/// reference, which is what the ranks are meant to compute.
fn compare<F>(case: &Case, run: F) -> Result<f64>
where
    F: Fn(MoeLayer, &ForwardInput<'_>) -> Result<ForwardOutput>,
{
    let layer = case.layer()?;
    let input = case.input()?;
    let (t, h) = (case.tokens, layer.config().hidden);
    // The reference routes independently of the backend, so a routing bug shows as an error.
    let want = oracle(case, &layer, &input)?;

    let fwd = ForwardInput {
        hidden: &input.hidden,
        routing: input.routing_input(),
    };
    let mut got = vec![0f64; t * h];
    for par in case.ranks() {
        let part = if par.is_single() {
            layer.clone()
        } else {
            shard(&layer, par)?
        };
        let out = run(part, &fwd)?;
        check_output_form(case, &out, &format!("rank {par:?}: "))?;
        for (g, v) in got.iter_mut().zip(out.output.to_f32_vec("output")?) {
            *g += v as f64;
        }
    }
    Ok(relative_error(&got, &want))
}
