//! How a hidden row travels in EP all-to-all dispatch (docs/parallel.md, "What travels"): as the
//! caller gave it, or — where the layer quantizes its input to a format whose values survive being
//! quantized again unchanged — as those quantized values, smaller than bf16: fp8 codes under the
//! layer's static input scale (1 byte an element), or mxfp8 codes with one UE8M0 byte per 32
//! (1 + 1/32). The serving rank decodes them to f32, exactly, and its backend quantizes them again
//! to the same values, so the layer's output stays bitwise the single-device one. fp8_block (a
//! dynamic f32 scale recomputed from decoded values can move by an ulp) and nvfp4 (a block whose
//! largest code is below 6 gets another scale when quantized again) travel as given.

use crate::config::ActivationFormat;
use crate::error::{MoeError, Result};
use crate::formats::{act_quant, e4m3, ue8m0};
use crate::tensor::{DType, HostTensor};

/// The encoding of one layer call's dispatched rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Wire {
    /// The caller's dtype, bytes as given.
    AsGiven(DType),
    /// E4M3 codes of x / s, s the layer's static input scale.
    Fp8(f32),
    /// Per 32 elements one UE8M0 scale byte, then 32 E4M3 codes of x / 2^s.
    Mxfp8,
}

/// UE8M0 bytes whose blocks decode to normal f32 values for every E4M3 code (2^-9 · 2^(b-127) ≥
/// 2^-126 and 448 · 2^(b-127) < 2^128): a row with a block outside travels as given.
const MX_SCALE_BYTES: std::ops::RangeInclusive<u8> = 10..=246;

impl Wire {
    /// The encoding for a layer of activation format `act` (its static input scale `static_scale`)
    /// called with rows of `dtype`: quantized where that is exact and smaller.
    pub(super) fn choose(act: ActivationFormat, static_scale: Option<f32>, dtype: DType) -> Wire {
        if dtype.size() < 2 {
            return Wire::AsGiven(dtype);
        }
        match (act, static_scale) {
            // (x / s decoded as code · s must stay a normal f32 for every code)
            (ActivationFormat::Fp8, Some(s))
                if s.is_normal() && (2f32.powi(-117)..=2f32.powi(119)).contains(&s) =>
            {
                Wire::Fp8(s)
            }
            (ActivationFormat::Mxfp8, _) => Wire::Mxfp8,
            _ => Wire::AsGiven(dtype),
        }
    }

    /// Bytes of an encoded row of `h` elements.
    pub(super) fn row_bytes(&self, h: usize) -> usize {
        match self {
            Wire::AsGiven(d) => h * d.size(),
            Wire::Fp8(_) => h,
            Wire::Mxfp8 => h + h / 32,
        }
    }

    /// Appends `row` (its caller's bytes `raw`, its f32 values `x`) encoded; false when this row
    /// cannot be (an mxfp8 block scale outside `MX_SCALE_BYTES`, a NaN among them): the caller
    /// sends it as given instead, flagged.
    pub(super) fn encode(&self, raw: &[u8], x: &[f32], out: &mut Vec<u8>) -> Result<bool> {
        match *self {
            Wire::AsGiven(_) => {
                out.extend_from_slice(raw);
                Ok(true)
            }
            Wire::Fp8(s) => {
                out.extend(x.iter().map(|&v| e4m3::encode(v / s)));
                Ok(true)
            }
            Wire::Mxfp8 => {
                let q = act_quant::quantize_rows(ActivationFormat::Mxfp8, x, 1, x.len(), None)?;
                let bytes: Vec<u8> = q.scales.iter().map(|&s| ue8m0::encode_ceil(s)).collect();
                if !bytes.iter().all(|b| MX_SCALE_BYTES.contains(b)) {
                    return Ok(false);
                }
                for (b, vals) in bytes.iter().zip(q.values.chunks(32)) {
                    out.push(*b);
                    out.extend(vals.iter().map(|&v| e4m3::encode(v)));
                }
                Ok(true)
            }
        }
    }

    /// The f32 values of an encoded row of `h` elements (`raw_dtype`: the caller's, for a row sent
    /// as given).
    pub(super) fn decode(&self, bytes: &[u8], h: usize, raw_dtype: DType) -> Result<Vec<f32>> {
        match *self {
            Wire::AsGiven(_) => HostTensor::from_u8(raw_dtype, vec![1, h], bytes.to_vec())
                .to_f32_vec("hidden_states"),
            Wire::Fp8(s) => Ok(bytes.iter().map(|&c| e4m3::decode(c) * s).collect()),
            Wire::Mxfp8 => {
                if bytes.len() != h + h / 32 {
                    return Err(MoeError::invalid(
                        "dispatched row",
                        format!("{} bytes for an mxfp8 row of {h}", bytes.len()),
                    ));
                }
                let mut x = Vec::with_capacity(h);
                for block in bytes.chunks(33) {
                    let scale = ue8m0::decode(block[0]);
                    x.extend(block[1..].iter().map(|&c| e4m3::decode(c) * scale));
                }
                Ok(x)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SeededRng;

    /// What the serving rank quantizes from the decoded row is what the owner's row quantizes to:
    /// the same values (fp8 codes; mxfp8 element × scale), over seeded rows with blocks of very
    /// different magnitude; rows the encoding cannot hold exactly are refused, never mangled.
    #[test]
    fn decoded_rows_quantize_to_the_same_values() {
        let h = 256;
        let mut rng = SeededRng::new(0x51AE);
        let bf16 = DType::BF16;
        for (act, stat) in [
            (ActivationFormat::Fp8, Some(0.013f32)),
            (ActivationFormat::Mxfp8, None),
        ] {
            let wire = Wire::choose(act, stat, bf16);
            assert_ne!(wire, Wire::AsGiven(bf16), "{act}");
            assert!(wire.row_bytes(h) < h * 2, "{act}: smaller than bf16");
            let (mut exact, mut refused) = (0, 0);
            for r in 0..64 {
                let mag = [1.0f32, 1e-3, 3e4, 1e-30, 0.0, 1e30][r % 6];
                let x: Vec<f32> = (0..h)
                    .map(|c| rng.uniform(-1.0, 1.0) * mag * if c % 32 == 0 { 1e3 } else { 1.0 })
                    .collect();
                let mut bytes = Vec::new();
                if !wire.encode(&[], &x, &mut bytes).expect("encode") {
                    refused += 1;
                    continue;
                }
                let back = wire.decode(&bytes, h, bf16).expect("decode");
                let q = act_quant::quantize_rows(act, &x, 1, h, stat).expect("q");
                let q2 = act_quant::quantize_rows(act, &back, 1, h, stat).expect("q2");
                for c in 0..h {
                    let (b1, b2) = (c / q.block, c / q2.block);
                    let (v1, v2) = (q.values[c] * q.scales[b1], q2.values[c] * q2.scales[b2]);
                    assert_eq!(
                        v1.to_bits(),
                        v2.to_bits(),
                        "{act} row {r} col {c}: {v1} vs {v2}"
                    );
                }
                exact += 1;
            }
            println!("{act}: {exact} rows exact, {refused} sent as given");
            assert!(exact > 40);
        }
        // Formats whose values do not survive a second quantization travel as given.
        for act in [
            ActivationFormat::Fp8Block,
            ActivationFormat::Nvfp4,
            ActivationFormat::Bf16,
        ] {
            assert_eq!(Wire::choose(act, Some(1.0), bf16), Wire::AsGiven(bf16));
        }
        assert_eq!(
            Wire::choose(ActivationFormat::Fp8, Some(1e-38), bf16),
            Wire::AsGiven(bf16)
        );
    }
}
