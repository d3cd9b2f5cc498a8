//! Verified autotuning on the GPU (`moerunner tune`; the table and its rules: `tactics.rs`).
//!
//! For each token count: the default tactic's whole-layer output on two seeded inputs is the
//! baseline; every other candidate runs the same inputs (outputs poisoned first, as every host
//! call does) and is **kept only if both outputs are bit-for-bit the baseline's**, then timed by
//! CUDA-graph replay with the L2 flushed (what `bench` reports). The fastest kept candidate wins
//! the token count's shape class if it beats the default by `MIN_GAIN`; a candidate that differs,
//! or fails, is reported with why.

use std::path::PathBuf;

use super::layer::CudaLayer;
use super::pipeline::main_loop_switches;
use super::tactics::{self, shape_class, Tactic, TacticTable, TunedClass};
use crate::backend::LoadedLayer;
use crate::error::{MoeError, Result};
use crate::forward::ForwardInput;
use crate::synth::{self, RoutingMode};
use crate::tensor::DType;

/// What one candidate did at one token count.
#[derive(Clone, Debug)]
pub enum Verdict {
    /// Same output as the default, bit for bit; its median time (µs).
    Timed(f64),
    /// Its output differed from the default's (where), so it is never used.
    Differs(String),
    /// It could not run (the error).
    Failed(String),
}

/// One token count's tuning.
#[derive(Clone, Debug)]
pub struct TuneRow {
    pub tokens: usize,
    pub class: usize,
    pub default: Tactic,
    pub default_us: f64,
    pub candidates: Vec<(Tactic, Verdict)>,
    /// The fastest candidate whose output equals the default's, if it is at least `MIN_GAIN`
    /// faster; else the default.
    pub winner: Tactic,
    pub winner_us: f64,
}

impl std::fmt::Display for TuneRow {
    /// `T = 1024 class 6: default bn 64 377.3 µs, chosen bn 128 ws 1/0 356.7 µs`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "T = {} class {}: default {} {:.1} µs, chosen {} {:.1} µs",
            self.tokens,
            self.class,
            self.default.label(),
            self.default_us,
            self.winner.label(),
            self.winner_us
        )
    }
}

impl TuneRow {
    /// The refused candidates as table notes: `bn 16: differs at byte 40`.
    pub fn rejected(&self) -> Vec<String> {
        self.candidates
            .iter()
            .filter_map(|(t, v)| match v {
                Verdict::Timed(_) => None,
                Verdict::Differs(why) => Some(format!("{}: differs ({why})", t.label())),
                Verdict::Failed(why) => Some(format!("{}: failed ({why})", t.label())),
            })
            .collect()
    }
}

/// How much faster than the default a candidate must be to replace it (2 %: the spread of
/// repeated graph-replay medians on the H100).
pub const MIN_GAIN: f64 = 0.02;

/// Seeds of the two inputs each candidate must reproduce (printed by `tune`).
pub fn check_seeds(seed: u64, tokens: usize) -> [u64; 2] {
    [
        seed ^ tokens as u64,
        seed.wrapping_add(0x9e37_79b9) ^ tokens as u64,
    ]
}

impl CudaLayer {
    /// Tunes this layer (loaded with [`CudaLayer::load_for_tuning`]) at each of `tokens`; makes its
    /// calls take the winners (classes tuned before keep theirs) and returns the rows. `iters`
    /// timed replays per candidate.
    pub fn tune(&self, tokens: &[usize], iters: usize, seed: u64) -> Result<Vec<TuneRow>> {
        // The tactics are the standard pipeline's GEMM tiles: a call the fused small-batch kernel
        // would take (it has no tactic) is tuned with that kernel off, which is back afterwards.
        let fused = self.pipeline.decode_limits();
        self.pipeline.set_decode_limits((0, 0));
        let rows = self.tune_standard(tokens, iters, seed);
        if let Some(limits) = fused {
            self.pipeline.set_decode_limits(limits);
        }
        rows
    }

    fn tune_standard(&self, tokens: &[usize], iters: usize, seed: u64) -> Result<Vec<TuneRow>> {
        let cfg = self.layer().config().clone();
        let codec = self.resident.codec;
        let (wgmma_on, ws_on) = main_loop_switches(&self.dev.arch, codec, codec.summary)?;
        let candidates = Tactic::candidates(codec, wgmma_on, ws_on);
        let (k, experts) = (cfg.routing.top_k, self.resident.dims.experts);
        let mut rows = Vec::new();
        let mut choice = self.tactic_choice()?;
        for &t in tokens.iter().filter(|&&t| t > 0) {
            let inputs = check_seeds(seed, t)
                .iter()
                .map(|&s| synth::random_input(&cfg, t, RoutingMode::Logits, DType::BF16, s))
                .collect::<Result<Vec<_>>>()?;
            let run = |tactic: Tactic| -> Result<Vec<Vec<u8>>> {
                self.force_tactic(Some(tactic))?;
                let outs = inputs
                    .iter()
                    .map(|i| {
                        let fwd = ForwardInput {
                            hidden: &i.hidden,
                            routing: i.routing_input(),
                        };
                        self.forward(&fwd).map(|o| o.output.bytes.to_vec())
                    })
                    .collect();
                self.force_tactic(None)?;
                outs
            };
            let time = |tactic: Tactic| -> Result<f64> {
                self.force_tactic(Some(tactic))?;
                let i = &inputs[0];
                let fwd = ForwardInput {
                    hidden: &i.hidden,
                    routing: i.routing_input(),
                };
                let us = self
                    .time_device_forward(&fwd, iters)
                    .unwrap_or_else(|| Err(MoeError::Cuda("no device timing".into())));
                self.force_tactic(None)?;
                us
            };
            // the built-in choice, whatever an earlier tuning set: the baseline of the bit check
            let default = Tactic::default_for(tactics::mean_pairs(t, k, experts), ws_on);
            let baseline = run(default)?;
            let default_us = time(default)?;
            let mut row = TuneRow {
                tokens: t,
                class: shape_class(t, k, experts),
                default,
                default_us,
                candidates: Vec::new(),
                winner: default,
                winner_us: default_us,
            };
            for &c in candidates.iter().filter(|&&c| c != default) {
                let verdict = match run(c) {
                    Err(e) => Verdict::Failed(e.to_string()),
                    Ok(outs) => match first_difference(&baseline, &outs) {
                        Some(where_) => Verdict::Differs(where_),
                        None => match time(c) {
                            Ok(us) => Verdict::Timed(us),
                            Err(e) => Verdict::Failed(e.to_string()),
                        },
                    },
                };
                if let Verdict::Timed(us) = verdict {
                    if us < row.winner_us {
                        row.winner = c;
                        row.winner_us = us;
                    }
                }
                row.candidates.push((c, verdict));
            }
            // Within the replays' noise the default stays (a tuned table should not flap
            // between runs on 1 % differences).
            if row.winner_us > row.default_us * (1.0 - MIN_GAIN) {
                row.winner = default;
                row.winner_us = default_us;
            }
            choice.per_class[row.class] = Some(row.winner);
            rows.push(row);
        }
        self.set_tactics(choice)?;
        Ok(rows)
    }
}

impl CudaLayer {
    /// `MOERUNNER_TACTICS=tune` at load: tunes the classes of `TUNE_AT_LOAD_TOKENS` the table
    /// lacks for this layer (verified as `tune` does) and stores them; the layer then uses them.
    /// Each tuned count is printed on stderr (tuning takes seconds to a minute).
    pub(super) fn tune_missing_classes(&self) -> Result<()> {
        let cfg = self.layer().config();
        let (k, experts) = (cfg.routing.top_k, self.resident.dims.experts);
        let have = self.tactic_choice()?;
        let mut missing: Vec<usize> = Vec::new();
        for t in tactics::TUNE_AT_LOAD_TOKENS {
            let c = shape_class(t, k, experts);
            let counted = missing.iter().any(|&m| shape_class(m, k, experts) == c);
            if have.per_class[c].is_none() && !counted {
                missing.push(t);
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        eprintln!(
            "MOERUNNER_TACTICS=tune: tuning {} at T = {missing:?} (each candidate checked bit for bit)",
            self.tactic_key()
        );
        let rows = self.tune(&missing, 10, 0)?;
        let path = store(self, &rows, &crate::clock::today_utc())?;
        eprintln!("MOERUNNER_TACTICS=tune: stored in {}", path.display());
        Ok(())
    }
}

/// Where two runs' output bytes first differ (input index and byte), or None when equal.
fn first_difference(a: &[Vec<u8>], b: &[Vec<u8>]) -> Option<String> {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x.len() != y.len() {
            return Some(format!("input {i}: {} bytes vs {}", y.len(), x.len()));
        }
        if let Some(p) = x.iter().zip(y).position(|(u, v)| u != v) {
            return Some(format!("input {i}, output byte {p}"));
        }
    }
    None
}

/// Merges `rows` into the tactic table under `layer`'s key (read, updated, written at once);
/// returns the file. A class tuned at several token counts keeps the last row's winner.
pub fn store(layer: &CudaLayer, rows: &[TuneRow], date: &str) -> Result<PathBuf> {
    let path = tactics::table_path().ok_or_else(|| {
        MoeError::invalid(
            "tactic table",
            "the kernel cache is off (MOERUNNER_KERNEL_CACHE=off): nowhere to keep the table",
        )
    })?;
    let mut table = TacticTable::read(&path)?;
    let classes = table
        .layers
        .entry(layer.tactic_key().to_string())
        .or_default();
    for r in rows {
        classes.insert(
            r.class,
            TunedClass {
                tactic: r.winner,
                tokens: r.tokens,
                us: r.winner_us,
                default_us: r.default_us,
                rejected: r.rejected(),
                date: date.to_string(),
            },
        );
    }
    table.write(&path)?;
    Ok(path)
}
