//! E2M1 (FP4): codes 0..7 → 0, 0.5, 1, 1.5, 2, 3, 4, 6; 8..15 the same negated. Two per byte,
//! element 2i in the low nibble.

/// f32 → E2M1 nibble: round to nearest even, saturate to ±6.
pub fn encode(x: f32) -> u8 {
    let _ = x;
    unimplemented!("e2m1::encode")
}

/// E2M1 nibble (low 4 bits of `code`) → f32.
pub fn decode(code: u8) -> f32 {
    let _ = code;
    unimplemented!("e2m1::decode")
}
