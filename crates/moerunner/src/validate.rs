//! Every check a layer's tensors must pass against its config (`spec/layer-file.md`): shapes,
//! element data sizes, scale kinds and values (finite, positive, no UE8M0 255, no NaN E4M3),
//! consistent E/H/I, required extras. Errors name the layer-file tensor (`w13_scale`, ...) and,
//! for a bad scale, its index.
//!
//! Decisions where the spec leaves room:
//! - Static input scales are required when the activation format needs them and otherwise accepted
//!   (checked, unused): a checkpoint calibrated for static nvfp4 keeps them when run per token.
//! - `router_bias` is accepted for every routing method and checked ([E], finite) but only
//!   `deepseek_v3` and `minimax2` read it; refusing it elsewhere would refuse checkpoints whose
//!   router carries a bias the chosen method does not use.

use crate::config::{LayerConfig, WeightFormat};
use crate::error::{MoeError, Result};
use crate::formats::e4m3;
use crate::weights::{BlockScales, LayerWeights, MoeLayer, QuantizedTensor};

impl MoeLayer {
    /// Validates `weights` against `config` ([`validate_layer`]) and pairs them: the only way to
    /// make a `MoeLayer`.
    pub fn new(config: LayerConfig, weights: LayerWeights) -> Result<Self> {
        validate_layer(&config, &weights)?;
        Ok(MoeLayer::from_validated(config, weights))
    }
}

pub fn validate_layer(config: &LayerConfig, weights: &LayerWeights) -> Result<()> {
    config.validate()?;
    let e = config.num_local_experts();
    let (m, h, i) = (config.w13_rows(), config.hidden, config.intermediate);
    check_projection("w13", &weights.w13, config.weight_format, [e, m, h])?;
    check_projection("w2", &weights.w2, config.weight_format, [e, h, i])?;
    check_vector(
        "w13_bias",
        weights.w13_bias.as_deref(),
        e * m,
        &format!("[{e}, {m}]"),
    )?;
    check_vector(
        "w2_bias",
        weights.w2_bias.as_deref(),
        e * h,
        &format!("[{e}, {h}]"),
    )?;
    check_vector(
        "router_bias",
        weights.router_bias.as_deref(),
        config.num_experts,
        &format!("[{}]", config.num_experts),
    )?;
    // Input scales are accepted (and unused) where the activation format computes its own, e.g.
    // nvfp4_per_token: checkpoints calibrated for static mode carry them, and switching the mode
    // must not need an edit of the file.
    let needs_static = config.activation_format.needs_input_scale();
    for (name, s) in [
        ("w13_input_scale", weights.w13_input_scale),
        ("w2_input_scale", weights.w2_input_scale),
    ] {
        match s {
            Some(v) if !(v.is_finite() && v > 0.0) => {
                return Err(MoeError::invalid(
                    format!("tensor `{name}`"),
                    format!("must be finite and positive, got {v}"),
                ))
            }
            None if needs_static => {
                return Err(MoeError::missing(format!(
                    "tensor `{name}` (F32 scalar), required by activation format `{}`",
                    config.activation_format
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_vector(name: &str, v: Option<&[f32]>, len: usize, shape: &str) -> Result<()> {
    let Some(v) = v else { return Ok(()) };
    if v.len() != len {
        return Err(MoeError::shape(name, shape, &[v.len()]));
    }
    match v.iter().position(|x| !x.is_finite()) {
        Some(idx) => Err(nonfinite(name, idx, v[idx])),
        None => Ok(()),
    }
}

/// Checks one projection `[E, rows, cols]` of `format`: shape, data size, scales.
fn check_projection(
    name: &str,
    t: &QuantizedTensor,
    format: WeightFormat,
    [e, rows, cols]: [usize; 3],
) -> Result<()> {
    if t.format != format {
        return Err(MoeError::invalid(
            format!("tensor `{name}`"),
            format!("is {} but the layer's weight format is {format}", t.format),
        ));
    }
    if [t.experts, t.rows, t.cols] != [e, rows, cols] {
        return Err(MoeError::shape(
            name,
            format!("[{e}, {rows}, {cols}] (logical elements)"),
            &[t.experts, t.rows, t.cols],
        ));
    }
    let want = e * t.expert_data_bytes();
    if t.data.len() != want {
        return Err(MoeError::invalid(
            format!("tensor `{name}`"),
            format!("holds {} bytes, expected {want}", t.data.len()),
        ));
    }
    let sname = format!("{name}_scale");
    let kind_err = |what: &str| {
        MoeError::invalid(
            format!("tensor `{sname}`"),
            format!("{format} weights need {what}"),
        )
    };
    match (format, &t.scales) {
        (WeightFormat::Bf16, BlockScales::None) => {}
        (WeightFormat::Bf16, _) => {
            return Err(MoeError::invalid(
                format!("tensor `{sname}`"),
                "bf16 weights take no scale",
            ))
        }
        (WeightFormat::Fp8, BlockScales::PerExpert(s)) => check_f32_scales(&sname, s, &[e])?,
        (WeightFormat::Fp8, _) => return Err(kind_err("one F32 scale per expert")),
        (WeightFormat::Fp8Block, BlockScales::Block128(s)) => {
            let (rb, cb) = (rows.div_ceil(128), cols.div_ceil(128));
            check_f32_scales(&sname, s, &[e, rb, cb])?
        }
        (WeightFormat::Fp8Block, _) => return Err(kind_err("F32 128×128 block scales")),
        (WeightFormat::Mxfp8 | WeightFormat::Mxfp4, BlockScales::Ue8m0(b)) => {
            let nb = cols / 32;
            if b.len() != e * rows * nb {
                return Err(MoeError::shape(
                    &sname,
                    format!("[{e}, {rows}, {nb}]"),
                    &[b.len()],
                ));
            }
            if let Some(idx) = b.iter().position(|&x| x == 255) {
                let at = unflatten(idx, &[e, rows, nb]);
                return Err(MoeError::invalid(
                    format!("tensor `{sname}`"),
                    format!("UE8M0 byte 255 (NaN) at {at:?} [expert, row, block]"),
                ));
            }
        }
        (WeightFormat::Mxfp8 | WeightFormat::Mxfp4, _) => {
            return Err(kind_err("UE8M0 1×32 block scales"))
        }
        (WeightFormat::Nvfp4, BlockScales::E4m3(b)) => {
            let nb = cols / 16;
            if b.len() != e * rows * nb {
                return Err(MoeError::shape(
                    &sname,
                    format!("[{e}, {rows}, {nb}]"),
                    &[b.len()],
                ));
            }
            if let Some(idx) = b
                .iter()
                .position(|&x| e4m3::decode(x).is_nan() || x & 0x80 != 0)
            {
                let at = unflatten(idx, &[e, rows, nb]);
                let what = if e4m3::decode(b[idx]).is_nan() {
                    "NaN"
                } else {
                    "negative (sign bit set)"
                };
                return Err(MoeError::invalid(format!("tensor `{sname}`"), format!(
                    "E4M3 scale byte {:#04x} at {at:?} [expert, row, block] is {what}; scales must be positive numbers or zero",
                    b[idx])));
            }
            check_f32_scales(&format!("{name}_global_scale"), &t.global_scales, &[e])?;
        }
        (WeightFormat::Nvfp4, _) => return Err(kind_err("E4M3 1×16 block scales")),
    }
    if format != WeightFormat::Nvfp4 && !t.global_scales.is_empty() {
        return Err(MoeError::invalid(
            format!("tensor `{name}_global_scale`"),
            format!("only nvfp4 weights take a global scale, not {format}"),
        ));
    }
    check_decoded_finite(name, t)
}

/// The overflow rule at load (docs/robustness.md): every decoded weight — element × block scale
/// (× global) — and every block scale itself must be finite in f32, or a kernel's product is
/// ±inf (or 0 · inf = NaN) for every token routed to that expert. A legal UE8M0 byte 254 (2^127)
/// times an E4M3 448 is such a value.
///
/// Fast path: the largest element of the format times the largest scale (one pass over the
/// scales, never over the weights). Only when that bound overflows are the offending blocks'
/// elements decoded, one row at a time, to find a value that really overflows.
fn check_decoded_finite(name: &str, t: &QuantizedTensor) -> Result<()> {
    let (elem_max, block) = match t.format {
        WeightFormat::Bf16 => return Ok(()),
        WeightFormat::Fp8 => (448.0, t.cols.max(1)),
        WeightFormat::Fp8Block => (448.0, 128),
        WeightFormat::Mxfp8 => (448.0, 32),
        WeightFormat::Mxfp4 => (6.0, 32),
        WeightFormat::Nvfp4 => (6.0, 16),
    };
    let fmax = |v: &[f32]| v.iter().fold(0f64, |m, &x| m.max(x as f64));
    let max_scale = match &t.scales {
        BlockScales::None => 1.0,
        BlockScales::PerExpert(s) | BlockScales::Block128(s) => fmax(s),
        BlockScales::Ue8m0(b) => b
            .iter()
            .max()
            .map_or(0.0, |&x| crate::formats::ue8m0::decode(x) as f64),
        BlockScales::E4m3(b) => {
            let dec = b
                .iter()
                .map(|&x| e4m3::decode(x))
                .fold(0f64, |m, x| m.max(x as f64));
            dec * fmax(&t.global_scales)
        }
    };
    if ((elem_max * max_scale) as f32).is_finite() {
        return Ok(());
    }
    let nb = t.cols.div_ceil(block);
    let mut row = vec![0f64; t.cols];
    for e in 0..t.experts {
        for r in 0..t.rows {
            let bound_over =
                |j: usize| !((elem_max * t.block_scale_f64(e, r, j)) as f32).is_finite();
            if !(0..nb).any(bound_over) {
                continue;
            }
            t.decode_rows_f64(e, r..r + 1, &mut row);
            for j in (0..nb).filter(|&j| bound_over(j)) {
                let scale = t.block_scale_f64(e, r, j);
                let cols = j * block..((j + 1) * block).min(t.cols);
                // The scale itself must be finite in f32 (0 · inf is NaN), and so must each value.
                let bad = if (scale as f32).is_finite() {
                    cols.clone().find(|&c| !(row[c] as f32).is_finite())
                } else {
                    Some(cols.start)
                };
                if let Some(c) = bad {
                    let what = if t.format == WeightFormat::Nvfp4 {
                        format!("tensors `{name}_scale` × `{name}_global_scale`")
                    } else {
                        format!("tensor `{name}_scale`")
                    };
                    return Err(MoeError::invalid(
                        what,
                        format!(
                            "expert {e} (local index), row {r}, block {j}: scale {scale:e} times element \
                             {:e} decodes to {:e}, which overflows f32 (largest finite {:e}); \
                             every decoded weight must be finite in f32",
                            row[c] / scale,
                            row[c],
                            f32::MAX
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn check_f32_scales(name: &str, s: &[f32], dims: &[usize]) -> Result<()> {
    if s.len() != dims.iter().product::<usize>() {
        return Err(MoeError::shape(name, format!("{dims:?}"), &[s.len()]));
    }
    match s.iter().position(|v| !(v.is_finite() && *v > 0.0)) {
        Some(idx) => Err(MoeError::invalid(
            format!("tensor `{name}`"),
            format!(
                "value at {:?} is {}; scales must be finite and positive",
                unflatten(idx, dims),
                s[idx]
            ),
        )),
        None => Ok(()),
    }
}

/// The multi-index of flat index `idx` in a row-major tensor of `dims`.
fn unflatten(mut idx: usize, dims: &[usize]) -> Vec<usize> {
    let mut out = vec![0; dims.len()];
    for (o, &d) in out.iter_mut().zip(dims).rev() {
        *o = idx % d.max(1);
        idx /= d.max(1);
    }
    out
}

/// A non-finite value at `index` of tensor `name`.
fn nonfinite(name: &str, index: usize, v: f32) -> MoeError {
    MoeError::invalid(
        format!("tensor `{name}`"),
        format!("value at index {index} is {v}, not a finite number"),
    )
}
