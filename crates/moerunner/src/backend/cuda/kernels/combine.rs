//! Launcher of `combine.cu`: each token's k GEMM2 rows in slot order times their routing weights,
//! summed in f32 and stored in the hidden states' dtype (deterministic, no atomics).

use super::{grid_cap, kernel_args, In, Out, Shape, Void};

kernel_args! {
    pub struct CombineRows for Combine::"combine_rows", pdl = true {
        /// [pairs, z_stride] GEMM2 rows of `z_dtype` (`ElemCode`: f32 or bf16).
        z: In<Void>,
        z_dtype: i32,
        z_stride: i32,
        /// [T, K] row of each (token, slot) pair in `z`.
        pair_pos: In<i32>,
        /// [T, K] routing weights, or null when they were applied on GEMM1's input (Llama-4).
        topk_w: In<f32>,
        T: i32,
        K: i32,
        H: i32,
        /// [T, H] of `out_dtype`.
        out: Out<Void>,
        out_dtype: i32,
    }
}

/// One thread per (token, 4 columns); blocks of 128 while that gives at most one block per SM
/// (small T: spread over more SMs), else 256.
pub fn shape(tokens: usize, h: usize, sms: u32) -> Shape {
    let items = tokens * h.div_ceil(4);
    let block = if items <= 128 * sms as usize {
        128
    } else {
        256
    };
    Shape {
        grid: (grid_cap(items, block, sms), 1, 1),
        block: block as u32,
        smem: 0,
        pdl: true,
    }
}
