//! Expert- and tensor-parallel slicing of a whole layer into one rank's layer (`spec/layer.md`).

use crate::config::Parallelism;
use crate::error::{MoeError, Result};
use crate::weights::MoeLayer;

/// The part of `layer` (which must hold all experts and the full I) that rank `par` computes.
pub fn shard(layer: &MoeLayer, par: Parallelism) -> Result<MoeLayer> {
    let _ = (layer, par);
    Err(MoeError::Unsupported("sharding not implemented yet".into()))
}
