//! The `moerunner` binary end to end on temp files: make-layer → make-input → run, for T = 0, 1 and
//! 4096, every weight format, EP/TP ranks, `--save-routing`, bad files, and `info`.

mod common;

use std::path::Path;

use common::{
    fails, fails_usage, make_input, make_layer, moerunner, ok, ok_stdout, small_layer_args, TempDir,
};
use moerunner::layer_file;
use moerunner::{DType, HostTensor};

/// Runs a layer on an input and returns the output tensor (and the summary line).
fn run(layer: &str, input: &str, output: &str, extra: &[&str]) -> (HostTensor, String) {
    let mut args = vec![
        "run", "--layer", layer, "--input", input, "--output", output,
    ];
    args.extend_from_slice(extra);
    let summary = ok_stdout(&args);
    (
        layer_file::read_output(Path::new(output)).unwrap().0,
        summary,
    )
}

fn values(t: &HostTensor) -> Vec<f64> {
    t.to_f32_vec("output")
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

/// ‖a − b‖₂ / ‖b‖₂.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

#[test]
fn make_layer_input_run_for_t_0_1_and_4096() {
    let dir = TempDir::new("t-0-1-4096");
    let layer = make_layer(&dir, "layer.safetensors", &["--seed", "7"]);
    let fp8_block = make_layer(
        &dir,
        "fp8-block.safetensors",
        &["--weight-format", "fp8_block"],
    );
    for (layer, tokens) in [
        (&layer, 0),
        (&layer, 1),
        (&layer, 4096),
        (&fp8_block, 0),
        (&fp8_block, 4096),
    ] {
        let input = make_input(
            &dir,
            layer,
            &format!("in-{tokens}.safetensors"),
            tokens,
            &["--seed", "3"],
        );
        let (out, summary) = run(
            layer,
            &input,
            &dir.s(&format!("out-{tokens}.safetensors")),
            &[],
        );
        assert_eq!(
            (out.dtype, out.shape.clone()),
            (DType::BF16, vec![tokens, 256]),
            "T = {tokens}"
        );
        assert!(
            values(&out).iter().all(|v| v.is_finite()),
            "T = {tokens}: non-finite output"
        );
        assert!(
            summary.contains("backend cpu") && summary.contains(&format!("T = {tokens} ")),
            "{summary}"
        );
    }
    // The default (automatic) backend agrees with the float64 reference.
    let input = make_input(&dir, &layer, "in-16.safetensors", 16, &["--dtype", "f32"]);
    let (fast, _) = run(
        &layer,
        &input,
        &dir.s("fast.safetensors"),
        &["--backend", "cpu"],
    );
    let (slow, summary) = run(&layer, &input, &dir.s("ref.safetensors"), &["--reference"]);
    assert!(summary.contains("backend reference"), "{summary}");
    let err = rel_err(&values(&fast), &values(&slow));
    assert!(err <= 1e-2, "cpu vs reference: rel err {err}");
}

#[test]
fn every_weight_format_runs_end_to_end() {
    let dir = TempDir::new("formats");
    let cases: &[(&str, &[&str])] = &[
        ("bf16", &[]),
        ("fp8", &[]),
        (
            "fp8_block",
            &[
                "--routing",
                "deepseek_v3",
                "--n-group",
                "2",
                "--topk-group",
                "1",
                "--routed-scaling-factor",
                "2.5",
            ],
        ),
        ("mxfp8", &["--activation", "relu2"]),
        (
            "mxfp4",
            &[
                "--activation",
                "swiglu_oai",
                "--w13-order",
                "interleaved",
                "--biases",
            ],
        ),
        ("mxfp4", &["--activation-format", "mxfp8"]),
        ("nvfp4", &["--routing", "minimax2"]),
        (
            "nvfp4",
            &[
                "--activation-format",
                "nvfp4_per_token",
                "--activation",
                "geglu",
            ],
        ),
    ];
    for (i, (wf, extra)) in cases.iter().enumerate() {
        let mut args = vec!["--weight-format", wf, "--seed", "1"];
        args.extend_from_slice(extra);
        let layer = make_layer(&dir, &format!("layer-{i}.safetensors"), &args);
        let config = layer_file::read_layer_header(Path::new(&layer)).unwrap();
        assert_eq!(config.weight_format.name(), *wf);
        let routing = ["logits", "topk", "packed"][i % 3];
        let input = make_input(
            &dir,
            &layer,
            &format!("in-{i}.safetensors"),
            8,
            &["--routing", routing],
        );
        let (fast, _) = run(
            &layer,
            &input,
            &dir.s(&format!("fast-{i}.safetensors")),
            &["--backend", "cpu"],
        );
        let (slow, _) = run(
            &layer,
            &input,
            &dir.s(&format!("ref-{i}.safetensors")),
            &["--backend", "reference"],
        );
        let tol = moerunner::config::tolerance(config.weight_format, config.activation_format);
        let err = rel_err(&values(&fast), &values(&slow));
        assert!(err <= tol, "{wf} {extra:?}: rel err {err} > {tol}");
    }
}

#[test]
fn save_routing_writes_the_routes_the_layer_used() {
    let dir = TempDir::new("save-routing");
    let layer = make_layer(&dir, "layer.safetensors", &[]);
    let input = make_input(&dir, &layer, "in.safetensors", 5, &[]);
    let out = dir.s("out.safetensors");
    ok(&[
        "run",
        "--layer",
        &layer,
        "--input",
        &input,
        "--output",
        &out,
        "--save-routing",
    ]);
    let (_, saved) = layer_file::read_output(Path::new(&out)).unwrap();
    let (ids, w) = saved.expect("--save-routing writes topk_ids and topk_weights");
    assert_eq!(
        (ids.dtype, ids.shape.clone(), w.dtype, w.shape.clone()),
        (DType::I32, vec![5, 2], DType::F32, vec![5, 2])
    );
    let (ids, w) = (
        ids.to_i32_vec("topk_ids").unwrap(),
        w.to_f32_vec("topk_weights").unwrap(),
    );
    for t in 0..5 {
        assert!(
            ids[2 * t] != ids[2 * t + 1]
                && ids[2 * t..2 * t + 2].iter().all(|&i| (0..8).contains(&i)),
            "{ids:?}"
        );
        assert!(
            (w[2 * t] + w[2 * t + 1] - 1.0).abs() < 1e-5,
            "renormalize weights sum to 1: {w:?}"
        );
    }
    // Caller-chosen top-k comes back as given; without the flag no routing is written.
    let routed = make_input(
        &dir,
        &layer,
        "routed.safetensors",
        5,
        &["--routing", "topk"],
    );
    ok(&[
        "run",
        "--layer",
        &layer,
        "--input",
        &routed,
        "--output",
        &out,
        "--save-routing",
    ]);
    let given = layer_file::read_input(Path::new(&routed)).unwrap();
    let layer_file::RoutingTensors::TopK { ids: given_ids, .. } = &given.routing else {
        panic!("not top-k")
    };
    let (saved, _) = layer_file::read_output(Path::new(&out)).unwrap().1.unwrap();
    assert_eq!(
        saved.to_i32_vec("ids").unwrap(),
        given_ids.to_i32_vec("ids").unwrap()
    );
    ok(&[
        "run", "--layer", &layer, "--input", &routed, "--output", &out,
    ]);
    assert!(layer_file::read_output(Path::new(&out))
        .unwrap()
        .1
        .is_none());
}

#[test]
fn expert_and_tensor_parallel_ranks_sum_to_the_whole() {
    let dir = TempDir::new("ranks");
    let bf16 = make_layer(&dir, "bf16.safetensors", &["--seed", "2"]);
    // W2 biases must be added by TP rank 0 only; packed routing exercises the routed path.
    let oai = [
        "--weight-format",
        "mxfp4",
        "--activation",
        "swiglu_oai",
        "--w13-order",
        "interleaved",
        "--biases",
    ];
    let mxfp4 = make_layer(&dir, "mxfp4.safetensors", &oai);
    for (layer, routing) in [(&bf16, "logits"), (&mxfp4, "packed")] {
        check_ranks(&dir, layer, routing);
    }
}

fn check_ranks(dir: &TempDir, layer: &str, routing: &str) {
    let input = make_input(
        dir,
        layer,
        &format!("in-{routing}.safetensors"),
        32,
        &["--dtype", "f32", "--routing", routing],
    );
    let (whole, _) = run(
        layer,
        &input,
        &dir.s("whole.safetensors"),
        &["--backend", "cpu"],
    );
    let whole = values(&whole);
    for axis in ["ep", "tp"] {
        let mut sum = vec![0.0; whole.len()];
        for rank in 0..2 {
            let (size, rank_s) = (format!("--{axis}-size"), format!("--{axis}-rank"));
            let r = rank.to_string();
            let (part, summary) = run(
                layer,
                &input,
                &dir.s(&format!("{axis}{rank}.safetensors")),
                &["--backend", "cpu", &size, "2", &rank_s, &r],
            );
            assert!(summary.contains("partial sum"), "{summary}");
            for (s, v) in sum.iter_mut().zip(values(&part)) {
                *s += v;
            }
        }
        let err = rel_err(&sum, &whole);
        assert!(
            err <= 1e-5,
            "{layer} {axis}: ranks sum to the whole within f32 rounding, rel err {err}"
        );
    }
}

#[test]
fn bad_files_and_arguments_exit_non_zero_with_the_reason() {
    let dir = TempDir::new("bad");
    let layer = make_layer(&dir, "layer.safetensors", &[]);
    let input = make_input(&dir, &layer, "in.safetensors", 3, &[]);
    let out = dir.s("out.safetensors");
    let garbage = dir.s("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a safetensors file").unwrap();
    let err = fails(&[
        "run", "--layer", &garbage, "--input", &input, "--output", &out,
    ]);
    assert!(
        err.contains("not a valid safetensors file") && err.contains(&garbage),
        "{err}"
    );
    let err = fails(&[
        "run", "--layer", &layer, "--input", &garbage, "--output", &out,
    ]);
    assert!(
        err.contains("reading input") && err.contains("not a valid safetensors file"),
        "{err}"
    );
    let err = fails(&[
        "run",
        "--layer",
        &dir.s("absent.safetensors"),
        "--input",
        &input,
        "--output",
        &out,
    ]);
    assert!(err.contains("absent.safetensors"), "{err}");
    // An input made for another H.
    let wide = dir.s("wide.safetensors");
    ok(&[
        "make-layer",
        "--out",
        &wide,
        "--experts",
        "8",
        "--hidden",
        "512",
        "--intermediate",
        "128",
        "--top-k",
        "2",
    ]);
    let wide_input = make_input(&dir, &wide, "wide-in.safetensors", 3, &[]);
    let err = fails(&[
        "run",
        "--layer",
        &layer,
        "--input",
        &wide_input,
        "--output",
        &out,
    ]);
    assert!(
        err.contains("`hidden_states`") && err.contains("256"),
        "{err}"
    );
    // A layer that breaks a rule: the error names the key.
    let broken = dir.s("broken.safetensors");
    let file = layer_file::MappedFile::open(Path::new(&layer)).unwrap();
    let tensors: Vec<(String, HostTensor)> = file
        .names()
        .map(|n| (n.to_string(), file.get(n).unwrap()))
        .collect();
    let mut meta = file.metadata().clone();
    meta.insert("moerunner.routing".into(), "roundrobin".into());
    layer_file::write_tensors(Path::new(&broken), &tensors, meta).unwrap();
    let err = fails(&[
        "run", "--layer", &broken, "--input", &input, "--output", &out,
    ]);
    assert!(
        err.contains("moerunner.routing") && err.contains("roundrobin"),
        "{err}"
    );
    // `--backend` is parsed by clap: an unknown name is a usage error (exit 2).
    let err = fails_usage(&[
        "run",
        "--layer",
        &layer,
        "--input",
        &input,
        "--output",
        &out,
        "--backend",
        "tpu",
    ]);
    assert!(
        err.contains("unknown backend") && err.contains("cpu"),
        "{err}"
    );
    assert!(
        !Path::new(&out).exists(),
        "no output written by a failed run"
    );
}

#[test]
fn make_layer_is_deterministic_and_checks_its_arguments() {
    let dir = TempDir::new("make-layer");
    let a = make_layer(
        &dir,
        "a.safetensors",
        &["--weight-format", "nvfp4", "--seed", "5"],
    );
    let b = make_layer(
        &dir,
        "b.safetensors",
        &["--weight-format", "nvfp4", "--seed", "5"],
    );
    let c = make_layer(
        &dir,
        "c.safetensors",
        &["--weight-format", "nvfp4", "--seed", "6"],
    );
    let (a, b, c) = (
        std::fs::read(a).unwrap(),
        std::fs::read(b).unwrap(),
        std::fs::read(c).unwrap(),
    );
    assert!(a == b, "same seed, same file");
    assert!(a != c, "another seed, another layer");
    // clap's `conflicts_with`: a usage error (exit 2).
    let err = fails_usage(&[
        "make-layer",
        "--out",
        &dir.s("x.safetensors"),
        "--preset",
        "mixtral-8x7b",
        "--experts",
        "4",
    ]);
    assert!(
        err.contains("--experts") && err.contains("--preset"),
        "{err}"
    );
    let err = fails(&[
        "make-layer",
        "--out",
        &dir.s("x.safetensors"),
        "--experts",
        "4",
    ]);
    assert!(err.contains("--hidden"), "{err}");
    let err = make_layer_fails(
        &dir,
        &["--weight-format", "mxfp4", "--activation-format", "fp8"],
    );
    assert!(
        err.contains("activation_format") && err.contains("bf16, mxfp8"),
        "{err}"
    );
    let err = make_layer_fails(&dir, &["--routing", "llama4"]);
    assert!(err.contains("top_k"), "{err}");
    let err = fails(&[
        "make-layer",
        "--out",
        &dir.s("x.safetensors"),
        "--preset",
        "gpt-5",
    ]);
    assert!(
        err.contains("unknown preset") && err.contains("qwen3-30b-a3b"),
        "{err}"
    );
    // clap's required `--layer`/`--preset` group: a usage error (exit 2).
    let err = fails_usage(&[
        "make-input",
        "--out",
        &dir.s("in.safetensors"),
        "--tokens",
        "1",
    ]);
    assert!(err.contains("--layer") && err.contains("--preset"), "{err}");
}

fn make_layer_fails(dir: &TempDir, extra: &[&str]) -> String {
    fails(&small_layer_args(&dir.s("x.safetensors"), extra))
}

#[test]
fn make_input_for_a_preset_needs_no_layer_file() {
    let dir = TempDir::new("preset-input");
    let path = dir.s("in.safetensors");
    ok(&[
        "make-input",
        "--preset",
        "qwen3-30b-a3b",
        "--out",
        &path,
        "--tokens",
        "2",
        "--routing",
        "packed",
        "--dtype",
        "f16",
    ]);
    let input = layer_file::read_input(Path::new(&path)).unwrap();
    assert_eq!(
        (input.hidden.dtype, input.hidden.shape.clone()),
        (DType::F16, vec![2, 2048])
    );
    assert!(
        matches!(input.routing, layer_file::RoutingTensors::Packed(ref p) if p.shape == [2, 8])
    );
}

#[test]
fn info_lists_backends_formats_routing_and_presets() {
    let out = ok_stdout(&["info"]);
    for needle in [
        "moerunner 0.",
        "cpu: ready",
        "reference",
        "cuda",
        "mxfp4",
        "nvfp4_per_token",
        "deepseek_v3",
        "swiglu_oai",
        "gpt-oss-120b",
    ] {
        assert!(out.contains(needle), "info lacks `{needle}`:\n{out}");
    }
}

#[test]
fn compare_closes_the_run_reference_loop() {
    let dir = TempDir::new("compare");
    let layer = make_layer(&dir, "layer.safetensors", &["--weight-format", "fp8_block"]);
    // f32 hidden states: the output is f32 too, so the backends' rounding differences show.
    let input = make_input(&dir, &layer, "in.safetensors", 6, &["--dtype", "f32"]);
    let (out, refr) = (dir.s("out.safetensors"), dir.s("ref.safetensors"));
    let base = [
        "run",
        "--layer",
        &layer,
        "--input",
        &input,
        "--save-routing",
    ];
    ok(&[&base[..], &["--output", &out]].concat());
    ok(&[&base[..], &["--output", &refr, "--reference"]].concat());
    let text = ok_stdout(&["compare", &out, &refr, "--tolerance", "2e-2"]);
    assert!(
        text.contains("relative error")
            && text.contains("max abs error")
            && text.contains("0 in A, 0 in B")
            && text.contains("6/6 tokens, 12/12 ids (k = 2)")
            && text.contains("within --tolerance"),
        "{text}"
    );
    // A file against itself: exactly zero; an impossible tolerance fails with status 1.
    let same = ok_stdout(&["compare", &refr, &refr]);
    assert!(same.contains("relative error  0.000e0"), "{same}");
    let err = fails(&["compare", &out, &refr, "--tolerance", "0"]);
    assert!(err.contains("over --tolerance"), "{err}");
    // Different shapes are refused by name.
    let other = make_input(&dir, &layer, "in3.safetensors", 3, &[]);
    let out3 = dir.s("out3.safetensors");
    ok(&[
        "run", "--layer", &layer, "--input", &other, "--output", &out3,
    ]);
    let err = fails(&["compare", &out, &out3]);
    assert!(err.contains("only outputs of the same layer"), "{err}");
}

#[test]
fn check_names_why_a_backend_cannot_be_checked() {
    // An unknown name is named as typed, with the known ones (it once printed `Named("gpu")`).
    let err = fails(&["check", "--backend", "gpu", "--cases", "2"]);
    assert!(
        err.contains("unknown backend `gpu`") && err.contains("auto, cuda, cpu, reference"),
        "{err}"
    );
    assert!(!err.contains("Named"), "{err}");
    // The reference against itself would pass whatever it computes.
    let err = fails(&["check", "--backend", "reference", "--cases", "2"]);
    assert!(err.contains("against itself"), "{err}");
    // CUDA on a machine without it: why, not "every case outside what cuda supports".
    if moerunner::backend::cuda::create().is_err() {
        let err = fails(&["check", "--backend", "cuda", "--cases", "2"]);
        assert!(
            err.contains("backend cuda is not available here") && !err.contains("skipped"),
            "{err}"
        );
    }
    // Format pairs read with a times sign.
    let text = ok_stdout(&["check", "--cases", "4", "--seed", "3"]);
    assert!(
        text.contains("weight × activation") && text.contains(" × "),
        "{text}"
    );
    // Split cases through real collectives between thread ranks.
    let text = ok_stdout(&[
        "check",
        "--cases",
        "40",
        "--seed",
        "3",
        "--comm",
        "thread",
        "--backend",
        "cpu",
    ]);
    assert!(
        text.contains("all 40 cases passed") && text.contains("threads with collectives"),
        "{text}"
    );
    // GPU transports: without a GPU (CI) a clear error naming what is missing.
    if std::env::var_os("MOERUNNER_REQUIRE_GPU").is_none() {
        for comm in ["nccl", "device"] {
            let err = fails(&["check", "--cases", "2", "--comm", comm]);
            assert!(
                err.contains(&format!("--comm {comm}")) && err.contains("GPU"),
                "{err}"
            );
        }
        let err = fails(&[
            "check",
            "--cases",
            "2",
            "--comm",
            "device",
            "--backend",
            "cpu",
        ]);
        assert!(err.contains("--backend cuda"), "{err}");
    }
}

#[test]
fn run_takes_an_activation_format_and_prints_its_load_time() {
    let dir = TempDir::new("run-act");
    let layer = make_layer(&dir, "layer.safetensors", &["--weight-format", "mxfp4"]);
    let input = make_input(&dir, &layer, "in.safetensors", 3, &[]);
    let out = dir.s("out.safetensors");
    let base = [
        "run", "--layer", &layer, "--input", &input, "--output", &out,
    ];
    let text = ok_stdout(&base);
    assert!(
        text.contains("mxfp4×bf16") && text.contains("| load "),
        "{text}"
    );
    let text = ok_stdout(&[&base[..], &["--activation-format", "mxfp8"]].concat());
    assert!(
        text.contains("mxfp4×mxfp8") && text.contains(" ms | run "),
        "{text}"
    );
    // A pairing the layer cannot take is refused, naming the flag.
    let err = fails(&[&base[..], &["--activation-format", "nvfp4"]].concat());
    assert!(err.contains("--activation-format nvfp4"), "{err}");
}

#[test]
fn bench_in_the_fields_shape() {
    let dir = TempDir::new("bench-shape");
    let (json, csv) = (dir.s("b.json"), dir.s("b.csv"));
    let base = [
        "bench",
        "--tokens",
        "1,4",
        "--iters",
        "3",
        "--weight-format",
        "bf16",
    ];
    let shape = [
        "--experts",
        "4",
        "--hidden",
        "128",
        "--intermediate",
        "256",
        "--top-k",
        "2",
    ];
    let ranks = [
        "--tp-size",
        "2",
        "--ep-size",
        "2",
        "--json",
        &json,
        "--csv",
        &csv,
    ];
    let text = ok_stdout(&[&base[..], &shape[..], &ranks[..]].concat());
    assert!(
        text.contains("E4-H128-I256-k2") && text.contains("min–max µs"),
        "{text}"
    );
    assert!(!text.contains("n/a"), "{text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["moerunner_version"], env!("CARGO_PKG_VERSION"));
    assert!(report["argv"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a == "--tp-size"));
    let row = &report["rows"][0];
    assert_eq!(
        (row["tp_size"].as_u64(), row["ep_size"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(row["samples_us"].as_array().unwrap().len(), 3);
    let csv = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(
        csv.starts_with("preset,weight_format,activation_format,tokens,tp_size"),
        "{csv}"
    );
    // The shape of a model's config.json (its first MoE layer: DeepSeek-V3's layer 0 is dense).
    let config = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../moerunner/tests/fixtures/transformers/deepseek_v3/config.json");
    let text = ok_stdout(&[&base[..], &["--config", config.to_str().unwrap()]].concat());
    assert!(text.contains("deepseek_v3-layer1"), "{text}");
}

/// `run --ep R` / `--tp R` run the whole layer split over CPU-thread ranks: all-to-all EP is bit
/// for bit the unsplit CPU output (also with an uneven map, and on this layer with replicas: not
/// guaranteed in general, docs/parallel.md), TP and TEP within the
/// format's tolerance; T = 0 and T = 1 (ranks owning no tokens) included; bad maps are refused.
#[test]
fn run_split_over_cpu_ranks_equals_the_unsplit_run() {
    let dir = TempDir::new("split");
    let layer = make_layer(&dir, "l.safetensors", &["--weight-format", "mxfp4"]);
    for tokens in [0, 1, 37] {
        let input = make_input(&dir, &layer, "in.safetensors", tokens, &["--dtype", "f32"]);
        let (one, _) = run(
            &layer,
            &input,
            &dir.s("one.safetensors"),
            &["--backend", "cpu"],
        );
        for split in [
            &["--ep", "2"][..],
            &["--ep", "3"],
            &["--ep", "4", "--ep-mode", "all-to-all"],
            &["--ep", "3", "--expert-map", "0,0,0,0,0,1,1,2"],
            &["--ep", "2", "--expert-map", "0+1,0,0,0,1,1,1,1+0"],
        ] {
            let (out, summary) = run(&layer, &input, &dir.s("ep.safetensors"), split);
            assert!(summary.contains("ranks through thread"), "{summary}");
            assert_eq!(&out.bytes[..], &one.bytes[..], "{split:?} T={tokens}");
        }
        for split in [
            &["--tp", "2"][..],
            &["--tp", "4"],
            &["--ep", "2", "--tp", "2"],
            &["--ep", "4", "--ep-mode", "gather-scatter"],
        ] {
            let (out, _) = run(&layer, &input, &dir.s("tp.safetensors"), split);
            if tokens > 0 {
                let err = rel_err(&values(&out), &values(&one));
                assert!(err < 1e-2, "{split:?} T={tokens}: {err}");
            }
        }
    }
    let input = make_input(&dir, &layer, "in.safetensors", 3, &[]);
    let out = dir.s("bad.safetensors");
    let base = [
        "run", "--layer", &layer, "--input", &input, "--output", &out,
    ];
    let err = fails(&[&base[..], &["--ep", "3", "--expert-map", "0,0,0"]].concat());
    assert!(
        err.contains("--expert-map") && err.contains("3 entries"),
        "{err}"
    );
    let err = fails(&[&base[..], &["--ep", "9"]].concat());
    assert!(err.contains("holds no expert"), "{err}");
    // clap's `conflicts_with`: a usage error (exit 2).
    let err = fails_usage(&[&base[..], &["--ep", "2", "--ep-size", "2"]].concat());
    assert!(err.contains("cannot be used with"), "{err}");
}

/// `moerunner gemm` with no arguments but the backend: a small dense product on the CPU, checked
/// against the float64 reference and timed; both formats; JSON; bad flags refused.
#[test]
fn gemm_runs_its_default_on_the_cpu_within_tolerance() {
    let out = ok_stdout(&["gemm", "--backend", "cpu"]);
    println!("{out}");
    let err: f64 = out
        .split("rel_err ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no rel_err in:\n{out}"));
    assert!(err <= 2e-2, "{out}");
    assert!(out.contains("TFLOP/s") && out.contains("mxfp8"), "{out}");
    let out = ok_stdout(&[
        "gemm",
        "--backend",
        "cpu",
        "--format",
        "fp8_block",
        "--m",
        "7",
        "--n",
        "130",
        "--k",
        "200",
        "--iters",
        "2",
        "--json",
        "--dtype",
        "f32",
    ]);
    let j: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(j["format"], "fp8_block");
    assert_eq!(j["backend"], "cpu");
    assert_eq!(j["passed"], true);
    assert_eq!(j["checked_rows"], 7);
    assert!(j["rel_err"].as_f64().expect("rel_err") <= 2e-2, "{j}");
    assert!(j["tflops"].as_f64().expect("tflops") > 0.0, "{j}");
    // where the result came from, as bench's report says it
    assert_eq!(j["moerunner_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(j["date"].as_str().map(str::len), Some(10), "{j}");
    assert!(
        j["argv"]
            .as_array()
            .expect("argv")
            .iter()
            .any(|a| a == "fp8_block"),
        "{j}"
    );
    let e = fails(&["gemm", "--backend", "cpu", "--k", "40"]);
    assert!(e.contains("K % 32"), "{e}");
    let e = fails(&["gemm", "--format", "nvfp4"]);
    assert!(e.contains("mxfp8, fp8_block"), "{e}");
    let e = fails(&["gemm", "--backend", "tpu"]);
    assert!(e.contains("cpu, cuda or auto"), "{e}");
}

/// `run --ep 2 --comm nccl` (and `device`, `nccl-process`) on a machine without GPUs (or NCCL) stops
/// with the reason, naming what is missing, and writes no output; with a CPU backend it is refused
/// by name.
#[test]
fn run_with_nccl_ranks_says_why_it_cannot() {
    let dir = TempDir::new("nccl");
    let (layer, input, out) = (
        dir.s("l.safetensors"),
        dir.s("x.safetensors"),
        dir.s("o.safetensors"),
    );
    ok(&[
        "make-layer",
        "--experts",
        "4",
        "--hidden",
        "64",
        "--intermediate",
        "32",
        "--top-k",
        "2",
        "--out",
        &layer,
    ]);
    ok(&[
        "make-input",
        "--layer",
        &layer,
        "--tokens",
        "3",
        "--out",
        &input,
    ]);
    let cases = [(&["--backend", "cpu"][..], "--backend cuda"), (&[][..], "")];
    for ((extra, needle), comm) in cases
        .iter()
        .flat_map(|c| [(*c, "nccl"), (*c, "device"), (*c, "nccl-process")])
    {
        let mut args = vec![
            "run", "--layer", &layer, "--input", &input, "--output", &out, "--ep", "2", "--comm",
            comm,
        ];
        args.extend(extra);
        let o = moerunner(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        if o.status.success() {
            // a machine with two GPUs and NCCL runs it
            continue;
        }
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(
            !needle.is_empty()
                || err.contains("libcuda")
                || err.contains("libnccl")
                || err.contains("GPU"),
            "{err}"
        );
        assert!(!Path::new(&out).exists(), "no output after a refusal");
    }
}

/// `bench --ep-size/--tp-size --comm thread`: the whole layer over thread ranks with collectives;
/// each row is the whole call, with the critical-path rank's time in collectives and its share,
/// and a plan of one rank is refused.
#[test]
fn bench_splits_the_layer_over_thread_ranks() {
    let dir = TempDir::new("bench-split");
    let json = dir.s("b.json");
    let shape = [
        "bench",
        "--experts",
        "8",
        "--hidden",
        "128",
        "--intermediate",
        "128",
        "--top-k",
        "2",
        "--tokens",
        "1,5",
        "--iters",
        "3",
        "--weight-format",
        "bf16",
        "--backend",
        "cpu",
    ];
    for (ep, tp) in [("2", "1"), ("2", "2")] {
        let text = ok_stdout(
            &[
                &shape[..],
                &[
                    "--ep-size",
                    ep,
                    "--tp-size",
                    tp,
                    "--comm",
                    "thread",
                    "--json",
                    &json,
                ],
            ]
            .concat(),
        );
        assert!(
            text.contains(&format!("ep {ep} × tp {tp} ranks")) && text.contains("% of the call"),
            "{text}"
        );
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        for row in report["rows"].as_array().unwrap() {
            let share = row["comm_share"].as_f64().expect("comm_share");
            let comm = row["comm_us"].as_f64().expect("comm_us");
            let time = row["time_us"].as_f64().unwrap();
            assert!(share > 0.0 && share <= 1.0 && comm <= time, "{row}");
            assert!(row["rel_err"].as_f64().unwrap() < 1e-2, "{row}");
            assert_eq!(row["ep_size"].as_u64(), ep.parse().ok());
        }
    }
    let err = fails(&[&shape[..], &["--comm", "thread"]].concat());
    assert!(err.contains("--comm thread"), "{err}");
    // The memory budget counts the whole layer a split row synthesizes, not one rank's share.
    let needs = |extra: &[&str]| -> u64 {
        let err = fails(
            &[
                &shape[..],
                &["--ep-size", "2", "--memory-budget", "1K"],
                extra,
            ]
            .concat(),
        );
        let at = err.find(" needs ").unwrap_or_else(|| panic!("{err}")) + 7;
        err[at..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("{err}"))
    };
    let (share, whole) = (needs(&[]), needs(&["--comm", "thread"]));
    assert!(
        whole > share,
        "split {whole} bytes, one rank's share {share}"
    );
    // One rank per GPU through NCCL: without GPUs (CI) a clear error naming why, never a panic.
    if std::env::var_os("MOERUNNER_REQUIRE_GPU").is_none() {
        let err = fails(&[&shape[..], &["--ep-size", "2", "--comm", "nccl"]].concat());
        assert!(err.contains("--comm nccl runs GPU ranks"), "{err}");
        let auto: Vec<&str> = shape
            .iter()
            .copied()
            .filter(|a| *a != "--backend" && *a != "cpu")
            .collect();
        let err = fails(&[&auto[..], &["--ep-size", "2", "--comm", "nccl"]].concat());
        assert!(err.contains("NCCL") || err.contains("GPU"), "{err}");
    }
}

/// `warm-kernels` compiles the modules it is asked for into the cache folder it is given, once (a
/// second run finds them cached), without a GPU; a cache switched off or a malformed --arch is
/// refused.
#[test]
fn warm_kernels_fills_the_kernel_cache_once() {
    if !moerunner::backend::cuda::nvrtc::available() {
        assert_ne!(
            std::env::var("MOERUNNER_REQUIRE_NVRTC").as_deref(),
            Ok("1"),
            "libnvrtc.so.13 is required here (MOERUNNER_REQUIRE_NVRTC=1)"
        );
        println!("skipped: libnvrtc.so.13 not found (set LD_LIBRARY_PATH; .ci/run installs it)");
        return;
    }
    let dir = TempDir::new("warm-kernels");
    let cache = dir.s("kernels");
    let warm = |cache: &str, extra: &[&str]| {
        common::bin()
            .env("MOERUNNER_KERNEL_CACHE", cache)
            .args(["warm-kernels", "--only", "combine"])
            .args(extra)
            .output()
            .unwrap()
    };
    let first = warm(&cache, &["--arch", "sm_90a"]);
    let said = common::text(&first);
    assert!(first.status.success(), "{said}");
    assert!(
        said.contains("1 modules for sm_90a")
            && said.contains("1 compiled, 0 already cached, 0 failed"),
        "{said}"
    );
    let cubins = std::fs::read_dir(&cache)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "cubin")
        })
        .count();
    assert_eq!(cubins, 1, "one module's binary in {cache}");
    let again = common::text(&warm(&cache, &["--arch", "sm_90a"]));
    assert!(
        again.contains("0 compiled, 1 already cached, 0 failed"),
        "{again}"
    );

    let off = warm("off", &["--arch", "sm_90a"]);
    assert_eq!(off.status.code(), Some(1));
    assert!(
        common::text(&off).contains("MOERUNNER_KERNEL_CACHE"),
        "{}",
        common::text(&off)
    );
    let bad = warm(&cache, &["--arch", "90"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(common::text(&bad).contains("expected an architecture"));
}

/// `bench --stage-times`: a backend without device stages (the CPU) gives rows without them (no
/// `stages` key in the JSON, no stage line), and the flag is refused beside `--comm`, whose rows
/// are whole split calls. (The GPU's stage times: `gpu_stage_times_cover_the_standard_pipeline`.)
#[test]
fn bench_stage_times_only_where_a_device_has_stages() {
    let dir = TempDir::new("bench-stages");
    let json = dir.s("b.json");
    let args = [
        "bench",
        "--backend",
        "cpu",
        "--tokens",
        "2",
        "--iters",
        "2",
        "--weight-format",
        "bf16",
        "--experts",
        "4",
        "--hidden",
        "128",
        "--intermediate",
        "128",
        "--top-k",
        "2",
        "--stage-times",
        "--json",
        &json,
    ];
    let text = ok_stdout(&args);
    assert!(!text.contains("stages (µs"), "{text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let row = &report["rows"][0];
    // (nor a device workspace: the CPU keeps none)
    assert!(row.get("workspace_bytes").is_none(), "{row}");
    assert!(
        row.get("time_us").is_some() && row.get("stages").is_none(),
        "{row}"
    );
    fails_usage(&[&args[..], &["--comm", "thread", "--ep-size", "2"]].concat());
}

/// `--ep-mode device-all-to-all` runs GPU ranks: with host-memory ranks `check` and `bench` refuse it
/// before any case, naming the transports that take it; without `--comm` it is a usage error; and
/// `run` says why CPU ranks cannot.
#[test]
fn device_all_to_all_needs_gpu_ranks() {
    for args in [
        &[
            "check",
            "--comm",
            "thread",
            "--ep-mode",
            "device-all-to-all",
            "--cases",
            "2",
        ][..],
        &[
            "bench",
            "--backend",
            "cpu",
            "--comm",
            "thread",
            "--ep-size",
            "2",
            "--ep-mode",
            "device-a2a",
            "--tokens",
            "1",
        ],
    ] {
        let err = fails(args);
        assert!(err.contains("--comm nccl or device"), "{args:?}: {err}");
    }
    let err = fails_usage(&["check", "--ep-mode", "device-all-to-all", "--cases", "2"]);
    assert!(err.contains("--comm"), "{err}");
    let err = fails_usage(&["check", "--comm", "thread", "--ep-mode", "sideways"]);
    assert!(err.contains("device-all-to-all"), "{err}");
}
