//! Launcher of `quant.cu`: rows to GEMM operands (bf16; e4m3 with a static scale or dynamic 1×128
//! scales; mxfp8 and nvfp4 as the bf16 of their exact values, nvfp4's globals per row), padded with
//! zeros to the GEMM's K.

use super::{grid_cap, kernel_args, In, Out, Shape, Void};

kernel_args! {
    /// Quantizes `rows` rows of `cols` columns into rows of `out_stride` elements.
    pub struct QuantizeRows for Quant::"quantize_rows", pdl = true {
        /// [rows, in_stride] of `x_dtype` (`ElemCode`).
        x: In<Void>,
        x_dtype: i32,
        rows: i32,
        cols: i32,
        in_stride: i64,
        /// [rows, out_stride] bf16 or e4m3 (`RowQuant::element_bytes`).
        out: Out<Void>,
        out_stride: i32,
        /// `codec::RowQuant::mode`.
        mode: i32,
        /// [1] the static scale (`RowQuant::reads_static_scale`), else null.
        static_scale: In<f32>,
        /// Per-row scales (`RowQuant::scales_per_row`): [rows, out_stride / 128] (E4m3Block128) or
        /// each row's nvfp4 global [rows].
        out_scales: Out<f32>,
    }
}

/// One thread per 16 output columns.
pub fn shape(rows: usize, cols_padded: usize, sms: u32) -> Shape {
    Shape {
        grid: (grid_cap(rows * cols_padded / 16, 256, sms), 1, 1),
        block: 256,
        smem: 0,
        pdl: true,
    }
}
