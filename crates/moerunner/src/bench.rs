//! Benchmark counting (`spec/performance.md`): bytes, FLOPs, floors, roofline fractions, ceilings.
//!
//! Design decision: ceilings are measured in the same run as the cases (memory read bandwidth and a
//! dense GEMM on the same cores), and bytes are counted from the benchmark input's real routing, so
//! a row's roofline fraction compares like with like. On the CPU every weight format is computed in
//! f32 after decoding, so the "bf16" matrix rate is the dense f32 GEMM rate and there is no fp8
//! rate (`fp8_tflops` is null); every format's floor uses the f32 rate.

use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::config::{ActivationFormat, LayerConfig, WeightFormat};
use crate::error::{MoeError, Result};
use crate::forward::ForwardInput;
use crate::presets::Preset;
use crate::runner::{BackendChoice, Runner};
use crate::synth::{self, RoutingMode};
use crate::tensor::DType;
use crate::weights::MoeLayer;

/// Measured device limits (`performance.md`, "Floor").
#[derive(Clone, Debug, Serialize)]
pub struct Ceilings {
    /// Sustained read bandwidth, GB/s (10^9 bytes).
    pub read_gbps: f64,
    /// Matrix rate used for bf16 and W4A16 (on the CPU: the dense f32 GEMM rate), TFLOP/s.
    pub bf16_tflops: f64,
    /// Matrix rate used for fp8 activations; null where the device has none (the CPU).
    pub fp8_tflops: Option<f64>,
    /// Dense f32 GEMM rate, TFLOP/s, where the host measured it (the CPU, where every format
    /// computes in f32): then the same number as `bf16_tflops`, the best of the two measurements;
    /// null on a GPU.
    pub f32_tflops: Option<f64>,
}

impl Ceilings {
    /// The matrix rate (FLOP/s) the floor of an activation format uses.
    pub fn matrix_flops(&self, activation: ActivationFormat) -> f64 {
        let tflops = match activation {
            ActivationFormat::Bf16 => self.bf16_tflops,
            _ => self.fp8_tflops.unwrap_or(self.bf16_tflops),
        };
        tflops * 1e12
    }
}

/// One benchmark row, exactly the JSON schema of `bench --json`.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub preset: String,
    pub weight_format: String,
    pub activation_format: String,
    pub tokens: usize,
    /// Distinct experts the input routes to (counted from its real routing).
    pub active_experts: usize,
    /// Tensor- and expert-parallel group sizes: the row is rank 0's share (I / tp_size features,
    /// E / ep_size experts), as a rank of a TP/EP deployment runs it.
    pub tp_size: usize,
    pub ep_size: usize,
    /// Median of the timed runs, µs.
    pub time_us: f64,
    /// Fastest and slowest timed run, µs.
    pub min_us: f64,
    pub max_us: f64,
    /// Every timed run, µs, in the order run. A backend that times on its device (CUDA graph
    /// replays) reports its own median as the one sample.
    pub samples_us: Vec<f64>,
    pub bytes: u64,
    pub flops: u64,
    pub floor_us: f64,
    /// floor / time.
    pub roofline: f64,
    /// ‖out − ref‖₂ / ‖ref‖₂ over the sampled tokens, against the float64 reference.
    pub rel_err: f64,
    /// Split rows (`BenchPlan::split`): the median over calls of the least time a rank spent
    /// inside collectives (the critical-path rank's: moving data, not waiting for a slower peer),
    /// and its share of `time_us`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm_share: Option<f64>,
    /// The backend's kernel path for the layer where it has several (`LoadedLayer::kernel_path`:
    /// on the GPU the codec's GEMM format, e.g. `e4m3_block` or `mxfp8_decoded` for mxfp8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_path: Option<String>,
    /// The GEMM tactic the call took where the backend has tactics (`LoadedLayer::tactic`: on the
    /// GPU `bn 64` or `bn 128 ws 1/1`, tuned or the default, or `fused_small_batch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tactic: Option<String>,
    /// With `BenchPlan::stage_times`, where the device time goes: each stage of the backend's
    /// standard launch sequence timed as its prefix (`LoadedLayer::time_device_stages`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<Vec<crate::backend::StageTime>>,
    /// Device memory the layer's workspace takes at this T besides its weights, where the backend
    /// has one (`LoadedLayer::workspace_bytes`: the GPU's scratch for its device entry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_bytes: Option<u64>,
}

impl BenchRow {
    pub fn achieved_gbps(&self) -> f64 {
        self.bytes as f64 / self.time_us / 1e3
    }
    pub fn achieved_tflops(&self) -> f64 {
        self.flops as f64 / self.time_us / 1e6
    }
}

/// Where a measurement came from, recorded beside it by every benchmark's JSON (`bench`, `gemm`,
/// `quantize-bench`): the moerunner version, the commit it was built from (when known), the date
/// (UTC) and the command line — what reproduces the run.
#[derive(Clone, Debug, Serialize)]
pub struct Provenance {
    pub moerunner_version: String,
    pub commit: Option<String>,
    pub date: String,
    pub argv: Vec<String>,
}

impl Provenance {
    /// This library's version and today's date; the commit and the command line are the caller's
    /// to fill (the CLI knows them).
    pub fn today() -> Provenance {
        Provenance {
            moerunner_version: env!("CARGO_PKG_VERSION").to_string(),
            commit: None,
            date: today_utc(),
            argv: Vec::new(),
        }
    }
}

/// A whole run: what `bench --json` writes.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    #[serde(flatten)]
    pub provenance: Provenance,
    pub device: String,
    pub backend: String,
    pub ceilings: Ceilings,
    pub rows: Vec<BenchRow>,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchPlan {
    pub presets: Vec<&'static Preset>,
    pub weight_formats: Vec<WeightFormat>,
    /// Activation formats to pair with each weight format where legal (mxfp4 × bf16 and × mxfp8,
    /// nvfp4 × nvfp4 and × nvfp4_per_token); empty, or none legal: the weight format's default.
    pub activation_formats: Vec<ActivationFormat>,
    pub tokens: Vec<usize>,
    /// Timed runs per case (after one warm-up run); the median is reported.
    pub iters: usize,
    pub backend: BackendChoice,
    pub seed: u64,
    /// TP/EP group sizes: every case is rank 0's share (ranks are equal in shape).
    pub parallelism: crate::config::Parallelism,
    /// With `parallelism` of more than one rank: the whole layer over that many ranks with real
    /// collectives (`parallel::timing::time_split`: threads, or one rank per GPU through NCCL),
    /// each row the whole call and the share of it spent communicating, instead of rank 0's share
    /// alone.
    pub split: Option<crate::parallel::Transport>,
    /// How a split's EP ranks exchange tokens; None: all-to-all, or gather-scatter with TP.
    pub ep_mode: Option<crate::parallel::EpMode>,
    /// Also time each stage of the backend's standard launch sequence, as its prefix (device
    /// backends only; a row of another backend has none).
    pub stage_times: bool,
}

impl BenchPlan {
    /// Whether each row runs the whole layer split over ranks (`split` with more than one rank).
    pub fn splits(&self) -> bool {
        self.split.is_some() && self.parallelism.ep_size * self.parallelism.tp_size > 1
    }
    /// The weight × activation formats of the plan, in order.
    pub fn format_pairs(&self) -> Vec<(WeightFormat, ActivationFormat)> {
        let mut pairs = Vec::new();
        for &wf in &self.weight_formats {
            let legal = wf.legal_activation_formats();
            let chosen: Vec<ActivationFormat> = self
                .activation_formats
                .iter()
                .copied()
                .filter(|a| legal.contains(a))
                .collect();
            if chosen.is_empty() {
                pairs.push((wf, wf.default_activation_format()));
            } else {
                pairs.extend(chosen.into_iter().map(|a| (wf, a)));
            }
        }
        pairs
    }
}

/// The layer rank 0 of `par` holds: I / tp_size features and E / ep_size experts.
pub fn rank_config(
    preset: &Preset,
    (wf, af): (WeightFormat, ActivationFormat),
    par: crate::config::Parallelism,
) -> Result<LayerConfig> {
    let mut config = preset.config(wf, Some(af));
    par.validate()?;
    par.check_splits(config.num_experts, config.intermediate)?;
    config.intermediate /= par.tp_size;
    config.local_experts = 0..config.num_experts / par.ep_size;
    config.parallelism = crate::config::Parallelism {
        ep_rank: 0,
        tp_rank: 0,
        ..par
    };
    config.validate()?;
    Ok(config)
}

/// Progress events for a front end (a progress bar).
#[derive(Debug)]
pub enum Progress<'a> {
    /// Total steps: two per ceiling, one per layer generated, one per case.
    Start {
        steps: usize,
    },
    Step {
        what: String,
    },
    Row(&'a BenchRow),
}

/// Sampled tokens for the accuracy check (the reference is slow; a few rows suffice).
const SAMPLED_TOKENS: usize = 4;

/// Bytes streamed between timed runs so that no case reads weights a previous run left in the
/// last-level cache (several times any L3 we expect).
const CACHE_FLUSH_BYTES: usize = 128 << 20;

/// Bytes of a forward call (`performance.md`): the routed experts' weights plus hidden states in
/// and the output out (both in `act_dtype`).
pub fn count_bytes(
    config: &LayerConfig,
    active_experts: usize,
    tokens: usize,
    act_dtype: DType,
) -> u64 {
    let weights = active_experts as f64
        * config.params_per_expert() as f64
        * config.weight_format.bytes_per_param();
    let activations = 2 * tokens * config.hidden * act_dtype.size();
    weights.round() as u64 + activations as u64
}

/// FLOPs of a forward call: 2·P·k·T.
pub fn count_flops(config: &LayerConfig, tokens: usize) -> u64 {
    count_flops_pairs(config, config.routing.top_k * tokens)
}

/// FLOPs of the (token, slot) pairs a rank's experts hold: 2·P per pair (P of the rank's slice).
pub fn count_flops_pairs(config: &LayerConfig, pairs: usize) -> u64 {
    2 * config.params_per_expert() as u64 * pairs as u64
}

/// Runs the plan: ceilings first, then each preset × format (one layer generated each) × token
/// count.
pub fn run(plan: &BenchPlan, progress: &mut dyn FnMut(Progress<'_>)) -> Result<BenchReport> {
    if plan.iters == 0 {
        return Err(MoeError::invalid("iters", "must be at least 1"));
    }
    check_every_case_fits(plan)?;
    let runner = Runner::new();
    let pairs = plan.format_pairs();
    let layers = plan.presets.len() * pairs.len();
    progress(Progress::Start {
        steps: 4 + layers * (1 + plan.tokens.len()),
    });

    // The host's ceilings, or the device's once a layer is loaded on a backend that has one.
    let mut ceilings: Option<Ceilings> = None;
    let mut device_backend: Option<&dyn crate::backend::Backend> = None;

    let mut rows = Vec::new();
    let mut backend_name = String::new();
    let mut device = String::new();
    let mut flush = vec![0u64; CACHE_FLUSH_BYTES / 8];
    let split = plan.splits();
    for preset in &plan.presets {
        for &(wf, af) in &pairs {
            if split {
                let ceil = match &ceilings {
                    Some(c) => c.clone(),
                    None => {
                        let config = preset.config(wf, Some(af));
                        backend_name = runner.chosen_name(&plan.backend, &config)?.to_string();
                        device = device_name(&runner, &backend_name);
                        device_backend = runner.backends().iter().find_map(|r| match r {
                            crate::runner::Registered::Ready(b) if b.name() == backend_name => {
                                Some(&**b)
                            }
                            _ => None,
                        });
                        let c = measure_ceilings_for(device_backend, progress, "before")?;
                        ceilings = Some(c.clone());
                        c
                    }
                };
                rows.extend(split_rows(plan, preset, (wf, af), &ceil, progress)?);
                continue;
            }
            let config = rank_config(preset, (wf, af), plan.parallelism)?;
            progress(Progress::Step {
                what: format!("generating {} {}×{}", preset.name, wf, af),
            });
            let layer = synth::random_layer(&config, plan.seed, preset.biases)?;
            let loaded = runner.load(layer, &plan.backend)?;
            if backend_name.is_empty() {
                backend_name = loaded.backend().to_string();
                device = device_name(&runner, &backend_name);
                device_backend = runner.backends().iter().find_map(|r| match r {
                    crate::runner::Registered::Ready(b) if b.name() == backend_name => Some(&**b),
                    _ => None,
                });
            }
            if ceilings.is_none() {
                ceilings = Some(measure_ceilings_for(device_backend, progress, "before")?);
            }
            let ceil = ceilings
                .clone()
                .ok_or_else(|| MoeError::invalid("bench", "no ceilings"))?;
            for &tokens in &plan.tokens {
                progress(Progress::Step {
                    what: format!("{} {}×{} T={tokens}", preset.name, wf, af),
                });
                let input = case_input(&config, tokens, plan.seed)?;
                let fwd = ForwardInput {
                    hidden: &input.hidden,
                    routing: input.routing_input(),
                };
                let first = loaded.forward(&fwd)?; // warm-up (thread pool, scratch, page faults)
                let samples_s = timed_calls_s(&*loaded, &fwd, plan.iters, &mut flush)?;

                let mut row = measured_row(
                    (preset.name, wf, tokens),
                    &config,
                    plan.parallelism,
                    (loaded.layer(), loaded.kernel_path(), loaded.tactic(tokens)),
                    (&input.hidden, &first),
                    &samples_s,
                    &ceil,
                )?;
                if plan.stage_times {
                    row.stages = loaded.time_device_stages(&fwd, plan.iters).transpose()?;
                }
                row.workspace_bytes = loaded.workspace_bytes(tokens).map(|b| b as u64);
                progress(Progress::Row(&row));
                rows.push(row);
            }
        }
    }
    let ceilings = best_ceilings(ceilings, device_backend, progress, &mut rows)?;
    if backend_name.is_empty() {
        // Nothing ran (an empty plan): still name the backend the choice would take.
        backend_name = match &plan.backend {
            BackendChoice::Named(n) => n.clone(),
            BackendChoice::Auto => "auto".into(),
        };
        device = device_name(&runner, &backend_name);
    }
    Ok(BenchReport {
        provenance: Provenance::today(),
        device,
        backend: backend_name,
        ceilings,
        rows,
    })
}

/// Every case's memory is checked before the first one runs: a case over the budget fails now, not
/// after the cases before it have spent their time.
fn check_every_case_fits(plan: &BenchPlan) -> Result<()> {
    for preset in &plan.presets {
        for (wf, af) in plan.format_pairs() {
            // (a split row synthesizes the whole layer on the host, a rank's row its share)
            let config = if plan.splits() {
                preset.config(wf, Some(af))
            } else {
                rank_config(preset, (wf, af), plan.parallelism)?
            };
            for &tokens in &plan.tokens {
                let bytes = synth::layer_bytes(&config, preset.biases)
                    .plus(synth::input_bytes(&config, tokens, DType::BF16))
                    .plus(crate::forward::forward_bytes(&config, tokens));
                crate::size::check(
                    bytes,
                    &format!("bench case {} {wf}×{af} T={tokens}", preset.name),
                    &format!(
                        "--preset {} --weight-format {wf} --activation-format {af} --tokens {tokens}",
                        preset.name
                    ),
                )?;
            }
        }
    }
    Ok(())
}

/// One bench row from a case's first call (routes, output) and its timed samples.
fn measured_row(
    (preset, wf, tokens): (&str, WeightFormat, usize),
    config: &LayerConfig,
    par: crate::config::Parallelism,
    (layer, kernel_path, tactic): (&MoeLayer, Option<&str>, Option<String>),
    (hidden, first): (&crate::tensor::HostTensor, &crate::forward::ForwardOutput),
    samples_s: &[f64],
    ceil: &Ceilings,
) -> Result<BenchRow> {
    let time_s = median(samples_s);
    let routes = &first.routes;
    let active = routes.distinct_experts(config.local_experts.clone());
    let bytes = count_bytes(config, active, tokens, hidden.dtype);
    // The (token, slot) pairs this rank's experts hold: T·k on one rank.
    let pairs = routes
        .expert_counts(config.local_experts.clone())
        .iter()
        .sum();
    let flops = count_flops_pairs(config, pairs);
    let floor_s = (bytes as f64 / (ceil.read_gbps * 1e9))
        .max(flops as f64 / ceil.matrix_flops(config.activation_format));
    let rel_err = sampled_rel_err(layer, hidden, routes, &first.output)?;
    let row = BenchRow {
        preset: preset.to_string(),
        weight_format: wf.name().to_string(),
        activation_format: config.activation_format.name().to_string(),
        tokens,
        active_experts: active,
        tp_size: par.tp_size,
        ep_size: par.ep_size,
        time_us: time_s * 1e6,
        min_us: samples_s.iter().copied().fold(f64::INFINITY, f64::min) * 1e6,
        max_us: samples_s.iter().copied().fold(0.0, f64::max) * 1e6,
        samples_us: samples_s.iter().map(|s| s * 1e6).collect(),
        bytes,
        flops,
        floor_us: floor_s * 1e6,
        roofline: floor_s / time_s,
        rel_err,
        comm_us: None,
        comm_share: None,
        kernel_path: kernel_path.map(str::to_string),
        tactic,
        stages: None,
        workspace_bytes: None,
    };
    Ok(row)
}

/// A case's input: bf16 hidden states and router logits, seeded by the plan's seed and T.
fn case_input(config: &LayerConfig, tokens: usize, seed: u64) -> Result<synth::SynthInput> {
    synth::random_input(
        config,
        tokens,
        RoutingMode::Logits,
        DType::BF16,
        seed ^ tokens as u64,
    )
}

/// The rows of one preset × format over the plan's token counts, the whole layer split over ranks
/// (`BenchPlan::split`): EP all-to-all when only EP splits, gather-scatter with TP.
/// Bytes and FLOPs are the whole layer's, against the one machine's ceilings the ranks share.
fn split_rows(
    plan: &BenchPlan,
    preset: &Preset,
    (wf, af): (WeightFormat, ActivationFormat),
    ceil: &Ceilings,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Vec<BenchRow>> {
    use crate::parallel::{self, EpMode, ExpertMap, Layout};
    let par = plan.parallelism;
    let config = preset.config(wf, Some(af));
    par.validate()?;
    par.check_splits(config.num_experts, config.intermediate)?;
    progress(Progress::Step {
        what: format!("generating {} {}×{}", preset.name, wf, af),
    });
    let layer = synth::random_layer(&config, plan.seed, preset.biases)?;
    let mode = plan.ep_mode.unwrap_or(if par.tp_size > 1 {
        EpMode::GatherScatter
    } else {
        EpMode::AllToAll
    });
    let layout = Layout::new(
        ExpertMap::even(config.num_experts, par.ep_size)?,
        par.tp_size,
        mode,
    )?;
    let timeout = std::time::Duration::from_secs(600);
    let mut rows = Vec::new();
    for &tokens in &plan.tokens {
        progress(Progress::Step {
            what: format!(
                "{} {}×{} T={tokens} over {} ranks",
                preset.name,
                wf,
                af,
                layout.ranks()
            ),
        });
        let input = case_input(&config, tokens, plan.seed)?;
        let fwd = ForwardInput {
            hidden: &input.hidden,
            routing: input.routing_input(),
        };
        // (the host's caches flushed before each call, as for one rank; a GPU's L2 is not)
        let flush = std::sync::Mutex::new(vec![0u64; CACHE_FLUSH_BYTES / 8]);
        let before_each = || {
            if let Ok(mut f) = flush.lock() {
                stream_through(&mut f);
            }
        };
        let transport = plan.split.unwrap_or(parallel::Transport::Threads);
        let (first, samples) = parallel::timing::time_split(
            &layer,
            &layout,
            (&plan.backend, transport),
            &fwd,
            (timeout, plan.iters),
            &before_each,
        )?;
        let wall: Vec<f64> = samples.iter().map(|s| s.wall_s).collect();
        let comm: Vec<f64> = samples.iter().map(|s| s.comm_s).collect();
        let row = measured_row(
            (preset.name, wf, tokens),
            &config,
            par,
            (&layer, None, None),
            (&input.hidden, &first),
            &wall,
            ceil,
        )?;
        let (time_s, comm_s) = (median(&wall), median(&comm));
        let row = BenchRow {
            comm_us: Some(comm_s * 1e6),
            comm_share: Some(comm_s / time_s),
            ..row
        };
        progress(Progress::Row(&row));
        rows.push(row);
    }
    Ok(rows)
}

/// Wall times (s) of one call: the device's own graph timing where the backend has one (its
/// median, one sample), else `iters` host calls with the caches flushed before each.
fn timed_calls_s(
    loaded: &dyn crate::backend::LoadedLayer,
    fwd: &ForwardInput<'_>,
    iters: usize,
    flush: &mut [u64],
) -> Result<Vec<f64>> {
    if let Some(us) = loaded.time_device_forward(fwd, iters) {
        return Ok(vec![us? * 1e-6]);
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        stream_through(flush);
        let t0 = Instant::now();
        let out = loaded.forward(fwd)?;
        times.push(t0.elapsed().as_secs_f64());
        drop(out);
    }
    Ok(times)
}

/// The median (the upper one of an even count, as before).
fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Other work on the machine can only lower a measured ceiling: the ceilings are measured again
/// after the cases, the best of both kept, and every row's floor recomputed against them.
fn best_ceilings(
    before: Option<Ceilings>,
    device_backend: Option<&dyn crate::backend::Backend>,
    progress: &mut dyn FnMut(Progress<'_>),
    rows: &mut [BenchRow],
) -> Result<Ceilings> {
    let mut ceilings = match before {
        Some(c) => c,
        None => measure_ceilings_for(device_backend, progress, "before")?,
    };
    let after = measure_ceilings_for(device_backend, progress, "after")?;
    ceilings.read_gbps = ceilings.read_gbps.max(after.read_gbps);
    ceilings.bf16_tflops = ceilings.bf16_tflops.max(after.bf16_tflops);
    ceilings.fp8_tflops = match (ceilings.fp8_tflops, after.fp8_tflops) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    // On the host the f32 GEMM rate *is* the matrix rate: one number, the best of both runs.
    if ceilings.f32_tflops.is_some() || after.f32_tflops.is_some() {
        ceilings.f32_tflops = Some(ceilings.bf16_tflops);
    }
    for row in rows.iter_mut() {
        let activation: ActivationFormat = row.activation_format.parse()?;
        let floor_s = (row.bytes as f64 / (ceilings.read_gbps * 1e9))
            .max(row.flops as f64 / ceilings.matrix_flops(activation));
        row.floor_us = floor_s * 1e6;
        row.roofline = row.floor_us / row.time_us;
    }
    Ok(ceilings)
}

/// The ceilings of the device `backend` runs on: its own measurement where it has one (the GPU's
/// copy bandwidth and cuBLASLt GEMM rates), else the host's.
fn measure_ceilings_for(
    backend: Option<&dyn crate::backend::Backend>,
    progress: &mut dyn FnMut(Progress<'_>),
    when: &str,
) -> Result<Ceilings> {
    // Two steps per measurement whichever path measures (Progress::Start counts two).
    progress(Progress::Step {
        what: format!(
            "measuring {} bandwidth and matrix rate ({when})",
            backend.map_or("host", |b| b.name())
        ),
    });
    if let Some(b) = backend {
        if let Some(c) = b.measure_ceilings() {
            let c = c?;
            progress(Progress::Step {
                what: format!("{} ceilings measured ({when})", b.name()),
            });
            return Ok(Ceilings {
                read_gbps: c.read_gbps,
                bf16_tflops: c.bf16_tflops,
                fp8_tflops: c.fp8_tflops,
                f32_tflops: None,
            });
        }
    }
    Ok(measure_ceilings(progress, when))
}

/// Read bandwidth and the dense f32 GEMM rate, measured now (`when` labels the progress steps).
fn measure_ceilings(progress: &mut dyn FnMut(Progress<'_>), when: &str) -> Ceilings {
    let read_gbps = measure_read_gbps();
    progress(Progress::Step {
        what: format!("measuring dense f32 GEMM rate ({when})"),
    });
    let f32_tflops = measure_sgemm_tflops();
    Ceilings {
        read_gbps,
        bf16_tflops: f32_tflops,
        fp8_tflops: None,
        f32_tflops: Some(f32_tflops),
    }
}

/// Relative error of `output` against the float64 reference over a few evenly spaced tokens.
fn sampled_rel_err(
    layer: &crate::weights::MoeLayer,
    hidden: &crate::tensor::HostTensor,
    routes: &crate::routing::Routes,
    output: &crate::tensor::HostTensor,
) -> Result<f64> {
    let t = routes.tokens;
    if t == 0 {
        return Ok(0.0);
    }
    let h = layer.config().hidden;
    let mut sampled: Vec<usize> = (0..SAMPLED_TOKENS.min(t))
        .map(|i| i * t / SAMPLED_TOKENS.min(t))
        .collect();
    sampled.dedup();
    let x = hidden.to_f32_vec("hidden_states")?;
    let reference = crate::reference::forward_tokens(layer, &x, routes, &sampled)?;
    let out = output.to_f32_vec("output")?;
    let (mut diff, mut norm) = (0f64, 0f64);
    for (i, &tok) in sampled.iter().enumerate() {
        for c in 0..h {
            let r = reference[i * h + c];
            let d = out[tok * h + c] as f64 - r;
            diff += d * d;
            norm += r * r;
        }
    }
    Ok(if norm > 0.0 {
        (diff / norm).sqrt()
    } else {
        diff.sqrt()
    })
}

/// Reads `buf` once on all threads (evicts the last-level cache).
pub fn stream_through(buf: &mut [u64]) {
    let s: u64 = buf
        .par_chunks_mut(1 << 16)
        .map(|c| {
            c[0] = c[0].wrapping_add(1);
            c.iter().fold(0u64, |a, &v| a.wrapping_add(v))
        })
        .sum();
    std::hint::black_box(s);
}

/// Best of several multi-threaded streaming sums over a buffer far larger than any cache, GB/s.
pub fn measure_read_gbps() -> f64 {
    const BYTES: usize = 512 << 20;
    let buf: Vec<u64> = (0..BYTES / 8).into_par_iter().map(|i| i as u64).collect();
    let threads = rayon::current_num_threads().max(1);
    let per = buf.len().div_ceil(threads);
    let mut best = 0f64;
    for _ in 0..5 {
        let t0 = Instant::now();
        // One contiguous stream per thread; four running sums so the adds vectorize and never
        // bind the loop.
        let s: u64 = buf
            .par_chunks(per)
            .map(|chunk| {
                let mut acc = [0u64; 4];
                for q in chunk.chunks_exact(4) {
                    for i in 0..4 {
                        acc[i] = acc[i].wrapping_add(q[i]);
                    }
                }
                acc.iter().fold(0u64, |a, &v| a.wrapping_add(v))
            })
            .sum();
        let dt = t0.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max(BYTES as f64 / dt / 1e9);
    }
    best
}

/// Best of several dense f32 GEMMs (matrixmultiply's sgemm, 1024³, one per thread at once),
/// TFLOP/s over all threads.
pub fn measure_sgemm_tflops() -> f64 {
    const N: usize = 1024;
    let threads = rayon::current_num_threads().max(1);
    let a: Vec<f32> = (0..N * N).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect();
    let b: Vec<f32> = (0..N * N).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
    let mut outs = vec![vec![0f32; N * N]; threads];
    let mut best = 0f64;
    for _ in 0..4 {
        let t0 = Instant::now();
        outs.par_iter_mut()
            .for_each(|c| crate::backend::cpu::dense_sgemm(N, N, N, &a, &b, c));
        let dt = t0.elapsed().as_secs_f64();
        best = best.max(threads as f64 * 2.0 * (N * N * N) as f64 / dt / 1e12);
    }
    std::hint::black_box(&outs);
    best
}

/// The device in words: the CPU model and thread count for the CPU backends, else the backend's
/// own description.
fn device_name(runner: &Runner, backend: &str) -> String {
    if backend == "cpu" || backend == "reference" {
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        return format!("{model} ({} threads)", rayon::current_num_threads());
    }
    runner
        .backends()
        .iter()
        .find_map(|r| match r {
            crate::runner::Registered::Ready(b) if b.name() == backend => {
                b.info().devices.first().cloned()
            }
            _ => None,
        })
        .unwrap_or_else(|| backend.to_string())
}

pub use crate::clock::today_utc;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;

    #[test]
    fn counts_follow_the_spec() {
        let p = presets::preset("qwen3-30b-a3b").unwrap();
        let cfg = p.config(WeightFormat::Bf16, None);
        assert_eq!(cfg.params_per_expert(), 3 * 768 * 2048);
        assert_eq!(count_flops(&cfg, 1), 2 * 3 * 768 * 2048 * 8);
        assert_eq!(
            count_bytes(&cfg, 8, 1, DType::BF16),
            8 * 3 * 768 * 2048 * 2 + 2 * 2048 * 2
        );
        let mx = p.config(WeightFormat::Mxfp4, None);
        assert_eq!(
            count_bytes(&mx, 1, 0, DType::BF16),
            (3.0 * 768.0 * 2048.0 * (0.5 + 1.0 / 32.0)) as u64
        );
    }

    #[test]
    fn progress_counts_exactly_its_steps_and_the_cpu_has_one_matrix_rate() {
        // A tiny preset on the CPU backend: the progress bar once counted 18 of 16 (the CPU
        // backend has no ceilings of its own, and its fallback counted a step of its own).
        let tiny: &'static Preset = Box::leak(Box::new(Preset {
            name: "tiny",
            num_experts: 4,
            top_k: 2,
            hidden: 128,
            intermediate: 128,
            ..*presets::preset("qwen3-30b-a3b").unwrap()
        }));
        let plan = BenchPlan {
            presets: vec![tiny],
            weight_formats: vec![WeightFormat::Bf16],
            activation_formats: Vec::new(),
            tokens: vec![1, 2],
            iters: 1,
            backend: BackendChoice::Named("cpu".into()),
            seed: 1,
            parallelism: crate::config::Parallelism::default(),
            split: None,
            ep_mode: None,
            stage_times: false,
        };
        let (mut total, mut steps) = (0, 0);
        let report = run(&plan, &mut |p| match p {
            Progress::Start { steps } => total = steps,
            Progress::Step { .. } => steps += 1,
            Progress::Row(_) => {}
        })
        .unwrap();
        assert_eq!((steps, total), (4 + 3, 4 + 3));
        let c = &report.ceilings;
        assert_eq!((c.f32_tflops, c.fp8_tflops), (Some(c.bf16_tflops), None));
    }

    #[test]
    fn rows_carry_their_samples_and_a_rank_runs_its_share() {
        let tiny: &'static Preset = Box::leak(Box::new(Preset {
            name: "tiny",
            num_experts: 4,
            top_k: 2,
            hidden: 128,
            intermediate: 256,
            ..*presets::preset("qwen3-30b-a3b").unwrap()
        }));
        let par = crate::config::Parallelism {
            ep_size: 2,
            ep_rank: 0,
            tp_size: 2,
            tp_rank: 0,
        };
        let plan = BenchPlan {
            presets: vec![tiny],
            weight_formats: vec![WeightFormat::Bf16],
            activation_formats: Vec::new(),
            tokens: vec![8],
            iters: 3,
            backend: BackendChoice::Named("cpu".into()),
            seed: 1,
            parallelism: par,
            split: None,
            ep_mode: None,
            stage_times: false,
        };
        let report = run(&plan, &mut |_| {}).unwrap();
        assert_eq!(
            report.provenance.moerunner_version,
            env!("CARGO_PKG_VERSION")
        );
        let row = &report.rows[0];
        assert_eq!((row.tp_size, row.ep_size, row.samples_us.len()), (2, 2, 3));
        assert!(
            row.min_us <= row.time_us && row.time_us <= row.max_us,
            "{row:?}"
        );
        assert!(row.samples_us.contains(&row.time_us), "{row:?}");
        // Rank 0's share: I/2 features of E/2 experts, FLOPs over the pairs those experts hold.
        let cfg = rank_config(tiny, (WeightFormat::Bf16, ActivationFormat::Bf16), par).unwrap();
        assert_eq!((cfg.intermediate, cfg.local_experts.clone()), (128, 0..2));
        assert_eq!(row.flops % count_flops_pairs(&cfg, 1), 0);
        assert!(row.flops <= count_flops(&cfg, 8), "{row:?}");
    }

    #[test]
    fn date_is_iso() {
        let d = today_utc();
        assert_eq!(d.len(), 10);
        assert_eq!(&d[4..5], "-");
        assert!(d.as_str() >= "2024-01-01");
    }
}
