//! The CUDA kernel sources as tidy sees them: each `.cu` file's `extern "C" __global__` kernels
//! with their bodies, for checks over kernels (every kernel has a launcher, a kernel launched
//! with PDL calls `pdl_wait()`, ...).

use crate::source::strip;

/// One `extern "C" __global__` function of a kernel source.
#[derive(Debug)]
pub struct Kernel {
    pub name: String,
    /// 1-based line of `__global__`.
    pub line: usize,
    /// The text between the braces of its body, comments removed.
    pub body: String,
}

/// The `extern "C" __global__` kernels of one `.cu` text (`__launch_bounds__(…)` allowed between
/// the return type and the name).
pub fn kernels(text: &str) -> Vec<Kernel> {
    let code = strip(text, true);
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(k) = code[from..].find("__global__") {
        let at = from + k;
        from = at + "__global__".len();
        let before = code[..at].trim_end();
        if !before.ends_with("extern \"C\"") {
            continue;
        }
        // The name is the identifier before the first `(` that does not open `__launch_bounds__`.
        let mut i = from;
        let name = loop {
            let Some(p) = code[i..].find('(').map(|p| i + p) else {
                break None;
            };
            let head = code[from..p].trim_end();
            let ident: String = head
                .chars()
                .rev()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            if ident == "__launch_bounds__" {
                i = matching(&code, p, '(', ')').map_or(code.len(), |e| e + 1);
                from = i;
                continue;
            }
            break Some((ident, p));
        };
        let Some((name, paren)) = name else { break };
        let Some(open) = code[paren..].find('{').map(|o| paren + o) else {
            break;
        };
        let close = matching(&code, open, '{', '}').unwrap_or(code.len());
        out.push(Kernel {
            name,
            line: code[..at].matches('\n').count() + 1,
            body: code[open + 1..close].to_string(),
        });
        from = close;
    }
    out
}

/// The index of the bracket closing the one at `open`.
fn matching(code: &str, open: usize, l: char, r: char) -> Option<usize> {
    let mut depth = 0;
    for (i, ch) in code[open..].char_indices() {
        if ch == l {
            depth += 1;
        } else if ch == r {
            depth -= 1;
            if depth == 0 {
                return Some(open + i);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_are_found_with_their_names_and_bodies() {
        let text = "// extern \"C\" __global__ void commented() {}\n\
                    __device__ int helper(int x) { return x; }\n\
                    extern \"C\" __global__ void a(const int* p, int n) {\n  pdl_wait();\n}\n\
                    extern \"C\" __global__ void __launch_bounds__(NT, 1) b(\n    \
                    int n) { if (n) { x(); } }\n";
        let ks = kernels(text);
        let names: Vec<(&str, usize)> = ks.iter().map(|k| (k.name.as_str(), k.line)).collect();
        assert_eq!(names, [("a", 3), ("b", 6)]);
        assert!(ks[0].body.contains("pdl_wait()"));
        assert_eq!(ks[1].body.trim(), "if (n) { x(); }");
    }
}
