//! Just enough of Rust's syntax to check imports: comments and literals blanked, `#[cfg(test)]`
//! items cut, `use` items parsed into full paths (groups, `self`, `super`, renames, globs) and
//! paths in code found, each resolved to the module it names.
//!
//! Design decision: no `syn`. The rules need paths only, and a hand-written scanner over tokens
//! keeps the test crate's dependencies what they are; the tests below pin what it reads.

use std::collections::{BTreeMap, BTreeSet};

/// `text` with every comment removed and the contents of string and character literals blanked
/// (`"…"` becomes `""`), newlines kept so line numbers stay. With `keep_strings`, string
/// literals are left as they are (for checks that look at what code prints).
pub fn strip(text: &str, keep_strings: bool) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = 0;
    while i < c.len() {
        let at = |k: usize| c.get(k).copied().unwrap_or('\0');
        if c[i] == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if c[i] == '\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
            }
        } else if (c[i] == 'r' || (c[i] == 'b' && at(i + 1) == 'r'))
            && (i == 0 || !ident(c[i - 1]))
            && raw_string_hashes(&c, i + if c[i] == 'b' { 2 } else { 1 }).is_some()
        {
            // r"…", r#"…"#, br"…": no escapes; ends at a quote followed by as many hashes.
            let start = i + if c[i] == 'b' { 2 } else { 1 };
            let hashes = raw_string_hashes(&c, start).unwrap_or(0);
            let body = start + hashes + 1;
            let mut j = body;
            while j < c.len() && !(c[j] == '"' && (1..=hashes).all(|h| at(j + h) == '#')) {
                j += 1;
            }
            let end = (j + 1 + hashes).min(c.len());
            push_literal(
                &mut out,
                &c[i..end],
                &c[body.min(end)..j.min(end)],
                keep_strings,
            );
            i = end;
        } else if c[i] == '"' {
            let mut j = i + 1;
            while j < c.len() && c[j] != '"' {
                j += if c[j] == '\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(c.len());
            push_literal(
                &mut out,
                &c[i..end],
                &c[i + 1..j.min(c.len())],
                keep_strings,
            );
            i = end;
        } else if c[i] == '\'' && (at(i + 1) == '\\' || (at(i + 2) == '\'' && at(i + 1) != '\'')) {
            // A character literal ('x', '\n', '\u{..}'); a lifetime ('a) has no closing quote.
            let mut j = i + 1;
            while j < c.len() && c[j] != '\'' {
                j += if c[j] == '\\' { 2 } else { 1 };
            }
            out.push_str("' '");
            i = (j + 1).min(c.len());
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// After an `r` (or `br`): the number of `#` before an opening quote, if a raw string starts here.
fn raw_string_hashes(c: &[char], start: usize) -> Option<usize> {
    let hashes = c[start.min(c.len())..]
        .iter()
        .take_while(|&&ch| ch == '#')
        .count();
    (c.get(start + hashes) == Some(&'"')).then_some(hashes)
}

fn push_literal(out: &mut String, whole: &[char], body: &[char], keep: bool) {
    if keep {
        out.extend(whole);
    } else {
        out.push_str("\"\"");
        out.extend(body.iter().filter(|&&ch| ch == '\n'));
    }
}

/// Stripped `text` without its `#[cfg(test)]` items (a `mod tests { … }`, a test-only `fn` or
/// `use`): tests may unwrap and import what they like. Newlines are kept.
pub fn without_test_items(stripped: &str) -> String {
    const ATTR: &str = "#[cfg(test)]";
    let mut s: Vec<char> = stripped.chars().collect();
    let attr: Vec<char> = ATTR.chars().collect();
    let mut i = 0;
    while i + attr.len() <= s.len() {
        if s[i..i + attr.len()] != attr[..] {
            i += 1;
            continue;
        }
        // The item ends at its first `;` outside braces or at the brace closing its first `{`.
        let mut j = i + attr.len();
        let mut depth = 0usize;
        while j < s.len() {
            match s[j] {
                '{' => depth += 1,
                '}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        break;
                    }
                }
                ';' if depth == 0 => break,
                _ => {}
            }
            j += 1;
        }
        let end = (j + 1).min(s.len());
        for ch in &mut s[i..end] {
            if *ch != '\n' {
                *ch = ' ';
            }
        }
        i = j;
    }
    s.into_iter().collect()
}

/// The module a source file is: `src/lib.rs` and `src/main.rs` are `crate`, `src/a/mod.rs` is
/// `crate::a`, `src/a/b.rs` is `crate::a::b` (`rel` is relative to the crate, `/`-separated).
pub fn module_of(rel: &str) -> Vec<String> {
    let inner = rel.strip_prefix("src/").unwrap_or(rel);
    let mut parts: Vec<String> = vec!["crate".into()];
    let segs: Vec<&str> = inner.split('/').collect();
    for (n, seg) in segs.iter().enumerate() {
        let last = n + 1 == segs.len();
        let name = if last {
            seg.strip_suffix(".rs").unwrap_or(seg)
        } else {
            seg
        };
        if !(last && (name == "mod" || (n == 0 && (name == "lib" || name == "main")))) {
            parts.push(name.to_string());
        }
    }
    parts
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    PathSep,
    Punct(char),
}

/// Tokens with their line numbers (1-based); numbers, lifetimes and literals only as punctuation.
fn tokens(stripped: &str) -> Vec<(Tok, usize)> {
    let c: Vec<char> = stripped.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch.is_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let word = word.strip_prefix("r#").map(str::to_string).unwrap_or(word);
            out.push((Tok::Ident(word), line));
        } else if ch == ':' && c.get(i + 1) == Some(&':') {
            out.push((Tok::PathSep, line));
            i += 2;
        } else if ch.is_ascii_digit() {
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push((Tok::Punct('0'), line));
        } else {
            out.push((Tok::Punct(ch), line));
            i += 1;
        }
    }
    out
}

/// One path a file names: `path` as written (after expanding groups), the name it binds (a `use`
/// item's last segment or its `as` rename; None in code) and its line.
#[derive(Clone, Debug, PartialEq)]
pub struct Named {
    pub path: Vec<String>,
    pub binds: Option<String>,
    pub line: usize,
    pub in_use_item: bool,
}

/// Every `use` tree of the file expanded into full paths (`use crate::{a::b, c::{self, d as e}}`
/// gives `crate::a::b`, `crate::c::self`, `crate::c::d`), then every path in code that starts
/// with `crate`, `super`, `self` or a name bound by a `use` item or a `mod` declaration.
pub fn named_paths(stripped: &str) -> Vec<Named> {
    let toks = tokens(stripped);
    let mut out = Vec::new();
    let mut in_use = vec![false; toks.len()];
    let mut i = 0;
    while i < toks.len() {
        if toks[i].0 == Tok::Ident("use".into()) {
            let start = i;
            let line = toks[i].1;
            i += 1;
            for (path, binds) in use_tree(&toks, &mut i, Vec::new()) {
                out.push(Named {
                    path,
                    binds,
                    line,
                    in_use_item: true,
                });
            }
            while i < toks.len() && toks[i].0 != Tok::Punct(';') {
                i += 1;
            }
            in_use[start..(i + 1).min(toks.len())].fill(true);
        }
        i += 1;
    }
    let mut roots: BTreeSet<String> = ["crate", "super", "self"].map(String::from).into();
    roots.extend(out.iter().filter_map(|n| n.binds.clone()));
    roots.extend(declared_modules(stripped));
    let mut i = 0;
    while i < toks.len() {
        let starts = match &toks[i].0 {
            Tok::Ident(w) => {
                !in_use[i]
                    && roots.contains(w)
                    && toks.get(i + 1).map(|t| &t.0) == Some(&Tok::PathSep)
                    && (i == 0 || toks[i - 1].0 != Tok::PathSep)
            }
            _ => false,
        };
        if !starts {
            i += 1;
            continue;
        }
        let line = toks[i].1;
        let mut path = Vec::new();
        while let Some((Tok::Ident(w), _)) = toks.get(i) {
            path.push(w.clone());
            if toks.get(i + 1).map(|t| &t.0) == Some(&Tok::PathSep) {
                i += 2;
            } else {
                i += 1;
                break;
            }
        }
        out.push(Named {
            path,
            binds: None,
            line,
            in_use_item: false,
        });
    }
    out
}

/// One `use` tree after `use` (or after a `{`/`,` inside a group), below `prefix`.
fn use_tree(
    toks: &[(Tok, usize)],
    i: &mut usize,
    prefix: Vec<String>,
) -> Vec<(Vec<String>, Option<String>)> {
    let mut path = prefix;
    loop {
        match toks.get(*i).map(|t| &t.0) {
            Some(Tok::PathSep) => *i += 1,
            Some(Tok::Ident(w)) => {
                path.push(w.clone());
                *i += 1;
                match toks.get(*i).map(|t| &t.0) {
                    Some(Tok::PathSep) => *i += 1,
                    Some(Tok::Ident(a)) if a == "as" => {
                        let alias = match toks.get(*i + 1).map(|t| &t.0) {
                            Some(Tok::Ident(n)) if n != "_" => Some(n.clone()),
                            _ => None,
                        };
                        *i += 2;
                        return vec![(path, alias)];
                    }
                    _ => {
                        let binds = bound_name(&path);
                        return vec![(path, binds)];
                    }
                }
            }
            Some(Tok::Punct('{')) => {
                *i += 1;
                let mut out = Vec::new();
                loop {
                    match toks.get(*i).map(|t| &t.0) {
                        None | Some(Tok::Punct(';')) => return out,
                        Some(Tok::Punct('}')) => {
                            *i += 1;
                            return out;
                        }
                        Some(Tok::Punct(',')) => *i += 1,
                        _ => {
                            let before = *i;
                            out.extend(use_tree(toks, i, path.clone()));
                            if *i == before {
                                *i += 1;
                            }
                        }
                    }
                }
            }
            Some(Tok::Punct('*')) => {
                *i += 1;
                return vec![(path, None)];
            }
            _ => return vec![(path, None)],
        }
    }
}

/// The name a `use` path binds: its last segment, or the one before a trailing `self`.
fn bound_name(path: &[String]) -> Option<String> {
    match path {
        [.., m, last] if last == "self" => Some(m.clone()),
        [.., last] => Some(last.clone()),
        [] => None,
    }
}

/// The names of `mod x;` and `mod x { … }` declarations in the file.
pub fn declared_modules(stripped: &str) -> Vec<String> {
    let toks = tokens(stripped);
    toks.windows(2)
        .filter_map(|w| match (&w[0].0, &w[1].0) {
            (Tok::Ident(m), Tok::Ident(name)) if m == "mod" => Some(name.clone()),
            _ => None,
        })
        .collect()
}

/// `path` as an absolute `crate::…` path, seen from module `module` whose `use` items bound
/// `bindings` (name → absolute path) and which declares the child modules `children`. None for
/// a path outside the crate (`std::…`, `rayon::…`, another crate's).
pub fn resolve(
    module: &[String],
    path: &[String],
    bindings: &BTreeMap<String, Vec<String>>,
    children: &[String],
) -> Option<Vec<String>> {
    let (first, rest) = path.split_first()?;
    let mut abs: Vec<String> = match first.as_str() {
        "crate" => vec!["crate".into()],
        "self" => module.to_vec(),
        "super" => {
            let mut m = module.to_vec();
            m.pop();
            let mut rest = rest;
            while let Some((s, r)) = rest.split_first() {
                if s != "super" {
                    break;
                }
                m.pop();
                rest = r;
            }
            m.extend(rest.iter().cloned());
            return (!m.is_empty()).then(|| trim_self(m));
        }
        name if children.iter().any(|c| c == name) => {
            let mut m = module.to_vec();
            m.push(name.to_string());
            m
        }
        name => bindings.get(name)?.clone(),
    };
    abs.extend(rest.iter().cloned());
    Some(trim_self(abs))
}

fn trim_self(mut p: Vec<String>) -> Vec<String> {
    if p.len() > 1 && p.last().is_some_and(|s| s == "self") {
        p.pop();
    }
    p
}

/// The module an absolute path lands in: its longest prefix that is a module of `modules`, after
/// replacing a root re-export (`crate::Runner` → `crate::runner::Runner`) by what it re-exports.
pub fn module_named(
    abs: &[String],
    modules: &BTreeSet<Vec<String>>,
    root_reexports: &BTreeMap<String, Vec<String>>,
) -> Vec<String> {
    let expanded;
    let abs = match abs {
        [root, name, rest @ ..] if root == "crate" && root_reexports.contains_key(name) => {
            expanded = [root_reexports[name].clone(), rest.to_vec()].concat();
            &expanded[..]
        }
        _ => abs,
    };
    (1..=abs.len())
        .rev()
        .map(|n| abs[..n].to_vec())
        .find(|p| modules.contains(p))
        .unwrap_or_else(|| vec!["crate".into()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(text: &str) -> Vec<String> {
        named_paths(&strip(text, false))
            .into_iter()
            .map(|n| n.path.join("::"))
            .collect()
    }

    #[test]
    fn comments_and_literals_are_blanked() {
        let s = strip(
            "a // crate::x\n/* crate::y /* nested */ crate::z */ b \"crate::w\" r#\"crate::v\"# \
             'c' '\\'' x<'a>",
            false,
        );
        assert!(!s.contains("crate"), "{s}");
        assert!(s.contains("x<'a>"), "{s}");
        assert_eq!(s.lines().count(), 2);
        assert!(strip("println!(\"SKIPPED\")", true).contains("SKIPPED"));
    }

    #[test]
    fn test_items_are_cut_and_what_follows_them_is_kept() {
        let s = without_test_items(
            "use a;\n#[cfg(test)]\nmod tests { fn f() { x.unwrap() } }\n\
             #[cfg(test)]\nuse b;\nfn g() { y }\n",
        );
        assert!(!s.contains("unwrap") && !s.contains("use b"), "{s}");
        assert!(s.contains("use a;") && s.contains("fn g() { y }"), "{s}");
        assert_eq!(s.lines().count(), 6);
    }

    #[test]
    fn use_trees_expand_to_full_paths() {
        let got = paths(
            "pub(crate) use crate::{\n    a::b,\n    c::{self, d as e, f::*},\n};\n\
             use super::super::y;\nuse ::std::io;\nuse super::{x as _};",
        );
        assert_eq!(
            got,
            [
                "crate::a::b",
                "crate::c::self",
                "crate::c::d",
                "crate::c::f",
                "super::super::y",
                "std::io",
                "super::x"
            ]
        );
    }

    #[test]
    fn paths_in_code_start_at_crate_super_self_or_a_bound_name() {
        let text = "use crate::backend::{self, Backend};\nuse super::prepare as p;\nmod kid;\n\
                    fn f() { backend::cuda::create(); crate::runner::Runner::<T>::new(); \
                    p::prepare_weights(); kid::go(); x::backend::no(); Vec::new(); self::g(); }";
        let code: Vec<String> = named_paths(&strip(text, false))
            .into_iter()
            .filter(|n| !n.in_use_item)
            .map(|n| n.path.join("::"))
            .collect();
        assert_eq!(
            code,
            [
                "backend::cuda::create",
                "crate::runner::Runner",
                "p::prepare_weights",
                "kid::go",
                "self::g"
            ]
        );
    }

    #[test]
    fn paths_resolve_against_the_module_its_bindings_and_children() {
        let m = |s: &str| s.split("::").map(String::from).collect::<Vec<_>>();
        let here = m("crate::backend::cpu::forward");
        let bindings: BTreeMap<String, Vec<String>> =
            [("fwd".to_string(), m("crate::forward"))].into();
        let children = vec!["plan".to_string()];
        let r = |p: &str| resolve(&here, &m(p), &bindings, &children).map(|v| v.join("::"));
        assert_eq!(
            r("super::plan::Plan").as_deref(),
            Some("crate::backend::cpu::plan::Plan")
        );
        assert_eq!(
            r("super::super::cuda::x").as_deref(),
            Some("crate::backend::cuda::x")
        );
        assert_eq!(
            r("self::plan").as_deref(),
            Some("crate::backend::cpu::forward::plan")
        );
        assert_eq!(
            r("plan::Plan").as_deref(),
            Some("crate::backend::cpu::forward::plan::Plan")
        );
        assert_eq!(
            r("fwd::resolve_input").as_deref(),
            Some("crate::forward::resolve_input")
        );
        assert_eq!(r("crate::routing::self").as_deref(), Some("crate::routing"));
        assert_eq!(r("rayon::prelude"), None);
        assert_eq!(
            module_of("src/backend/cpu/mod.rs"),
            m("crate::backend::cpu")
        );
        assert_eq!(module_of("src/lib.rs"), m("crate"));
        assert_eq!(module_of("src/commands/run.rs"), m("crate::commands::run"));

        let modules: BTreeSet<Vec<String>> = [
            m("crate"),
            m("crate::runner"),
            m("crate::backend"),
            m("crate::backend::cpu"),
        ]
        .into();
        let reexports: BTreeMap<String, Vec<String>> =
            [("Runner".to_string(), m("crate::runner::Runner"))].into();
        let land = |p: &str| module_named(&m(p), &modules, &reexports).join("::");
        assert_eq!(
            land("crate::backend::cpu::CpuBackend::new"),
            "crate::backend::cpu"
        );
        assert_eq!(land("crate::Runner"), "crate::runner");
        assert_eq!(land("crate::Result"), "crate");
    }
}
