//! `moerunner make-layer`: a random layer file for a preset or an explicit shape, in any format,
//! deterministic from `--seed`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use moerunner::config::ActivationKind;
use moerunner::presets::preset;
use moerunner::{
    Activation, ActivationFormat, LayerConfig, Parallelism, RoutingConfig, RoutingMethod, W13Order,
    WeightFormat,
};

#[derive(clap::Args)]
pub struct Args {
    /// Where to write the layer file.
    #[arg(long)]
    pub out: PathBuf,
    /// A model preset (spec/models.md): qwen3-30b-a3b, deepseek-v3, gpt-oss-120b, mixtral-8x7b, …
    #[arg(long)]
    pub preset: Option<String>,
    /// E (explicit shapes: give --experts, --hidden, --intermediate and --top-k, not --preset).
    #[arg(long, conflicts_with = "preset")]
    pub experts: Option<usize>,
    /// H.
    #[arg(long, conflicts_with = "preset")]
    pub hidden: Option<usize>,
    /// I.
    #[arg(long, conflicts_with = "preset")]
    pub intermediate: Option<usize>,
    /// k.
    #[arg(long, conflicts_with = "preset")]
    pub top_k: Option<usize>,
    /// swiglu, geglu, swiglu_oai, relu2 (explicit shapes; default swiglu).
    #[arg(long, conflicts_with = "preset")]
    pub activation: Option<ActivationKind>,
    /// Routing method (explicit shapes; default renormalize).
    #[arg(long, conflicts_with = "preset")]
    pub routing: Option<RoutingMethod>,
    /// deepseek_v3: number of expert groups.
    #[arg(long)]
    pub n_group: Option<usize>,
    /// deepseek_v3: groups kept per token.
    #[arg(long)]
    pub topk_group: Option<usize>,
    /// deepseek_v3, minimax2: multiplies the routing weights.
    #[arg(long, allow_negative_numbers = true)]
    pub routed_scaling_factor: Option<f32>,
    /// Default: the preset's shipped format, else bf16.
    #[arg(long)]
    pub weight_format: Option<WeightFormat>,
    /// Default: the weight format's natural pairing.
    #[arg(long)]
    pub activation_format: Option<ActivationFormat>,
    /// gate_up, up_gate or interleaved (default: the preset's, else gate_up).
    #[arg(long)]
    pub w13_order: Option<W13Order>,
    /// Add random W13/W2 biases (presets that ship them always have them).
    #[arg(long)]
    pub biases: bool,
    /// The same seed and arguments give the same file, bit for bit.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// The layer config the arguments describe.
pub fn config_from(args: &Args) -> anyhow::Result<(LayerConfig, bool)> {
    let mut biases = args.biases;
    let mut config = match &args.preset {
        Some(name) => {
            let p = preset(name)?;
            biases |= p.biases;
            p.config(
                args.weight_format.unwrap_or(p.shipped),
                args.activation_format,
            )
        }
        None => {
            let (Some(e), Some(h), Some(i), Some(k)) =
                (args.experts, args.hidden, args.intermediate, args.top_k)
            else {
                bail!(
                    "give --preset NAME, or all of --experts, --hidden, --intermediate and --top-k"
                );
            };
            let activation = match args.activation.unwrap_or(ActivationKind::Swiglu) {
                ActivationKind::Swiglu => Activation::Swiglu,
                ActivationKind::Geglu => Activation::Geglu,
                ActivationKind::SwigluOai => Activation::OAI_DEFAULT,
                ActivationKind::Relu2 => Activation::Relu2,
            };
            let wf = args.weight_format.unwrap_or(WeightFormat::Bf16);
            LayerConfig {
                num_experts: e,
                hidden: h,
                intermediate: i,
                weight_format: wf,
                activation_format: args
                    .activation_format
                    .unwrap_or(wf.default_activation_format()),
                activation,
                w13_order: W13Order::GateUp,
                routing: RoutingConfig::new(args.routing.unwrap_or(RoutingMethod::Renormalize), k),
                local_experts: 0..e,
                parallelism: Parallelism::default(),
            }
        }
    };
    if let Some(o) = args.w13_order {
        config.w13_order = o;
    }
    if let Some(g) = args.n_group {
        config.routing.n_group = g;
    }
    if let Some(g) = args.topk_group {
        config.routing.topk_group = g;
    }
    if let Some(r) = args.routed_scaling_factor {
        config.routing.routed_scaling_factor = r;
    }
    config.validate()?;
    Ok((config, biases))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (config, biases) = config_from(&args)?;
    moerunner::layer_file::check_output_path(&args.out, "--out", &[])?;
    let asked_by = match &args.preset {
        Some(p) => format!("--preset {p}"),
        None => format!(
            "--experts {} --hidden {} --intermediate {}",
            config.num_experts, config.hidden, config.intermediate
        ),
    };
    moerunner::size::check(
        moerunner::synth::layer_bytes(&config, biases),
        &format!("make-layer's random layer ({config})"),
        &asked_by,
    )?;
    // One step per expert and projection (W13, then W2), so a large preset shows how far it is.
    let bar = ProgressBar::new(2 * config.num_local_experts() as u64).with_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} expert projections, {elapsed} elapsed, eta {eta} {msg}",
        )?,
    );
    bar.set_message(format!("generating {config}"));
    let layer =
        moerunner::synth::random_layer_with_progress(&config, args.seed, biases, &|| bar.inc(1))?;
    bar.set_message(format!("writing {}", args.out.display()));
    moerunner::layer_file::write_layer(&args.out, &layer)
        .with_context(|| format!("writing {}", args.out.display()))?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {} ({config}, seed {})",
        args.out.display(),
        args.seed
    );
    Ok(())
}
