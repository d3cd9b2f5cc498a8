//! Architecture invariants as tests (ARCHITECTURE.md, "Invariants"): no `unwrap()`/`expect()` in
//! library code, no module over the line budget, dependencies only pointing down.

use std::fs;
use std::path::{Path, PathBuf};

const LINE_BUDGET: usize = 1200;

fn library_sources() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .expect("src dir readable")
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut out);
    out
}

/// The file's text before its `#[cfg(test)]` module (tests may unwrap).
fn non_test_part(text: &str) -> &str {
    text.find("#[cfg(test)]").map_or(text, |i| &text[..i])
}

fn rel(p: &Path) -> String {
    p.strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap_or(p)
        .display()
        .to_string()
}

#[test]
fn library_code_has_no_unwrap_or_expect() {
    let mut bad = Vec::new();
    for path in library_sources() {
        let text = fs::read_to_string(&path).expect("source readable");
        for (i, line) in non_test_part(&text).lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if code.contains(".unwrap()") || code.contains(".expect(") {
                bad.push(format!("{}:{}: {}", rel(&path), i + 1, line.trim()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "library code must return errors, not unwrap:\n{}",
        bad.join("\n")
    );
}

#[test]
fn no_module_over_the_line_budget() {
    let mut bad = Vec::new();
    for path in library_sources() {
        let n = fs::read_to_string(&path)
            .expect("source readable")
            .lines()
            .count();
        if n > LINE_BUDGET {
            bad.push(format!(
                "{} has {n} lines (budget {LINE_BUDGET})",
                rel(&path)
            ));
        }
    }
    assert!(bad.is_empty(), "split these modules:\n{}", bad.join("\n"));
}

#[test]
fn dependencies_point_down() {
    // (module path prefix, crate paths it must not import)
    let upper = [
        "crate::backend",
        "crate::runner",
        "crate::random_cases",
        "crate::bench",
        "crate::layer_file",
        "crate::checkpoint",
    ];
    let rules: &[(&str, &[&str])] = &[
        (
            "src/config.rs",
            &[
                "crate::formats",
                "crate::routing",
                "crate::reference",
                "crate::weights",
            ],
        ),
        (
            "src/tensor.rs",
            &[
                "crate::formats",
                "crate::routing",
                "crate::reference",
                "crate::weights",
            ],
        ),
        ("src/formats", &["crate::routing", "crate::reference"]),
        ("src/routing", &["crate::formats", "crate::reference"]),
        (
            "src/activation.rs",
            &["crate::formats", "crate::routing", "crate::reference"],
        ),
        ("src/reference.rs", &[]),
        ("src/shard.rs", &[]),
    ];
    let mut bad = Vec::new();
    for path in library_sources() {
        let r = rel(&path);
        for (prefix, extra) in rules {
            if !r.starts_with(prefix) {
                continue;
            }
            let text = fs::read_to_string(&path).expect("source readable");
            for forbidden in upper.iter().chain(extra.iter()) {
                if non_test_part(&text).contains(forbidden) {
                    bad.push(format!("{r} uses {forbidden}"));
                }
            }
        }
    }
    assert!(bad.is_empty(), "upward dependencies:\n{}", bad.join("\n"));
}
