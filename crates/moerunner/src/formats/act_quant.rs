//! Activation quantizers: per token (row) along K, as each activation format prescribes
//! (`spec/formats.md` scale rules; `spec/layer.md` steps 2 and 5).
//!
//! The result keeps exact element values as f32 plus one f32 dequant scale per block, which is
//! what both the f64 reference and the f32 CPU backend consume; the packed byte form only matters
//! to device kernels, which quantize on the device.

use super::weight_quant::{
    amax, fp4_code, mx_scale, nvfp4_scale, FP8_AMAX_FLOOR, NVFP4_GLOBAL_DIVISOR,
};
use super::{bf16, e2m1, e4m3};
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
    /// An empty result to pass to [`quantize_rows_into`] (buffers grow on first use).
    pub fn empty(format: ActivationFormat) -> Self {
        QuantizedRows {
            format,
            rows: 0,
            cols: 0,
            block: 1,
            values: Vec::new(),
            scales: Vec::new(),
        }
    }
    pub fn blocks_per_row(&self) -> usize {
        self.cols.div_ceil(self.block.max(1))
    }
    /// Dequantized values `[rows, cols]` in f32 (element × scale, rounded once).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.dequantize_row_f32(r, o);
        }
        out
    }
    /// Row `r` dequantized into `out` (`cols` values), element × scale rounded once to f32.
    pub fn dequantize_row_f32(&self, r: usize, out: &mut [f32]) {
        let (nb, block) = (self.blocks_per_row(), self.block.max(1));
        let vals = &self.values[r * self.cols..(r + 1) * self.cols];
        for (j, (o, v)) in out.chunks_mut(block).zip(vals.chunks(block)).enumerate() {
            let s = self.scales[r * nb + j];
            for (ov, vv) in o.iter_mut().zip(v) {
                *ov = vv * s;
            }
        }
    }
    /// Row `r` dequantized exactly in f64 into `out` (`cols` values).
    pub fn dequantize_row_f64(&self, r: usize, out: &mut [f64]) {
        let (nb, block) = (self.blocks_per_row(), self.block.max(1));
        let vals = &self.values[r * self.cols..(r + 1) * self.cols];
        for (j, (o, v)) in out.chunks_mut(block).zip(vals.chunks(block)).enumerate() {
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
///
/// Rules: bf16 rounds each value (scale 1, one block per row); fp8 divides by the static scale;
/// fp8_block s = max(amax, 1e-10)/448 per 1×128 (a partial last block over the values present);
/// mxfp8 ceil-pow2(amax/448) per 1×32; nvfp4 s = dec(E4M3(amax/6/g))·g per 1×16 with g the static
/// scale, or with g_row = amax_row/(448·6) for `nvfp4_per_token` (a zero row: g_row = 0, scales 0,
/// values 0). Inputs are expected finite (hidden states are checked at the boundary); a NaN that
/// slips through makes its block's scale NaN, so it shows in the output instead of vanishing.
pub fn quantize_rows(
    format: ActivationFormat,
    x: &[f32],
    rows: usize,
    cols: usize,
    static_scale: Option<f32>,
) -> Result<QuantizedRows> {
    let mut q = QuantizedRows {
        rows,
        cols,
        ..QuantizedRows::empty(format)
    };
    quantize_rows_into(x, static_scale, &mut q)?;
    Ok(q)
}

/// [`quantize_rows`] into a reused `out`: its `format`, `rows` and `cols` say what to do, its
/// buffers are resized (capacity kept), so hot loops allocate nothing per call. On error `out` is
/// left unchanged.
pub fn quantize_rows_into(
    x: &[f32],
    static_scale: Option<f32>,
    out: &mut QuantizedRows,
) -> Result<()> {
    let (format, rows, cols) = (out.format, out.rows, out.cols);
    let block = block_of(format, cols);
    if rows.checked_mul(cols) != Some(x.len()) {
        return Err(MoeError::invalid(
            "quantize_rows: activations `x`",
            format!("{} values do not match [{rows}, {cols}]", x.len()),
        ));
    }
    let whole_blocks = matches!(
        format,
        ActivationFormat::Mxfp8 | ActivationFormat::Nvfp4 | ActivationFormat::Nvfp4PerToken
    );
    if whole_blocks && cols % block != 0 {
        return Err(MoeError::invalid(
            "quantize_rows: K (`cols`)",
            format!("{format} activations need K = {cols} to be a multiple of {block}"),
        ));
    }
    let stat = match static_scale {
        _ if !format.needs_input_scale() => 1.0,
        Some(s) if s.is_finite() && s > 0.0 => s,
        _ => {
            return Err(MoeError::invalid("input_scale", format!(
                "{format} activations need a finite positive static input scale, got {static_scale:?}")))
        }
    };
    out.block = block;
    let nb = cols.div_ceil(block);
    out.values.resize(rows * cols, 0.0);
    out.scales.resize(rows * nb, 0.0);
    if cols == 0 {
        return Ok(());
    }
    for ((xr, vr), sr) in x
        .chunks_exact(cols)
        .zip(out.values.chunks_exact_mut(cols))
        .zip(out.scales.chunks_exact_mut(nb))
    {
        // Per-token NVFP4 takes the row's own global; static NVFP4 the layer's.
        let global = match format {
            ActivationFormat::Nvfp4PerToken => amax(xr) / NVFP4_GLOBAL_DIVISOR,
            _ => stat,
        };
        for ((xb, vb), s_out) in xr
            .chunks(block)
            .zip(vr.chunks_mut(block))
            .zip(sr.iter_mut())
        {
            let s = match format {
                ActivationFormat::Bf16 => 1.0,
                ActivationFormat::Fp8 => stat,
                ActivationFormat::Fp8Block => amax(xb).max(FP8_AMAX_FLOOR) / e4m3::MAX,
                ActivationFormat::Mxfp8 => mx_scale(amax(xb), e4m3::MAX).1,
                ActivationFormat::Nvfp4 | ActivationFormat::Nvfp4PerToken => {
                    if global == 0.0 {
                        0.0
                    } else {
                        nvfp4_scale(amax(xb), global).1
                    }
                }
            };
            *s_out = s;
            match format {
                ActivationFormat::Bf16 => vb
                    .iter_mut()
                    .zip(xb)
                    .for_each(|(v, x)| *v = bf16::round(*x)),
                ActivationFormat::Nvfp4 | ActivationFormat::Nvfp4PerToken => vb
                    .iter_mut()
                    .zip(xb)
                    .for_each(|(v, x)| *v = e2m1::decode(fp4_code(*x, s))),
                ActivationFormat::Fp8 | ActivationFormat::Fp8Block | ActivationFormat::Mxfp8 => vb
                    .iter_mut()
                    .zip(xb)
                    .for_each(|(v, x)| *v = e4m3::DECODE[e4m3::encode(x / s) as usize]),
            }
        }
    }
    Ok(())
}
