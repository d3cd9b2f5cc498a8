//! UE8M0 scale bytes: e means 2^(e−127) for e in 0..=254; 255 is NaN (rejected at load).

/// UE8M0 → f32 (2^(e−127); NaN for 255). 2^-127 is an f32 subnormal, still exact.
pub fn decode(code: u8) -> f32 {
    match code {
        255 => f32::NAN,
        0 => f32::from_bits(1 << 22),
        e => f32::from_bits((e as u32) << 23),
    }
}

/// The byte of ceil-pow2(s): the smallest c with 2^c ≥ s, clamped to 2^−127..2^127;
/// s = 0 (or negative) → byte 0. FlashInfer's rule: rounding the scale up means a block's largest
/// value never saturates.
pub fn encode_ceil(s: f32) -> u8 {
    if s.is_nan() || s <= 0.0 {
        return 0;
    }
    let bits = s.to_bits();
    let exp_field = (bits >> 23) as i32;
    let c = if exp_field == 0 {
        // Subnormal s < 2^-126: ceil(log2 s) is -126 unless s ≤ 2^-127.
        if s > f32::from_bits(1 << 22) {
            -126
        } else {
            -127
        }
    } else if exp_field == 255 {
        127 // +inf
    } else {
        let exact_pow2 = bits & 0x7F_FFFF == 0;
        exp_field - 127 + if exact_pow2 { 0 } else { 1 }
    };
    (c.clamp(-127, 127) + 127) as u8
}
