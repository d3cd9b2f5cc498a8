//! Architecture invariants as tests (ARCHITECTURE.md, "Invariants"), over the crates' sources,
//! `.cu`/`.cuh` included: no `unwrap()`/`expect()` in library code (the library and the Python
//! extension, where a panic would surface in the interpreter); no source over the line
//! budget; imports, parsed from real `use` items and paths in code, point down the layers of
//! `rules::LAYERS` for every module, never form a circle, never join the CPU and CUDA backends,
//! never take a loader to a backend, never join two CLI subcommands; GPU tests skip only through
//! a helper that `MOERUNNER_REQUIRE_GPU=1` turns into a failure, which `scripts/gpu-run.sh` sets;
//! every kernel header is pasted by `kernels.rs` and every GEMM piece named in docs/cuda.md.
//!
//! Each rule is a function over (path, text) in `rules.rs`, with a planted violation beside it.

mod cuda;
mod rules;
mod source;

use std::fs;
use std::path::{Path, PathBuf};

use rules::Source;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The files under `crate_dir/sub` whose extension is one of `exts`, relative to `crate_dir`,
/// in a stable order.
fn files(crate_dir: &Path, sub: &str, exts: &[&str]) -> Vec<Source> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .expect("dir readable")
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut paths = Vec::new();
    walk(&crate_dir.join(sub), &mut paths);
    paths
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| exts.iter().any(|x| e == *x)))
        .map(|p| {
            let rel = p.strip_prefix(crate_dir).expect("under the crate");
            let rel = rel.to_string_lossy().replace('\\', "/");
            Source::new(&rel, &fs::read_to_string(&p).expect("source readable"))
        })
        .collect()
}

fn library() -> Vec<Source> {
    files(Path::new(env!("CARGO_MANIFEST_DIR")), "src", &["rs"])
}

fn cli() -> Vec<Source> {
    files(&repo().join("crates/moerunner-cli"), "src", &["rs"])
}

/// The Python extension's Rust sources (`crates/moerunner-py`): library code under the same rules.
fn python_extension() -> Vec<Source> {
    files(&repo().join("crates/moerunner-py"), "src", &["rs"])
}

fn check(what: &str, bad: Vec<String>) {
    assert!(bad.is_empty(), "{what}:\n{}", bad.join("\n"));
}

#[test]
fn library_code_has_no_unwrap_or_expect() {
    let mut sources = library();
    sources.extend(python_extension());
    assert!(!python_extension().is_empty());
    let bad = sources.iter().flat_map(rules::unwrap_calls).collect();
    check("library code must return errors, not unwrap", bad);
}

#[test]
fn no_source_over_the_line_budget() {
    let mut sources = files(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "src",
        &["rs", "cu", "cuh"],
    );
    sources.extend(cli());
    sources.extend(python_extension());
    assert!(sources.iter().any(|s| s.rel.ends_with(".cu")));
    let bad = sources.iter().filter_map(rules::over_budget).collect();
    check("split these sources", bad);
}

#[test]
fn library_dependencies_point_down_the_layers() {
    check(
        "imports against the layers",
        rules::layer_violations(&library()),
    );
}

#[test]
fn no_forbidden_imports() {
    let mut bad = rules::forbidden_imports(&library());
    bad.extend(rules::forbidden_imports(&cli()));
    check("forbidden imports", bad);
}

#[test]
fn no_import_circles() {
    let mut bad = rules::import_cycles(&library());
    bad.extend(rules::import_cycles(&cli()));
    check("import circles", bad);
}

#[test]
fn gpu_tests_skip_only_through_the_helper_and_gpu_runs_demand_the_gpu() {
    let mut tests = files(Path::new(env!("CARGO_MANIFEST_DIR")), "tests", &["rs"]);
    tests.extend(files(
        &repo().join("crates/moerunner-cli"),
        "tests",
        &["rs"],
    ));
    // (tidy's own sources hold planted skips.)
    tests.retain(|s| !s.rel.starts_with("tests/tidy/"));
    let mut bad: Vec<String> = tests
        .iter()
        .flat_map(rules::skips_outside_the_helper)
        .collect();
    let script = fs::read_to_string(repo().join("scripts/gpu-run.sh")).expect("gpu-run.sh");
    bad.extend(rules::gpu_run_requires_the_gpu(&script));
    check("GPU tests that could pass unrun", bad);
}

#[test]
fn every_kernel_source_defines_kernels_and_common_cuh_none() {
    let sources = files(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "src/backend/cuda/kernels",
        &["cu", "cuh"],
    );
    assert!(!sources.is_empty());
    for s in &sources {
        let names: Vec<String> = cuda::kernels(&s.text).into_iter().map(|k| k.name).collect();
        assert_eq!(
            names.is_empty(),
            s.rel.ends_with(".cuh"),
            "{}: kernels {names:?}",
            s.rel
        );
    }
}

#[test]
fn every_kernel_header_is_pasted_and_every_gemm_piece_documented() {
    let dir = "src/backend/cuda/kernels";
    let headers: Vec<String> = files(Path::new(env!("CARGO_MANIFEST_DIR")), dir, &["cuh"])
        .into_iter()
        .map(|s| {
            s.rel
                .trim_start_matches(dir)
                .trim_start_matches('/')
                .to_string()
        })
        .collect();
    assert!(
        headers.iter().any(|h| h.starts_with("gemm/")),
        "{headers:?}"
    );
    let kernels_rs = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/backend/cuda/kernels.rs"),
    )
    .expect("kernels.rs");
    let cuda_md = fs::read_to_string(repo().join("docs/cuda.md")).expect("docs/cuda.md");
    check(
        "kernel headers no translation unit pastes or docs/cuda.md does not name",
        rules::unlisted_kernel_headers(&headers, &kernels_rs, &cuda_md),
    );
}
