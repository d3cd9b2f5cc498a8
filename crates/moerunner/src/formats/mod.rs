//! Number formats (`spec/formats.md`): bit-exact element codecs, weight and activation quantizers,
//! scale layouts. The scalar code here *is* the definition that faster paths are tested against.

pub mod act_quant;
pub mod bf16;
pub mod e2m1;
pub mod e4m3;
pub mod scale_layout;
pub mod ue8m0;
pub mod weight_quant;

pub use act_quant::{quantize_rows, quantize_rows_into, QuantizedRows};
pub use weight_quant::quantize_weights;
