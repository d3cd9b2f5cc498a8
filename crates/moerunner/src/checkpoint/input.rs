//! The input of a layer loaded from a checkpoint (`moerunner run --checkpoint`): an input file as
//! `spec/layer-file.md` defines it, or hidden states alone, which the checkpoint's own router routes.

use std::path::Path;

use super::CheckpointLayer;
use crate::error::Result;
use crate::layer_file::{self, InputFile, MappedFile, Router, RoutingTensors};
use crate::tensor::DType;
use crate::weights::MoeLayer;

impl CheckpointLayer {
    /// Reads the input file at `path` for this layer. A file holding only `hidden_states` gets
    /// router logits (f32) from the checkpoint's router ([`CheckpointLayer::router_logits`]); any
    /// other is read and checked as [`layer_file::read_input`] does.
    pub fn read_input(&self, path: &Path) -> Result<InputFile> {
        read_input_routed_by(path, &self.layer, self.router().as_ref())
    }

    /// The layer's router as a layer file carries it (`convert` writes it beside the layer).
    pub fn router(&self) -> Option<Router> {
        self.router_weight.clone().map(|weight| Router {
            weight,
            linear_bias: self.router_bias.clone(),
        })
    }
}

/// The input file at `path` for `layer`: one holding only `hidden_states` is routed by `router`
/// (a checkpoint's, or one a layer file carries: `layer_file::read_layer_router`), refused naming
/// the missing routing input when there is none; any other is read and checked as
/// [`layer_file::read_input`] does.
pub fn read_input_routed_by(
    path: &Path,
    layer: &MoeLayer,
    router: Option<&Router>,
) -> Result<InputFile> {
    let file = MappedFile::open(path)?;
    if router.is_none() || !file.names().all(|n| n == "hidden_states") {
        return layer_file::read_input(path);
    }
    let hidden = file.require("hidden_states")?;
    hidden.expect_dtype("hidden_states", &[DType::BF16, DType::F16, DType::F32])?;
    let logits = super::router_logits(
        layer,
        router.map(|r| &r.weight),
        router.and_then(|r| r.linear_bias.as_deref()),
        &hidden,
    )?;
    Ok(InputFile {
        hidden,
        routing: RoutingTensors::Logits(logits),
    })
}
