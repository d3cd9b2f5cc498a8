//! Activation functions (`spec/activations.md`). f64 versions define the meaning (the reference
//! uses them); f32 versions are what fast paths evaluate.

use crate::config::{Activation, W13Order};

fn sigmoid64(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// erf in f64 (Abramowitz–Stegun 7.1.26 is too coarse; use a series/continued fraction with
/// ~1e-15 accuracy so the reference is not the weak link).
pub fn erf64(x: f64) -> f64 {
    // W. J. Cody's rational approximations would do; a Taylor series near 0 and erfc continued
    // fraction in the tails reach double precision with few terms.
    let ax = x.abs();
    let r = if ax < 2.5 {
        // Taylor: erf x = 2/√π Σ (−1)^n x^(2n+1) / (n! (2n+1))
        let mut sum: f64 = 0.0;
        let mut term = ax;
        let x2 = ax * ax;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 3.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x2 / n;
            if n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc x = e^(−x²)/√π · 1/(x + 1/2/(x + 1/(x + 3/2/(x + 2/(x + ...))))) (Lentz-free, fixed depth)
        let mut f = 0.0;
        for n in (1..60).rev() {
            f = (n as f64 / 2.0) / (ax + f);
        }
        1.0 - (-ax * ax).exp() / std::f64::consts::PI.sqrt() / (ax + f)
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

/// Gated activation of one feature in f64: act(gate) · up (with GPT-OSS clamping).
pub fn gated_f64(act: &Activation, gate: f64, up: f64) -> f64 {
    match *act {
        Activation::Swiglu => gate * sigmoid64(gate) * up,
        Activation::Geglu => 0.5 * gate * (1.0 + erf64(gate / std::f64::consts::SQRT_2)) * up,
        Activation::SwigluOai { alpha, beta, limit } => {
            let (limit, alpha, beta) = (limit as f64, alpha as f64, beta as f64);
            let g = gate.min(limit);
            let u = up.clamp(-limit, limit);
            g * sigmoid64(alpha * g) * (u + beta)
        }
        Activation::Relu2 => unreachable_non_gated(),
    }
}

/// Non-gated activation of one feature in f64.
pub fn plain_f64(act: &Activation, y: f64) -> f64 {
    match act {
        Activation::Relu2 => {
            let r = y.max(0.0);
            r * r
        }
        _ => unreachable_non_gated(),
    }
}

/// f32 version of [`gated_f64`] for fast paths.
#[inline]
pub fn gated_f32(act: &Activation, gate: f32, up: f32) -> f32 {
    match *act {
        Activation::Swiglu => gate / (1.0 + (-gate).exp()) * up,
        Activation::Geglu => {
            (0.5 * gate as f64 * (1.0 + erf64(gate as f64 / std::f64::consts::SQRT_2))) as f32 * up
        }
        Activation::SwigluOai { alpha, beta, limit } => {
            let g = gate.min(limit);
            let u = up.clamp(-limit, limit);
            g / (1.0 + (-alpha * g).exp()) * (u + beta)
        }
        Activation::Relu2 => unreachable_non_gated(),
    }
}

/// f32 version of [`plain_f64`].
#[inline]
pub fn plain_f32(act: &Activation, y: f32) -> f32 {
    match act {
        Activation::Relu2 => {
            let r = y.max(0.0);
            r * r
        }
        _ => unreachable_non_gated(),
    }
}

#[cold]
fn unreachable_non_gated() -> ! {
    // LayerConfig::validate pairs gated/non-gated with the W13 row count, so this is a bug.
    panic!("activation called with the wrong arity (gated vs non-gated): a bug, not bad input")
}

impl W13Order {
    /// Row of W13 holding gate feature `i` of `inter` (I).
    #[inline]
    pub fn gate_row(self, i: usize, inter: usize) -> usize {
        match self {
            W13Order::GateUp => i,
            W13Order::UpGate => inter + i,
            W13Order::Interleaved => 2 * i,
        }
    }
    /// Row of W13 holding up feature `i` of `inter` (I).
    #[inline]
    pub fn up_row(self, i: usize, inter: usize) -> usize {
        match self {
            W13Order::GateUp => inter + i,
            W13Order::UpGate => i,
            W13Order::Interleaved => 2 * i + 1,
        }
    }
}

/// Applies the activation to one GEMM1 output row `y` (M values in W13 row order) into `out` (I).
pub fn apply_row_f64(act: &Activation, order: W13Order, y: &[f64], out: &mut [f64]) {
    let inter = out.len();
    if act.is_gated() {
        for (i, o) in out.iter_mut().enumerate() {
            *o = gated_f64(act, y[order.gate_row(i, inter)], y[order.up_row(i, inter)]);
        }
    } else {
        for (o, &v) in out.iter_mut().zip(y) {
            *o = plain_f64(act, v);
        }
    }
}

/// f32 version of [`apply_row_f64`].
pub fn apply_row_f32(act: &Activation, order: W13Order, y: &[f32], out: &mut [f32]) {
    let inter = out.len();
    if act.is_gated() {
        for (i, o) in out.iter_mut().enumerate() {
            *o = gated_f32(act, y[order.gate_row(i, inter)], y[order.up_row(i, inter)]);
        }
    } else {
        for (o, &v) in out.iter_mut().zip(y) {
            *o = plain_f32(act, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        // Values from tables (Abramowitz & Stegun), 15+ digits.
        let cases = [
            (0.0, 0.0),
            (0.5, 0.520499877813047),
            (1.0, 0.842700792949715),
            (2.0, 0.995322265018953),
            (3.0, 0.999977909503001),
            (-1.5, -0.966105146475311),
        ];
        for (x, want) in cases {
            assert!(
                (erf64(x) - want).abs() < 1e-13,
                "erf({x}) = {} want {want}",
                erf64(x)
            );
        }
    }

    #[test]
    fn swiglu_oai_with_open_limits_equals_swiglu() {
        let oai = Activation::SwigluOai {
            alpha: 1.0,
            beta: 0.0,
            limit: f32::INFINITY,
        };
        for &(g, u) in &[(0.3, -1.2), (-4.0, 2.5), (7.5, 9.0)] {
            assert_eq!(gated_f64(&oai, g, u), gated_f64(&Activation::Swiglu, g, u));
        }
    }

    #[test]
    fn swiglu_oai_clamps_gate_above_and_up_both_sides() {
        let act = Activation::OAI_DEFAULT;
        let at_limit = gated_f64(&act, 7.0, 7.0);
        assert_eq!(gated_f64(&act, 100.0, 100.0), at_limit);
        assert_eq!(gated_f64(&act, 7.0, -100.0), gated_f64(&act, 7.0, -7.0));
        // The gate is not clamped from below.
        assert!(gated_f64(&act, -20.0, 1.0).abs() < 1e-10);
    }

    #[test]
    fn relu2_and_orders() {
        assert_eq!(plain_f64(&Activation::Relu2, -3.0), 0.0);
        assert_eq!(plain_f64(&Activation::Relu2, 3.0), 9.0);
        let y = [1.0, 2.0, 3.0, 4.0]; // I = 2
        let mut out = [0.0; 2];
        let id = Activation::SwigluOai {
            alpha: 0.0,
            beta: 0.0,
            limit: f32::INFINITY,
        }; // g·0.5·u
        apply_row_f64(&id, W13Order::GateUp, &y, &mut out);
        assert_eq!(out, [1.0 * 0.5 * 3.0, 2.0 * 0.5 * 4.0]);
        apply_row_f64(&id, W13Order::UpGate, &y, &mut out);
        assert_eq!(out, [3.0 * 0.5 * 1.0, 4.0 * 0.5 * 2.0]);
        apply_row_f64(&id, W13Order::Interleaved, &y, &mut out);
        assert_eq!(out, [1.0 * 0.5 * 2.0, 3.0 * 0.5 * 4.0]);
    }
}
