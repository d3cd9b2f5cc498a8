//! Timing the online weight quantizer (`online_quant.rs`) on a layer's expert tensors, beside the
//! device's copy bandwidth (`moerunner quantize-bench`).
//!
//! Each tensor's bf16 source is resident on the GPU (one seeded random expert, uploaded into every
//! expert's slot: the values do not change the time, zeros would); per format the outputs are
//! allocated once and the whole tensor's launch sequence — amax pass where the format has one,
//! then the quantizer — is timed with CUDA events (median of `iters`, one warm-up, the per-expert
//! amax and non-finite index cleared untimed before each run). Tensors are benchmarked one at a
//! time, so the GPU holds one tensor's source and outputs (DeepSeek-V3's W13: 15 GB + 7.5 GB for
//! fp8), never an f32 copy.
//!
//! Reported bandwidth counts what one pass must move: source bytes read + output bytes written
//! (elements and scales). Two-pass formats (fp8 per-tensor, nvfp4 with computed globals) read the
//! source twice; `passes` says so, and the figure still counts it once.

use std::sync::Arc;

use super::ceilings::copy_bandwidth;
use super::device::Device;
use super::online_quant::{WeightQuantizer, WeightSource};
use super::timing::time_median_us;
use crate::config::WeightFormat;
use crate::error::{MoeError, Result};
use crate::rng::SeededRng;
use crate::tensor::DType;

/// One expert tensor of a layer: its name and `[rows, cols]` per expert.
#[derive(Clone, Debug)]
pub struct BenchTensor {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
}

/// One (tensor, format) timing.
#[derive(Clone, Debug)]
pub struct QuantBenchRow {
    pub tensor: String,
    pub format: WeightFormat,
    pub experts: usize,
    pub rows: usize,
    pub cols: usize,
    /// Reads of the source per run (2 with an amax pass).
    pub passes: usize,
    pub src_bytes: usize,
    pub out_bytes: usize,
    /// Median GPU time of the whole tensor, µs.
    pub us: f64,
}

impl QuantBenchRow {
    /// (source + output bytes) / time, GB/s.
    pub fn gbps(&self) -> f64 {
        (self.src_bytes + self.out_bytes) as f64 / self.us / 1e3
    }
}

/// The device, its copy ceiling, and one row per (tensor, format).
#[derive(Clone, Debug)]
pub struct QuantBench {
    pub device: String,
    /// Device-to-device copy, bytes read + written, GB/s (`ceilings::copy_bandwidth`).
    pub copy_gbps: f64,
    pub rows: Vec<QuantBenchRow>,
}

/// Times quantizing each of `tensors` (`experts` experts, bf16 source) into each of `formats`.
pub fn bench(
    dev: &Arc<Device>,
    experts: usize,
    tensors: &[BenchTensor],
    formats: &[WeightFormat],
    iters: usize,
    seed: u64,
) -> Result<QuantBench> {
    let copy_gbps = copy_bandwidth(dev)?;
    let q = WeightQuantizer::new(dev.clone())?;
    let mut rows = Vec::new();
    for t in tensors {
        let per_expert = t.rows * t.cols;
        let expert_bytes = per_expert * 2;
        let src_bytes = experts
            .checked_mul(expert_bytes)
            .ok_or_else(|| MoeError::invalid("quantize-bench", "the tensor's size overflows"))?;
        let mut src = dev.alloc(src_bytes)?;
        let mut rng = SeededRng::new(seed);
        let one: Vec<u8> = (0..per_expert)
            .flat_map(|_| half::bf16::from_f32(rng.normal() * 0.02).to_le_bytes())
            .collect();
        for e in 0..experts {
            dev.write(&mut src, e * expert_bytes, &one)?;
        }
        let source = WeightSource::from_buf(&src, DType::BF16, experts, t.rows, t.cols)?;
        for &format in formats {
            let out = q.alloc_output(format, experts, t.rows, t.cols, None)?;
            // Warm-up, and the check that the kernels saw no non-finite value.
            out.reset(dev)?;
            q.enqueue(&source, &out, 0)?;
            out.check_finite(dev, &t.name)?;
            let us = time_median_us(dev, 0, iters, &mut || out.reset(dev), &mut || {
                q.enqueue(&source, &out, 0)
            })?;
            rows.push(QuantBenchRow {
                tensor: t.name.clone(),
                format,
                experts,
                rows: t.rows,
                cols: t.cols,
                passes: if out.two_pass() { 2 } else { 1 },
                src_bytes,
                out_bytes: out.output_bytes(),
                us,
            });
        }
    }
    Ok(QuantBench {
        device: format!("GPU {}: {} ({})", dev.ordinal, dev.name, dev.arch),
        copy_gbps,
        rows,
    })
}
