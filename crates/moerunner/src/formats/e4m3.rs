//! E4M3 (`float8_e4m3fn`): 1 sign, 4 exponent (bias 7), 3 mantissa bits, no infinities,
//! 0x7F / 0xFF are NaN, largest finite 448.

/// f32 → E4M3: round to nearest even, saturate to ±448 (±inf too), NaN stays NaN.
pub fn encode(x: f32) -> u8 {
    let _ = x;
    unimplemented!("e4m3::encode")
}

/// E4M3 → f32 (exact).
pub fn decode(code: u8) -> f32 {
    let _ = code;
    unimplemented!("e4m3::decode")
}
