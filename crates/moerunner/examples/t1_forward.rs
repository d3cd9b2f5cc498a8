//! Times one-token forward calls of a preset on the CPU backend, cold (last-level cache flushed
//! before each call, as `moerunner bench` does) and warm (weights left in cache), on all threads
//! and on one. Usage: `cargo run --release --example t1_forward [preset] [format] [iters]`.

use std::time::Instant;

use moerunner::bench::stream_through as flush;
use moerunner::presets::preset;
use moerunner::synth::{self, RoutingMode};
use moerunner::{BackendChoice, DType, ForwardInput, Runner, WeightFormat};

fn main() -> moerunner::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).map_or("qwen3-30b-a3b", |s| s.as_str());
    let wf: WeightFormat = args.get(2).map_or("mxfp4", |s| s.as_str()).parse()?;
    let iters: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(31);
    let p = preset(name)?;
    let config = p.config(wf, None);
    let layer = synth::random_layer(&config, 1, p.biases)?;
    let loaded = Runner::new().load(layer, &BackendChoice::Named("cpu".into()))?;
    let input = synth::random_input(&config, 1, RoutingMode::Logits, DType::BF16, 1)?;
    let fwd = ForwardInput {
        hidden: &input.hidden,
        routing: input.routing_input(),
    };
    let mut buf = vec![0u64; (128 << 20) / 8];
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().ok();
    loaded.forward(&fwd)?;
    for (label, cold, single) in [
        ("cold 2t", true, false),
        ("warm 2t", false, false),
        ("cold 1t", true, true),
        ("warm 1t", false, true),
    ] {
        let mut times = Vec::new();
        for _ in 0..iters {
            if cold {
                flush(&mut buf);
            }
            let t0 = Instant::now();
            let out = match (&one, single) {
                (Some(pool), true) => pool.install(|| loaded.forward(&fwd))?,
                _ => loaded.forward(&fwd)?,
            };
            times.push(t0.elapsed().as_secs_f64() * 1e6);
            drop(out);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{label}: median {:7.0} µs  min {:7.0} µs  max {:7.0} µs",
            times[iters / 2],
            times[0],
            times[iters - 1]
        );
    }
    Ok(())
}
