//! UE8M0 scale bytes: e means 2^(e−127) for e in 0..=254; 255 is NaN (rejected at load).

/// UE8M0 → f32 (2^(e−127); NaN for 255).
pub fn decode(code: u8) -> f32 {
    let _ = code;
    unimplemented!("ue8m0::decode")
}

/// The byte of ceil-pow2(s): smallest c with 2^c ≥ s, clamped to 2^−127..2^127; s = 0 → 0.
pub fn encode_ceil(s: f32) -> u8 {
    let _ = s;
    unimplemented!("ue8m0::encode_ceil")
}
