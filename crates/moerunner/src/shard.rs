//! Expert- and tensor-parallel slicing of a whole layer into one rank's layer (`spec/layer.md`,
//! "Parallelism").
//!
//! Design decision: every slice is expressed as index maps (new expert → old expert, new row → old
//! row, new column → old column), and one gather copies elements, scales and biases through those
//! maps. A scale block of the slice is legal exactly when all of its elements come from one block
//! of the full tensor (so dequantization is unchanged); otherwise the error names the boundary.

use std::ops::Range;

use crate::config::{LayerConfig, Parallelism, WeightFormat};
use crate::error::{MoeError, Result};
use crate::weights::{BlockScales, LayerWeights, MoeLayer, QuantizedTensor};

/// Rows and columns per fp8_block weight scale block.
const FP8_BLOCK: usize = 128;

/// The part of `layer` (which must hold all experts and the full I) that rank `par` computes.
///
/// EP: rank r of R keeps experts `[r·E/R, (r+1)·E/R)` (global ids in `config.local_experts`; the
/// router bias stays global). TP: rank r keeps features `[r·I/R, (r+1)·I/R)` of both W13 halves
/// (in the layer's row order), the same columns of W2 and the matching scales; the W2 bias stays on
/// TP rank 0 only, so the ranks' partial outputs add up to the whole.
pub fn shard(layer: &MoeLayer, par: Parallelism) -> Result<MoeLayer> {
    par.validate()?;
    let cfg = layer.config();
    check_whole(cfg)?;
    let (e, inter) = (cfg.num_experts, cfg.intermediate);
    par.check_splits(e, inter)?;
    let per_rank = e / par.ep_size;
    let experts = par.ep_rank * per_rank..(par.ep_rank + 1) * per_rank;
    let ids: Vec<usize> = experts.clone().collect();
    slice(layer, &ids, experts, par)
}

/// The part of `layer` (a whole layer) that holds experts `experts` (global ids, in this order;
/// any set, as an explicit or uneven expert map gives) and TP slice `tp_rank` of `tp_size` on I.
/// The result's experts are renumbered: its local expert `j` (id `j` in routes given to it) is
/// global expert `experts[j]`, `local_experts = 0..experts.len()`, `num_experts` stays global
/// (routing limits are unchanged) and the router bias stays global (routes are made by the token
/// owner before dispatch). `ep` records the rank for display only.
pub fn shard_experts(
    layer: &MoeLayer,
    experts: &[usize],
    ep: (usize, usize),
    tp: (usize, usize),
) -> Result<MoeLayer> {
    let par = Parallelism {
        ep_size: ep.1,
        ep_rank: ep.0,
        tp_size: tp.1,
        tp_rank: tp.0,
    };
    par.validate()?;
    let cfg = layer.config();
    check_whole(cfg)?;
    if let Some(&x) = experts.iter().find(|&&x| x >= cfg.num_experts) {
        return Err(MoeError::invalid(
            "experts",
            format!("expert {x} is out of range (E = {})", cfg.num_experts),
        ));
    }
    Parallelism {
        ep_size: 1,
        ep_rank: 0,
        ..par
    }
    .check_splits(cfg.num_experts, cfg.intermediate)?;
    slice(layer, experts, 0..experts.len(), par)
}

/// A shard must start from a whole layer.
fn check_whole(cfg: &LayerConfig) -> Result<()> {
    if cfg.local_experts != (0..cfg.num_experts) || !cfg.parallelism.is_single() {
        return Err(MoeError::invalid(
            "shard",
            format!(
                "the layer is already a shard (experts {:?} of {}, {:?}); shard a whole layer",
                cfg.local_experts, cfg.num_experts, cfg.parallelism
            ),
        ));
    }
    Ok(())
}

/// Experts `experts` (global ids) and TP slice `par.tp_rank` of the whole `layer`, labelled
/// `local_experts`.
fn slice(
    layer: &MoeLayer,
    experts: &[usize],
    local_experts: Range<usize>,
    par: Parallelism,
) -> Result<MoeLayer> {
    let cfg = layer.config();
    let w = layer.weights();
    let inter = cfg.intermediate;
    let local_i = inter / par.tp_size;
    let features = par.tp_rank * local_i..(par.tp_rank + 1) * local_i;

    // Whole-element blocks along K of W2 are a format rule (`K % 32 = 0` for MX, 16 for NVFP4);
    // say so in terms of the slice before the generic block check below.
    if let Some(block) = w.w2.format.k_block().filter(|&b| b < FP8_BLOCK) {
        if par.tp_size > 1 && !local_i.is_multiple_of(block) {
            return Err(MoeError::invalid("tp_size", format!(
                "I/R = {inter}/{} = {local_i} is not a multiple of the {block}-column scale blocks of {} W2",
                par.tp_size, w.w2.format)));
        }
    }

    let w13_rows = w13_row_map(cfg, &features);
    let w2_rows: Vec<usize> = (0..cfg.hidden).collect();
    let w2_cols: Vec<usize> = features.clone().collect();
    let all_h: Vec<usize> = (0..cfg.hidden).collect();

    let w13 = gather(&w.w13, "w13", experts, &w13_rows, &all_h)?;
    let w2 = gather(&w.w2, "w2", experts, &w2_rows, &w2_cols)?;
    let m_full = cfg.w13_rows();
    let w13_bias = w.w13_bias.as_ref().map(|b| {
        experts
            .iter()
            .flat_map(|&x| w13_rows.iter().map(move |&r| b[x * m_full + r]))
            .collect::<Vec<f32>>()
    });
    // The GEMM2 bias is added once over the TP group: by rank 0.
    let h = cfg.hidden;
    let w2_bias = if par.tp_rank == 0 {
        w.w2_bias.as_ref().map(|b| {
            experts
                .iter()
                .flat_map(|&x| b[x * h..(x + 1) * h].iter().copied())
                .collect::<Vec<f32>>()
        })
    } else {
        None
    };

    let config = LayerConfig {
        intermediate: local_i,
        local_experts,
        parallelism: par,
        ..cfg.clone()
    };
    let weights = LayerWeights {
        w13,
        w2,
        w13_bias,
        w2_bias,
        w13_input_scale: w.w13_input_scale,
        w2_input_scale: w.w2_input_scale,
        router_bias: w.router_bias.clone(),
    };
    MoeLayer::new(config, weights)
}

/// Full-layer W13 row of every row of the rank's W13, keeping the layer's row order: the rank's
/// gate feature i sits where the order puts gate feature i of I/R, and holds full gate feature
/// `features.start + i`; likewise for up.
fn w13_row_map(cfg: &LayerConfig, features: &Range<usize>) -> Vec<usize> {
    let (full, local) = (cfg.intermediate, features.len());
    if !cfg.activation.is_gated() {
        return features.clone().collect();
    }
    let order = cfg.w13_order;
    let mut rows = vec![0; 2 * local];
    for i in 0..local {
        rows[order.gate_row(i, local)] = order.gate_row(features.start + i, full);
        rows[order.up_row(i, local)] = order.up_row(features.start + i, full);
    }
    rows
}

/// Copies experts `experts`, rows `rows` (new → old) and columns `cols` (new → old) of `t`,
/// with the scales that belong to them, into an owned tensor.
fn gather(
    t: &QuantizedTensor,
    name: &str,
    experts: &[usize],
    rows: &[usize],
    cols: &[usize],
) -> Result<QuantizedTensor> {
    let data = gather_elements(t, name, experts, rows, cols)?;
    let scales = match &t.scales {
        BlockScales::None => BlockScales::None,
        BlockScales::PerExpert(s) => {
            BlockScales::PerExpert(experts.iter().map(|&x| s[x]).collect())
        }
        BlockScales::Block128(s) => {
            let row_blocks = block_map(rows, FP8_BLOCK, name, "row")?;
            let col_blocks = block_map(cols, FP8_BLOCK, name, "column")?;
            let (old_rb, old_cb) = (t.rows.div_ceil(FP8_BLOCK), t.cols.div_ceil(FP8_BLOCK));
            let mut out = Vec::with_capacity(experts.len() * row_blocks.len() * col_blocks.len());
            for &x in experts {
                for &rb in &row_blocks {
                    out.extend(
                        col_blocks
                            .iter()
                            .map(|&cb| s[(x * old_rb + rb) * old_cb + cb]),
                    );
                }
            }
            BlockScales::Block128(out)
        }
        BlockScales::Ue8m0(s) => {
            BlockScales::Ue8m0(gather_row_scales(t, s, name, experts, rows, cols)?)
        }
        BlockScales::E4m3(s) => {
            BlockScales::E4m3(gather_row_scales(t, s, name, experts, rows, cols)?)
        }
    };
    let global_scales = if t.global_scales.is_empty() {
        Vec::new()
    } else {
        experts.iter().map(|&x| t.global_scales[x]).collect()
    };
    Ok(QuantizedTensor {
        format: t.format,
        experts: experts.len(),
        rows: rows.len(),
        cols: cols.len(),
        data: data.into(),
        scales,
        global_scales,
    })
}

/// Element bytes of the slice. Columns of the slices made by [`shard`] are contiguous, so each
/// row is one copied byte range (4-bit formats: two elements per byte, so the range must start
/// and end on even columns).
fn gather_elements(
    t: &QuantizedTensor,
    name: &str,
    experts: &[usize],
    rows: &[usize],
    cols: &[usize],
) -> Result<Vec<u8>> {
    let first = cols.first().copied().unwrap_or(0);
    if cols.iter().enumerate().any(|(i, &c)| c != first + i) {
        return Err(MoeError::invalid(
            format!("tensor `{name}`"),
            "shard columns must be one contiguous range",
        ));
    }
    let (start, len) = match t.format {
        WeightFormat::Bf16 => (first * 2, cols.len() * 2),
        WeightFormat::Mxfp4 | WeightFormat::Nvfp4 => {
            if !first.is_multiple_of(2) || !cols.len().is_multiple_of(2) {
                return Err(MoeError::invalid(
                    format!("tensor `{name}`"),
                    format!(
                        "the column slice {first}..{} splits a byte of packed 4-bit elements",
                        first + cols.len()
                    ),
                ));
            }
            (first / 2, cols.len() / 2)
        }
        _ => (first, cols.len()),
    };
    let row_bytes = t.row_data_bytes();
    let mut out = Vec::with_capacity(experts.len() * rows.len() * len);
    for &x in experts {
        let expert = t.expert_data(x);
        for &r in rows {
            out.extend_from_slice(&expert[r * row_bytes + start..r * row_bytes + start + len]);
        }
    }
    Ok(out)
}

/// Per-row block scales `[E, rows, cols/block]` (MX: UE8M0 per 32, NVFP4: E4M3 per 16) of the slice.
fn gather_row_scales(
    t: &QuantizedTensor,
    s: &[u8],
    name: &str,
    experts: &[usize],
    rows: &[usize],
    cols: &[usize],
) -> Result<Vec<u8>> {
    let block = t.format.k_block().unwrap_or(t.cols.max(1));
    let col_blocks = block_map(cols, block, name, "column")?;
    let old_nb = t.cols.div_ceil(block);
    let mut out = Vec::with_capacity(experts.len() * rows.len() * col_blocks.len());
    for &x in experts {
        for &r in rows {
            out.extend(
                col_blocks
                    .iter()
                    .map(|&cb| s[(x * t.rows + r) * old_nb + cb]),
            );
        }
    }
    Ok(out)
}

/// For a new → old index map along one axis, the old scale block of every new block of `block`
/// indices; an error when a new block would take elements from two old blocks (its one scale
/// could not dequantize both).
fn block_map(map: &[usize], block: usize, name: &str, axis: &str) -> Result<Vec<usize>> {
    map.chunks(block)
        .enumerate()
        .map(|(nb, chunk)| {
            let old = chunk[0] / block;
            match chunk.iter().find(|&&i| i / block != old) {
                None => Ok(old),
                Some(&other) => Err(MoeError::invalid(format!("tensor `{name}`"), format!(
                    "tensor-parallel slice is not aligned to the {block}-{axis} scale blocks: the shard's {axis}s {}..{} \
                     come from full-tensor {axis}s {} and {other}, which lie in different blocks ({old} and {}); \
                     the slice boundaries (multiples of I/R, and the gate/up halves) must fall on multiples of {block}",
                    nb * block, nb * block + chunk.len(), chunk[0], other / block))),
            }
        })
        .collect()
}
