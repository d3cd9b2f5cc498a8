//! Weight quantizers (f32 → any weight format, bit-exact per `spec/formats.md`) and decoders of
//! quantized rows (the one primitive every backend and the reference build on).

use std::ops::Range;

use crate::config::WeightFormat;
use crate::error::Result;
use crate::weights::QuantizedTensor;

/// Quantizes f32 weights `[experts, rows, cols]` into `format`.
/// Scales are chosen from the data: fp8 per-tensor s = max(amax_expert, 1e-10)/448; fp8_block
/// s = max(amax_block, 1e-10)/448 per 128×128 block; mx per `spec/formats.md`; nvfp4 with
/// `global_scales` if given, else g = amax_expert / (448·6) per expert.
pub fn quantize_weights(
    format: WeightFormat,
    experts: usize,
    rows: usize,
    cols: usize,
    values: &[f32],
    global_scales: Option<&[f32]>,
) -> Result<QuantizedTensor> {
    let _ = (format, experts, rows, cols, values, global_scales);
    unimplemented!("quantize_weights")
}

impl QuantizedTensor {
    /// Dequantizes rows `rows` of local expert `expert` into `out` (`rows.len() * cols` f32, row-major).
    pub fn decode_rows_f32(&self, expert: usize, rows: Range<usize>, out: &mut [f32]) {
        let _ = (expert, rows, out);
        unimplemented!("decode_rows_f32")
    }
    /// Same as [`decode_rows_f32`](Self::decode_rows_f32) in f64 (element × scale × global, exact).
    pub fn decode_rows_f64(&self, expert: usize, rows: Range<usize>, out: &mut [f64]) {
        let _ = (expert, rows, out);
        unimplemented!("decode_rows_f64")
    }
}
