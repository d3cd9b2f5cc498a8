//! Launchers of `weight_quant.cu`: expert weights (bf16 or f32, in device memory) into a weight
//! format's canonical layout, bit for bit `formats::weight_quant::quantize_weights` (the host side
//! is `backend/cuda/online_quant.rs`).

use super::{kernel_args, In, Out, Shape, Void};
use crate::config::WeightFormat;

kernel_args! {
    /// Per-expert amax (as |x| bit patterns) for the expert-wide scales (fp8 per-tensor, nvfp4
    /// without given globals), and the first non-finite element.
    pub struct WeightAmax for WeightQuant::"weight_amax", pdl = false {
        /// [experts, per_expert] of `src_dtype` (`ElemCode`: bf16 or f32).
        src: In<Void>,
        src_dtype: i32,
        per_expert: i64,
        /// This launch's expert 0 in the whole tensor (for `bad`'s index only).
        first_expert: i32,
        /// [experts], zeroed before; atomicMax.
        amax_bits: Out<u32>,
        /// [1], set to u64::MAX before; atomicMin of the flat index of a non-finite element.
        bad: Out<u64>,
    }
}

kernel_args! {
    /// fp8 per-tensor (mode 0), mxfp8 (1), mxfp4 (2), nvfp4 (3): one thread per 16 elements.
    pub struct QuantizeWeightRows for WeightQuant::"quantize_weight_rows", pdl = false {
        /// [experts, per_expert] of `src_dtype`.
        src: In<Void>,
        src_dtype: i32,
        per_expert: i64,
        /// [`RowsMode::mode`].
        mode: i32,
        first_expert: i32,
        /// [experts] from `WeightAmax` (modes 0 and 3 without `given_globals`), else unread.
        amax_bits: In<u32>,
        /// nvfp4: [experts] the caller's globals, or null to compute them.
        given_globals: In<f32>,
        /// [experts, per_expert] e4m3 bytes, or [experts, per_expert / 2] packed e2m1.
        out: Out<u8>,
        /// [experts, per_expert / 32] UE8M0 or [experts, per_expert / 16] E4M3 bytes.
        block_scales: Out<u8>,
        /// [experts]: fp8's s or nvfp4's g per expert.
        expert_scales: Out<f32>,
        bad: Out<u64>,
    }
}

kernel_args! {
    /// fp8_block: one 256-thread block per 128 × 128 block of an expert.
    pub struct QuantizeWeightBlock128 for WeightQuant::"quantize_weight_block128", pdl = false {
        src: In<Void>,
        src_dtype: i32,
        rows: i32,
        cols: i32,
        first_expert: i32,
        /// [experts, rows, cols] e4m3 bytes.
        out: Out<u8>,
        /// [experts, ceil(rows / 128), ceil(cols / 128)] f32.
        scales: Out<f32>,
        bad: Out<u64>,
    }
}

/// Which kernel quantizes a format, and the `mode` of `quantize_weight_rows`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowsMode {
    Fp8Tensor = 0,
    Mxfp8 = 1,
    Mxfp4 = 2,
    Nvfp4 = 3,
}

impl RowsMode {
    /// None for bf16 (a copy) and fp8_block (its own kernel).
    pub fn of(format: WeightFormat) -> Option<RowsMode> {
        match format {
            WeightFormat::Fp8 => Some(RowsMode::Fp8Tensor),
            WeightFormat::Mxfp8 => Some(RowsMode::Mxfp8),
            WeightFormat::Mxfp4 => Some(RowsMode::Mxfp4),
            WeightFormat::Nvfp4 => Some(RowsMode::Nvfp4),
            WeightFormat::Bf16 | WeightFormat::Fp8Block => None,
        }
    }
    pub fn mode(self) -> i32 {
        self as i32
    }
}

/// The most experts one launch covers (the grid's y / z dimension).
pub const MAX_EXPERTS_PER_LAUNCH: usize = 65535;

/// `weight_amax` and `quantize_weight_rows`: `experts` rows of the grid, each with enough 256-thread
/// blocks striding over the expert's 16-element items for about 32 blocks per SM in all.
pub fn rows_shape(experts: usize, per_expert: usize, sms: u32) -> Shape {
    let items = per_expert.div_ceil(16);
    let per_expert_cap = (32 * sms as usize).div_ceil(experts.max(1)).max(1);
    Shape {
        grid: (
            items.div_ceil(256).clamp(1, per_expert_cap) as u32,
            experts as u32,
            1,
        ),
        block: 256,
        smem: 0,
        pdl: false,
    }
}

/// `quantize_weight_block128`: one block per 128 × 128 block.
pub fn block128_shape(experts: usize, rows: usize, cols: usize) -> Shape {
    Shape {
        grid: (
            cols.div_ceil(128) as u32,
            rows.div_ceil(128) as u32,
            experts as u32,
        ),
        block: 256,
        smem: 0,
        pdl: false,
    }
}
