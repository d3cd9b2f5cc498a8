//! Launcher of `quant.cu`: rows to GEMM operands (bf16, e4m3 with a static scale, or e4m3 with
//! dynamic 1×128 scales), padded with zeros to the GEMM's K.

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
        /// [rows, out_stride] bf16 or e4m3 (`mode`).
        out: Out<Void>,
        out_stride: i32,
        /// `codec::RowQuant::mode`.
        mode: i32,
        /// [1] the static scale (mode E4m3Static), else null.
        static_scale: In<f32>,
        /// [rows, out_stride / 128] dynamic scales (mode E4m3Block128).
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
