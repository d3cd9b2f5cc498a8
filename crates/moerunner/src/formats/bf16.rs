//! BF16 round to nearest even from f32 (the `half` crate's conversion, which is RNE and keeps NaN).

/// f32 → bf16 bits, round to nearest even (NaN stays NaN).
pub fn encode(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// f32 rounded to the nearest bf16, as f32.
pub fn round(x: f32) -> f32 {
    decode(encode(x))
}

/// bf16 bits → f32 (exact).
pub fn decode(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}
