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
pub mod warm_kernels;

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
        experts: None,
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
/// `--ep-mode` against `--comm` (`check` and `bench`): device all-to-all needs ranks that move device
/// memory, refused before any case runs otherwise.
fn check_ep_mode(
    mode: Option<moerunner::parallel::EpMode>,
    transport: Option<moerunner::parallel::Transport>,
) -> anyhow::Result<()> {
    use moerunner::parallel::{EpMode, Transport};
    if mode == Some(EpMode::DeviceAllToAll)
        && !matches!(transport, Some(Transport::Nccl | Transport::Device))
    {
        anyhow::bail!("--ep-mode device-all-to-all runs GPU ranks: use --comm nccl or device");
    }
    Ok(())
}

pub(crate) fn build_commit() -> Option<String> {
    Some(env!("MOERUNNER_COMMIT"))
        .filter(|c| !c.is_empty())
        .map(str::to_string)
}

/// Where this run's numbers come from (`moerunner::bench::Provenance`): the library's version and
/// date, this binary's commit and the command line.
pub(crate) fn provenance() -> moerunner::bench::Provenance {
    moerunner::bench::Provenance {
        commit: build_commit(),
        argv: std::env::args().collect(),
        ..moerunner::bench::Provenance::today()
    }
}

/// `gemm`'s and `quantize-bench`'s JSON object `fields` with `provenance()`'s keys first, as
/// `bench`'s report carries them.
pub(crate) fn with_provenance(fields: serde_json::Value) -> serde_json::Value {
    let mut m = match serde_json::to_value(provenance()) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    if let serde_json::Value::Object(fields) = fields {
        m.extend(fields);
    }
    serde_json::Value::Object(m)
}
