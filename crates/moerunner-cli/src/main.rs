//! The `moerunner` command-line tool. Each subcommand lives in `commands/<name>.rs` with its own
//! clap `Args` and a `run` function; this file only dispatches and prints errors with their chain.

mod commands;
mod process_ranks;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "moerunner",
    version,
    about = "Fused Mixture-of-Experts layer runtime: run, check and benchmark MoE layers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Most memory a command may ask for (bytes, or with K/M/G/T): a larger layer, input or
    /// bench case is refused before anything is allocated. Default: MOERUNNER_MEMORY_BUDGET, else
    /// 3/4 of physical memory.
    #[arg(long, global = true, value_name = "BYTES")]
    memory_budget: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run one MoE layer on an input file (spec/layer-file.md) and write the output file.
    Run(commands::run::Args),
    /// Convert one MoE layer of a Hugging Face checkpoint folder into a layer file.
    Convert(commands::convert::Args),
    /// Write a random layer file for a preset or an explicit shape, in any format.
    MakeLayer(commands::make_layer::Args),
    /// Write a random input file for a layer.
    MakeInput(commands::make_input::Args),
    /// Benchmark presets × formats × token counts against the roofline.
    Bench(commands::bench::Args),
    /// Check random cases across formats, routing and activations against the float64 reference.
    Check(commands::check::Args),
    /// Time the GPU's online weight quantizer (bf16 → a weight format) against copy bandwidth.
    ///
    /// Quantizes a preset's expert tensors, W13 [E, 2·I, H] then W2 [E, H, I], from bf16 already on
    /// the GPU into each --format (bit-identical to the CPU's quantize_weights). Each tensor's bf16
    /// source stays on the GPU with one format's output at a time (DeepSeek-V3's W13: 15 GB + 7.5 GB
    /// for fp8); the whole tensor's launch sequence is timed with CUDA events, median of --iters.
    /// GB/s counts source bytes read + quantized bytes written (elements and scales) once; "passes 2"
    /// marks formats that read the source twice (an expert-wide amax first: fp8 per-tensor, nvfp4
    /// with computed globals). "% copy" is that rate over the device-to-device copy rate (also read +
    /// write); the "layer" rows sum a format's tensors. Needs a CUDA GPU (sm_90+) and libnvrtc.
    ///
    /// Example: moerunner quantize-bench --preset deepseek-v3 --format mxfp8,nvfp4 --json q.json
    QuantizeBench(commands::quantize_bench::Args),
    /// A dense linear layer y = x·Wᵀ (mxfp8 or fp8_block) on random data: checked against the
    /// float64 reference and timed (on the GPU beside cuBLASLt's fp8 GEMM).
    Gemm(commands::gemm::Args),
    /// Tune the GPU's GEMM tactics for a preset × format, each verified bit for bit.
    ///
    /// At each --tokens count every candidate tactic (token-tile width, warp specialisation per
    /// GEMM) runs the whole layer on two seeded inputs; a candidate whose output differs from the
    /// default tactic's in any bit is refused and reported, the others are timed by CUDA-graph
    /// replay (L2 flushed), and the fastest is kept for the count's shape class (the power of two
    /// of the mean pairs per expert) in the tactic table beside the kernel cache, keyed by device,
    /// driver, NVRTC, kernel sources and layer shape. Layers use it under MOERUNNER_TACTICS=use.
    ///
    /// Example: moerunner tune --preset qwen3-30b-a3b --format fp8_block --tokens 1,128,8192
    Tune(commands::tune::Args),
    /// Compile every GPU kernel into the kernel cache ahead of time, in parallel (no GPU needed).
    ///
    /// A layer's first call on a GPU compiles the kernel modules it uses with NVRTC, one by one
    /// (hundreds of modules across formats and tile widths: minutes on one core). This compiles
    /// every module a GPU of --arch may load (or those named by --only) on all cores into the
    /// cache folder (MOERUNNER_KERNEL_CACHE, default ~/.cache/moerunner/kernels), keyed by source,
    /// options, architecture and NVRTC version — so it can run at deploy time on a machine
    /// without a GPU. Modules already cached are counted, not recompiled.
    ///
    /// Example: moerunner warm-kernels --arch sm_90a
    WarmKernels(commands::warm_kernels::Args),
    /// Compare two output files: relative error, max abs error, NaN count, top-k agreement.
    Compare(commands::compare::Args),
    /// Version, backends, devices and what each backend supports.
    Info(commands::info::Args),
}

fn main() -> std::process::ExitCode {
    restore_default_sigpipe();
    let cli = Cli::parse();
    if let Some(text) = &cli.memory_budget {
        match moerunner::size::parse_bytes(text, "--memory-budget") {
            Ok(bytes) => moerunner::size::set_budget(bytes),
            Err(e) => {
                eprintln!("error: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let result = match cli.command {
        Command::Run(a) => commands::run::run(a),
        Command::Convert(a) => commands::convert::run(a),
        Command::MakeLayer(a) => commands::make_layer::run(a),
        Command::MakeInput(a) => commands::make_input::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Check(a) => commands::check::run(a),
        Command::QuantizeBench(a) => commands::quantize_bench::run(a),
        Command::Gemm(a) => commands::gemm::run(a),
        Command::Tune(a) => commands::tune::run(a),
        Command::WarmKernels(a) => commands::warm_kernels::run(a),
        Command::Compare(a) => commands::compare::run(a),
        Command::Info(a) => commands::info::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by ": ", each cause once: a cause whose text the message
/// before it already ends with (an I/O error shown inside `path: cause`) is not repeated.
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// `moerunner info | head` must end quietly when the reader goes away, as other command-line tools
/// do. Rust ignores SIGPIPE, which turns a closed pipe into a panic inside `println!`; the default
/// action ends the process instead.
fn restore_default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is a valid action.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
