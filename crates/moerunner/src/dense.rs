//! A dense linear layer beside the MoE: y = x · Wᵀ (x `[M, K]`, W `[N, K]`, row = output feature),
//! in the formats that SGLang / FlashInfer ship a dense GEMM for next to their fused MoE:
//!
//! - `mxfp8`: W in E4M3 with one UE8M0 scale per 1×32 along K; x quantized on the fly to MXFP8 1×32
//!   (ceil-pow2(amax / 448)); K % 32 == 0.
//! - `fp8_block`: W in E4M3 with one f32 scale per 128×128 block; x quantized 1×128 dynamically
//!   (max(amax, 1e-10) / 448).
//!
//! The weights are a one-expert [`QuantizedTensor`] and both quantizers are the library's own
//! (`formats::weight_quant::quantize_weights`, `formats::act_quant::quantize_rows`): they are the
//! definition (`spec/formats.md`). [`DenseLinear::reference`] is the float64 oracle (the same
//! quantized operands, dequantized exactly, summed in f64); [`DenseLinear::forward_cpu`] the fast
//! path (row blocks of W decoded to f32, f32 sgemm on rayon, bf16-rounded output). The GPU runs it
//! through the MoE's grouped GEMM as one expert (`backend::cuda::dense`).
//!
//! A `DenseLinear` that exists is valid (shapes, scales, no NaN element code): [`DenseLinear::new`]
//! checks it once, and every input is checked by [`DenseLinear::check_input`], naming the tensor.

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;

use crate::config::{tolerance, ActivationFormat, WeightFormat};
use crate::error::{MoeError, Result};
use crate::formats::act_quant::{quantize_rows, QuantizedRows};
use crate::formats::weight_quant::quantize_weights;
use crate::rng::SeededRng;
use crate::tensor::{DType, HostTensor};
use crate::weights::{BlockScales, QuantizedTensor};

/// The formats of a dense linear layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenseFormat {
    Mxfp8,
    Fp8Block,
}

impl DenseFormat {
    pub const ALL: [DenseFormat; 2] = [DenseFormat::Mxfp8, DenseFormat::Fp8Block];

    pub fn name(self) -> &'static str {
        self.weight_format().name()
    }
    pub fn weight_format(self) -> WeightFormat {
        match self {
            DenseFormat::Mxfp8 => WeightFormat::Mxfp8,
            DenseFormat::Fp8Block => WeightFormat::Fp8Block,
        }
    }
    pub fn activation_format(self) -> ActivationFormat {
        match self {
            DenseFormat::Mxfp8 => ActivationFormat::Mxfp8,
            DenseFormat::Fp8Block => ActivationFormat::Fp8Block,
        }
    }
    /// The relative-norm tolerance against [`DenseLinear::reference`] (the MoE formats' of
    /// `spec/formats.md`: 2e-2 for both).
    pub fn tolerance(self) -> f64 {
        tolerance(self.weight_format(), self.activation_format())
    }
    /// K must be a multiple of this (mxfp8's scale block; fp8_block takes any K).
    pub fn k_multiple(self) -> usize {
        match self {
            DenseFormat::Mxfp8 => 32,
            DenseFormat::Fp8Block => 1,
        }
    }
}

impl fmt::Display for DenseFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DenseFormat {
    type Err = MoeError;
    fn from_str(s: &str) -> Result<DenseFormat> {
        DenseFormat::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                MoeError::invalid(
                    "dense format",
                    format!("`{s}` is not one of mxfp8, fp8_block"),
                )
            })
    }
}

/// y = x · Wᵀ with W quantized (module docs).
#[derive(Clone, Debug)]
pub struct DenseLinear {
    format: DenseFormat,
    weights: QuantizedTensor,
}

/// Rows of W decoded together by [`DenseLinear::forward_cpu`] (one rayon task).
const CPU_ROW_BLOCK: usize = 64;

impl DenseLinear {
    /// A dense layer over `weights` (`[1, N, K]` in `format`), checked: one expert, the format's
    /// scale layout and sizes, K % 32 == 0 for mxfp8, finite scales (no UE8M0 255, no NaN or
    /// non-positive f32) and no E4M3 NaN element code.
    pub fn new(format: DenseFormat, weights: QuantizedTensor) -> Result<DenseLinear> {
        let what = "tensor `weight`";
        let (n, k) = (weights.rows, weights.cols);
        if weights.format != format.weight_format() {
            return Err(MoeError::invalid(
                what,
                format!(
                    "holds {} weights, not {}",
                    weights.format.name(),
                    format.name()
                ),
            ));
        }
        if weights.experts != 1 {
            return Err(MoeError::shape(
                "weight",
                format!("[1, N, K] (one expert), N = {n}, K = {k}"),
                &[weights.experts, n, k],
            ));
        }
        if n == 0 || k == 0 {
            return Err(MoeError::shape("weight", "[N, K] with N, K > 0", &[n, k]));
        }
        if !k.is_multiple_of(format.k_multiple()) {
            return Err(MoeError::invalid(
                what,
                format!("{format} needs K % 32 == 0, K = {k}"),
            ));
        }
        if weights.data.len() != n * k {
            return Err(MoeError::invalid(
                what,
                format!("{} element bytes, not N·K = {}", weights.data.len(), n * k),
            ));
        }
        match (&weights.scales, format) {
            (BlockScales::Ue8m0(b), DenseFormat::Mxfp8) => {
                if b.len() != n * k / 32 {
                    return Err(MoeError::invalid(
                        "tensor `weight_scale`",
                        format!("{} UE8M0 bytes, not N·K/32 = {}", b.len(), n * k / 32),
                    ));
                }
                if let Some(i) = b.iter().position(|&s| s == 0xFF) {
                    return Err(MoeError::invalid(
                        "tensor `weight_scale`",
                        format!("UE8M0 255 (NaN) at [{}, {}]", i / (k / 32), i % (k / 32)),
                    ));
                }
            }
            (BlockScales::Block128(s), DenseFormat::Fp8Block) => {
                let blocks = n.div_ceil(128) * k.div_ceil(128);
                if s.len() != blocks {
                    return Err(MoeError::invalid(
                        "tensor `weight_scale`",
                        format!("{} block scales, not ⌈N/128⌉·⌈K/128⌉ = {blocks}", s.len()),
                    ));
                }
                if let Some(i) = s.iter().position(|v| !(v.is_finite() && *v > 0.0)) {
                    return Err(MoeError::invalid(
                        "tensor `weight_scale`",
                        format!(
                            "block scale {} at index {i} is not finite and positive",
                            s[i]
                        ),
                    ));
                }
            }
            _ => {
                return Err(MoeError::invalid(
                    "tensor `weight_scale`",
                    format!("not the scale layout of {format}"),
                ))
            }
        }
        if let Some(i) = weights.data.iter().position(|&b| b & 0x7F == 0x7F) {
            return Err(MoeError::invalid(
                what,
                format!(
                    "E4M3 NaN code {:#04x} at [{}, {}]: weights must be numbers",
                    weights.data[i],
                    i / k,
                    i % k
                ),
            ));
        }
        Ok(DenseLinear { format, weights })
    }

    /// Quantizes f32 weights `w` (`[n, k]`, row = output feature) into `format` with the library's
    /// weight quantizer (one expert).
    pub fn quantize(format: DenseFormat, n: usize, k: usize, w: &[f32]) -> Result<DenseLinear> {
        if !k.is_multiple_of(format.k_multiple()) {
            return Err(MoeError::invalid(
                "tensor `weight`",
                format!("{format} needs K % 32 == 0, K = {k}"),
            ));
        }
        if w.len() != n * k {
            return Err(MoeError::shape(
                "weight",
                format!("[{n}, {k}] ({} values)", n * k),
                &[w.len()],
            ));
        }
        let t = quantize_weights(format.weight_format(), 1, n, k, w, None)?;
        DenseLinear::new(format, t)
    }

    /// Seeded random weights (normal, std 1/√K: outputs of order 1), quantized into `format`.
    pub fn random(format: DenseFormat, n: usize, k: usize, seed: u64) -> Result<DenseLinear> {
        let mut rng = SeededRng::new(seed);
        let mut w = vec![0f32; n * k];
        rng.fill_normal(&mut w, 1.0 / (k.max(1) as f32).sqrt());
        DenseLinear::quantize(format, n, k, &w)
    }

    pub fn format(&self) -> DenseFormat {
        self.format
    }
    /// The quantized weights, `[1, N, K]`.
    pub fn weights(&self) -> &QuantizedTensor {
        &self.weights
    }
    /// Output features.
    pub fn n(&self) -> usize {
        self.weights.rows
    }
    /// Input features.
    pub fn k(&self) -> usize {
        self.weights.cols
    }

    /// Checks `x` is `[M, K]` of F32 or BF16 (any M, 0 included) and returns M.
    pub fn check_input(&self, x: &HostTensor) -> Result<usize> {
        x.expect_dtype("x", &[DType::F32, DType::BF16])?;
        if x.shape.len() != 2 || x.shape[1] != self.k() {
            return Err(MoeError::shape(
                "x",
                format!("[M, {}] (K of the weight)", self.k()),
                &x.shape,
            ));
        }
        Ok(x.shape[0])
    }

    /// `x` quantized as the format says (mxfp8 1×32, fp8_block 1×128), kept as exact values and
    /// scales. A non-finite x is refused, naming the row and column.
    pub fn quantize_input(&self, x: &HostTensor) -> Result<QuantizedRows> {
        let m = self.check_input(x)?;
        let v = x.to_f32_vec("x")?;
        if let Some(i) = v.iter().position(|f| !f.is_finite()) {
            return Err(MoeError::invalid(
                "tensor `x`",
                format!(
                    "x[{}, {}] = {} is not finite",
                    i / self.k(),
                    i % self.k(),
                    v[i]
                ),
            ));
        }
        quantize_rows(self.format.activation_format(), &v, m, self.k(), None)
    }

    /// The float64 oracle: x quantized as the format says, both operands dequantized exactly, each
    /// output the f64 sum of its products. `[M, N]` row-major.
    pub fn reference(&self, x: &HostTensor) -> Result<Vec<f64>> {
        let m = self.check_input(x)?;
        let rows: Vec<usize> = (0..m).collect();
        self.reference_rows(x, &rows)
    }

    /// [`reference`](Self::reference) for the rows `rows` of x only (`[rows.len(), N]`): a check of
    /// a large product on a sample of its rows. Each weight row is decoded once.
    pub fn reference_rows(&self, x: &HostTensor, rows: &[usize]) -> Result<Vec<f64>> {
        let m = self.check_input(x)?;
        if let Some(&r) = rows.iter().find(|&&r| r >= m) {
            return Err(MoeError::invalid(
                "reference rows",
                format!("row {r} of x, which has {m}"),
            ));
        }
        let q = self.quantize_input(x)?;
        let (n, k) = (self.n(), self.k());
        let mut xs = vec![0f64; rows.len() * k];
        for (i, &r) in rows.iter().enumerate() {
            q.dequantize_row_f64(r, &mut xs[i * k..(i + 1) * k]);
        }
        let mut out = vec![0f64; rows.len() * n];
        let mut w = vec![0f64; k];
        for j in 0..n {
            self.weights.decode_rows_f64(0, j..j + 1, &mut w);
            for (i, xr) in xs.chunks_exact(k).enumerate() {
                out[i * n + j] = xr.iter().zip(&w).map(|(a, b)| a * b).sum();
            }
        }
        Ok(out)
    }

    /// The fast CPU path: x quantized as the format says and dequantized to f32, blocks of 64
    /// weight rows decoded to f32 on rayon's threads, each block's `[M, 64]` products by f32 sgemm,
    /// outputs rounded to bf16 (returned widened to f32). `[M, N]` row-major. The same bits for
    /// any thread count (each output has one fixed order of operations).
    pub fn forward_cpu(&self, x: &HostTensor) -> Result<Vec<f32>> {
        let m = self.check_input(x)?;
        let (n, k) = (self.n(), self.k());
        if m == 0 {
            return Ok(Vec::new());
        }
        let xq = self.quantize_input(x)?.dequantize();
        let blocks: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(CPU_ROW_BLOCK))
            .into_par_iter()
            .map(|b| {
                let rows = b * CPU_ROW_BLOCK..((b + 1) * CPU_ROW_BLOCK).min(n);
                let nb = rows.len();
                let mut w = vec![0f32; nb * k];
                self.weights.decode_rows_f32(0, rows.clone(), &mut w);
                let mut c = vec![0f32; m * nb];
                // SAFETY: a is [m, k] row-major (xq), b = wᵀ read from w [nb, k] row-major
                // (row stride 1, column stride k), c is [m, nb] row-major; every slice holds
                // exactly the elements the strides reach.
                unsafe {
                    matrixmultiply::sgemm(
                        m,
                        k,
                        nb,
                        1.0,
                        xq.as_ptr(),
                        k as isize,
                        1,
                        w.as_ptr(),
                        1,
                        k as isize,
                        0.0,
                        c.as_mut_ptr(),
                        nb as isize,
                        1,
                    );
                }
                (rows.start, c)
            })
            .collect();
        let mut out = vec![0f32; m * n];
        for (start, c) in blocks {
            let nb = c.len() / m;
            for (i, row) in c.chunks_exact(nb).enumerate() {
                for (o, v) in out[i * n + start..i * n + start + nb].iter_mut().zip(row) {
                    *o = half::bf16::from_f32(*v).to_f32();
                }
            }
        }
        Ok(out)
    }

    /// Multiply-adds of one call with M rows, times two: the FLOPs of 2·M·N·K.
    pub fn flops(&self, m: usize) -> f64 {
        2.0 * m as f64 * self.n() as f64 * self.k() as f64
    }
}

/// Seeded random activations `[m, k]` (normal, std 1) in `dtype` (F32 or BF16).
pub fn random_input(m: usize, k: usize, dtype: DType, seed: u64) -> Result<HostTensor> {
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(MoeError::dtype("x", "F32 or BF16", dtype));
    }
    let mut rng = SeededRng::new(seed);
    let mut v = vec![0f32; m * k];
    rng.fill_normal(&mut v, 1.0);
    Ok(HostTensor::encode_f32(dtype, vec![m, k], &v))
}

/// The relative-norm error every check of this project uses (`config::relative_error`).
pub use crate::config::relative_error;

/// Whether `err` passes `tol` (NaN never does).
pub fn within(err: f64, tol: f64) -> bool {
    err <= tol
}
