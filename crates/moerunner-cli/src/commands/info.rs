//! `moerunner info`: version, backends (and why any is unavailable), devices, supported matrix.

use moerunner::config::ActivationKind;
use moerunner::presets::PRESETS;
use moerunner::runner::Registered;
use moerunner::{RoutingMethod, Runner, WeightFormat};

#[derive(clap::Args)]
pub struct Args {
    /// Print the CUDA kernels' contracts as JSON instead (every `.cu` entry with its parameters,
    /// and every compiled form the backend may load): what the scripts under `scripts/gpu/` read.
    #[arg(long)]
    kernels_json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.kernels_json {
        let json = moerunner::backend::cuda::kernels::contracts_json();
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    println!("moerunner {}", env!("CARGO_PKG_VERSION"));
    println!("\nbackends (in order of automatic choice):");
    for reg in Runner::new().backends() {
        match reg {
            Registered::Ready(b) => {
                let info = b.info();
                let auto = if b.auto_eligible() {
                    ""
                } else {
                    " (only when asked for by name)"
                };
                println!("  {}{auto}: ready", info.name);
                for d in &info.devices {
                    println!("    device: {d}");
                }
                for s in &info.supports {
                    println!("    supports: {s}");
                }
            }
            Registered::Unavailable { name, reason } => {
                println!("  {name}: unavailable — {reason}");
                if *name == "cuda" {
                    for s in moerunner::backend::cuda::codec::supports_lines() {
                        println!("    supports (on a GPU): {s}");
                    }
                }
            }
        }
    }
    println!("\nformats (weight × activation):");
    for w in WeightFormat::ALL {
        let acts: Vec<&str> = w
            .legal_activation_formats()
            .iter()
            .map(|a| a.name())
            .collect();
        println!("  {:<10} × {}", w.name(), acts.join(", "));
    }
    let names = |v: Vec<&str>| v.join(", ");
    println!(
        "\nrouting: {}",
        names(RoutingMethod::ALL.iter().map(|m| m.name()).collect())
    );
    println!(
        "activations: {}",
        names(ActivationKind::ALL.iter().map(|a| a.name()).collect())
    );
    println!("\npresets:");
    for p in PRESETS {
        println!(
            "  {:<16} E={:<4} k={} H={:<5} I={:<6} {} {} (ships {})",
            p.name,
            p.num_experts,
            p.top_k,
            p.hidden,
            p.intermediate,
            p.activation,
            p.routing,
            p.shipped
        );
    }
    Ok(())
}
