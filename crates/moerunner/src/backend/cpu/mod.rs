//! The fast CPU backend: multithreaded, deterministic, tokens grouped by expert so each expert's
//! weights are decoded once per call in cache-sized blocks.

use std::sync::Arc;

use super::{Backend, BackendInfo, LoadedLayer};
use crate::config::LayerConfig;
use crate::error::{MoeError, Result};
use crate::weights::MoeLayer;

pub struct CpuBackend;

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: self.name(),
            devices: vec![format!("{} CPU threads", rayon::current_num_threads())],
            supports: vec!["every format, routing method and activation of the spec".into()],
        }
    }
    fn supports(&self, _config: &LayerConfig) -> std::result::Result<(), String> {
        Ok(())
    }
    fn load(&self, layer: Arc<MoeLayer>) -> Result<Box<dyn LoadedLayer>> {
        let _ = layer;
        Err(MoeError::Unsupported("cpu backend not implemented yet".into()))
    }
}
