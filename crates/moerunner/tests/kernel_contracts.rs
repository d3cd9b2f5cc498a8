//! The CUDA kernels' contracts, checked on any machine (no GPU, no NVRTC): every
//! `extern "C" __global__` entry of every `.cu` has a launcher (`kernels/<stem>.rs`) whose argument
//! struct matches its parameter list (names, C types, order); every entry launched with PDL calls
//! `pdl_wait()`; every entry is exercised by a GPU check. Each rule is also shown to bite on a
//! planted violation.

use std::path::Path;

use moerunner::backend::cuda::kernels::{self, Signature, Source};

/// One `extern "C" __global__` function of a source: name, (name, type) parameters, body.
#[derive(Debug)]
struct Entry {
    name: String,
    params: Vec<(String, String)>,
    body: String,
}

/// The text without `//` and `/* */` comments (string literals in kernels hold no comment markers).
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("//") {
            rest = r.find('\n').map_or("", |i| &r[i..]);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map_or("", |i| &r[i + 2..]);
        } else {
            let c = rest.chars().next().unwrap_or(' ');
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// The text between the bracket at `open` and its match, and the index after the match.
fn balanced(text: &str, open: usize, (l, r): (char, char)) -> Option<(String, usize)> {
    let mut depth = 0usize;
    for (i, c) in text[open..].char_indices() {
        if c == l {
            depth += 1;
        } else if c == r {
            depth -= 1;
            if depth == 0 {
                return Some((text[open + 1..open + i].to_string(), open + i + 1));
            }
        }
    }
    None
}

/// `const u8* __restrict__ w` → ("w", "const u8*").
fn parse_param(decl: &str) -> (String, String) {
    let decl = decl.replace("__restrict__", " ").replace('*', " * ");
    let words: Vec<&str> = decl.split_whitespace().collect();
    let (name, ty) = words.split_last().unwrap_or((&"", &[]));
    let ty = ty.join(" ").replace(" *", "*");
    (name.to_string(), ty)
}

fn global_entries(source_text: &str) -> Vec<Entry> {
    const MARK: &str = "extern \"C\" __global__";
    let text = strip_comments(source_text);
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find(MARK) {
        let mut i = from + at + MARK.len();
        let head_end = text[i..]
            .find('(')
            .map(|j| i + j)
            .expect("a parameter list");
        // `void __launch_bounds__(...) name(`: skip the launch bounds' parentheses.
        let mut open = head_end;
        if text[i..head_end].contains("__launch_bounds__") {
            let (_, after) = balanced(&text, head_end, ('(', ')')).expect("launch bounds");
            open = after + text[after..].find('(').expect("a parameter list");
            i = after;
        }
        let name = text[i..open]
            .split_whitespace()
            .last()
            .unwrap_or("")
            .to_string();
        let (params, after) = balanced(&text, open, ('(', ')')).expect("closed parameters");
        let body_open = after + text[after..].find('{').expect("a body");
        let (body, end) = balanced(&text, body_open, ('{', '}')).expect("closed body");
        let params = params
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(parse_param)
            .collect();
        out.push(Entry { name, params, body });
        from = end;
    }
    out
}

/// Every violation of the contracts between `sources` ((source, text) pairs), `signatures` and the
/// GPU checks' text.
fn violations(
    sources: &[(Source, String)],
    signatures: &[Signature],
    gpu_checks: &str,
) -> Vec<String> {
    let mut bad = Vec::new();
    for (source, text) in sources {
        for entry in global_entries(text) {
            let Some(sig) = signatures
                .iter()
                .find(|s| s.source == *source && s.entry == entry.name)
            else {
                bad.push(format!(
                    "{}.cu: `{}` has no launcher",
                    source.name(),
                    entry.name
                ));
                continue;
            };
            let want: Vec<(String, String)> = sig
                .params
                .iter()
                .map(|(n, t)| (n.to_string(), t.clone()))
                .collect();
            if want != entry.params {
                bad.push(format!(
                    "{}.cu: `{}` declares {:?} but its launcher passes {:?}",
                    source.name(),
                    entry.name,
                    entry.params,
                    want
                ));
            }
            if sig.pdl && !entry.body.contains("pdl_wait()") {
                bad.push(format!(
                    "{}.cu: `{}` is launched with PDL but never calls pdl_wait()",
                    source.name(),
                    entry.name
                ));
            }
            if !gpu_checks.contains(&entry.name) {
                bad.push(format!(
                    "{}.cu: `{}` is not exercised by any GPU check",
                    source.name(),
                    entry.name
                ));
            }
        }
    }
    for sig in signatures {
        let declared = sources
            .iter()
            .filter(|(s, _)| *s == sig.source)
            .any(|(_, text)| global_entries(text).iter().any(|e| e.name == sig.entry));
        if !declared {
            bad.push(format!(
                "launcher of `{}` names no entry of {}.cu",
                sig.entry,
                sig.source.name()
            ));
        }
    }
    bad
}

fn gpu_checks_text() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut text = std::fs::read_to_string(root.join("crates/moerunner/tests/cuda.rs"))
        .expect("tests/cuda.rs readable");
    for entry in std::fs::read_dir(root.join("scripts/gpu")).expect("scripts/gpu readable") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("check_") && name.ends_with(".py") {
            text.push_str(&std::fs::read_to_string(&path).expect("script readable"));
        }
    }
    text
}

fn real_sources() -> Vec<(Source, String)> {
    Source::ALL
        .iter()
        .map(|s| (*s, s.text().to_string()))
        .collect()
}

#[test]
fn every_kernel_entry_matches_its_launcher() {
    let sources = real_sources();
    let entries: usize = sources.iter().map(|(_, t)| global_entries(t).len()).sum();
    assert_eq!(
        entries,
        kernels::signatures().len(),
        "every entry has exactly one launcher"
    );
    let bad = violations(&sources, &kernels::signatures(), &gpu_checks_text());
    assert!(
        bad.is_empty(),
        "kernel contracts broken:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_parser_reads_launch_bounds_restrict_and_comments() {
    let text = "// extern \"C\" __global__ void commented(int x) {}\n\
                extern \"C\" __global__ void __launch_bounds__(MG_NTHREADS, 1) k(\n\
                const u8* __restrict__ w, /* rows */ int Mp, void *out, long long n) {\n\
                if (x) { pdl_wait(); }\n}\n";
    let entries = global_entries(text);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].name, "k");
    let want = [
        ("w", "const u8*"),
        ("Mp", "int"),
        ("out", "void*"),
        ("n", "long long"),
    ];
    let got: Vec<(&str, &str)> = entries[0]
        .params
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    assert_eq!(got, want);
    assert!(entries[0].body.contains("pdl_wait()"));
}

/// The real sources with one kernel's text replaced: a planted violation of one rule.
fn planted(source: Source, from: &str, to: &str) -> Vec<String> {
    let sources: Vec<(Source, String)> = real_sources()
        .into_iter()
        .map(|(s, t)| {
            if s == source {
                assert!(t.contains(from), "the planted edit must apply: {from}");
                (s, t.replacen(from, to, 1))
            } else {
                (s, t)
            }
        })
        .collect();
    violations(&sources, &kernels::signatures(), &gpu_checks_text())
}

#[test]
fn a_swapped_parameter_order_is_caught() {
    let bad = planted(
        Source::Routing,
        "const float* bias, int T, int E,",
        "const float* bias, int E, int T,",
    );
    assert!(
        bad.iter()
            .any(|b| b.contains("route_logits") && b.contains("declares")),
        "{bad:?}"
    );
}

#[test]
fn a_changed_parameter_type_is_caught() {
    let bad = planted(
        Source::Combine,
        "int z_stride, const int* pair_pos",
        "long long z_stride, const int* pair_pos",
    );
    assert!(
        bad.iter()
            .any(|b| b.contains("combine_rows") && b.contains("declares")),
        "{bad:?}"
    );
}

#[test]
fn a_kernel_without_a_launcher_is_caught() {
    let bad = planted(
        Source::Quant,
        "extern \"C\" __global__ void quantize_rows(",
        "extern \"C\" __global__ void orphan(int n) { pdl_wait(); }\n\
         extern \"C\" __global__ void quantize_rows(",
    );
    assert!(
        bad.iter().any(|b| b.contains("`orphan` has no launcher")),
        "{bad:?}"
    );
}

#[test]
fn a_launcher_without_its_kernel_is_caught() {
    let bad = planted(
        Source::Routing,
        "extern \"C\" __global__ void unpack_routes(",
        "__device__ void unpack_routes_gone(",
    );
    assert!(
        bad.iter()
            .any(|b| b.contains("launcher of `unpack_routes`")),
        "{bad:?}"
    );
}

#[test]
fn a_pdl_kernel_without_pdl_wait_is_caught() {
    let bad = planted(
        Source::Routing,
        "int* ids, float* w) {\n    pdl_wait();",
        "int* ids, float* w) {\n    ;",
    );
    assert!(
        bad.iter()
            .any(|b| b.contains("unpack_routes") && b.contains("pdl_wait")),
        "{bad:?}"
    );
}

#[test]
fn a_kernel_no_gpu_check_runs_is_caught() {
    let bad = violations(&real_sources(), &kernels::signatures(), "moe_gemm only");
    assert!(
        bad.iter()
            .any(|b| b.contains("`combine_rows` is not exercised")),
        "{bad:?}"
    );
}
