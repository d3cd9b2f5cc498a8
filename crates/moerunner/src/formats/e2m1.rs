//! E2M1 (FP4): codes 0..7 → 0, 0.5, 1, 1.5, 2, 3, 4, 6; 8..15 the same negated. Two per byte,
//! element 2i in the low nibble.

/// Largest finite magnitude.
pub const MAX: f32 = 6.0;

/// The 16 code values.
pub const VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// f32 → E2M1 nibble: round to nearest, ties to even code, saturate to ±6. NaN has no code in
/// E2M1; quantizers reject non-finite input before calling this, and it maps to ±6.
pub fn encode(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 8 } else { 0 };
    let a = x.abs();
    // Midpoints between neighbours; `<=` where the lower neighbour's code is even (ties to even).
    let code = if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    sign | code
}

/// E2M1 nibble (low 4 bits of `code`) → f32.
pub fn decode(code: u8) -> f32 {
    VALUES[(code & 0xF) as usize]
}

/// Packs two nibbles: element 2i (`lo`) in the low nibble, element 2i+1 (`hi`) in the high one.
pub fn pack(lo: u8, hi: u8) -> u8 {
    (lo & 0xF) | (hi << 4)
}

/// The two nibbles of a packed byte, element 2i (low nibble) first.
pub fn unpack(byte: u8) -> [u8; 2] {
    [byte & 0xF, byte >> 4]
}

/// Both decoded values of a packed byte, low nibble first (a 256-entry table for decoders).
pub static PAIRS: [[f32; 2]; 256] = build_pairs();

const fn build_pairs() -> [[f32; 2]; 256] {
    let mut t = [[0f32; 2]; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = [VALUES[b & 0xF], VALUES[b >> 4]];
        b += 1;
    }
    t
}
