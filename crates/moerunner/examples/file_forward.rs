//! Times forward calls of a layer file on an input file through the library (what the Python
//! package's overhead is measured against: `crates/moerunner-py/bench_overhead.py` times the same
//! files from Python). Usage:
//! `cargo run --release --example file_forward LAYER INPUT [backend] [iters]`; prints the median
//! and minimum µs per call, warm (the same input again and again).

use std::path::Path;
use std::time::Instant;

use moerunner::layer_file::{read_input, read_layer};
use moerunner::{BackendChoice, ForwardInput, Runner};

fn main() -> moerunner::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(layer), Some(input)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: file_forward LAYER INPUT [backend] [iters]");
        std::process::exit(2);
    };
    let backend: BackendChoice = args.get(3).map_or("cpu", |s| s.as_str()).parse()?;
    let iters: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(2000);
    let loaded = Runner::new().load(read_layer(Path::new(layer))?, &backend)?;
    let input = read_input(Path::new(input))?;
    let call = ForwardInput {
        hidden: &input.hidden,
        routing: input.routing_input(),
    };
    for _ in 0..50 {
        loaded.forward(&call)?;
    }
    let mut times: Vec<f64> = (0..iters)
        .map(|_| {
            let start = Instant::now();
            let out = loaded.forward(&call);
            let us = start.elapsed().as_secs_f64() * 1e6;
            out.map(|_| us)
        })
        .collect::<moerunner::Result<_>>()?;
    times.sort_by(f64::total_cmp);
    println!(
        "{} calls on {}: median {:.1} µs, min {:.1} µs",
        iters,
        loaded.backend(),
        times[iters / 2],
        times[0]
    );
    Ok(())
}
