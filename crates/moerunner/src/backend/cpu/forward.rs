//! The CPU forward pass in four parallel phases over a chunk of tokens:
//! A. GEMM1 + bias + activation, items = (expert, block of I features);
//! B. requantization of the intermediate, items = runs of pairs;
//! C. GEMM2 + bias, items = (expert, block of H rows);
//! D. combine per token in slot order.
//!
//! Design decision: every phase writes disjoint, contiguous pieces of one buffer laid out as
//! `[expert][block][pair][block width]`, so items run in any order on any thread without locks or
//! `unsafe`, and each output element is computed by the same operations whatever the threads.

use std::ops::Range;

use rayon::prelude::*;

use super::gemm::{self, TokenRows};
use super::plan::{self, Plan, NO_PAIR};
use super::simd::{self, Codec, FixedRow, FixedRows, Isa};
use super::CpuLayer;
use crate::activation::apply_row_f32;
use crate::config::ActivationFormat;
use crate::error::{MoeError, Result};
use crate::formats::{quantize_rows_into, QuantizedRows};
use crate::forward::{self, ForwardInput, ForwardOutput};
use crate::routing::Routes;

/// Bytes of per-chunk buffers (intermediates and GEMM2 outputs) a call may hold at once; longer
/// inputs are processed in chunks of tokens (each chunk re-reads the routed experts' weights).
const CHUNK_BUFFER_BYTES: usize = 256 << 20;

/// Rows quantized per task (activation quantizers are per row, so any split gives the same bits).
const QUANT_ROWS_PER_TASK: usize = 32;

pub fn run(cpu: &CpuLayer, input: &ForwardInput<'_>) -> Result<ForwardOutput> {
    // The phases run on a pool thread: called from outside the pool, every parallel loop would
    // otherwise inject a job and wake sleeping workers (measured 25–65 µs a phase on the
    // development VM, five phases a call), where from inside the pool the next phase finds them
    // still spinning.
    rayon::scope(|_| run_in_pool(cpu, input))
}

fn run_in_pool(cpu: &CpuLayer, input: &ForwardInput<'_>) -> Result<ForwardOutput> {
    let layer = &cpu.layer;
    let cfg = layer.config();
    let (x, routes) = forward::resolve_input(layer, input)?;
    let (tokens, h) = (routes.tokens, cfg.hidden);
    // NaN until written: a row the phases forget shows up as NaN, never as a plausible zero.
    let mut out = vec![f32::NAN; tokens * h];
    let per_token = (routes.top_k * (h + 2 * cfg.intermediate) + h) * 4;
    let chunk = (CHUNK_BUFFER_BYTES / per_token.max(1)).clamp(1, cpu.max_chunk_tokens.max(1));
    let mut start = 0;
    while start < tokens {
        let end = (start + chunk).min(tokens);
        run_chunk(cpu, &x, &routes, start..end, &mut out[start * h..end * h])?;
        start = end;
    }
    let output = forward::output_like(input.hidden, &out, tokens, h);
    Ok(ForwardOutput { output, routes })
}

/// Feature blocks of GEMM1 items (I features each: 2 rows for gated activations).
fn feature_blocks(cpu: &CpuLayer) -> Vec<Range<usize>> {
    let cfg = cpu.layer.config();
    let gated = cfg.activation.is_gated();
    let rows = plan::rows_per_item(cpu.w13.row_bytes(), cfg.w13_rows());
    plan::blocks(
        cfg.intermediate,
        if gated { (rows / 2).max(1) } else { rows },
    )
}

/// Row blocks of GEMM2 items.
fn hidden_blocks(cpu: &CpuLayer) -> Vec<Range<usize>> {
    let cfg = cpu.layer.config();
    plan::blocks(
        cfg.hidden,
        plan::rows_per_item(cpu.w2.row_bytes(), cfg.hidden),
    )
}

/// Splits `buf` into each busy expert's blocks: `[expert][block][pair][width]`, yielding
/// `(expert, block, slice of n_e × width)`.
fn split_by_expert_block<'a>(
    plan: &Plan,
    blocks: &[Range<usize>],
    width: usize,
    mut buf: &'a mut [f32],
) -> Vec<(usize, Range<usize>, &'a mut [f32])> {
    let mut items = Vec::new();
    for e in 0..plan.experts {
        let n = plan.expert_pairs(e).len();
        if n == 0 {
            continue;
        }
        debug_assert_eq!(blocks.last().map_or(0, |b| b.end), width);
        for b in blocks {
            let (head, rest) = buf.split_at_mut(n * b.len());
            items.push((e, b.clone(), head));
            buf = rest;
        }
    }
    items
}

/// Offset of pair-local row `i` of expert `e` inside block `b` of a `[expert][block][pair][width]`
/// buffer.
#[inline]
fn block_offset(plan: &Plan, e: usize, width: usize, b: &Range<usize>, i: usize) -> usize {
    let pairs = plan.expert_pairs(e);
    pairs.start * width + pairs.len() * b.start + i * b.len()
}

fn run_chunk(
    cpu: &CpuLayer,
    x: &[f32],
    routes: &Routes,
    tokens: Range<usize>,
    out: &mut [f32],
) -> Result<()> {
    let layer = &cpu.layer;
    let cfg = layer.config();
    let w = layer.weights();
    let (h, inter, k) = (cfg.hidden, cfg.intermediate, routes.top_k);
    let plan = Plan::build(routes, tokens.clone(), &cfg.local_experts, cfg.num_experts);
    let pairs = plan.pairs();
    let n_tok = tokens.len();

    // GEMM1's input: every token quantized once, dequantized into W13's codec order.
    let mut xq = vec![f32::NAN; n_tok * h];
    quantize_rows_par(
        cfg.activation_format,
        &x[tokens.start * h..tokens.end * h],
        h,
        w.w13_input_scale,
        cpu.w13.codec(),
        &mut xq,
    )?;

    // Experts with a single pair run their products in integers where the weights allow it:
    // their tokens' rows in fixed point, once each.
    let fixed1 = SingleRows::build(cpu.isa, cpu.w13.codec(), &plan, h, |p| {
        let t = plan.pair_token[p] as usize;
        (t, &xq[t * h..(t + 1) * h])
    });

    // A: GEMM1, bias, activation. Every item is its own task (`with_max_len(1)`): rayon's
    // default split leaves each thread a few long runs of items, so when one core runs slower
    // (another tenant on this VM's cores) the other finished its share and idled for up to a
    // third of the phase (measured: 48 items each, one thread done at 0.79 ms, the other at
    // 1.19 ms); items are ≥ ~5 µs of work, so per-task overhead is negligible.
    let fblocks = feature_blocks(cpu);
    let mut act = vec![f32::NAN; pairs * inter];
    let items = split_by_expert_block(&plan, &fblocks, inter, &mut act);
    let on_input = routes.weight_on_input;
    items
        .into_par_iter()
        .with_max_len(1)
        .for_each(|(e, feats, dst)| {
            gemm1_item(cpu, &plan, &xq, fixed1.row(e), on_input, e, feats, dst)
        });

    // B: the intermediate, quantized per pair, into W2's codec order ([pair][I], sorted order).
    let mut aq = vec![f32::NAN; pairs * inter];
    aq.par_chunks_mut(QUANT_ROWS_PER_TASK * inter)
        .enumerate()
        .try_for_each(|(task, dst)| -> Result<()> {
            let first = task * QUANT_ROWS_PER_TASK;
            let rows = dst.len() / inter;
            gemm::with_scratch(|s| {
                let gemm::Scratch { y, quant, .. } = s;
                let raw = grow_scratch(y, rows * inter);
                for (i, row) in raw.chunks_exact_mut(inter).enumerate() {
                    let p = first + i;
                    let e = plan.pair_expert[p] as usize;
                    let pi = p - plan.expert_pairs(e).start;
                    for b in &fblocks {
                        let o = block_offset(&plan, e, inter, b, pi);
                        row[b.clone()].copy_from_slice(&act[o..o + b.len()]);
                    }
                }
                quantize_chunk(
                    cfg.activation_format,
                    raw,
                    inter,
                    w.w2_input_scale,
                    cpu.w2.codec(),
                    dst,
                    quant,
                )
            })
        })?;
    drop(act);

    // C: GEMM2 and its bias.
    let fixed2 = SingleRows::build(cpu.isa, cpu.w2.codec(), &plan, inter, |p| {
        (p, &aq[p * inter..(p + 1) * inter])
    });
    let hblocks = hidden_blocks(cpu);
    let mut z = vec![f32::NAN; pairs * h];
    let items = split_by_expert_block(&plan, &hblocks, h, &mut z);
    items
        .into_par_iter()
        .with_max_len(1)
        .for_each(|(e, rows, dst)| gemm2_item(cpu, &plan, &aq, fixed2.row(e), e, rows, dst));

    // D: combine each token's slots in slot order (f32, a fixed order: deterministic).
    out.par_chunks_mut(h).enumerate().for_each(|(t, row)| {
        row.fill(0.0);
        for j in 0..k {
            let p = plan.slot_pair[t * k + j];
            if p == NO_PAIR {
                continue;
            }
            let p = p as usize;
            let e = plan.pair_expert[p] as usize;
            let pi = p - plan.expert_pairs(e).start;
            // Llama-4 applied its weight to GEMM1's accumulator; combine uses 1.
            let weight = if routes.weight_on_input {
                1.0
            } else {
                plan.pair_weight[p]
            };
            for b in &hblocks {
                let o = block_offset(&plan, e, h, b, pi);
                for (acc, &v) in row[b.clone()].iter_mut().zip(&z[o..o + b.len()]) {
                    *acc += weight * v;
                }
            }
        }
    });
    Ok(())
}

/// The fixed-point input rows of the experts that hold exactly one pair (the one-token products
/// that have an integer kernel), each distinct source row converted once.
struct SingleRows {
    rows: FixedRows,
    /// Expert → its row in `rows` (`u32::MAX`: none).
    slot: Vec<u32>,
}

impl SingleRows {
    /// `source(pair)` names the pair's input row (a key shared by pairs reading the same row)
    /// and its values in the weights' codec order.
    fn build<'x>(
        isa: Isa,
        codec: Codec,
        plan: &Plan,
        k: usize,
        source: impl Fn(usize) -> (usize, &'x [f32]) + Sync,
    ) -> SingleRows {
        let mut slot = vec![u32::MAX; plan.experts];
        let mut rows = FixedRows::default();
        if !simd::has_fixed_kernel(isa, codec) {
            return SingleRows { rows, slot };
        }
        // Distinct sources in expert order (deterministic), and each single expert's slot.
        let mut keys: Vec<usize> = Vec::new();
        let mut firsts: Vec<usize> = Vec::new();
        for (e, s) in slot.iter_mut().enumerate() {
            let p = plan.expert_pairs(e);
            if p.len() != 1 {
                continue;
            }
            let key = source(p.start).0;
            let at = keys.iter().position(|&k| k == key).unwrap_or_else(|| {
                keys.push(key);
                firsts.push(p.start);
                keys.len() - 1
            });
            *s = at as u32;
        }
        rows.reset(keys.len(), k);
        rows.fill_all(codec, |i| source(firsts[i]).1);
        SingleRows { rows, slot }
    }

    fn row(&self, e: usize) -> Option<FixedRow<'_>> {
        self.rows.row(*self.slot.get(e)? as usize)
    }
}

/// GEMM1 for expert `e`'s pairs over one block of features: both halves' rows (gated), the
/// Llama-4 input weight, the bias and the activation, into `dst` `[n_e][feats]`.
#[allow(clippy::too_many_arguments)]
fn gemm1_item(
    cpu: &CpuLayer,
    plan: &Plan,
    xq: &[f32],
    fixed: Option<FixedRow<'_>>,
    weight_on_input: bool,
    e: usize,
    feats: Range<usize>,
    dst: &mut [f32],
) {
    let layer = &cpu.layer;
    let cfg = layer.config();
    let w = layer.weights();
    let (h, inter, m_all) = (cfg.hidden, cfg.intermediate, cfg.w13_rows());
    let pairs = plan.expert_pairs(e);
    let n = pairs.len();
    let fl = feats.len();
    // The rows of these features, as W13Order lays them out, concatenated in an order such that
    // the local row layout is itself `w13_order` over `fl` features (apply_row_f32 then works on
    // it unchanged).
    let both = [feats.clone(), inter + feats.start..inter + feats.end];
    let interleaved = 2 * feats.start..2 * feats.end;
    let ranges: &[Range<usize>] = if !cfg.activation.is_gated() {
        &both[..1]
    } else {
        match cfg.w13_order {
            crate::config::W13Order::Interleaved => std::slice::from_ref(&interleaved),
            _ => &both,
        }
    };
    let m: usize = ranges.iter().map(|r| r.len()).sum();
    let rows = TokenRows {
        base: xq,
        k: h,
        index: Some(&plan.pair_token[pairs.clone()]),
        n,
        fixed,
    };
    gemm::with_scratch(|s| {
        let mut y = std::mem::take(&mut s.y);
        let yb = grow_scratch(&mut y, n * m);
        gemm::project(cpu.isa, &cpu.w13, &w.w13, e, ranges, &rows, yb, m, s);
        for (i, yrow) in yb.chunks_exact_mut(m).enumerate() {
            if weight_on_input {
                let wt = plan.pair_weight[pairs.start + i];
                yrow.iter_mut().for_each(|v| *v *= wt);
            }
            if let Some(b13) = &w.w13_bias {
                let bias = &b13[e * m_all..(e + 1) * m_all];
                let mut j = 0;
                for r in ranges {
                    for (v, &b) in yrow[j..j + r.len()].iter_mut().zip(&bias[r.clone()]) {
                        *v += b;
                    }
                    j += r.len();
                }
            }
            apply_row_f32(
                &cfg.activation,
                cfg.w13_order,
                yrow,
                &mut dst[i * fl..(i + 1) * fl],
            );
        }
        s.y = y;
    });
}

/// GEMM2 for expert `e`'s pairs over one block of H rows, plus the bias, into `dst` `[n_e][rows]`.
fn gemm2_item(
    cpu: &CpuLayer,
    plan: &Plan,
    aq: &[f32],
    fixed: Option<FixedRow<'_>>,
    e: usize,
    rows: Range<usize>,
    dst: &mut [f32],
) {
    let layer = &cpu.layer;
    let cfg = layer.config();
    let w = layer.weights();
    let (h, inter) = (cfg.hidden, cfg.intermediate);
    let pairs = plan.expert_pairs(e);
    let n = pairs.len();
    let xs = TokenRows {
        base: &aq[pairs.start * inter..pairs.end * inter],
        k: inter,
        index: None,
        n,
        fixed,
    };
    let width = rows.len();
    gemm::with_scratch(|s| {
        gemm::project(
            cpu.isa,
            &cpu.w2,
            &w.w2,
            e,
            std::slice::from_ref(&rows),
            &xs,
            dst,
            width,
            s,
        )
    });
    if let Some(b2) = &w.w2_bias {
        let bias = &b2[e * h + rows.start..e * h + rows.end];
        for zrow in dst.chunks_exact_mut(width) {
            for (v, &b) in zrow.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }
}

fn grow_scratch(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// Quantizes rows of `cols` values (`src`, natural order) with `format` and writes their
/// dequantized values in `codec` order into `dst`, a task per [`QUANT_ROWS_PER_TASK`] rows, each
/// with its thread's reusable quantizer buffers. Quantizers work per row, so the split changes no
/// bit.
fn quantize_rows_par(
    format: ActivationFormat,
    src: &[f32],
    cols: usize,
    scale: Option<f32>,
    codec: Codec,
    dst: &mut [f32],
) -> Result<()> {
    if cols == 0 || src.is_empty() {
        return Ok(());
    }
    src.par_chunks(QUANT_ROWS_PER_TASK * cols)
        .zip(dst.par_chunks_mut(QUANT_ROWS_PER_TASK * cols))
        .try_for_each(|(s, d)| {
            gemm::with_scratch(|sc| quantize_chunk(format, s, cols, scale, codec, d, &mut sc.quant))
        })
}

/// [`quantize_rows_par`] for one task's rows, through the reusable `q`.
fn quantize_chunk(
    format: ActivationFormat,
    src: &[f32],
    cols: usize,
    scale: Option<f32>,
    codec: Codec,
    dst: &mut [f32],
    q: &mut QuantizedRows,
) -> Result<()> {
    let rows = src.len() / cols.max(1);
    q.format = format;
    q.rows = rows;
    q.cols = cols;
    quantize_rows_into(src, scale, q)?;
    let (block, bpr) = (q.block.max(1), q.blocks_per_row());
    if q.values.len() < rows * cols || q.scales.len() < rows * bpr {
        return Err(MoeError::invalid(
            "activation quantizer",
            format!(
                "{format} returned {} values and {} scales for [{rows}, {cols}]",
                q.values.len(),
                q.scales.len()
            ),
        ));
    }
    for r in 0..rows {
        let vals = &q.values[r * cols..(r + 1) * cols];
        let scales = &q.scales[r * bpr..(r + 1) * bpr];
        let d = &mut dst[r * cols..(r + 1) * cols];
        // Block by block: no division per element (it dominated this loop).
        for (b, (vb, &s)) in vals.chunks(block).zip(scales).enumerate() {
            for (i, &v) in vb.iter().enumerate() {
                d[codec.order_index(b * block + i, cols)] = v * s;
            }
        }
    }
    Ok(())
}
