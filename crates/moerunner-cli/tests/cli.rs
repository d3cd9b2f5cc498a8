//! The `moerunner` binary end to end on small temp files: make-layer → make-input → run for
//! T = 0, 1 and 4096, the reference, EP partial sums, --save-routing, and failures that exit
//! non-zero with a message naming the problem.

use std::path::{Path, PathBuf};
use std::process::Command;

use moerunner::layer_file;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_moerunner"))
}

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("moerunner-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} should have failed");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn make_layer(d: &Path, name: &str, extra: &[&str]) -> PathBuf {
    make_layer_h(d, name, "256", extra)
}

fn make_layer_h(d: &Path, name: &str, hidden: &str, extra: &[&str]) -> PathBuf {
    let p = d.join(name);
    let mut args = vec!["make-layer", "--experts", "8", "--hidden", hidden, "--intermediate", "128", "--top-k", "2", "--seed", "3", "--out"];
    args.push(p.to_str().unwrap());
    args.extend_from_slice(extra);
    ok(bin().args(&args));
    p
}

fn make_input(d: &Path, layer: &Path, tokens: usize, routing: &str) -> PathBuf {
    let p = d.join(format!("in-{tokens}-{routing}.safetensors"));
    ok(bin().args(["make-input", "--layer", layer.to_str().unwrap(), "--tokens", &tokens.to_string(), "--routing", routing, "--seed", "9", "--out", p.to_str().unwrap()]));
    p
}

fn run(layer: &Path, input: &Path, out: &Path, extra: &[&str]) -> (Vec<f32>, Vec<usize>) {
    let mut args = vec!["run", "--layer", layer.to_str().unwrap(), "--input", input.to_str().unwrap(), "--output", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    ok(bin().args(&args));
    let (t, _) = layer_file::read_output(out).unwrap();
    (t.to_f32_vec("output").unwrap(), t.shape)
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn run_handles_zero_one_and_many_tokens_and_matches_the_reference() {
    let d = dir();
    let layer = make_layer(&d, "l.safetensors", &["--weight-format", "fp8_block"]);
    for tokens in [0usize, 1, 4096] {
        let input = make_input(&d, &layer, tokens, "logits");
        let (out, shape) = run(&layer, &input, &d.join(format!("o{tokens}.safetensors")), &[]);
        assert_eq!(shape, vec![tokens, 256]);
        assert!(out.iter().all(|v| v.is_finite()));
        if tokens == 1 {
            let (r, _) = run(&layer, &input, &d.join("ref1.safetensors"), &["--reference"]);
            let e = rel_err(&out, &r);
            assert!(e <= 2e-2, "rel err {e}");
        }
    }
}

#[test]
fn expert_parallel_partial_sums_add_up_and_routing_is_saved() {
    let d = dir();
    let layer = make_layer(&d, "ep.safetensors", &["--weight-format", "mxfp4", "--activation", "swiglu_oai", "--w13-order", "interleaved", "--biases"]);
    let input = make_input(&d, &layer, 33, "packed");
    let (whole, _) = run(&layer, &input, &d.join("whole.safetensors"), &["--backend", "cpu", "--save-routing"]);
    let mut sum = vec![0f32; whole.len()];
    for r in 0..2 {
        let (part, _) = run(&layer, &input, &d.join(format!("ep{r}.safetensors")), &["--backend", "cpu", "--ep-size", "2", "--ep-rank", &r.to_string()]);
        sum.iter_mut().zip(&part).for_each(|(s, p)| *s += p);
    }
    assert!(rel_err(&sum, &whole) < 1e-2, "EP sum differs: {}", rel_err(&sum, &whole));
    let (_, routes) = layer_file::read_output(&d.join("whole.safetensors")).unwrap();
    let (ids, weights) = routes.expect("--save-routing writes topk_ids/topk_weights");
    assert_eq!(ids.shape, vec![33, 2]);
    assert_eq!(weights.shape, vec![33, 2]);
}

#[test]
fn bad_inputs_exit_non_zero_naming_the_problem() {
    let d = dir();
    let layer = make_layer(&d, "bad.safetensors", &[]);
    let garbage = d.join("garbage.safetensors");
    std::fs::write(&garbage, b"nope").unwrap();
    let input = make_input(&d, &layer, 2, "topk");
    let err = fails(bin().args(["run", "--layer", garbage.to_str().unwrap(), "--input", input.to_str().unwrap(), "--output", d.join("x.safetensors").to_str().unwrap()]));
    assert!(err.contains("garbage.safetensors") && err.contains("not a valid safetensors"), "{err}");
    let other = make_layer_h(&d, "other.safetensors", "128", &[]);
    let err = fails(bin().args(["run", "--layer", other.to_str().unwrap(), "--input", input.to_str().unwrap(), "--output", d.join("y.safetensors").to_str().unwrap()]));
    assert!(err.contains("hidden_states"), "{err}");
    assert!(!d.join("y.safetensors").exists(), "no output on failure");
    let err = fails(bin().args(["run", "--layer", layer.to_str().unwrap(), "--input", input.to_str().unwrap(), "--output", d.join("z.safetensors").to_str().unwrap(), "--backend", "tpu"]));
    assert!(err.contains("unknown backend") && err.contains("cpu"), "{err}");
    let err = fails(bin().args(["make-layer", "--preset", "gpt-5", "--out", d.join("p.safetensors").to_str().unwrap()]));
    assert!(err.contains("unknown preset") && err.contains("qwen3-30b-a3b"), "{err}");
}

#[test]
fn info_lists_backends_and_the_matrix() {
    let text = ok(bin().arg("info"));
    for needle in ["cpu: ready", "cuda: unavailable", "mxfp4", "nvfp4_per_token", "deepseek_v3", "swiglu_oai", "gpt-oss-120b"] {
        assert!(text.contains(needle), "info lacks `{needle}`:\n{text}");
    }
}
