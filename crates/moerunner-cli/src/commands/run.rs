//! `moerunner run`: one layer file × one input file → one output file (`spec/layer-file.md`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use moerunner::layer_file;
use moerunner::{BackendChoice, ForwardInput, Parallelism, Runner};

#[derive(clap::Args)]
pub struct Args {
    /// The layer file (`.safetensors`, spec/layer-file.md). (Deprecated: with `--checkpoint`, the
    /// layer index; use `--layer-index`.)
    #[arg(long, required_unless_present = "layer_index")]
    pub layer: Option<String>,
    /// With `--checkpoint`: the index of the layer to run (0-based, as in `model.layers.{N}`).
    #[arg(long, requires = "checkpoint", conflicts_with = "layer")]
    pub layer_index: Option<usize>,
    /// A Hugging Face model folder (config.json, shards, index) to load layer `--layer-index` from;
    /// the input may then carry only `hidden_states` (logits come from the checkpoint's router).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// With `--checkpoint`: quantize the experts into this format at load (e.g. mxfp8, nvfp4). On
    /// the GPU when the backend is cuda or auto and a GPU is usable (bit-identical to the CPU pass,
    /// which runs otherwise); a line on stderr says which.
    #[arg(long)]
    pub quantize: Option<String>,
    /// The activation format to run with (as `convert` has it): with `--checkpoint` instead of
    /// the weight format's natural one; on a layer file instead of the file's own (static formats
    /// need the file's input scales).
    #[arg(long)]
    pub activation_format: Option<String>,
    /// The input file: `hidden_states` and one routing source.
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the output file (atomically).
    #[arg(long)]
    pub output: PathBuf,
    /// cpu, cuda, reference, or auto (the best available).
    #[arg(long, default_value = "auto")]
    pub backend: BackendChoice,
    /// Use the float64 quantization-aware reference (same as `--backend reference`).
    #[arg(long, conflicts_with = "backend")]
    pub reference: bool,
    /// Expert-parallel group size; the output is this rank's partial sum.
    #[arg(long, default_value_t = 1)]
    pub ep_size: usize,
    #[arg(long, default_value_t = 0)]
    pub ep_rank: usize,
    /// Tensor-parallel group size; the output is this rank's partial sum.
    #[arg(long, default_value_t = 1)]
    pub tp_size: usize,
    #[arg(long, default_value_t = 0)]
    pub tp_rank: usize,
    /// Also write the chosen `topk_ids` and `topk_weights`.
    #[arg(long)]
    pub save_routing: bool,
    /// Run the whole layer split over this many expert-parallel ranks (CPU threads of this
    /// process, docs/parallel.md); the output is the whole layer's.
    #[arg(long, conflicts_with_all = ["ep_size", "ep_rank", "tp_size", "tp_rank"])]
    pub ep: Option<usize>,
    /// Run the whole layer split over this many tensor-parallel ranks (with `--ep`: per EP rank).
    #[arg(long, conflicts_with_all = ["ep_size", "ep_rank", "tp_size", "tp_rank"])]
    pub tp: Option<usize>,
    /// With `--ep`: all-to-all (dispatch each token to its experts' ranks; bitwise the unsplit
    /// CPU result), gather-scatter (the only mode with `--tp`) or device-all-to-all (dispatch and
    /// combine on the GPU: `--backend cuda` over `--comm device` or `nccl`).
    #[arg(long)]
    pub ep_mode: Option<moerunner::parallel::EpMode>,
    /// With `--ep`: which ranks hold each expert, one entry per expert, comma-separated; `+`
    /// joins replicas (`0,0,1,1+0`). Default: an even split.
    #[arg(long, requires = "ep")]
    pub expert_map: Option<String>,
    /// With `--ep`/`--tp`: how long a rank waits for its peers in one collective before every
    /// rank stops with an error.
    #[arg(long, default_value_t = 600.0)]
    pub comm_timeout_s: f64,
    /// With `--ep`/`--tp`: how ranks talk — `thread` (ranks as threads of this process, through
    /// host memory: CPU ranks, or with `--backend cuda` several ranks sharing one GPU), `nccl`
    /// (rank r on GPU r through NCCL; as many GPUs as ranks, the CUDA backend) or `device` (every
    /// rank on GPU 0, through device-to-device copies; the CUDA backend) or `process` (one process
    /// per rank, this one rank 0 starting the others, talking over loopback TCP; a launcher may
    /// start every rank itself with MOERUNNER_RANK, MOERUNNER_WORLD_SIZE and MOERUNNER_RENDEZVOUS
    /// set), or `nccl-process` (the same processes, rank r on GPU r, talking through NCCL). With
    /// `--checkpoint` each rank loads its own slice where its transport puts it.
    #[arg(long, default_value = "thread", value_parser = ["thread", "nccl", "device", "process", "nccl-process"])]
    pub comm: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let choice = if args.reference {
        BackendChoice::Named("reference".into())
    } else {
        args.backend.clone()
    };
    let par = Parallelism {
        ep_size: args.ep_size,
        ep_rank: args.ep_rank,
        tp_size: args.tp_size,
        tp_rank: args.tp_rank,
    };
    // Refused before any work: a rank out of range (also for a single layer file, which is not
    // sliced), and an output that would replace an input being read.
    par.validate()
        .context("--ep-size/--ep-rank/--tp-size/--tp-rank")?;
    check_output_is_no_input(&args)?;
    let load_started = Instant::now();
    let split = args.ep.is_some() || args.tp.is_some();
    let (layer, input) = load_layer_and_input(&args, par, split)?;
    // Input errors (wrong H, E or k) surface before the backend spends time preparing weights.
    let layer_name = match (&args.layer, args.layer_index) {
        (Some(layer), _) => layer.clone(),
        (None, index) => index.map(|i| i.to_string()).unwrap_or_default(),
    };
    input.validate_against(layer.config()).with_context(|| {
        format!(
            "input {} does not fit layer {layer_name}",
            args.input.display(),
        )
    })?;
    moerunner::size::check(
        moerunner::forward::forward_bytes(layer.config(), input.tokens()),
        &format!("a forward pass of {} tokens", input.tokens()),
        &format!("--input {} (T = {})", args.input.display(), input.tokens()),
    )?;
    let bar = spinner(format!("loading {}", layer.config()))?;
    let backend_flag = match &choice {
        BackendChoice::Auto => "--backend auto".to_string(),
        BackendChoice::Named(n) => format!("--backend {n}"),
    };
    if split {
        bar.finish_and_clear();
        return run_split(&args, layer, &input, choice);
    }
    let loaded = Runner::new().load(layer, &choice).context(backend_flag)?;
    if let Some(note) = loaded.preparation() {
        bar.println(format!("note: {note}"));
    }
    // Reading (and slicing, quantizing) the layer and the input, and the backend's preparation.
    let load_time = load_started.elapsed();
    bar.set_message(format!(
        "running {} tokens on `{}`",
        input.tokens(),
        loaded.backend()
    ));
    let started = Instant::now();
    let out = loaded.forward(&ForwardInput {
        hidden: &input.hidden,
        routing: input.routing_input(),
    });
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let out = out?;
    layer_file::write_output(
        &args.output,
        &out.output,
        args.save_routing.then_some(&out.routes),
    )
    .with_context(|| format!("writing output {}", args.output.display()))?;
    let partial = if par.is_single() {
        String::new()
    } else {
        format!(
            " (partial sum of ep {}/{} tp {}/{})",
            par.ep_rank, par.ep_size, par.tp_rank, par.tp_size
        )
    };
    println!(
        "backend {} | T = {} | load {:.1} ms | run {:.3} ms | {} | {}{partial}",
        loaded.backend(),
        out.routes.tokens,
        load_time.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e3,
        loaded.layer().config(),
        args.output.display(),
    );
    Ok(())
}

/// Refused before any work: an output that would replace a file the command reads (the input, the
/// layer file, or the checkpoint's config, index and shards).
fn check_output_is_no_input(args: &Args) -> anyhow::Result<()> {
    let mut inputs: Vec<(PathBuf, &str)> = vec![(args.input.clone(), "--input")];
    match &args.checkpoint {
        Some(dir) => inputs.extend(
            moerunner::checkpoint::input_files(dir)
                .with_context(|| format!("reading checkpoint {}", dir.display()))?
                .into_iter()
                .map(|p| (p, "the checkpoint's")),
        ),
        None => inputs.push((
            PathBuf::from(args.layer.as_deref().unwrap_or_default()),
            "--layer",
        )),
    }
    let inputs: Vec<(&std::path::Path, &str)> =
        inputs.iter().map(|(p, f)| (p.as_path(), *f)).collect();
    layer_file::check_output_path(&args.output, "--output", &inputs)?;
    Ok(())
}

/// The layer (this rank's slice of it; with `split`, rank 0's) and the input, from a layer file or
/// a checkpoint, with `--quantize` / `--activation-format` applied.
fn load_layer_and_input(
    args: &Args,
    par: Parallelism,
    split: bool,
) -> anyhow::Result<(moerunner::MoeLayer, layer_file::InputFile)> {
    Ok(match &args.checkpoint {
        Some(dir) => {
            let index = checkpoint_layer_index(args)?;
            // Split over ranks, every rank reads only its slice: here rank 0's (which also
            // routes a hidden-only input), the others on their threads (`run_split`).
            let par = if split {
                rank_parallelism(args, first_rank(args))
            } else {
                par
            };
            let mut opts = super::load_options(
                par,
                args.quantize.as_deref(),
                args.activation_format.as_deref(),
            )?;
            if split {
                opts.experts = checkpoint_experts(args, dir, index, first_rank(args))?;
            }
            if let Some(format) = opts.quantize {
                opts.quantizer = quantizer_for(args, split, format);
            }
            let loaded = super::load_checkpoint(dir, index, &opts)?;
            let input = loaded
                .read_input(&args.input)
                .with_context(|| format!("reading input {}", args.input.display()))?;
            (loaded.layer, input)
        }
        None => {
            if args.quantize.is_some() {
                anyhow::bail!(
                    "--quantize needs --checkpoint (a layer file is run in its own format)"
                );
            }
            let path = PathBuf::from(args.layer.as_deref().unwrap_or_default());
            // An input of hidden states alone is routed by the router the file carries (`convert`
            // writes a checkpoint's beside its layer).
            let (mut layer, router) = layer_file::read_layer_with_router(&path)
                .with_context(|| format!("reading layer {}", path.display()))?;
            let input =
                moerunner::checkpoint::read_input_routed_by(&args.input, &layer, router.as_ref())
                    .with_context(|| format!("reading input {}", args.input.display()))?;
            if let Some(a) = &args.activation_format {
                let mut config = layer.config().clone();
                config.activation_format = a.parse().context("--activation-format")?;
                layer = moerunner::MoeLayer::new(config, layer.weights().clone())
                    .with_context(|| format!("--activation-format {a} on {}", path.display()))?;
            }
            if !par.is_single() {
                layer = moerunner::shard::shard(&layer, par)
                    .context("slicing the layer for this rank")?;
            }
            (layer, input)
        }
    })
}

/// Who quantizes for `--quantize`: the GPU (`backend::cuda::online_quant`, bit-identical to the
/// CPU pass) when the run's backend is cuda or auto, the GPU is usable and the format is a quantized
/// one; else None, the CPU pass. Says which on stderr, and why not the GPU.
fn quantizer_for(
    args: &Args,
    split: bool,
    format: moerunner::WeightFormat,
) -> Option<std::sync::Arc<dyn moerunner::checkpoint::ExpertQuantizer>> {
    let backend = if args.reference {
        "reference"
    } else {
        match &args.backend {
            BackendChoice::Auto => "auto",
            BackendChoice::Named(n) => n.as_str(),
        }
    };
    let why_not = if split {
        "--ep/--tp ranks quantize their own slices on the CPU".to_string()
    } else if backend != "cuda" && backend != "auto" {
        format!("--backend {backend}")
    } else {
        match gpu_quantizer(format) {
            Ok(q) => {
                eprintln!("--quantize {format}: quantizing on the GPU ({q:?})");
                return Some(q);
            }
            Err(reason) => reason,
        }
    };
    eprintln!("--quantize {format}: quantizing on the CPU ({why_not})");
    None
}

#[cfg(feature = "cuda")]
fn gpu_quantizer(
    format: moerunner::WeightFormat,
) -> Result<std::sync::Arc<dyn moerunner::checkpoint::ExpertQuantizer>, String> {
    use moerunner::backend::cuda::online_quant::WeightQuantizer;
    if !WeightQuantizer::supports_format(format) {
        return Err(format!("the GPU quantizer does not produce {format}"));
    }
    let backend =
        moerunner::backend::cuda::create_concrete().map_err(|e| format!("no usable GPU: {e}"))?;
    let q = WeightQuantizer::new(backend.device().clone())
        .map_err(|e| format!("the GPU quantizer did not start: {e}"))?;
    Ok(std::sync::Arc::new(q))
}

#[cfg(not(feature = "cuda"))]
fn gpu_quantizer(
    _: moerunner::WeightFormat,
) -> Result<std::sync::Arc<dyn moerunner::checkpoint::ExpertQuantizer>, String> {
    Err("this build has no CUDA backend".into())
}

/// `run --ep R` / `--tp R`: the whole layer split over ranks as threads of this process.
fn run_split(
    args: &Args,
    layer: moerunner::MoeLayer,
    input: &layer_file::InputFile,
    choice: BackendChoice,
) -> anyhow::Result<()> {
    use moerunner::parallel::{self, EpMode, ExpertMap, Layout, Transport};
    let (ep, tp) = (args.ep.unwrap_or(1), args.tp.unwrap_or(1));
    // Ranks are threads of this process talking through host memory (`--comm thread`: on the CPU,
    // or with `--backend cuda` all on one GPU), one per GPU talking through NCCL (`--comm nccl`),
    // or all on GPU 0 talking through device copies (`--comm device`).
    let transport: Transport = args.comm.parse()?;
    let on_gpus = matches!(
        transport,
        Transport::Nccl | Transport::Device | Transport::NcclProcesses
    );
    let choice = match choice {
        BackendChoice::Auto if on_gpus => BackendChoice::Named("cuda".into()),
        BackendChoice::Auto => BackendChoice::Named("cpu".into()),
        BackendChoice::Named(n) if n != "cuda" && on_gpus => {
            anyhow::bail!("--comm {transport} runs GPU ranks: use --backend cuda (or auto)")
        }
        named => named,
    };
    let most = transport
        .max_ranks()
        .with_context(|| format!("--comm {transport}"))?;
    if ep * tp > most {
        anyhow::bail!(
            "--comm {transport} puts one rank on each GPU: ep {ep} × tp {tp} ranks need {} GPUs, \
             this machine has {most} (--comm device puts every rank on one GPU)",
            ep * tp
        );
    }
    let config = layer.config().clone();
    let e = config.num_experts;
    let map = match &args.expert_map {
        Some(spec) => ExpertMap::parse(spec, e, ep).context("--expert-map")?,
        None => ExpertMap::even(e, ep).context("--ep")?,
    };
    let mode = args.ep_mode.unwrap_or(if tp > 1 {
        EpMode::GatherScatter
    } else {
        EpMode::AllToAll
    });
    let layout = Layout::new(map, tp, mode).context("--ep/--tp/--ep-mode")?;
    if !args.comm_timeout_s.is_finite() || args.comm_timeout_s <= 0.0 {
        anyhow::bail!("--comm-timeout-s must be a positive number of seconds");
    }
    let timeout = std::time::Duration::from_secs_f64(args.comm_timeout_s);
    let forward_input = ForwardInput {
        hidden: &input.hidden,
        routing: input.routing_input(),
    };
    // `layer`: with a checkpoint, this rank's first slice (rank 0's, or with process ranks this
    // process's); every other rank reads its own and loads it where its transport puts it
    // (`runner`: with NCCL its own GPU's).
    let first = std::sync::Mutex::new(Some(layer));
    let first_rank = first_rank(args);
    let index = match &args.checkpoint {
        Some(_) => Some(checkpoint_layer_index(args)?),
        None => None,
    };
    let load = |rank: usize, runner: &moerunner::Runner| match &args.checkpoint {
        None => {
            // (a process rank slices the whole layer file it read; thread ranks get it whole below)
            let guard = first.lock().map_err(|_| {
                moerunner::MoeError::invalid(
                    "--layer",
                    "internal: a rank panicked holding the layer",
                )
            })?;
            let whole = guard.as_ref().ok_or_else(|| {
                moerunner::MoeError::invalid("--layer", "internal: the layer was already handed on")
            })?;
            parallel::RankLayer::load(whole, &layout, rank, runner, &choice)
        }
        Some(dir) => {
            let taken = if rank == first_rank {
                first.lock().ok().and_then(|mut f| f.take())
            } else {
                None
            };
            let slice = match taken {
                Some(slice) => slice,
                None => {
                    let mut opts = super::load_options(
                        rank_parallelism(args, rank),
                        args.quantize.as_deref(),
                        args.activation_format.as_deref(),
                    )
                    .map_err(|e| {
                        moerunner::MoeError::invalid(
                            "--quantize/--activation-format",
                            e.to_string(),
                        )
                    })?;
                    // (an expert map's rank reads its list; the even split its range)
                    opts.experts = args
                        .expert_map
                        .as_ref()
                        .map(|_| layout.ep.experts_of(layout.coords(rank).0).to_vec());
                    moerunner::checkpoint::load_layer(dir, index.unwrap_or_default(), &opts)?.layer
                }
            };
            // An expert map's slices are renumbered 0..n; an even split keeps global ids.
            let renumbered = args.expert_map.is_some();
            parallel::RankLayer::new(slice, renumbered, &layout, rank, runner, &choice)
        }
    };
    let started = Instant::now();
    let out = if matches!(transport, Transport::Processes | Transport::NcclProcesses) {
        let nccl = transport == Transport::NcclProcesses;
        let (out, role) =
            crate::process_ranks::run(layout.ranks(), nccl, &forward_input, timeout, &load)
                .with_context(|| format!("ep {ep} × tp {tp} {transport} ranks"))?;
        if let crate::process_ranks::Role::Other = role {
            return Ok(());
        }
        out
    } else {
        let bar = spinner(format!(
            "running {} tokens on {} ranks (ep {ep} × tp {tp}, {mode:?})",
            input.tokens(),
            layout.ranks()
        ))?;
        let out = match &args.checkpoint {
            None => {
                let whole = first.lock().ok().and_then(|mut f| f.take());
                let whole = whole.context("the layer")?;
                parallel::forward_split(
                    &whole,
                    &layout,
                    (&choice, transport),
                    &forward_input,
                    timeout,
                )
            }
            Some(_) => {
                parallel::forward_split_with(&layout, transport, &forward_input, timeout, load)
            }
        };
        bar.finish_and_clear();
        out.with_context(|| format!("ep {ep} × tp {tp} ranks"))?
    };
    finish_split(
        args,
        &out,
        (&choice, transport),
        (ep, tp, mode),
        started.elapsed(),
        &config,
    )
}

/// Writes a split run's output and prints its summary line.
fn finish_split(
    args: &Args,
    out: &moerunner::ForwardOutput,
    (choice, transport): (&BackendChoice, moerunner::parallel::Transport),
    (ep, tp, mode): (usize, usize, moerunner::parallel::EpMode),
    elapsed: std::time::Duration,
    config: &moerunner::LayerConfig,
) -> anyhow::Result<()> {
    layer_file::write_output(
        &args.output,
        &out.output,
        args.save_routing.then_some(&out.routes),
    )
    .with_context(|| format!("writing output {}", args.output.display()))?;
    let backend = match choice {
        BackendChoice::Named(n) => n.as_str(),
        BackendChoice::Auto => "auto",
    };
    println!(
        "backend {backend} × {} ranks through {transport} (ep {ep} × tp {tp}, {mode:?}) | T = {} | {:.3} ms | {} | {}",
        ep * tp,
        out.routes.tokens,
        elapsed.as_secs_f64() * 1e3,
        config,
        args.output.display(),
    );
    Ok(())
}

/// The rank whose checkpoint slice this process reads first: with `--comm process` its own
/// (`MOERUNNER_RANK`, 0 for the process that starts the others), else rank 0's (which also
/// routes a hidden-only input).
fn first_rank(args: &Args) -> usize {
    if args.comm != "process" && args.comm != "nccl-process" {
        return 0;
    }
    moerunner::parallel::RankEnv::from_env()
        .ok()
        .flatten()
        .map_or(0, |env| env.rank)
}

/// With `--expert-map`, the experts rank `rank` of a split checkpoint run reads (the map parsed
/// against the checkpoint's E); None: its even slice.
fn checkpoint_experts(
    args: &Args,
    dir: &std::path::Path,
    index: usize,
    rank: usize,
) -> anyhow::Result<Option<Vec<usize>>> {
    let Some(spec) = &args.expert_map else {
        return Ok(None);
    };
    let shape = moerunner::checkpoint::describe(&dir.join("config.json"), Some(index))
        .with_context(|| format!("reading {}", dir.join("config.json").display()))?;
    let ep = args.ep.unwrap_or(1);
    let map = moerunner::parallel::ExpertMap::parse(spec, shape.num_experts, ep)
        .context("--expert-map")?;
    Ok(Some(
        map.experts_of(rank_parallelism(args, rank).ep_rank)
            .to_vec(),
    ))
}

/// The EP × TP coordinates of rank `rank` of `--ep`/`--tp` (rank i: EP rank i / tp, TP rank
/// i mod tp), for reading its slice of a checkpoint.
fn rank_parallelism(args: &Args, rank: usize) -> Parallelism {
    let (ep, tp) = (args.ep.unwrap_or(1), args.tp.unwrap_or(1).max(1));
    Parallelism {
        ep_size: ep,
        ep_rank: rank / tp,
        tp_size: tp,
        tp_rank: rank % tp,
    }
}

/// The layer index of `run --checkpoint`: `--layer-index N`, or the deprecated `--layer N` (with a
/// note on stderr).
fn checkpoint_layer_index(args: &Args) -> anyhow::Result<usize> {
    if let Some(index) = args.layer_index {
        return Ok(index);
    }
    let layer = args.layer.as_deref().unwrap_or_default();
    let index: usize = layer.parse().with_context(|| {
        format!("--layer `{layer}` must be a layer index with --checkpoint (use --layer-index N)")
    })?;
    eprintln!(
        "note: `--layer {index}` with `--checkpoint` is deprecated; use `--layer-index {index}`"
    );
    Ok(index)
}

/// A spinner on stderr for work of unknown length (hidden when stderr is not a terminal).
fn spinner(msg: String) -> anyhow::Result<ProgressBar> {
    let bar = ProgressBar::new_spinner()
        .with_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")?);
    bar.set_message(msg);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    Ok(bar)
}
