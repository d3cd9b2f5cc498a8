//! The input of a layer loaded from a checkpoint (`moerunner run --checkpoint`): an input file as
//! `spec/layer-file.md` defines it, or hidden states alone, which the checkpoint's own router routes.

use std::path::Path;

use super::CheckpointLayer;
use crate::error::Result;
use crate::layer_file::{self, InputFile, MappedFile, RoutingTensors};
use crate::tensor::DType;

impl CheckpointLayer {
    /// Reads the input file at `path` for this layer. A file holding only `hidden_states` gets
    /// router logits (f32) from the checkpoint's router ([`CheckpointLayer::router_logits`]); any
    /// other is read and checked as [`layer_file::read_input`] does.
    pub fn read_input(&self, path: &Path) -> Result<InputFile> {
        let file = MappedFile::open(path)?;
        if !file.names().all(|n| n == "hidden_states") {
            return layer_file::read_input(path);
        }
        let hidden = file.require("hidden_states")?;
        hidden.expect_dtype("hidden_states", &[DType::BF16, DType::F16, DType::F32])?;
        let logits = self.router_logits(&hidden)?;
        Ok(InputFile {
            hidden,
            routing: RoutingTensors::Logits(logits),
        })
    }
}
