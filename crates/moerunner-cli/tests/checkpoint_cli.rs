//! `moerunner convert` and `moerunner run --checkpoint` end to end on a miniature Qwen3-MoE folder
//! (a single `model.safetensors`, no index): a hidden-only input is routed by the checkpoint's
//! router, the converted layer file (which carries the router) gives the same output on that input
//! and on one with the logits, and TP ranks add up to the whole.

mod common;

use std::path::Path;

use common::{fails, fails_usage, ok, qwen, values, TempDir};
use moerunner::checkpoint::{load_layer, LoadOptions};
use moerunner::layer_file::{self, InputFile, RoutingTensors};
use moerunner::HostTensor;

fn output(path: &str) -> Vec<f32> {
    layer_file::read_output(Path::new(path))
        .unwrap()
        .0
        .to_f32_vec("output")
        .unwrap()
}

/// A temp folder holding a Qwen3-MoE checkpoint (layer 1 of 2: E = 4, H = 64, I = 32, BF16, one
/// `model.safetensors` without an index) and `hidden.safetensors`: `tokens` rows of hidden states
/// alone (the checkpoint's router routes them). The folder, its path and the input's tensor.
fn fixture(test: &str, tokens: usize, seed: u32) -> (TempDir, String, HostTensor) {
    let d = TempDir::new(test);
    qwen(4, 64, 32, 2).write_single(&d.0);
    let v = values(tokens * 64, seed);
    common::hidden_only(&d.path("hidden.safetensors"), tokens, 64, &v);
    let checkpoint = d.0.display().to_string();
    (d, checkpoint, HostTensor::from_f32(vec![tokens, 64], &v))
}

#[test]
fn run_checkpoint_and_convert_agree() {
    let (d, ckpt, hidden) = fixture("ckpt", 3, 5);
    let hidden_only = d.s("hidden.safetensors");

    let out1 = d.s("out1.safetensors");
    let text = ok(&[
        "run",
        "--checkpoint",
        &ckpt,
        "--layer-index",
        "1",
        "--input",
        &hidden_only,
        "--output",
        &out1,
        "--reference",
    ]);
    assert!(!text.contains("deprecated"), "{text}");

    // The converted layer file, run on an input carrying the router's logits, gives the same output.
    let layer = d.s("layer.safetensors");
    let text = ok(&[
        "convert",
        "--checkpoint",
        &ckpt,
        "--layer",
        "1",
        "--out",
        &layer,
    ]);
    assert!(text.contains("qwen3_moe"), "{text}");
    let loaded = load_layer(&d.0, 1, &LoadOptions::default()).unwrap();
    let logits = loaded.router_logits(&hidden).unwrap();
    let with_logits = d.s("logits.safetensors");
    layer_file::write_input(
        Path::new(&with_logits),
        &InputFile {
            hidden,
            routing: RoutingTensors::Logits(logits),
        },
    )
    .unwrap();
    let out2 = d.s("out2.safetensors");
    ok(&[
        "run",
        "--layer",
        &layer,
        "--input",
        &with_logits,
        "--output",
        &out2,
        "--reference",
    ]);
    let (a, b) = (output(&out1), output(&out2));
    assert!(a.iter().any(|v| *v != 0.0));
    assert_eq!(a, b);

    // The router travels with the converted file: the hidden-only input runs on it as well.
    let router = layer_file::read_layer_router(Path::new(&layer))
        .unwrap()
        .expect("convert writes the router");
    assert_eq!(router.weight.shape, vec![4, 64]);
    let out3 = d.s("out3.safetensors");
    ok(&[
        "run",
        "--layer",
        &layer,
        "--input",
        &hidden_only,
        "--output",
        &out3,
        "--reference",
    ]);
    assert_eq!(
        a,
        output(&out3),
        "hidden-only input on the converted layer file"
    );
    // A layer file without a router still refuses a hidden-only input, naming what is missing.
    let bare = d.s("bare.safetensors");
    layer_file::write_layer(
        Path::new(&bare),
        &layer_file::read_layer(Path::new(&layer)).unwrap(),
    )
    .unwrap();
    let err = fails(&[
        "run",
        "--layer",
        &bare,
        "--input",
        &hidden_only,
        "--output",
        &d.s("o4.safetensors"),
    ]);
    assert!(err.contains("router_logits"), "{err}");

    // Two TP ranks read their halves from the checkpoint; their partial outputs add up.
    let mut sum = vec![0f32; a.len()];
    for r in 0..2 {
        let o = d.s(&format!("tp{r}.safetensors"));
        // The old spelling, `--layer N` with `--checkpoint`, still works and says what replaces it.
        let text = ok(&[
            "run",
            "--checkpoint",
            &ckpt,
            "--layer",
            "1",
            "--input",
            &hidden_only,
            "--output",
            &o,
            "--reference",
            "--tp-size",
            "2",
            "--tp-rank",
            &r.to_string(),
        ]);
        assert!(
            text.contains("deprecated") && text.contains("--layer-index 1"),
            "{text}"
        );
        for (x, y) in sum.iter_mut().zip(output(&o)) {
            *x += y;
        }
    }
    for (x, y) in sum.iter().zip(&a) {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
    }

    // --quantize at load, and errors that name the problem.
    let q = d.s("q.safetensors");
    ok(&[
        "run",
        "--checkpoint",
        &ckpt,
        "--layer",
        "1",
        "--input",
        &hidden_only,
        "--output",
        &q,
        "--quantize",
        "mxfp8",
    ]);
    let err = fails(&[
        "run",
        "--checkpoint",
        &ckpt,
        "--layer",
        "x",
        "--input",
        &hidden_only,
        "--output",
        &q,
    ]);
    assert!(err.contains("layer index"), "{err}");
    // `--layer-index` names a layer of a checkpoint only: clap's `requires` refuses it without
    // `--checkpoint`, a usage error (exit 2).
    let err = fails_usage(&[
        "run",
        "--layer-index",
        "1",
        "--input",
        &hidden_only,
        "--output",
        &q,
    ]);
    assert!(err.contains("--checkpoint"), "{err}");
    let err = fails(&[
        "convert",
        "--checkpoint",
        &ckpt,
        "--layer-index",
        "5",
        "--out",
        &q,
    ]);
    assert!(err.contains("num_hidden_layers"), "{err}");
}

/// `run --checkpoint --ep R / --tp R`: every rank reads only its slice (rank 0 in the main
/// thread, which also routes the hidden-only input), and the output is the unsplit run's: bit for
/// bit in all-to-all EP, within roundings for TP and TEP.
#[test]
fn run_checkpoint_split_over_ranks() {
    let (d, ckpt, _) = fixture("ckpt-split", 5, 6);
    let input = d.s("hidden.safetensors");
    let run = |name: &str, extra: &[&str]| {
        let o = d.s(name);
        let base = [
            "run",
            "--checkpoint",
            &ckpt,
            "--layer-index",
            "1",
            "--input",
            &input,
            "--output",
            &o,
            "--backend",
            "cpu",
        ];
        let text = ok(&[&base[..], extra].concat());
        (output(&o), text)
    };
    let (one, _) = run("one.safetensors", &[]);
    assert!(one.iter().any(|v| *v != 0.0));
    for ep in ["2", "4"] {
        let (out, text) = run("ep.safetensors", &["--ep", ep]);
        assert!(
            text.contains(&format!("× {ep} ranks through thread")),
            "{text}"
        );
        assert_eq!(out, one, "--ep {ep}");
    }
    for split in [&["--tp", "2"][..], &["--ep", "2", "--tp", "2"]] {
        let (out, _) = run("tp.safetensors", split);
        for (x, y) in out.iter().zip(&one) {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "{split:?}: {x} vs {y}"
            );
        }
        // Ranks as processes, each reading its own slice of the shards and the hidden-only input
        // (routed by its own copy of the router): the thread ranks' output, bit for bit.
        let (procs, text) = run(
            "proc.safetensors",
            &[split, &["--comm", "process"][..]].concat(),
        );
        assert!(text.contains("ranks through process"), "{text}");
        assert_eq!(procs, out, "{split:?} --comm process");
    }
    let (procs, _) = run("proc.safetensors", &["--ep", "2", "--comm", "process"]);
    assert_eq!(procs, one, "--ep 2 --comm process");

    // An expert map: each rank reads its experts from the checkpoint, as thread and as process
    // ranks (the same output bit for bit). Uneven all-to-all EP is the unsplit run bit for bit; with
    // a replica an expert's pairs split over two ranks, and the CPU computes a lone pair by another
    // kernel, so within roundings (docs/parallel.md, "Equal to one device").
    let close = |out: &[f32], what: &str| {
        for (x, y) in out.iter().zip(&one) {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "{what}: {x} vs {y}"
            );
        }
    };
    for (map, bitwise) in [
        (&["--ep", "3", "--expert-map", "0,1,1,2"][..], true),
        (&["--ep", "2", "--expert-map", "0+1,0,1,1"], false),
    ] {
        let (out, _) = run("map.safetensors", map);
        if bitwise {
            assert_eq!(out, one, "{map:?}");
        } else {
            close(&out, &format!("{map:?}"));
        }
        let (procs, _) = run(
            "map-proc.safetensors",
            &[map, &["--comm", "process"][..]].concat(),
        );
        assert_eq!(procs, out, "{map:?} --comm process");
    }
    let (tep, _) = run(
        "map-tep.safetensors",
        &["--ep", "2", "--tp", "2", "--expert-map", "0,1,1,0+1"],
    );
    close(&tep, "TEP with a map");
    let base = [
        "run",
        "--checkpoint",
        &ckpt,
        "--layer-index",
        "1",
        "--input",
        &input,
    ];
    let bad = d.s("bad.safetensors");
    let err = fails(
        &[
            &base[..],
            &["--output", &bad, "--ep", "2", "--expert-map", "0,0,1"],
        ]
        .concat(),
    );
    assert!(
        err.contains("--expert-map") && err.contains("3 entries"),
        "{err}"
    );
    assert!(!Path::new(&bad).exists(), "a refused run wrote {bad}");

    // Every rank quantizes at load into the same formats as rank 0 (`--activation-format`
    // included): EP ranks equal the unsplit run bit for bit.
    let q = ["--quantize", "mxfp4", "--activation-format", "mxfp8"];
    let (whole_q, _) = run("q.safetensors", &q);
    assert_ne!(whole_q, one);
    for extra in [&["--ep", "2"][..], &["--ep", "2", "--comm", "process"]] {
        let (split_q, _) = run("q-split.safetensors", &[&q[..], extra].concat());
        assert_eq!(split_q, whole_q, "{extra:?} with {q:?}");
    }
}
