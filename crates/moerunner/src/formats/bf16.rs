//! BF16 round to nearest even from f32.

/// f32 → bf16 bits, round to nearest even (NaN stays NaN).
pub fn encode(x: f32) -> u16 {
    let _ = x;
    unimplemented!("bf16::encode")
}

/// bf16 bits → f32 (exact).
pub fn decode(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}
