//! Two output files side by side (`moerunner compare A B`): how far A is from B, taken as the
//! reference. Closes the `run` → `run --reference` loop without Python.

use std::path::Path;

use super::io::read_output;
use crate::error::{MoeError, Result};

/// What [`compare_outputs`] measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    pub tokens: usize,
    pub hidden: usize,
    /// ‖A − B‖₂ / ‖B‖₂ over the finite pairs (0 when both are all zero, ∞ when only B is).
    pub rel_err: f64,
    /// max |A − B| over the finite pairs, and where: (token, column).
    pub max_abs: f64,
    pub max_abs_at: (usize, usize),
    /// Elements that are NaN (or ±inf) in A and in B.
    pub non_finite: (usize, usize),
    /// Top-k agreement, when both files carry `topk_ids` (`run --save-routing`).
    pub topk: Option<TopkAgreement>,
}

/// How many tokens chose the same set of experts, and how many of the k slots agree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopkAgreement {
    pub top_k: usize,
    pub tokens_same: usize,
    /// Σ over tokens of |ids_A ∩ ids_B|, out of T·k.
    pub ids_shared: usize,
}

/// Compares output file `a` with output file `b` (the reference). Shapes must agree.
pub fn compare_outputs(a: &Path, b: &Path) -> Result<Comparison> {
    let (out_a, routes_a) = read_output(a)?;
    let (out_b, routes_b) = read_output(b)?;
    if out_a.shape != out_b.shape || out_a.shape.len() != 2 {
        return Err(MoeError::invalid(
            format!("tensor `output` of {}", a.display()),
            format!(
                "has shape {:?}, {} has {:?}: only outputs of the same layer and input compare",
                out_a.shape,
                b.display(),
                out_b.shape
            ),
        ));
    }
    let (tokens, hidden) = (out_a.shape[0], out_a.shape[1]);
    let va = out_a.to_f32_vec("output")?;
    let vb = out_b.to_f32_vec("output")?;
    let (mut num, mut den, mut max_abs, mut at) = (0f64, 0f64, 0f64, 0usize);
    let mut non_finite = (0, 0);
    for (i, (&x, &y)) in va.iter().zip(&vb).enumerate() {
        non_finite.0 += usize::from(!x.is_finite());
        non_finite.1 += usize::from(!y.is_finite());
        if !(x.is_finite() && y.is_finite()) {
            continue;
        }
        let d = x as f64 - y as f64;
        num += d * d;
        den += y as f64 * y as f64;
        if d.abs() > max_abs {
            (max_abs, at) = (d.abs(), i);
        }
    }
    let rel_err = if den > 0.0 {
        (num / den).sqrt()
    } else if num == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    let topk = match (routes_a, routes_b) {
        (Some((ia, _)), Some((ib, _))) => {
            if ia.shape != ib.shape || ia.shape.first() != Some(&tokens) {
                return Err(MoeError::invalid(
                    format!("tensor `topk_ids` of {}", a.display()),
                    format!(
                        "has shape {:?}, {} has {:?}",
                        ia.shape,
                        b.display(),
                        ib.shape
                    ),
                ));
            }
            let k = ia.shape.get(1).copied().unwrap_or(0);
            let (ia, ib) = (ia.to_i32_vec("topk_ids")?, ib.to_i32_vec("topk_ids")?);
            let mut agreement = TopkAgreement {
                top_k: k,
                tokens_same: 0,
                ids_shared: 0,
            };
            for t in 0..tokens {
                let mut x = ia[t * k..(t + 1) * k].to_vec();
                let mut y = ib[t * k..(t + 1) * k].to_vec();
                x.sort_unstable();
                y.sort_unstable();
                agreement.tokens_same += usize::from(x == y);
                agreement.ids_shared += x.iter().filter(|id| y.binary_search(id).is_ok()).count();
            }
            Some(agreement)
        }
        _ => None,
    };
    Ok(Comparison {
        tokens,
        hidden,
        rel_err,
        max_abs,
        max_abs_at: (at / hidden.max(1), at % hidden.max(1)),
        non_finite,
        topk,
    })
}
