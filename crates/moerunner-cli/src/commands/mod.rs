//! One module per subcommand, each with its clap `Args` and a `run` function. Subcommands never
//! call each other; what two of them share lives here (or in the library).

pub mod bench;
pub mod check;
pub mod compare;
pub mod convert;
pub mod gemm;
pub mod info;
pub mod make_input;
pub mod make_layer;
pub mod quantize_bench;
pub mod run;
pub mod tune;

use std::path::Path;

use anyhow::Context;
use moerunner::checkpoint::{load_layer, CheckpointLayer, LoadOptions};
use moerunner::{ActivationFormat, Parallelism, WeightFormat};

/// `convert` and `run --checkpoint`: the load options from the `--quantize` and activation format
/// flags.
fn load_options(
    par: Parallelism,
    quantize: Option<&str>,
    activation: Option<&str>,
) -> anyhow::Result<LoadOptions> {
    let quantize = quantize.map(|q| q.parse::<WeightFormat>()).transpose()?;
    let activation_format = activation
        .map(|a| a.parse::<ActivationFormat>())
        .transpose()?;
    Ok(LoadOptions {
        parallelism: par,
        quantize,
        activation_format,
        quantizer: None,
    })
}

/// `convert` and `run --checkpoint`: layer `layer` of the model folder `dir`.
fn load_checkpoint(
    dir: &Path,
    layer: usize,
    opts: &LoadOptions,
) -> anyhow::Result<CheckpointLayer> {
    load_layer(dir, layer, opts)
        .with_context(|| format!("loading layer {layer} of checkpoint {}", dir.display()))
}

/// The commit this binary was built from (build.rs; None outside a git checkout).
pub(crate) fn build_commit() -> Option<String> {
    Some(env!("MOERUNNER_COMMIT"))
        .filter(|c| !c.is_empty())
        .map(str::to_string)
}

/// `gemm`'s and `quantize-bench`'s JSON object `fields` with where the result came from: the same
/// four keys `bench`'s report carries (version, commit, date (UTC), the command line).
pub(crate) fn with_provenance(fields: serde_json::Value) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("moerunner_version".into(), env!("CARGO_PKG_VERSION").into());
    m.insert("commit".into(), build_commit().into());
    m.insert("date".into(), moerunner::clock::today_utc().into());
    m.insert("argv".into(), std::env::args().collect::<Vec<_>>().into());
    if let serde_json::Value::Object(fields) = fields {
        m.extend(fields);
    }
    serde_json::Value::Object(m)
}
