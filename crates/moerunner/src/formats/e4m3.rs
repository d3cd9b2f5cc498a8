//! E4M3 (`float8_e4m3fn`): 1 sign, 4 exponent (bias 7), 3 mantissa bits, no infinities,
//! 0x7F / 0xFF are NaN, largest finite 448.

/// Largest finite magnitude.
pub const MAX: f32 = 448.0;

/// f32 → E4M3: round to nearest, ties to even, saturate to ±448 (±inf too), NaN stays NaN.
pub fn encode(x: f32) -> u8 {
    let sign = ((x.to_bits() >> 24) & 0x80) as u8;
    if x.is_nan() {
        return sign | 0x7F;
    }
    let a = x.abs();
    if a >= MAX {
        return sign | 0x7E;
    }
    if a < f32::from_bits(0x3C80_0000) {
        // Below 2^-6: subnormal spacing 2^-9, so a·2^9 rounded is the code (a result of 8 is the
        // smallest normal, code 8, which the layout gives for free).
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    // Scale by a power of two so the 3 kept mantissa bits become the integer part; the scaling is
    // exact, so `round_ties_even` sees the true value. q is in [8, 16]; q = 16 carries into the
    // next exponent, which the addition below does by itself.
    let unbiased = ((a.to_bits() >> 23) as i32) - 127;
    let q = (a * f32::from_bits(((127 + 3 - unbiased) as u32) << 23)).round_ties_even() as u32;
    let code = (((unbiased + 7) as u32) << 3) + (q - 8);
    sign | code.min(0x7E) as u8
}

/// E4M3 → f32 (exact).
pub fn decode(code: u8) -> f32 {
    DECODE[code as usize]
}

/// All 256 decoded values, built once at compile time (used by decoders' inner loops).
pub static DECODE: [f32; 256] = build_table();

const fn build_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut c = 0;
    while c < 256 {
        let e = (c >> 3) & 0xF;
        let m = (c & 7) as u32;
        let mag = if c & 0x7F == 0x7F {
            f32::NAN
        } else if e == 0 {
            // m/8 · 2^-6 = m · 2^-9
            f32::from_bits(0x3B00_0000) * m as f32 // 2^-9
        } else {
            f32::from_bits((((e as u32) + 120) << 23) | (m << 20))
        };
        t[c] = if c & 0x80 != 0 { -mag } else { mag };
        c += 1;
    }
    t
}
