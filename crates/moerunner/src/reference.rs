//! The float64, quantization-aware reference of the forward pass (`spec/layer.md`): the oracle for
//! every test and backend. Written for clarity, not speed.

use crate::error::{MoeError, Result};
use crate::routing::Routes;
use crate::weights::MoeLayer;

/// The layer's output `[T, H]` in f64 for f32 hidden states `x` `[T, H]` and resolved routes.
pub fn forward(layer: &MoeLayer, x: &[f32], routes: &Routes) -> Result<Vec<f64>> {
    let _ = (layer, x, routes);
    Err(MoeError::Unsupported("reference not implemented yet".into()))
}
