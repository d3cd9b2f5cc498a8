//! The float64, quantization-aware reference of the forward pass (`spec/layer.md`): the oracle for
//! every test and backend. Written for clarity, not speed: plain f64 loops, no threads, no SIMD.
//!
//! One design decision keeps it usable on real layer sizes: (token, slot) pairs are grouped by
//! expert, and each expert's weights are decoded once, a block of rows at a time, for all of its
//! pairs. Activations are quantized exactly as the layer's activation format says (the f32
//! quantizers of `formats` define the grid) and then carried in f64.

use std::ops::Range;

use crate::config::LayerConfig;
use crate::error::{MoeError, Result};
use crate::formats::{quantize_rows, QuantizedRows};
use crate::routing::Routes;
use crate::weights::{MoeLayer, QuantizedTensor};

/// Rows of a weight decoded at a time: bounds the reference's memory on big experts
/// (64 rows × 7168 columns × 8 bytes ≈ 3.7 MB) while still decoding each row once.
const DECODE_ROWS: usize = 64;

/// The layer's output `[T, H]` in f64 for f32 hidden states `x` `[T, H]` and resolved routes.
pub fn forward(layer: &MoeLayer, x: &[f32], routes: &Routes) -> Result<Vec<f64>> {
    let all: Vec<usize> = (0..routes.tokens).collect();
    forward_tokens(layer, x, routes, &all)
}

/// Like [`forward`], but computes only the tokens listed in `tokens` (indices into `x`'s rows);
/// returns `[tokens.len(), H]`, row `i` belonging to token `tokens[i]`. Every activation format
/// quantizes per row, so a token's result does not depend on which other tokens are computed.
pub fn forward_tokens(
    layer: &MoeLayer,
    x: &[f32],
    routes: &Routes,
    tokens: &[usize],
) -> Result<Vec<f64>> {
    let cfg = layer.config();
    let h = cfg.hidden;
    check_inputs(cfg, x, routes, tokens)?;
    let n = tokens.len();
    let mut out = vec![0f64; n * h];
    if n == 0 {
        return Ok(out);
    }

    // Step 2: quantize the selected rows of x for GEMM1 (per row, so a subset quantizes the same).
    let mut xs = Vec::with_capacity(n * h);
    for &t in tokens {
        xs.extend_from_slice(&x[t * h..(t + 1) * h]);
    }
    let w = layer.weights();
    let xq = dequantize(&quantize_rows(
        cfg.activation_format,
        &xs,
        n,
        h,
        input_scale(cfg, w.w13_input_scale, "w13_input_scale")?,
    )?);

    // Step 1 (already resolved): group (row in `tokens`, routing weight) pairs by local expert.
    // Pairs within an expert stay in token-then-slot order; combine sums in f64, so the order
    // across experts does not matter.
    let local = &cfg.local_experts;
    let mut pairs: Vec<Vec<(usize, f64)>> = vec![Vec::new(); local.len()];
    let k = routes.top_k;
    for (row, &t) in tokens.iter().enumerate() {
        for j in 0..k {
            let id = routes.ids[t * k + j];
            // Ids outside [0, E) (padding) and experts held by other ranks contribute nothing.
            if id < 0 || id as usize >= cfg.num_experts || !local.contains(&(id as usize)) {
                continue;
            }
            pairs[id as usize - local.start].push((row, routes.weights[t * k + j] as f64));
        }
    }

    for (e, expert_pairs) in pairs.iter().enumerate() {
        if !expert_pairs.is_empty() {
            expert_forward(
                layer,
                e,
                expert_pairs,
                &xq,
                routes.weight_on_input,
                &mut out,
            )?;
        }
    }
    Ok(out)
}

/// Steps 3–7 for local expert `e` and its pairs `(row of xq/out, routing weight)`.
fn expert_forward(
    layer: &MoeLayer,
    e: usize,
    pairs: &[(usize, f64)],
    xq: &[f64],
    weight_on_input: bool,
    out: &mut [f64],
) -> Result<()> {
    let cfg = layer.config();
    let w = layer.weights();
    let (h, inter, m) = (cfg.hidden, cfg.intermediate, cfg.w13_rows());
    let p = pairs.len();

    // Step 3: GEMM1, y[p, M] = W13[e] · xq[t]; Llama-4 scales the product by the routing weight
    // before the bias (`spec/layer.md` step 7).
    let mut y = vec![0f64; p * m];
    gemm_rows(
        &w.w13,
        e,
        |pi| &xq[pairs[pi].0 * h..(pairs[pi].0 + 1) * h],
        p,
        &mut y,
    );
    for (pi, &(_, weight)) in pairs.iter().enumerate() {
        let row = &mut y[pi * m..(pi + 1) * m];
        if weight_on_input {
            row.iter_mut().for_each(|v| *v *= weight);
        }
        if let Some(b13) = &w.w13_bias {
            for (v, &b) in row.iter_mut().zip(&b13[e * m..(e + 1) * m]) {
                *v += b as f64;
            }
        }
        f32_range(row);
    }

    // Step 4: the activation in f64; step 5: the intermediate goes through f32 (what a kernel
    // holds) into the activation quantizer, then back to f64.
    let mut a = vec![0f64; inter];
    let mut a32 = Vec::with_capacity(p * inter);
    for pi in 0..p {
        crate::activation::apply_row_f64(
            &cfg.activation,
            cfg.w13_order,
            &y[pi * m..(pi + 1) * m],
            &mut a,
        );
        a32.extend(a.iter().map(|&v| v as f32));
    }
    let scale = input_scale(cfg, w.w2_input_scale, "w2_input_scale")?;
    let aq = dequantize(&quantize_rows(
        cfg.activation_format,
        &a32,
        p,
        inter,
        scale,
    )?);

    // Step 6: GEMM2, z[p, H] = W2[e] · aq (+ b2).
    let mut z = vec![0f64; p * h];
    gemm_rows(&w.w2, e, |pi| &aq[pi * inter..(pi + 1) * inter], p, &mut z);
    f32_range(&mut z);

    // Step 7: combine, out[t] += w · z (Llama-4: weight 1, it was applied in GEMM1).
    for (pi, &(row, weight)) in pairs.iter().enumerate() {
        let weight = if weight_on_input { 1.0 } else { weight };
        let b2 = w.w2_bias.as_ref().map(|b| &b[e * h..(e + 1) * h]);
        for c in 0..h {
            let zc = z[pi * h + c] + b2.map_or(0.0, |b| b[c] as f64);
            out[row * h + c] += weight * zc;
        }
    }
    Ok(())
}

/// The overflow rule (docs/robustness.md): a GEMM result beyond the f32 range is what an f32
/// kernel holds, ±inf, so the activation and combine see the same infinities (and make the same
/// NaN, inf or 0 of them) as every backend does. Values in range are left exact.
fn f32_range(values: &mut [f64]) {
    for v in values {
        if (*v as f32).is_infinite() {
            *v = *v as f32 as f64;
        }
    }
}

/// `result[pi, r] = Σ_c W[e][r, c] · input(pi)[c]` for every pair `pi < pairs` and every row `r`
/// of `weight`, in f64; the weight is decoded [`DECODE_ROWS`] rows at a time, each row once.
fn gemm_rows<'a>(
    weight: &QuantizedTensor,
    e: usize,
    input: impl Fn(usize) -> &'a [f64],
    pairs: usize,
    result: &mut [f64],
) {
    let (rows, cols) = (weight.rows, weight.cols);
    let mut block = vec![0f64; DECODE_ROWS.min(rows) * cols];
    let mut start = 0;
    while start < rows {
        let range: Range<usize> = start..(start + DECODE_ROWS).min(rows);
        let decoded = &mut block[..range.len() * cols];
        weight.decode_rows_f64(e, range.clone(), decoded);
        for pi in 0..pairs {
            let v = input(pi);
            for (i, r) in range.clone().enumerate() {
                result[pi * rows + r] = dot(&decoded[i * cols..(i + 1) * cols], v);
            }
        }
        start = range.end;
    }
}

/// Σ a·b in f64. Four running sums instead of one let the additions overlap (a sequential f64
/// sum is latency-bound); in f64 the order changes nothing that matters at f32 tolerances.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 4];
    let (a4, b4) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = a4
        .remainder()
        .iter()
        .zip(b4.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a4.zip(b4) {
        for l in 0..4 {
            acc[l] += x[l] * y[l];
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Dequantized activation rows in f64: element × its block's scale (`spec/formats.md`).
fn dequantize(q: &QuantizedRows) -> Vec<f64> {
    let blocks_per_row = q.cols.div_ceil(q.block.max(1));
    let mut out = Vec::with_capacity(q.rows * q.cols);
    for r in 0..q.rows {
        for c in 0..q.cols {
            let s = q.scales[r * blocks_per_row + c / q.block.max(1)] as f64;
            out.push(q.values[r * q.cols + c] as f64 * s);
        }
    }
    out
}

/// The static input scale of a GEMM when the activation format takes one.
fn input_scale(cfg: &LayerConfig, scale: Option<f32>, name: &str) -> Result<Option<f32>> {
    if !cfg.activation_format.needs_input_scale() {
        return Ok(None);
    }
    match scale {
        Some(s) => Ok(Some(s)),
        None => Err(MoeError::missing(format!(
            "tensor `{name}` (required by activation format `{}`)",
            cfg.activation_format
        ))),
    }
}

/// Shapes of the call's inputs against the layer (the layer itself is valid by construction).
fn check_inputs(cfg: &LayerConfig, x: &[f32], routes: &Routes, tokens: &[usize]) -> Result<()> {
    let (t, h, k) = (routes.tokens, cfg.hidden, routes.top_k);
    if x.len() != t * h {
        return Err(MoeError::shape(
            "hidden_states",
            format!("[{t}, {h}] ({} values)", t * h),
            &[x.len()],
        ));
    }
    if routes.ids.len() != t * k || routes.weights.len() != t * k {
        return Err(MoeError::invalid(
            "routes",
            format!(
                "{} ids and {} weights do not match T = {t}, k = {k}",
                routes.ids.len(),
                routes.weights.len()
            ),
        ));
    }
    if let Some(&bad) = tokens.iter().find(|&&i| i >= t) {
        return Err(MoeError::invalid(
            "tokens",
            format!("token index {bad} is out of range for T = {t}"),
        ));
    }
    Ok(())
}
