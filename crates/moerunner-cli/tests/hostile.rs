//! Issue 11, one test per finding: hostile and absurd files, checkpoints and arguments are refused
//! cleanly (exit 1, an error naming the tensor, key, file or flag), never a panic, a hang, an
//! unbounded allocation, a replaced input or a silent NaN. `fuzz.rs` covers the same ground at
//! random; these pin each finding down.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use moerunner::layer_file;
use moerunner::HostTensor;
use serde_json::json;

/// A small bf16 layer and a 3-token input in `d`.
fn layer_and_input(d: &TempDir) -> (String, String) {
    let (l, i) = (d.s("l.safetensors"), d.s("in.safetensors"));
    ok(&[
        "make-layer",
        "--out",
        &l,
        "--experts",
        "4",
        "--hidden",
        "64",
        "--intermediate",
        "32",
        "--top-k",
        "2",
    ]);
    ok(&["make-input", "--layer", &l, "--out", &i, "--tokens", "3"]);
    (l, i)
}

// 1. Panics ------------------------------------------------------------------------------------

#[test]
fn gpt_oss_swiglu_limit_must_be_positive_on_both_paths() {
    let d = TempDir::new("limit");
    for (limit, accepted) in [
        (json!(-1.0), false),
        (json!(0.0), false),
        (json!(7.0), true),
    ] {
        let mut c = gpt_oss(4, 64, 64);
        c.set("swiglu_limit", limit.clone());
        let dir = d.path(&format!("ckpt{limit}"));
        c.write(&dir);
        let out = d.s(&format!("out{limit}.safetensors"));
        let args = [
            "convert",
            "--checkpoint",
            dir.to_str().unwrap(),
            "--layer",
            "1",
            "--out",
            &out,
        ];
        if accepted {
            ok(&args);
            // What convert writes, moerunner reads.
            ok(&[
                "make-input",
                "--layer",
                &out,
                "--out",
                &d.s("in.safetensors"),
                "--tokens",
                "2",
            ]);
            ok(&[
                "run",
                "--layer",
                &out,
                "--input",
                &d.s("in.safetensors"),
                "--output",
                &d.s("o.safetensors"),
            ]);
        } else {
            let e = fails(&args);
            assert!(e.contains("swiglu_limit") && e.contains("positive"), "{e}");
        }
    }
}

#[test]
fn sizes_beyond_usize_are_refused() {
    let d = TempDir::new("huge");
    let (l, _) = layer_and_input(&d);
    let max = u64::MAX.to_string();
    let out = d.s("x.safetensors");
    let e = fails(&[
        "make-layer",
        "--out",
        &out,
        "--experts",
        "4",
        "--hidden",
        &max,
        "--intermediate",
        "32",
        "--top-k",
        "2",
    ]);
    assert!(e.contains("overflows"), "{e}");
    let e = fails(&["make-input", "--layer", &l, "--out", &out, "--tokens", &max]);
    assert!(e.contains("--tokens") && e.contains("bytes"), "{e}");
    let e = fails(&["bench", "--tokens", &max, "--iters", "1"]);
    assert!(e.contains("--tokens") && e.contains("bytes"), "{e}");
}

// 2. Inputs destroyed ----------------------------------------------------------------------------

#[test]
fn run_output_never_replaces_an_input() {
    let d = TempDir::new("alias-run");
    let (l, i) = layer_and_input(&d);
    let (lb, ib) = (std::fs::read(&l).unwrap(), std::fs::read(&i).unwrap());
    // The same file by name, by another spelling, by a hard link and by a symlink.
    std::fs::hard_link(&i, d.path("hard.safetensors")).unwrap();
    std::os::unix::fs::symlink(&l, d.path("sym.safetensors")).unwrap();
    let dotted = format!("{}/./l.safetensors", d.0.display());
    for out in [
        i.clone(),
        l.clone(),
        dotted,
        d.s("hard.safetensors"),
        d.s("sym.safetensors"),
    ] {
        let e = fails(&["run", "--layer", &l, "--input", &i, "--output", &out]);
        assert!(e.contains("same file as"), "{e}");
    }
    let e = fails(&["make-input", "--layer", &l, "--out", &l, "--tokens", "1"]);
    assert!(e.contains("same file as --layer"), "{e}");
    assert_eq!(std::fs::read(&l).unwrap(), lb);
    assert_eq!(std::fs::read(&i).unwrap(), ib);
}

#[test]
fn convert_out_never_replaces_a_checkpoint_file() {
    let d = TempDir::new("alias-convert");
    let dir = d.path("ckpt");
    qwen(4, 64, 32, 2).write(&dir);
    let names = [
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let before: Vec<Vec<u8>> = names
        .iter()
        .map(|n| std::fs::read(dir.join(n)).unwrap())
        .collect();
    for n in names {
        let out = dir.join(n).display().to_string();
        let e = fails(&[
            "convert",
            "--checkpoint",
            dir.to_str().unwrap(),
            "--layer",
            "1",
            "--out",
            &out,
        ]);
        assert!(e.contains("same file as the checkpoint's"), "{n}: {e}");
        let e = fails(&[
            "run",
            "--checkpoint",
            dir.to_str().unwrap(),
            "--layer",
            "1",
            "--input",
            &out,
            "--output",
            &out,
        ]);
        assert!(e.contains("same file as"), "{n}: {e}");
    }
    for (n, b) in names.iter().zip(before) {
        assert_eq!(std::fs::read(dir.join(n)).unwrap(), b, "{n} changed");
    }
}

// 3. Unbounded memory ------------------------------------------------------------------------------

#[test]
fn memory_budget_refuses_before_allocating_and_names_the_flags() {
    let d = TempDir::new("budget");
    let out = d.s("x.safetensors");
    let e = fails(&[
        "make-layer",
        "--out",
        &out,
        "--experts",
        "100000",
        "--hidden",
        "100000",
        "--intermediate",
        "100000",
        "--top-k",
        "2",
    ]);
    assert!(
        e.contains("bytes") && e.contains("--experts 100000 --hidden 100000"),
        "{e}"
    );
    let e = fails(&[
        "make-layer",
        "--out",
        &out,
        "--experts",
        "4611686018427387904",
        "--hidden",
        "64",
        "--intermediate",
        "32",
        "--top-k",
        "2",
    ]);
    assert!(e.contains("overflows"), "{e}");
    // A layer that fits the machine but not the budget given.
    let args = [
        "make-layer",
        "--out",
        &out,
        "--experts",
        "64",
        "--hidden",
        "256",
        "--intermediate",
        "256",
        "--top-k",
        "2",
    ];
    let e = fails(&[&["--memory-budget", "1M"][..], &args].concat());
    assert!(
        e.contains("1048576 bytes") && e.contains("--memory-budget"),
        "{e}"
    );
    let o = bin()
        .args(args)
        .env("MOERUNNER_MEMORY_BUDGET", "2M")
        .output()
        .unwrap();
    assert!(!o.status.success() && text(&o).contains("MOERUNNER_MEMORY_BUDGET"));
    ok(&[&["--memory-budget", "1G"][..], &args].concat());
    assert!(!std::path::Path::new(&out).with_extension("").exists());
    // Presets too, and make-input's tokens.
    let e = fails(&[
        "--memory-budget",
        "64M",
        "make-layer",
        "--out",
        &out,
        "--preset",
        "deepseek-v3",
    ]);
    assert!(e.contains("--preset deepseek-v3"), "{e}");
    let e = fails(&[
        "--memory-budget",
        "1M",
        "make-input",
        "--preset",
        "qwen3-30b-a3b",
        "--out",
        &out,
        "--tokens",
        "100000",
    ]);
    assert!(e.contains("--tokens 100000"), "{e}");
}

#[test]
fn bench_json_path_is_checked_before_the_benchmark() {
    let started = Instant::now();
    let e = fails(&["bench", "--json", "no-such-dir-here/x.json"]);
    assert!(
        e.contains("--json") && e.contains("no-such-dir-here"),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

// 4. Values dropped or misread -----------------------------------------------------------------------

#[test]
fn nan_or_negative_modelopt_input_scale_is_refused() {
    let d = TempDir::new("input-scale");
    for (k, bad) in [f32::NAN, -1.0, 0.0].into_iter().enumerate() {
        let mut c = nemotron_nvfp4(4, 64, 64);
        let name = "backbone.layers.3.mixer.experts.2.down_proj.input_scale";
        c.replace(name, HostTensor::from_f32(vec![], &[bad]));
        let dir = d.path(&format!("c{k}"));
        c.write(&dir);
        let e = fails(&[
            "convert",
            "--checkpoint",
            dir.to_str().unwrap(),
            "--layer",
            "3",
            "--out",
            &d.s("o"),
        ]);
        assert!(e.contains(name) && e.contains("finite and positive"), "{e}");
    }
}

#[test]
fn non_string_layers_block_type_entry_is_refused_not_skipped() {
    let d = TempDir::new("block-type");
    let mut c = nemotron_nvfp4(4, 64, 64);
    c.config
        .as_object_mut()
        .unwrap()
        .remove("hybrid_override_pattern");
    // Skipping the 7 would make layer 3 read as `moe`.
    c.set(
        "layers_block_type",
        json!(["mamba", 7, "mamba", "moe", "attention"]),
    );
    c.write(&d.0);
    let e = fails(&[
        "convert",
        "--checkpoint",
        &d.s(""),
        "--layer",
        "3",
        "--out",
        &d.s("o"),
    ]);
    assert!(
        e.contains("layers_block_type") && e.contains("entry 1"),
        "{e}"
    );
}

#[test]
fn rank_out_of_range_is_refused_for_a_layer_file() {
    let d = TempDir::new("rank");
    let (l, i) = layer_and_input(&d);
    for (flags, name) in [
        (["--ep-size", "1", "--ep-rank", "3"], "ep_rank"),
        (["--tp-size", "2", "--tp-rank", "2"], "tp_rank"),
    ] {
        let e = fails(
            &[
                &["run", "--layer", &l, "--input", &i, "--output", &d.s("o")][..],
                &flags,
            ]
            .concat(),
        );
        assert!(e.contains(name) && e.contains("out of range"), "{e}");
    }
}

// 5. Silent NaN (the library's tests/overflow.rs covers every backend) ----------------------------

#[test]
fn overflowing_hidden_states_are_an_error_naming_the_token() {
    let d = TempDir::new("overflow");
    let (l, _) = layer_and_input(&d);
    let x: Vec<f32> = (0..3 * 64)
        .map(|j| if j / 64 == 1 { 1e30 } else { 0.5 })
        .collect();
    let input = d.s("big.safetensors");
    let routed = vec![0i32, 1, 1, 2, 2, 3];
    layer_file::write_tensors(
        std::path::Path::new(&input),
        &[
            (
                "hidden_states".into(),
                HostTensor::from_f32(vec![3, 64], &x),
            ),
            ("topk_ids".into(), HostTensor::from_i32(vec![3, 2], &routed)),
            (
                "topk_weights".into(),
                HostTensor::from_f32(vec![3, 2], &[0.5; 6]),
            ),
        ],
        HashMap::new(),
    )
    .unwrap();
    for backend in ["cpu", "reference"] {
        let out = d.s(&format!("o-{backend}"));
        let e = fails(&[
            "run",
            "--layer",
            &l,
            "--input",
            &input,
            "--output",
            &out,
            "--backend",
            backend,
        ]);
        assert!(
            e.contains("token 1") && e.contains("overflow"),
            "{backend}: {e}"
        );
        assert!(!std::path::Path::new(&out).exists());
    }
}

// 6. Security -------------------------------------------------------------------------------------

#[test]
fn index_shard_paths_that_leave_the_folder_are_refused() {
    let d = TempDir::new("traversal");
    let dir = d.path("ckpt");
    qwen(2, 32, 32, 1).write(&dir);
    let index = dir.join("model.safetensors.index.json");
    let outside = d.path("outside.safetensors");
    std::fs::copy(dir.join("model-00001-of-00002.safetensors"), &outside).unwrap();
    for bad in [
        outside.display().to_string(),
        "../outside.safetensors".into(),
        "sub/../../outside.safetensors".into(),
    ] {
        let mut j: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
        for v in j["weight_map"].as_object_mut().unwrap().values_mut() {
            *v = json!(bad);
        }
        std::fs::write(&index, j.to_string()).unwrap();
        let e = fails(&[
            "convert",
            "--checkpoint",
            dir.to_str().unwrap(),
            "--layer",
            "1",
            "--out",
            &d.s("o"),
        ]);
        assert!(
            e.contains("leaves the model folder") && e.contains("weight_map"),
            "{bad}: {e}"
        );
    }
}

// 7. Lesser --------------------------------------------------------------------------------------

#[test]
fn fifo_or_directory_as_a_file_is_refused_at_once() {
    let d = TempDir::new("fifo");
    let (l, i) = layer_and_input(&d);
    let fifo = d.s("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let started = Instant::now();
    let e = fails(&[
        "run",
        "--layer",
        &fifo,
        "--input",
        &i,
        "--output",
        &d.s("o"),
    ]);
    assert!(e.contains("not a regular file"), "{e}");
    let e = fails(&[
        "run",
        "--layer",
        &l,
        "--input",
        &fifo,
        "--output",
        &d.s("o"),
    ]);
    assert!(e.contains("not a regular file"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let e = fails(&[
        "run",
        "--layer",
        &d.s(""),
        "--input",
        &i,
        "--output",
        &d.s("o"),
    ]);
    assert!(
        e.contains("is a directory") && !e.contains("os error 19"),
        "{e}"
    );
}

#[test]
fn stale_temp_files_of_dead_writers_are_removed() {
    let d = TempDir::new("stale");
    let (l, i) = layer_and_input(&d);
    // A writer killed mid-write: its pid no longer exists (pids stay below 2^22 on Linux).
    let stale = d.path(".moerunner-4194999-0.tmp");
    std::fs::write(&stale, b"half a file").unwrap();
    // A live writer's temp (this process) is left alone.
    let live = d.path(&format!(".moerunner-{}-0.tmp", std::process::id()));
    std::fs::write(&live, b"in progress").unwrap();
    ok(&[
        "run",
        "--layer",
        &l,
        "--input",
        &i,
        "--output",
        &d.s("o.safetensors"),
    ]);
    assert!(!stale.exists() && live.exists());
}

#[test]
fn a_legal_253_byte_output_name_is_written() {
    let d = TempDir::new("long");
    let (l, i) = layer_and_input(&d);
    let out = d.s(&"a".repeat(253));
    ok(&["run", "--layer", &l, "--input", &i, "--output", &out]);
    assert!(std::path::Path::new(&out).is_file());
}

#[test]
fn negative_routed_scaling_factor_is_a_value_not_a_flag() {
    let d = TempDir::new("rsf");
    let out = d.s("l.safetensors");
    ok(&[
        "make-layer",
        "--out",
        &out,
        "--experts",
        "8",
        "--hidden",
        "64",
        "--intermediate",
        "32",
        "--top-k",
        "2",
        "--routing",
        "deepseek_v3",
        "--routed-scaling-factor",
        "-2.5",
    ]);
    let info = layer_file::read_layer_header(std::path::Path::new(&out)).unwrap();
    assert_eq!(info.routing.routed_scaling_factor, -2.5);
}

// 8. Unclear messages ----------------------------------------------------------------------------

#[test]
fn safetensors_errors_name_the_tensor() {
    let d = TempDir::new("st-msg");
    let (l, i) = layer_and_input(&d);
    // Offsets that tile the data but a shape that needs more bytes than they hold.
    let header = br#"{"hidden_states":{"dtype":"F32","shape":[4,64],"data_offsets":[0,8]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0; 8]);
    std::fs::write(d.path("bad.safetensors"), bytes).unwrap();
    let e = fails(&[
        "run",
        "--layer",
        &l,
        "--input",
        &d.s("bad.safetensors"),
        "--output",
        &d.s("o"),
    ]);
    assert!(
        e.contains("`hidden_states`") && e.contains("1024 bytes"),
        "{e}"
    );
    let _ = i;
}

#[test]
fn checkpoint_messages_use_the_checkpoints_names() {
    let d = TempDir::new("ckpt-msg");
    let convert = |dir: &std::path::Path, layer: &str| {
        fails(&[
            "convert",
            "--checkpoint",
            dir.to_str().unwrap(),
            "--layer",
            layer,
            "--out",
            &d.s("o"),
        ])
    };
    // JSON errors are JSON errors.
    let dir = d.path("json");
    qwen(2, 32, 32, 1).write(&dir);
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let e = convert(&dir, "1");
    assert!(
        e.contains("config.json: not valid JSON") && !e.contains("safetensors"),
        "{e}"
    );
    qwen(2, 32, 32, 1).write(&dir);
    std::fs::write(dir.join("model.safetensors.index.json"), "[1,").unwrap();
    let e = convert(&dir, "1");
    assert!(e.contains("index.json: not valid JSON"), "{e}");
    // Keys and tensors by the checkpoint's names.
    let dir = d.path("topk");
    qwen(2, 32, 32, 3).write(&dir);
    let e = convert(&dir, "1");
    assert!(
        e.contains("num_experts_per_tok") && !e.contains("top_k"),
        "{e}"
    );
    let dir = d.path("g2");
    let mut c = nemotron_nvfp4(4, 64, 64);
    let name = "backbone.layers.3.mixer.experts.2.down_proj.weight_scale_2";
    c.replace(name, HostTensor::from_f32(vec![], &[f32::NAN]));
    c.write(&dir);
    let e = convert(&dir, "3");
    assert!(e.contains(name) && !e.contains("w2_global_scale"), "{e}");
    // Logits from the checkpoint's router that overflow are the router's, not the user's.
    let dir = d.path("router");
    qwen(2, 32, 32, 1).write(&dir);
    let h = d.path("h.safetensors");
    // Every element 3e38 with the sign of router row 0's weight: its dot product overflows f32.
    let signs = values(2 * 32, 99);
    let x: Vec<f32> = (0..2 * 32)
        .map(|j| 3e38f32.copysign(signs[j % 32]))
        .collect();
    hidden_only(&h, 2, 32, &x);
    let e = fails(&[
        "run",
        "--checkpoint",
        dir.to_str().unwrap(),
        "--layer",
        "1",
        "--input",
        h.to_str().unwrap(),
        "--output",
        &d.s("o"),
    ]);
    assert!(
        e.contains("checkpoint's router") && !e.contains("`router_logits`"),
        "{e}"
    );
}

#[test]
fn io_errors_print_their_cause_once() {
    let d = TempDir::new("io-once");
    let e = fails(&[
        "run",
        "--layer",
        &d.s("missing"),
        "--input",
        &d.s("x"),
        "--output",
        &d.s("o"),
    ]);
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
}
