//! The rules of ARCHITECTURE.md as data, and one checker per rule: a function over source files
//! given as (path, text), which returns one line per violation. The `#[test]`s in `main.rs` feed
//! them the real tree; the planted-violation tests below feed them a synthetic text that breaks
//! each rule once, so every rule provably bites.

use std::collections::{BTreeMap, BTreeSet};

use crate::source::{
    declared_modules, module_named, module_of, named_paths, resolve, strip, without_test_items,
};

pub const LINE_BUDGET: usize = 1200;

/// The library's top-level modules by layer, lowest first. A module imports from lower layers
/// only, and within its own layer only along [`SAME_LAYER`]; a module in no layer is a violation,
/// so a new module has to be placed here.
pub const LAYERS: &[(&str, &[&str])] = &[
    ("the error type", &["error"]),
    ("checked sizes and the memory budget", &["size"]),
    ("core types", &["config", "tensor", "rng", "clock"]),
    ("a layer's tensors", &["weights"]),
    (
        "formats, routing, activation",
        &["formats", "routing", "activation", "presets"],
    ),
    (
        "layer validation, forward-call checks",
        &["validate", "forward"],
    ),
    (
        "reference, loaders, slicing, synthesis, the dense linear layer",
        &[
            "reference",
            "shard",
            "synth",
            "layer_file",
            "checkpoint",
            "dense",
        ],
    ),
    ("backends", &["backend"]),
    ("runner", &["runner"]),
    (
        "drivers of the runner",
        &["bench", "random_cases", "parallel"],
    ),
];

/// The imports allowed inside one layer (importer, imported).
pub const SAME_LAYER: &[(&str, &str)] = &[
    // `InputFile: TryFrom<SynthInput>`: a synthesized input is written as an input file.
    ("layer_file", "synth"),
    // Checkpoint shards are safetensors files, mapped by the layer file's reader.
    ("checkpoint", "layer_file"),
    // A split bench row runs the whole layer over thread ranks (`bench --comm thread`).
    ("bench", "parallel"),
];

/// Imports that no layer order allows or forbids on its own: (importer prefix, imported prefix,
/// the invariant). A prefix matches a module and its descendants.
pub const FORBIDDEN: &[(&str, &str, &str)] = &[
    (
        "crate::backend::cpu",
        "crate::backend::cuda",
        "the CPU and CUDA backends never import each other",
    ),
    (
        "crate::backend::cuda",
        "crate::backend::cpu",
        "the CPU and CUDA backends never import each other",
    ),
    (
        "crate::layer_file",
        "crate::backend",
        "loaders never name a backend",
    ),
    (
        "crate::checkpoint",
        "crate::backend",
        "loaders never name a backend",
    ),
];

/// Modules whose children never import each other (the CLI's subcommands).
pub const INDEPENDENT_CHILDREN: &[&str] = &["crate::commands"];

/// One file of a crate: its path relative to the crate (`src/…`) and its text.
pub struct Source {
    pub rel: String,
    pub text: String,
}

impl Source {
    pub fn new(rel: &str, text: &str) -> Source {
        Source {
            rel: rel.to_string(),
            text: text.to_string(),
        }
    }
}

/// An import of module `to` by module `from` (a `use` item or a path in code) at `rel:line`.
#[derive(Debug)]
pub struct Edge {
    pub rel: String,
    pub line: usize,
    pub from: Vec<String>,
    pub to: Vec<String>,
}

impl Edge {
    fn at(&self) -> String {
        format!("{}:{}", self.rel, self.line)
    }
}

fn join(p: &[String]) -> String {
    p.join("::")
}

/// Every import between the modules of one crate's `.rs` sources, outside test items.
pub fn edges(sources: &[Source]) -> Vec<Edge> {
    let rust: Vec<&Source> = sources.iter().filter(|s| s.rel.ends_with(".rs")).collect();
    let modules: BTreeSet<Vec<String>> = rust.iter().map(|s| module_of(&s.rel)).collect();
    let code = |s: &Source| without_test_items(&strip(&s.text, false));
    // The crate root's `use` items are re-exports (`crate::Runner` is `crate::runner::Runner`).
    let mut reexports = BTreeMap::new();
    for s in rust.iter().filter(|s| module_of(&s.rel).len() == 1) {
        let (bindings, _) = bindings_of(&["crate".to_string()], &code(s));
        reexports.extend(bindings);
    }
    let mut out = Vec::new();
    for s in rust {
        let module = module_of(&s.rel);
        let text = code(s);
        let (bindings, children) = bindings_of(&module, &text);
        for named in named_paths(&text) {
            let Some(abs) = resolve(&module, &named.path, &bindings, &children) else {
                continue;
            };
            let to = module_named(&abs, &modules, &reexports);
            if to != module {
                out.push(Edge {
                    rel: s.rel.clone(),
                    line: named.line,
                    from: module.clone(),
                    to,
                });
            }
        }
    }
    out
}

/// The names a file's `use` items bind to absolute paths inside the crate, and its child modules.
fn bindings_of(module: &[String], text: &str) -> (BTreeMap<String, Vec<String>>, Vec<String>) {
    let children = declared_modules(text);
    let none = BTreeMap::new();
    let bindings = named_paths(text)
        .into_iter()
        .filter(|n| n.in_use_item)
        .filter_map(|n| {
            let abs = resolve(module, &n.path, &none, &children)?;
            Some((n.binds?, abs))
        })
        .collect();
    (bindings, children)
}

/// The top-level module of a module path (`crate::backend::cpu` → `backend`); None for the root.
fn top(m: &[String]) -> Option<&str> {
    m.get(1).map(String::as_str)
}

fn layer_of(name: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&name))
}

/// Dependencies point down: every import between top-level modules goes to a lower layer of
/// [`LAYERS`] or along [`SAME_LAYER`]. The crate root (declarations, re-exports) is exempt.
pub fn layer_violations(sources: &[Source]) -> Vec<String> {
    let mut bad = Vec::new();
    for s in sources.iter().filter(|s| s.rel.ends_with(".rs")) {
        if let Some(t) = top(&module_of(&s.rel)) {
            if layer_of(t).is_none() {
                bad.push(format!(
                    "{}: module crate::{t} is in no layer of LAYERS",
                    s.rel
                ));
            }
        }
    }
    for e in edges(sources) {
        let (Some(from), Some(to)) = (top(&e.from), top(&e.to)) else {
            continue;
        };
        let (Some(lf), Some(lt)) = (layer_of(from), layer_of(to)) else {
            continue;
        };
        if from == to || lt < lf || (lt == lf && SAME_LAYER.contains(&(from, to))) {
            continue;
        }
        let how = if lt == lf { "beside it" } else { "above it" };
        bad.push(format!(
            "{}: {} ({}) imports {} ({}, {how})",
            e.at(),
            join(&e.from),
            LAYERS[lf].0,
            join(&e.to),
            LAYERS[lt].0
        ));
    }
    bad.sort();
    bad.dedup();
    bad
}

fn under(m: &[String], prefix: &str) -> bool {
    let p: Vec<&str> = prefix.split("::").collect();
    m.len() >= p.len() && m.iter().zip(&p).all(|(a, b)| a == b)
}

/// No import of [`FORBIDDEN`], and no import between two children of an
/// [`INDEPENDENT_CHILDREN`] module.
pub fn forbidden_imports(sources: &[Source]) -> Vec<String> {
    let mut bad = Vec::new();
    for e in edges(sources) {
        for (from, to, why) in FORBIDDEN {
            if under(&e.from, from) && under(&e.to, to) {
                bad.push(format!(
                    "{}: {} imports {}: {why}",
                    e.at(),
                    join(&e.from),
                    join(&e.to)
                ));
            }
        }
        for parent in INDEPENDENT_CHILDREN {
            let depth = parent.split("::").count();
            if under(&e.from, parent)
                && under(&e.to, parent)
                && e.from.len() > depth
                && e.to.len() > depth
                && e.from[depth] != e.to[depth]
            {
                bad.push(format!(
                    "{}: {} imports {}: the children of {parent} never import each other",
                    e.at(),
                    join(&e.from),
                    join(&e.to)
                ));
            }
        }
    }
    bad.sort();
    bad.dedup();
    bad
}

/// No import circle between top-level modules: each group of modules that reach each other.
pub fn import_cycles(sources: &[Source]) -> Vec<String> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in edges(sources) {
        if let (Some(a), Some(b)) = (top(&e.from), top(&e.to)) {
            if a != b {
                graph.entry(a.into()).or_default().insert(b.into());
            }
        }
    }
    let reach = |start: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![start.to_string()];
        while let Some(n) = todo.pop() {
            for m in graph.get(&n).into_iter().flatten() {
                if seen.insert(m.clone()) {
                    todo.push(m.clone());
                }
            }
        }
        seen
    };
    let mut groups = BTreeSet::new();
    for a in graph.keys() {
        let from_a = reach(a);
        let group: BTreeSet<String> = from_a
            .iter()
            .filter(|b| reach(b).contains(a))
            .cloned()
            .collect();
        if !group.is_empty() {
            groups.insert(group);
        }
    }
    groups
        .into_iter()
        .map(|g| {
            let names: Vec<String> = g.into_iter().collect();
            format!("import circle between {}", names.join(", "))
        })
        .collect()
}

/// No `.unwrap()` or `.expect(` outside test items (comments and strings do not count).
pub fn unwrap_calls(s: &Source) -> Vec<String> {
    without_test_items(&strip(&s.text, false))
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(".unwrap()") || l.contains(".expect("))
        .map(|(i, _)| {
            let line = s.text.lines().nth(i).unwrap_or_default();
            format!("{}:{}: {}", s.rel, i + 1, line.trim())
        })
        .collect()
}

/// A source (`.rs`, `.cu`, `.cuh`) over [`LINE_BUDGET`] lines.
pub fn over_budget(s: &Source) -> Option<String> {
    let n = s.text.lines().count();
    (n > LINE_BUDGET).then(|| format!("{} has {n} lines (budget {LINE_BUDGET})", s.rel))
}

/// A test file prints "SKIPPED" only inside its `fn skip`, the helper that fails instead when the
/// run demands the hardware (`MOERUNNER_REQUIRE_GPU`, `MOERUNNER_REQUIRE_NVRTC`).
pub fn skips_outside_the_helper(s: &Source) -> Vec<String> {
    let text = strip(&s.text, true);
    let helper = text.find("fn skip(").map(|start| {
        let open = text[start..].find('{').map_or(text.len(), |o| start + o);
        let mut depth = 0;
        let mut end = text.len();
        for (i, ch) in text[open..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i;
                        break;
                    }
                }
                _ => {}
            }
        }
        (start, end)
    });
    let mut bad = Vec::new();
    if let Some((a, b)) = helper {
        if !text[a..b].contains("MOERUNNER_REQUIRE_") {
            bad.push(format!(
                "{}: fn skip never fails: it must honour MOERUNNER_REQUIRE_*",
                s.rel
            ));
        }
    }
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if let Some(k) = line.find("SKIPPED") {
            let at = offset + k;
            if !helper.is_some_and(|(a, b)| (a..b).contains(&at)) {
                bad.push(format!(
                    "{}:{}: a skip outside fn skip (MOERUNNER_REQUIRE_* could not fail it)",
                    s.rel,
                    i + 1
                ));
            }
        }
        offset += line.len();
    }
    bad
}

/// The GPU run script demands the GPU, so its tests cannot pass unrun.
pub fn gpu_run_requires_the_gpu(script: &str) -> Option<String> {
    let demands = script
        .lines()
        .any(|l| l.trim() == "export MOERUNNER_REQUIRE_GPU=1");
    (!demands).then(|| "scripts/gpu-run.sh does not export MOERUNNER_REQUIRE_GPU=1".to_string())
}

/// Every kernel header (a `.cuh` under `kernels/`, `headers` its paths relative to that folder) is
/// one of `kernels.rs`'s `HEADERS` or its prelude `COMMON` (else no translation unit pastes it: dead,
/// or an include NVRTC cannot find), and every GEMM piece (`gemm/*.cuh`) is named in docs/cuda.md's
/// table of pieces.
pub fn unlisted_kernel_headers(headers: &[String], kernels_rs: &str, cuda_md: &str) -> Vec<String> {
    let mut bad = Vec::new();
    for h in headers {
        let pasted = kernels_rs.contains(&format!("piece!(\"{h}\")"))
            || kernels_rs.contains(&format!("COMMON: &str = include_str!(\"kernels/{h}\")"));
        if !pasted {
            bad.push(format!("kernels/{h} is not in kernels.rs's HEADERS"));
        }
        if let Some(piece) = h.strip_prefix("gemm/") {
            if !cuda_md.contains(&format!("`{piece}`")) {
                bad.push(format!("kernels/{h} is not named in docs/cuda.md"));
            }
        }
    }
    bad
}

#[cfg(test)]
mod planted {
    //! One synthetic violation per rule, each reported; and the same text without it, clean.
    use super::*;

    fn lib(files: &[(&str, &str)]) -> Vec<Source> {
        files.iter().map(|(p, t)| Source::new(p, t)).collect()
    }

    #[test]
    fn an_upward_import_in_a_grouped_use_is_reported() {
        let text = "use crate::{\n    config::LayerConfig,\n    reference::{self, forward},\n};";
        let bad = layer_violations(&lib(&[
            ("src/formats/e4m3.rs", text),
            ("src/reference.rs", ""),
        ]));
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(
            bad[0].starts_with("src/formats/e4m3.rs:1: crate::formats::e4m3"),
            "{bad:?}"
        );
        assert!(bad[0].contains("imports crate::reference"), "{bad:?}");
        let ok = "use crate::{config::LayerConfig, error::Result};";
        assert_eq!(
            layer_violations(&lib(&[("src/formats/e4m3.rs", ok)])),
            [""; 0]
        );
    }

    #[test]
    fn an_upward_import_through_super_super_is_reported() {
        let bad = layer_violations(&lib(&[
            (
                "src/backend/cpu/forward.rs",
                "use super::super::super::runner::Runner;",
            ),
            ("src/runner.rs", ""),
        ]));
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(
            bad[0].contains("imports crate::runner (runner, above it)"),
            "{bad:?}"
        );
    }

    #[test]
    fn an_upward_path_in_code_and_through_a_root_re_export_is_reported() {
        let sources = lib(&[
            (
                "src/lib.rs",
                "pub mod runner;\npub use runner::{BackendChoice, Runner};",
            ),
            ("src/runner.rs", ""),
            (
                "src/reference.rs",
                "use crate::Runner;\nfn f() { let r = crate::runner::BackendChoice::Auto; }",
            ),
        ]);
        let bad = layer_violations(&sources);
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(
            bad[0].starts_with("src/reference.rs:1:") && bad[1].starts_with("src/reference.rs:2:")
        );
    }

    #[test]
    fn a_sideways_import_in_one_layer_is_reported_unless_listed() {
        let bad = layer_violations(&lib(&[
            ("src/routing/mod.rs", "use crate::formats::e4m3;"),
            ("src/formats/e4m3.rs", ""),
        ]));
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].contains("beside it"), "{bad:?}");
        let listed = layer_violations(&lib(&[
            (
                "src/checkpoint/shards.rs",
                "use crate::layer_file::MappedFile;",
            ),
            ("src/layer_file/mod.rs", ""),
        ]));
        assert!(listed.is_empty(), "{listed:?}");
    }

    #[test]
    fn a_module_in_no_layer_is_reported() {
        let bad = layer_violations(&lib(&[("src/newthing.rs", "")]));
        assert_eq!(
            bad,
            ["src/newthing.rs: module crate::newthing is in no layer of LAYERS"]
        );
    }

    #[test]
    fn the_cpu_and_cuda_backends_importing_each_other_are_reported() {
        let bad = forbidden_imports(&lib(&[
            (
                "src/backend/cpu/forward.rs",
                "use super::super::cuda::prepare::Dims;",
            ),
            (
                "src/backend/cuda/layer.rs",
                "fn f() { crate::backend::cpu::CpuBackend; }",
            ),
            ("src/backend/cuda/prepare.rs", ""),
            ("src/backend/cpu/mod.rs", ""),
        ]));
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(
            bad.iter().all(|b| b.contains("never import each other")),
            "{bad:?}"
        );
    }

    #[test]
    fn a_loader_naming_a_backend_is_reported() {
        let bad = forbidden_imports(&lib(&[
            (
                "src/checkpoint/qwen.rs",
                "use crate::backend::{self};\nfn f() { backend::cpu::x(); }",
            ),
            ("src/layer_file/io.rs", "use crate::backend::Backend as B;"),
            ("src/backend/mod.rs", ""),
            ("src/backend/cpu/mod.rs", ""),
        ]));
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert!(
            bad.iter()
                .all(|b| b.contains("loaders never name a backend")),
            "{bad:?}"
        );
    }

    #[test]
    fn a_subcommand_calling_another_is_reported() {
        let bad = forbidden_imports(&lib(&[
            (
                "src/commands/mod.rs",
                "pub mod run;\npub mod convert;\nfn shared() {}",
            ),
            (
                "src/commands/run.rs",
                "fn run() { super::convert::load(); super::shared(); }",
            ),
            ("src/commands/convert.rs", ""),
        ]));
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(
            bad[0].starts_with(
                "src/commands/run.rs:1: crate::commands::run imports crate::commands::convert"
            ),
            "{bad:?}"
        );
    }

    #[test]
    fn an_import_circle_is_reported() {
        let sources = lib(&[
            (
                "src/weights.rs",
                "fn new() { crate::validate::validate_layer(); }",
            ),
            (
                "src/validate.rs",
                "use crate::weights::{LayerWeights, MoeLayer};",
            ),
            ("src/config.rs", ""),
        ]);
        assert_eq!(
            import_cycles(&sources),
            ["import circle between validate, weights"]
        );
        assert!(import_cycles(&sources[1..]).is_empty());
    }

    #[test]
    fn unwrap_and_expect_in_library_code_are_reported_but_not_in_comments_strings_or_tests() {
        let text =
            "fn f() {\n    // x.unwrap()\n    let s = \".expect(\";\n    y.expect(\"y\");\n}\n\
                    #[cfg(test)]\nmod tests { fn t() { z.unwrap(); } }\nfn g() { w.unwrap() }\n";
        let bad = unwrap_calls(&Source::new("src/a.rs", text));
        assert_eq!(
            bad,
            [
                "src/a.rs:4: y.expect(\"y\");",
                "src/a.rs:8: fn g() { w.unwrap() }"
            ]
        );
    }

    #[test]
    fn an_unlisted_or_undocumented_kernel_header_is_reported() {
        let headers = ["quant_rows.cuh".to_string(), "gemm/loads.cuh".to_string()];
        let rs = "piece!(\"quant_rows.cuh\"), piece!(\"gemm/loads.cuh\")";
        let md = "| `loads.cuh` | one stage's loads |";
        assert!(unlisted_kernel_headers(&headers, rs, md).is_empty());
        assert_eq!(
            unlisted_kernel_headers(&headers, "piece!(\"quant_rows.cuh\")", "loads.cuh"),
            [
                "kernels/gemm/loads.cuh is not in kernels.rs's HEADERS",
                "kernels/gemm/loads.cuh is not named in docs/cuda.md"
            ]
        );
    }

    #[test]
    fn a_kernel_source_over_the_budget_is_reported() {
        let long = "// line\n".repeat(LINE_BUDGET + 1);
        let bad = over_budget(&Source::new("src/backend/cuda/kernels/k.cu", &long));
        assert!(bad.is_some_and(|b| b.contains("k.cu has 1201 lines")));
        assert!(over_budget(&Source::new("src/k.cuh", &long[8..])).is_none());
    }

    #[test]
    fn a_skip_outside_the_helper_or_a_helper_that_cannot_fail_is_reported() {
        let helper = "fn skip(reason: &str) {\n    \
                      assert!(std::env::var(\"MOERUNNER_REQUIRE_GPU\").is_err());\n    \
                      println!(\"SKIPPED: {reason}\");\n}\n";
        let good = format!("{helper}fn t() {{ skip(\"no GPU\"); }}");
        assert!(skips_outside_the_helper(&Source::new("tests/g.rs", &good)).is_empty());
        let stray = format!("{good}\nfn u() {{ println!(\"SKIPPED: no GPU\"); return; }}");
        let bad = skips_outside_the_helper(&Source::new("tests/g.rs", &stray));
        assert_eq!(
            bad,
            ["tests/g.rs:6: a skip outside fn skip (MOERUNNER_REQUIRE_* could not fail it)"]
        );
        let weak = "fn skip(reason: &str) {\n    println!(\"SKIPPED: {reason}\");\n}\n";
        let bad = skips_outside_the_helper(&Source::new("tests/g.rs", weak));
        assert_eq!(bad.len(), 1, "{bad:?}");
    }

    #[test]
    fn a_gpu_run_that_does_not_demand_the_gpu_is_reported() {
        assert!(gpu_run_requires_the_gpu("set -u\n# export MOERUNNER_REQUIRE_GPU=1\n").is_some());
        assert!(gpu_run_requires_the_gpu("set -u\nexport MOERUNNER_REQUIRE_GPU=1\n").is_none());
    }
}
