//! Activation quantizers: per token (row) along K, as each activation format prescribes
//! (`spec/formats.md` scale rules; `spec/layer.md` steps 2 and 5).

use super::weight_quant::{amax, fp4_code, mx_scale, nvfp4_scale, FP8_AMAX_FLOOR, NVFP4_GLOBAL_DIVISOR};
use super::{e2m1, e4m3};
use crate::config::ActivationFormat;
use crate::error::{MoeError, Result};

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

impl QuantizedRows {
    pub fn blocks_per_row(&self) -> usize {
        self.cols.div_ceil(self.block.max(1))
    }
    /// Dequantized values `[rows, cols]` in f32 (element × scale, rounded once).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            self.dequantize_row_f32(r, &mut out[r * self.cols..(r + 1) * self.cols]);
        }
        out
    }
    pub fn dequantize_row_f32(&self, r: usize, out: &mut [f32]) {
        let nb = self.blocks_per_row();
        let vals = &self.values[r * self.cols..(r + 1) * self.cols];
        for (j, (o, v)) in out.chunks_mut(self.block.max(1)).zip(vals.chunks(self.block.max(1))).enumerate() {
            let s = self.scales[r * nb + j];
            for (ov, vv) in o.iter_mut().zip(v) {
                *ov = vv * s;
            }
        }
    }
    /// Row `r` dequantized exactly in f64.
    pub fn dequantize_row_f64(&self, r: usize, out: &mut [f64]) {
        let nb = self.blocks_per_row();
        let vals = &self.values[r * self.cols..(r + 1) * self.cols];
        for (j, (o, v)) in out.chunks_mut(self.block.max(1)).zip(vals.chunks(self.block.max(1))).enumerate() {
            let s = self.scales[r * nb + j] as f64;
            for (ov, vv) in o.iter_mut().zip(v) {
                *ov = *vv as f64 * s;
            }
        }
    }
}

/// Columns per scale block of an activation format for rows of `cols` values.
pub fn block_of(format: ActivationFormat, cols: usize) -> usize {
    match format {
        ActivationFormat::Bf16 | ActivationFormat::Fp8 => cols.max(1),
        ActivationFormat::Fp8Block => 128,
        ActivationFormat::Mxfp8 => 32,
        ActivationFormat::Nvfp4 | ActivationFormat::Nvfp4PerToken => 16,
    }
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
    let block = block_of(format, cols);
    let mut q = QuantizedRows { format, rows, cols, block, values: Vec::new(), scales: Vec::new() };
    quantize_rows_into(x, static_scale, &mut q)?;
    Ok(q)
}

/// [`quantize_rows`] into a reused `out` (its format, rows and cols say what to do; buffers are
/// resized, never shrunk), so hot loops allocate nothing per call.
pub fn quantize_rows_into(x: &[f32], static_scale: Option<f32>, out: &mut QuantizedRows) -> Result<()> {
    let (format, rows, cols) = (out.format, out.rows, out.cols);
    if x.len() != rows * cols {
        return Err(MoeError::invalid("quantize_rows", format!("{} values for [{rows}, {cols}]", x.len())));
    }
    if cols > 0 && matches!(format, ActivationFormat::Mxfp8 | ActivationFormat::Nvfp4 | ActivationFormat::Nvfp4PerToken)
        && cols % block_of(format, cols) != 0
    {
        return Err(MoeError::invalid("quantize_rows", format!("{format} needs K = {cols} to be a multiple of {}", block_of(format, cols))));
    }
    let needs_static = format.needs_input_scale();
    let stat = match static_scale {
        Some(s) if s.is_finite() && s > 0.0 => s,
        _ if needs_static => {
            return Err(MoeError::invalid("input_scale", format!(
                "{format} activations need a finite positive static input scale, got {static_scale:?}")))
        }
        _ => 1.0,
    };
    let block = block_of(format, cols);
    out.block = block;
    let nb = cols.div_ceil(block);
    out.values.resize(rows * cols, 0.0);
    out.scales.resize(rows * nb, 0.0);
    for r in 0..rows {
        let xr = &x[r * cols..(r + 1) * cols];
        let vr = &mut out.values[r * cols..(r + 1) * cols];
        let sr = &mut out.scales[r * nb..(r + 1) * nb];
        // Per-token NVFP4 takes the row's own global; static NVFP4 the layer's.
        let global = match format {
            ActivationFormat::Nvfp4PerToken => amax(xr) / NVFP4_GLOBAL_DIVISOR,
            _ => stat,
        };
        for ((xb, vb), s_out) in xr.chunks(block).zip(vr.chunks_mut(block)).zip(sr.iter_mut()) {
            let s = match format {
                ActivationFormat::Bf16 => 1.0,
                ActivationFormat::Fp8 => stat,
                ActivationFormat::Fp8Block => amax(xb).max(FP8_AMAX_FLOOR) / e4m3::MAX,
                ActivationFormat::Mxfp8 => mx_scale(amax(xb), e4m3::MAX).1,
                ActivationFormat::Nvfp4 | ActivationFormat::Nvfp4PerToken => {
                    if global == 0.0 { 0.0 } else { nvfp4_scale(amax(xb), global).1 }
                }
            };
            *s_out = s;
            match format {
                ActivationFormat::Bf16 => vb.iter_mut().zip(xb).for_each(|(v, x)| *v = super::bf16::round(*x)),
                ActivationFormat::Nvfp4 | ActivationFormat::Nvfp4PerToken => {
                    vb.iter_mut().zip(xb).for_each(|(v, x)| *v = e2m1::decode(fp4_code(*x, s)))
                }
                _ => vb.iter_mut().zip(xb).for_each(|(v, x)| *v = e4m3::DECODE[e4m3::encode(x / s) as usize]),
            }
        }
    }
    Ok(())
}
