//! BF16: the top 16 bits of an f32, rounded to nearest even.
//!
//! Written out rather than delegated to `half` so the rounding rule is visible here and the tests
//! can hold it against `half::bf16::from_f32` as an independent implementation.

/// f32 → bf16 bits, round to nearest even. Overflow past the largest bf16 rounds to ±inf (IEEE);
/// NaN stays NaN with its sign (forced quiet, so truncation never turns it into an infinity).
pub fn encode(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x0040;
    }
    // Adding 0x7FFF plus the kept LSB rounds half-way cases to the even neighbour; the carry runs
    // into the exponent on its own. Cannot overflow u32: the largest non-NaN pattern is −inf.
    let round = 0x7FFF + ((b >> 16) & 1);
    ((b + round) >> 16) as u16
}

/// f32 rounded to the nearest bf16, as f32.
pub fn round(x: f32) -> f32 {
    decode(encode(x))
}

/// bf16 bits → f32 (exact).
pub fn decode(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}
