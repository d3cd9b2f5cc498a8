//! The float64 reference as a backend (`--backend reference` / `--reference`): slow, exact, never
//! chosen automatically.

use std::sync::Arc;

use super::{Backend, BackendInfo, LoadedLayer};
use crate::config::LayerConfig;
use crate::error::Result;
use crate::forward::{self, ForwardInput, ForwardOutput};
use crate::weights::MoeLayer;

pub struct ReferenceBackend;

impl Backend for ReferenceBackend {
    fn name(&self) -> &'static str {
        "reference"
    }
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: self.name(),
            devices: vec!["host (float64, single thread)".into()],
            supports: vec!["every format, routing method and activation of the spec".into()],
        }
    }
    fn supports(&self, _config: &LayerConfig) -> std::result::Result<(), String> {
        Ok(())
    }
    fn auto_eligible(&self) -> bool {
        false
    }
    fn load(&self, layer: Arc<MoeLayer>) -> Result<Box<dyn LoadedLayer>> {
        Ok(Box::new(LoadedReference { layer }))
    }
}

struct LoadedReference {
    layer: Arc<MoeLayer>,
}

impl LoadedLayer for LoadedReference {
    fn backend(&self) -> &'static str {
        "reference"
    }
    fn layer(&self) -> &MoeLayer {
        &self.layer
    }
    fn forward(&self, input: &ForwardInput<'_>) -> Result<ForwardOutput> {
        let (x, routes) = forward::resolve_input(&self.layer, input)?;
        let h = self.layer.config().hidden;
        let out64 = crate::reference::forward(&self.layer, &x, &routes)?;
        let out32: Vec<f32> = out64.iter().map(|&v| v as f32).collect();
        let output = forward::output_like(input.hidden, &out32, routes.tokens, h);
        Ok(ForwardOutput { output, routes })
    }
}
