//! Activation quantizers: per token (row) along K, as each activation format prescribes.

use crate::config::ActivationFormat;
use crate::error::Result;

/// Quantized activation rows kept as exact element values and one f32 dequant scale per block:
/// value(r, c) = `values[r * cols + c] * scales[r * blocks_per_row + c / block]`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedRows {
    pub format: ActivationFormat,
    pub rows: usize,
    pub cols: usize,
    /// Columns per scale block (`cols` for bf16 and per-tensor fp8).
    pub block: usize,
    pub values: Vec<f32>,
    pub scales: Vec<f32>,
}

/// Quantizes `x` `[rows, cols]` per `format`. `static_scale` is the layer's input scale for the
/// GEMM (required for `fp8` and `nvfp4`, ignored otherwise).
pub fn quantize_rows(
    format: ActivationFormat,
    x: &[f32],
    rows: usize,
    cols: usize,
    static_scale: Option<f32>,
) -> Result<QuantizedRows> {
    let _ = (format, x, rows, cols, static_scale);
    unimplemented!("quantize_rows")
}
