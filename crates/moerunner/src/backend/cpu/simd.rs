//! Weight decoding and dot-product tiles: the CPU backend's only `unsafe` code.
//!
//! Design decision: weights are decoded *in registers*. Each codec turns 16 elements (one
//! [`CHUNK`]) into two vectors of 8 f32 "raw" values; the factor of their group (block scale with
//! constants folded in, read straight from the stored scale bytes) multiplies them; FMAs dot them
//! with up to four activation rows at once, and a horizontal sum per (row, token) ends the tile.
//! Codecs whose stored layout pairs elements (E2M1 nibbles, bf16 halves of a 32-bit word) yield a
//! chunk as its 8 even elements then its 8 odd ones, so activation rows are permuted into the same
//! *codec order* once ([`Codec::order_index`]) instead of shuffling weights in the hot loop.
//! Every kernel exists twice: AVX2+FMA (chosen at run time with `is_x86_feature_detected!`) and a
//! portable scalar twin with the same semantics that tests hold the AVX2 path against.

/// Elements every codec decodes per step (two 8-lane vectors).
pub const CHUNK: usize = 16;

/// Most activation rows one tile multiplies against the same decoded weights.
pub const MAX_TILE_TOKENS: usize = 4;

/// 2^120: E4M3's 7 magnitude bits shifted left by 20 read as an f32 of value · 2^-120 (exponent
/// bias 127 instead of 7, subnormals included), so factors of E4M3 rows carry this multiplier.
pub const E4M3_RAW_FACTOR: f32 = f32::from_bits((127 + 120) << 23);

/// E2M1 magnitudes by code (`spec/formats.md`).
const E2M1_VALUES: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// Which kernels run: chosen once per loaded layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable code for any CPU (the semantics the AVX2 path is tested against).
    Scalar,
    /// x86-64 AVX2 + FMA.
    Avx2Fma,
}

impl Isa {
    /// The best kernels this CPU runs.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2Fma;
            }
        }
        Isa::Scalar
    }
    /// Whether this CPU can run `self` (tests ask before forcing a path).
    pub fn available(self) -> bool {
        self == Isa::Scalar || Isa::detect() == Isa::Avx2Fma
    }
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2Fma => "avx2+fma",
        }
    }
}

/// How a weight row's bytes become f32 "raw" values (the factor of their group does the rest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// Little-endian f32 (rows decoded elsewhere).
    F32,
    /// bf16 bits: exact in f32, no factor; pair-split codec order.
    Bf16,
    /// E4M3 bytes: raw = value · 2^-120 (see [`E4M3_RAW_FACTOR`]); always scaled.
    E4m3,
    /// Two E2M1 nibbles a byte, element 2i low: raw = value; always scaled; pair-split order.
    E2m1,
}

impl Codec {
    /// Bytes of `elems` elements (`elems` even for E2M1).
    pub fn bytes(self, elems: usize) -> usize {
        match self {
            Codec::F32 => 4 * elems,
            Codec::Bf16 => 2 * elems,
            Codec::E4m3 => elems,
            Codec::E2m1 => elems / 2,
        }
    }
    /// Whether raw values are multiplied by a per-group factor.
    pub fn scaled(self) -> bool {
        matches!(self, Codec::E4m3 | Codec::E2m1)
    }
    /// Whether whole chunks are stored as 8 (even, odd) pairs that decode to the 8 evens then the
    /// 8 odds: E2M1 nibbles of a byte, bf16 halves of a 32-bit word (a shift and a mask, no
    /// cross-lane shuffle).
    fn splits_pairs(self) -> bool {
        matches!(self, Codec::Bf16 | Codec::E2m1)
    }
    /// Position of natural element `c` of a `k`-long row in the codec's order: inside each whole
    /// chunk of 16, pair-split codecs put the even elements first; the tail past the last whole
    /// chunk keeps its natural order.
    #[inline]
    pub fn order_index(self, c: usize, k: usize) -> usize {
        if self.splits_pairs() && c < k - k % CHUNK {
            (c & !15) | ((c & 1) << 3) | ((c & 15) >> 1)
        } else {
            c
        }
    }
    /// Raw value of the element at codec-order position `pos` of a `k`-long row.
    #[inline]
    fn raw(self, row: &[u8], pos: usize, k: usize) -> f32 {
        // The natural index of codec position `pos` (the inverse of `order_index`).
        let c = if self.splits_pairs() && pos < k - k % CHUNK {
            let within = pos & 15;
            (pos & !15) | ((within & 7) << 1) | (within >> 3)
        } else {
            pos
        };
        match self {
            Codec::F32 => {
                f32::from_le_bytes([row[4 * c], row[4 * c + 1], row[4 * c + 2], row[4 * c + 3]])
            }
            Codec::Bf16 => {
                f32::from_bits(u32::from(u16::from_le_bytes([row[2 * c], row[2 * c + 1]])) << 16)
            }
            Codec::E4m3 => e4m3_raw(row[c]),
            Codec::E2m1 => {
                let byte = row[c / 2];
                e2m1_value(if c % 2 == 0 { byte & 15 } else { byte >> 4 })
            }
        }
    }
}

/// E4M3 byte → value · 2^-120 (exact, the same bits the AVX2 decoder builds).
#[inline]
pub fn e4m3_raw(b: u8) -> f32 {
    f32::from_bits((u32::from(b & 0x7F) << 20) | (u32::from(b & 0x80) << 24))
}

/// E2M1 nibble → value (exact).
#[inline]
pub fn e2m1_value(nibble: u8) -> f32 {
    let v = E2M1_VALUES[usize::from(nibble & 7)];
    if nibble & 8 != 0 {
        -v
    } else {
        v
    }
}

/// Where the per-group factors of a row come from: the row's *scale bytes* as stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scale<'a> {
    /// Unscaled codecs (F32, Bf16).
    None,
    /// One little-endian f32 per group, times `mul` (fp8 per-tensor as one group a row with
    /// the expert's scale, fp8_block; `mul` carries E4M3's 2^120).
    F32 { mul: f32 },
    /// One byte per group, looked up in the table (UE8M0 or E4M3 scale codes with constants
    /// folded in: 256 entries, L1-resident).
    Table(&'a [f32; 256]),
}

/// The shape of the rows a kernel reads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowFormat<'a> {
    pub codec: Codec,
    /// Elements per row.
    pub k: usize,
    /// Elements sharing one factor: a multiple of [`CHUNK`], or `k` (one group a row).
    pub group: usize,
    pub scale: Scale<'a>,
    /// Multiplies every dot product (nvfp4's per-expert global scale; 1 otherwise).
    pub out_mul: f32,
}

impl<'a> RowFormat<'a> {
    pub fn new(
        codec: Codec,
        k: usize,
        group: usize,
        scale: Scale<'a>,
        out_mul: f32,
    ) -> RowFormat<'a> {
        RowFormat {
            codec,
            k,
            group: group.clamp(1, k.max(1)),
            scale,
            out_mul,
        }
    }
    /// Plain f32 rows.
    pub fn f32(k: usize) -> RowFormat<'static> {
        RowFormat::new(Codec::F32, k, k, Scale::None, 1.0)
    }
    /// Factors per row (0 for unscaled codecs).
    pub fn groups(&self) -> usize {
        if self.codec.scaled() {
            self.k.div_ceil(self.group)
        } else {
            0
        }
    }
    pub fn row_bytes(&self) -> usize {
        self.codec.bytes(self.k)
    }
    /// Bytes of one row's scales.
    pub fn scale_bytes(&self) -> usize {
        match self.scale {
            Scale::None => 0,
            Scale::F32 { .. } => 4 * self.groups(),
            Scale::Table(_) => self.groups(),
        }
    }
    /// The factor of group `g` of a row with scale bytes `scales`.
    #[inline]
    fn factor(&self, scales: &[u8], g: usize) -> f32 {
        match self.scale {
            Scale::None => 1.0,
            Scale::F32 { mul } => {
                f32::from_le_bytes([
                    scales[4 * g],
                    scales[4 * g + 1],
                    scales[4 * g + 2],
                    scales[4 * g + 3],
                ]) * mul
            }
            Scale::Table(t) => t[usize::from(scales[g])],
        }
    }
    fn check(&self, rows: &[&[u8]], scales: &[&[u8]]) {
        // Internal invariants (callers derive everything from a validated layer); they guard the
        // raw-pointer reads below, so they stay on in release builds.
        let aligned = !self.codec.scaled() || self.group % CHUNK == 0 || self.group >= self.k;
        let paired = self.codec != Codec::E2m1 || self.k % CHUNK == 0;
        let scale_ok = self.codec.scaled() != (self.scale == Scale::None);
        assert!(aligned && paired && scale_ok, "bad row format {self:?}");
        assert!(
            rows.iter().all(|r| r.len() >= self.row_bytes()),
            "weight row shorter than {self:?}"
        );
        if self.codec.scaled() {
            assert_eq!(rows.len(), scales.len(), "one scale slice per row");
            assert!(
                scales.iter().all(|s| s.len() >= self.scale_bytes()),
                "too few scale bytes for {self:?}"
            );
        }
    }
}

/// `out[r * xs.len() + t] = out_mul · Σ_c W[r][c] · xs[t][c]` for any number of rows and up to
/// [`MAX_TILE_TOKENS`] activation rows (in codec order), decoding each weight element once per
/// call: the rows go 4 (one token) or 2 (more tokens) at a time through register tiles.
pub fn dot_rows(
    isa: Isa,
    fmt: RowFormat<'_>,
    rows: &[&[u8]],
    scales: &[&[u8]],
    xs: &[&[f32]],
    out: &mut [f32],
) {
    fmt.check(rows, scales);
    let (nr, nt) = (rows.len(), xs.len());
    assert!(
        (1..=MAX_TILE_TOKENS).contains(&nt) && out.len() == nr * nt,
        "tile shape"
    );
    assert!(
        xs.iter().all(|x| x.len() >= fmt.k),
        "activation row shorter than K"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma if Isa::detect() == Isa::Avx2Fma => {
            // SAFETY: AVX2 and FMA were detected on this CPU; `check` and the asserts above make
            // every row, scale slice and activation row at least as long as the kernel reads.
            unsafe { avx2::dot_rows(fmt, rows, scales, xs, out) }
        }
        _ => scalar_dot_rows(fmt, rows, scales, xs, out),
    }
}

/// Decodes rows to f32 weights (raw × factor, without `out_mul`) in codec order: `out[r * k + p]`.
pub fn decode_rows(
    isa: Isa,
    fmt: RowFormat<'_>,
    rows: &[&[u8]],
    scales: &[&[u8]],
    out: &mut [f32],
) {
    fmt.check(rows, scales);
    assert!(out.len() >= rows.len() * fmt.k, "decode buffer too small");
    for (r, row) in rows.iter().enumerate() {
        let s: &[u8] = if fmt.codec.scaled() { scales[r] } else { &[] };
        let dst = &mut out[r * fmt.k..(r + 1) * fmt.k];
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma if Isa::detect() == Isa::Avx2Fma => {
                // SAFETY: AVX2 detected; `check` sized the row and scales, `dst` is k long.
                unsafe { avx2::decode_row(fmt, row, s, dst) }
            }
            _ => scalar_decode_row(fmt, row, s, dst),
        }
    }
}

/// The bytes of an f32 slice (scales and decoded rows, read by kernels as bytes).
pub fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: u8 has no alignment or validity requirements and the length covers the same
    // memory; the borrow keeps `v` alive and immutable.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// `out[i * ldo + j] = Σ_c a[i * k + c] · b[j * k + c]` for i < m, j < n (C = A·Bᵀ, both stored
/// row-major), through `matrixmultiply::sgemm`: the dense f32 GEMM whose rate is the CPU's matrix
/// ceiling in `bench`.
pub fn sgemm_abt(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], out: &mut [f32], ldo: usize) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        a.len() >= m * k && b.len() >= n * k && n <= ldo && out.len() >= (m - 1) * ldo + n,
        "sgemm operand sizes"
    );
    // SAFETY: the assert bounds every index sgemm reads in `a` ([m, k] row-major) and `b`
    // ([n, k] row-major, read as k×n with strides 1, k) and writes in `out` ([m, ldo]); out does
    // not alias the inputs (it is borrowed mutably). With beta = 0 `out` need not be initialized.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            1,
            k as isize,
            0.0,
            out.as_mut_ptr(),
            ldo as isize,
            1,
        );
    }
}

/// The factor groups of a row as `(group index, start, end)` (one group for unscaled codecs).
#[inline(always)]
fn groups(fmt: &RowFormat<'_>) -> impl Iterator<Item = (usize, usize, usize)> {
    let group = if fmt.codec.scaled() {
        fmt.group
    } else {
        fmt.k.max(1)
    };
    let k = fmt.k;
    (0..k.div_ceil(group)).map(move |g| (g, g * group, ((g + 1) * group).min(k)))
}

fn scalar_decode_row(fmt: RowFormat<'_>, row: &[u8], scales: &[u8], out: &mut [f32]) {
    for (g, start, end) in groups(&fmt) {
        let f = fmt.factor(scales, g);
        for (p, o) in (start..end).zip(&mut out[start..end]) {
            let raw = fmt.codec.raw(row, p, fmt.k);
            *o = if fmt.codec.scaled() { raw * f } else { raw };
        }
    }
}

/// The scalar twin of the AVX2 tiles: 8 lanes of partial sums per (row, token), chunk elements p
/// and p + 8 into lane p (as the two vectors of a chunk), tails into a separate sum.
fn scalar_dot_rows(
    fmt: RowFormat<'_>,
    rows: &[&[u8]],
    scales: &[&[u8]],
    xs: &[&[f32]],
    out: &mut [f32],
) {
    let nt = xs.len();
    let vec_end = fmt.k - fmt.k % CHUNK;
    let mut w = [0f32; CHUNK];
    for (r, row) in rows.iter().enumerate() {
        let s: &[u8] = if fmt.codec.scaled() { scales[r] } else { &[] };
        let mut lanes = [[0f32; 8]; MAX_TILE_TOKENS];
        let mut tail = [0f32; MAX_TILE_TOKENS];
        for (g, start, end) in groups(&fmt) {
            let f = fmt.factor(s, g);
            let mut c = start;
            while c < end.min(vec_end) {
                for (p, wp) in w.iter_mut().enumerate() {
                    let raw = fmt.codec.raw(row, c + p, fmt.k);
                    *wp = if fmt.codec.scaled() { raw * f } else { raw };
                }
                for (t, x) in xs.iter().enumerate() {
                    let x = &x[c..c + CHUNK];
                    for l in 0..8 {
                        lanes[t][l] += w[l] * x[l];
                        lanes[t][l] += w[l + 8] * x[l + 8];
                    }
                }
                c += CHUNK;
            }
            for p in c..end {
                let raw = fmt.codec.raw(row, p, fmt.k);
                let wp = if fmt.codec.scaled() { raw * f } else { raw };
                for (t, x) in xs.iter().enumerate() {
                    tail[t] += wp * x[p];
                }
            }
        }
        for t in 0..nt {
            let l = &lanes[t];
            // Same pairing as the AVX2 horizontal sum: halves, then pairs, then the last two.
            let q = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
            let d = [q[0] + q[2], q[1] + q[3]];
            out[r * nt + t] = ((d[0] + d[1]) + tail[t]) * fmt.out_mul;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Codec, RowFormat, Scale, CHUNK, E2M1_VALUES, MAX_TILE_TOKENS};

    /// One codec's in-register decoder: 16 elements at a row's element offset `c` into two
    /// vectors of raw values (codec order).
    trait Decode {
        const CODEC: Codec;
        /// Raw values are the element values themselves (not tiny): a group's products may be
        /// summed before its factor is applied without underflow.
        const EXACT_RAW: bool;
        /// # Safety
        /// `row` must be readable for `Self::CODEC.bytes(c + 16)` bytes; AVX2 must be available.
        unsafe fn load(row: *const u8, c: usize) -> (__m256, __m256);
    }

    struct F32;
    struct Bf16;
    struct E4m3;
    struct E2m1;

    impl Decode for F32 {
        const CODEC: Codec = Codec::F32;
        const EXACT_RAW: bool = true;
        #[inline(always)]
        unsafe fn load(row: *const u8, c: usize) -> (__m256, __m256) {
            // SAFETY: the caller guarantees 16 f32 at element c ([16] f32, unaligned).
            unsafe {
                let p = row.add(4 * c) as *const f32;
                (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
            }
        }
    }

    impl Decode for Bf16 {
        const CODEC: Codec = Codec::Bf16;
        const EXACT_RAW: bool = true;
        #[inline(always)]
        unsafe fn load(row: *const u8, c: usize) -> (__m256, __m256) {
            // SAFETY: the caller guarantees 32 bytes ([16] bf16) at element c.
            unsafe {
                // Each 32-bit word holds elements 2i (low half) and 2i + 1 (high half); bf16 is
                // the top half of an f32, so a shift gives the evens and a mask the odds.
                let v = _mm256_loadu_si256(row.add(2 * c) as *const __m256i);
                let even = _mm256_slli_epi32::<16>(v);
                let odd = _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF_0000_u32 as i32));
                (_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd))
            }
        }
    }

    impl Decode for E4m3 {
        const CODEC: Codec = Codec::E4m3;
        const EXACT_RAW: bool = false;
        #[inline(always)]
        unsafe fn load(row: *const u8, c: usize) -> (__m256, __m256) {
            // SAFETY: the caller guarantees 16 bytes ([16] E4M3) at element c.
            unsafe {
                let bytes = _mm_loadu_si128(row.add(c) as *const __m128i);
                // Sign-extend each byte: bit 11 of the lane is then the sign, so one shift by 20
                // puts the sign at bit 31 and the 7 magnitude bits at 20..27; the mask keeps them.
                let mask = _mm256_set1_epi32(0x87F0_0000_u32 as i32);
                let lo = _mm256_cvtepi8_epi32(bytes);
                let hi = _mm256_cvtepi8_epi32(_mm_unpackhi_epi64(bytes, bytes));
                let lo = _mm256_and_si256(_mm256_slli_epi32::<20>(lo), mask);
                let hi = _mm256_and_si256(_mm256_slli_epi32::<20>(hi), mask);
                (_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi))
            }
        }
    }

    impl Decode for E2m1 {
        const CODEC: Codec = Codec::E2m1;
        const EXACT_RAW: bool = true;
        #[inline(always)]
        unsafe fn load(row: *const u8, c: usize) -> (__m256, __m256) {
            // SAFETY: the caller guarantees 8 bytes ([8] pairs of E2M1, low nibble first) at
            // element c (c even).
            unsafe {
                // Table entry i holds value(i) with bits 28..30 pre-xored with i, so xoring the
                // looked-up bits with (nibble << 28) restores them and sets the sign from bit 3.
                let t = |i: usize| (E2M1_VALUES[i].to_bits() ^ ((i as u32) << 28)) as i32;
                let lut = _mm256_castsi256_ps(_mm256_setr_epi32(
                    t(0),
                    t(1),
                    t(2),
                    t(3),
                    t(4),
                    t(5),
                    t(6),
                    t(7),
                ));
                let bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.add(c / 2) as *const __m128i));
                let high = _mm256_srli_epi32::<4>(bytes);
                // vpermps reads the low 3 bits of each index; the nibble's bit 3 lands on bit 31.
                let even = _mm256_xor_ps(
                    _mm256_permutevar8x32_ps(lut, bytes),
                    _mm256_castsi256_ps(_mm256_slli_epi32::<28>(bytes)),
                );
                let odd = _mm256_xor_ps(
                    _mm256_permutevar8x32_ps(lut, high),
                    _mm256_castsi256_ps(_mm256_slli_epi32::<28>(high)),
                );
                (even, odd)
            }
        }
    }

    /// Scale kinds as const parameters (the `Scale` variant, data hoisted out of the loops).
    const NO_SCALE: u8 = 0;
    const F32_SCALE: u8 = 1;
    const TABLE_SCALE: u8 = 2;

    /// What the loops need of a `Scale`: the multiplier of f32 scales, or the table.
    #[derive(Clone, Copy)]
    struct ScaleArgs {
        mul: f32,
        table: *const f32,
    }

    impl ScaleArgs {
        fn of(scale: Scale<'_>) -> ScaleArgs {
            match scale {
                Scale::None => ScaleArgs {
                    mul: 1.0,
                    table: std::ptr::null(),
                },
                Scale::F32 { mul } => ScaleArgs {
                    mul,
                    table: std::ptr::null(),
                },
                Scale::Table(t) => ScaleArgs {
                    mul: 1.0,
                    table: t.as_ptr(),
                },
            }
        }
        /// The factor of group `g` of a row whose scale bytes start at `scales`, broadcast.
        ///
        /// # Safety
        /// `scales` holds the row's scale bytes and `g` is one of its groups; for tables, the
        /// table holds 256 entries.
        #[inline(always)]
        unsafe fn factor<const S: u8>(self, scales: *const u8, g: usize) -> __m256 {
            // SAFETY: per the contract; f32 scales are read unaligned.
            unsafe {
                match S {
                    F32_SCALE => _mm256_set1_ps(
                        (scales.add(4 * g) as *const f32).read_unaligned() * self.mul,
                    ),
                    TABLE_SCALE => {
                        _mm256_broadcast_ss(&*self.table.add(usize::from(*scales.add(g))))
                    }
                    _ => _mm256_set1_ps(1.0),
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        // Pairing: lanes l and l + 4, then l and l + 2, then the last two (the scalar twin's order).
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let s = _mm_add_ss(d, _mm_shuffle_ps::<0b01>(d, d));
        _mm_cvtss_f32(s)
    }

    /// The tile: `R` weight rows × `N` activation rows, accumulators in registers.
    ///
    /// Register budget (16 ymm) decides the variants: one token of an unscaled codec gets two
    /// FMA chains per row (the decode is cheap, FMA latency would bind); for scaled codecs with
    /// exact raw values and one token, a group's products are summed first and its factor
    /// applied by one FMA per group instead of a multiply per vector; otherwise each decoded
    /// vector is multiplied by its factor and shared by all tokens.
    ///
    /// # Safety
    /// AVX2+FMA available; `rows[r]` points at `fmt.row_bytes()` bytes, `scales[r]` at
    /// `fmt.scale_bytes()` (scaled codecs), `xs[t]` at `fmt.k` f32.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<D: Decode, const S: u8, const R: usize, const N: usize>(
        fmt: &RowFormat<'_>,
        rows: [*const u8; R],
        scales: [*const u8; R],
        xs: [*const f32; N],
    ) -> [[f32; N]; R] {
        let scaled = S != NO_SCALE;
        let sa = ScaleArgs::of(fmt.scale);
        let block_sum = scaled && D::EXACT_RAW && N == 1;
        let two_chains = !scaled && N == 1;
        let k = fmt.k;
        let group = if scaled { fmt.group } else { k };
        let vec_end = k - k % CHUNK;
        let zero = _mm256_setzero_ps();
        let mut acc = [[zero; N]; R];
        let mut acc2 = [[zero; N]; R];
        let mut start = 0;
        let mut g = 0;
        while start < vec_end {
            let end = (start + group).min(vec_end);
            if block_sum {
                let mut blk = [zero; R];
                let mut c = start;
                while c < end {
                    // SAFETY: c + 16 ≤ vec_end ≤ k: inside the row and the activation row.
                    let (x0, x1) = unsafe {
                        (
                            _mm256_loadu_ps(xs[0].add(c)),
                            _mm256_loadu_ps(xs[0].add(c + 8)),
                        )
                    };
                    for r in 0..R {
                        // SAFETY: as above.
                        let (a, b) = unsafe { D::load(rows[r], c) };
                        blk[r] = _mm256_fmadd_ps(b, x1, _mm256_fmadd_ps(a, x0, blk[r]));
                    }
                    c += CHUNK;
                }
                for r in 0..R {
                    // SAFETY: g is a group of the row (start < k).
                    let f = unsafe { sa.factor::<S>(scales[r], g) };
                    acc[r][0] = _mm256_fmadd_ps(blk[r], f, acc[r][0]);
                }
            } else {
                let mut f = [zero; R];
                if scaled {
                    for r in 0..R {
                        // SAFETY: g is a group of the row.
                        f[r] = unsafe { sa.factor::<S>(scales[r], g) };
                    }
                }
                let mut c = start;
                while c < end {
                    let mut w = [(zero, zero); R];
                    for r in 0..R {
                        // SAFETY: c + 16 ≤ vec_end ≤ k.
                        let (a, b) = unsafe { D::load(rows[r], c) };
                        w[r] = if scaled {
                            (_mm256_mul_ps(a, f[r]), _mm256_mul_ps(b, f[r]))
                        } else {
                            (a, b)
                        };
                    }
                    for t in 0..N {
                        // SAFETY: xs[t] holds k ≥ c + 16 f32.
                        let (x0, x1) = unsafe {
                            (
                                _mm256_loadu_ps(xs[t].add(c)),
                                _mm256_loadu_ps(xs[t].add(c + 8)),
                            )
                        };
                        for r in 0..R {
                            acc[r][t] = _mm256_fmadd_ps(w[r].0, x0, acc[r][t]);
                            if two_chains {
                                acc2[r][t] = _mm256_fmadd_ps(w[r].1, x1, acc2[r][t]);
                            } else {
                                acc[r][t] = _mm256_fmadd_ps(w[r].1, x1, acc[r][t]);
                            }
                        }
                    }
                    c += CHUNK;
                }
            }
            start = end;
            g += 1;
        }
        let mut out = [[0f32; N]; R];
        for r in 0..R {
            for t in 0..N {
                let v = if two_chains {
                    _mm256_add_ps(acc[r][t], acc2[r][t])
                } else {
                    acc[r][t]
                };
                out[r][t] = hsum(v);
            }
        }
        // The tail past the last whole chunk (K % 16 elements; never for E2M1), in natural order.
        for p in vec_end..k {
            for r in 0..R {
                // SAFETY: p < k; the row holds `fmt.row_bytes()` bytes and its scale bytes
                // cover group p / group.
                let (row, s) = unsafe {
                    (
                        std::slice::from_raw_parts(rows[r], fmt.row_bytes()),
                        std::slice::from_raw_parts(scales[r], fmt.scale_bytes()),
                    )
                };
                let raw = D::CODEC.raw(row, p, k);
                let wp = if scaled {
                    raw * fmt.factor(s, p / group)
                } else {
                    raw
                };
                for t in 0..N {
                    // SAFETY: p < k.
                    out[r][t] += wp * unsafe { *xs[t].add(p) };
                }
            }
        }
        if fmt.out_mul != 1.0 {
            for o in out.iter_mut().flatten() {
                *o *= fmt.out_mul;
            }
        }
        out
    }

    /// Runs `R × N` tiles over all `rows` (a last partial tile repeats its first row and drops
    /// the extra results) and writes `out[r * N + t]`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tiles<D: Decode, const S: u8, const R: usize, const N: usize>(
        fmt: &RowFormat<'_>,
        rows: &[&[u8]],
        scales: &[&[u8]],
        xs: &[&[f32]],
        out: &mut [f32],
    ) {
        let xs_arr: [*const f32; N] = std::array::from_fn(|t| xs[t].as_ptr());
        let mut r0 = 0;
        while r0 < rows.len() {
            let nr = R.min(rows.len() - r0);
            let pick = |r: usize| r0 + if r < nr { r } else { 0 };
            let rows_arr: [*const u8; R] = std::array::from_fn(|r| rows[pick(r)].as_ptr());
            let scale_arr: [*const u8; R] = std::array::from_fn(|r| {
                if S != NO_SCALE {
                    scales[pick(r)].as_ptr()
                } else {
                    [].as_ptr()
                }
            });
            // SAFETY: forwarded from the caller (lengths checked by `dot_rows`); unscaled codecs
            // never read their (empty) scale pointers.
            let res = unsafe { tile::<D, S, R, N>(fmt, rows_arr, scale_arr, xs_arr) };
            for r in 0..nr {
                out[(r0 + r) * N..(r0 + r + 1) * N].copy_from_slice(&res[r]);
            }
            r0 += nr;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn for_shape<D: Decode, const S: u8>(
        fmt: &RowFormat<'_>,
        rows: &[&[u8]],
        scales: &[&[u8]],
        xs: &[&[f32]],
        out: &mut [f32],
    ) {
        debug_assert!(xs.len() <= MAX_TILE_TOKENS);
        // SAFETY: forwarded from the caller. One token gets 4 rows (4-8 FMA chains); more tokens
        // get 2 rows so accumulators, decoded weights and activations fit 16 registers.
        unsafe {
            match xs.len() {
                1 => tiles::<D, S, 4, 1>(fmt, rows, scales, xs, out),
                2 => tiles::<D, S, 2, 2>(fmt, rows, scales, xs, out),
                3 => tiles::<D, S, 2, 3>(fmt, rows, scales, xs, out),
                _ => tiles::<D, S, 2, 4>(fmt, rows, scales, xs, out),
            }
        }
    }

    /// # Safety
    /// AVX2+FMA available and the lengths `dot_rows` checks.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows(
        fmt: RowFormat<'_>,
        rows: &[&[u8]],
        scales: &[&[u8]],
        xs: &[&[f32]],
        out: &mut [f32],
    ) {
        let f = &fmt;
        // SAFETY: forwarded from the caller; `check` paired scaled codecs with a scale kind.
        unsafe {
            match (fmt.codec, fmt.scale) {
                (Codec::F32, _) => for_shape::<F32, NO_SCALE>(f, rows, scales, xs, out),
                (Codec::Bf16, _) => for_shape::<Bf16, NO_SCALE>(f, rows, scales, xs, out),
                (Codec::E4m3, Scale::F32 { .. }) => {
                    for_shape::<E4m3, F32_SCALE>(f, rows, scales, xs, out)
                }
                (Codec::E4m3, _) => for_shape::<E4m3, TABLE_SCALE>(f, rows, scales, xs, out),
                (Codec::E2m1, Scale::F32 { .. }) => {
                    for_shape::<E2m1, F32_SCALE>(f, rows, scales, xs, out)
                }
                (Codec::E2m1, _) => for_shape::<E2m1, TABLE_SCALE>(f, rows, scales, xs, out),
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn decode_with<D: Decode, const S: u8>(
        fmt: &RowFormat<'_>,
        row: &[u8],
        scales: &[u8],
        out: &mut [f32],
    ) {
        let scaled = S != NO_SCALE;
        let sa = ScaleArgs::of(fmt.scale);
        let k = fmt.k;
        let group = if scaled { fmt.group } else { k };
        let vec_end = k - k % CHUNK;
        let mut start = 0;
        let mut g = 0;
        while start < vec_end {
            let end = (start + group).min(vec_end);
            // SAFETY: g is a group of the row; its scale bytes are in `scales`.
            let f = if scaled {
                unsafe { sa.factor::<S>(scales.as_ptr(), g) }
            } else {
                _mm256_set1_ps(1.0)
            };
            let mut c = start;
            while c < end {
                // SAFETY: c + 16 ≤ k: the row holds the bytes and `out` the 16 f32.
                unsafe {
                    let (a, b) = D::load(row.as_ptr(), c);
                    let (a, b) = if scaled {
                        (_mm256_mul_ps(a, f), _mm256_mul_ps(b, f))
                    } else {
                        (a, b)
                    };
                    _mm256_storeu_ps(out.as_mut_ptr().add(c), a);
                    _mm256_storeu_ps(out.as_mut_ptr().add(c + 8), b);
                }
                c += CHUNK;
            }
            start = end;
            g += 1;
        }
        for p in vec_end..k {
            let raw = D::CODEC.raw(row, p, k);
            out[p] = if scaled {
                raw * fmt.factor(scales, p / group)
            } else {
                raw
            };
        }
    }

    /// # Safety
    /// AVX2+FMA available; `row` holds `fmt.row_bytes()`, `scales` `fmt.scale_bytes()`, `out`
    /// `fmt.k`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn decode_row(fmt: RowFormat<'_>, row: &[u8], scales: &[u8], out: &mut [f32]) {
        let f = &fmt;
        // SAFETY: forwarded from the caller.
        unsafe {
            match (fmt.codec, fmt.scale) {
                (Codec::F32, _) => decode_with::<F32, NO_SCALE>(f, row, scales, out),
                (Codec::Bf16, _) => decode_with::<Bf16, NO_SCALE>(f, row, scales, out),
                (Codec::E4m3, Scale::F32 { .. }) => {
                    decode_with::<E4m3, F32_SCALE>(f, row, scales, out)
                }
                (Codec::E4m3, _) => decode_with::<E4m3, TABLE_SCALE>(f, row, scales, out),
                (Codec::E2m1, Scale::F32 { .. }) => {
                    decode_with::<E2m1, F32_SCALE>(f, row, scales, out)
                }
                (Codec::E2m1, _) => decode_with::<E2m1, TABLE_SCALE>(f, row, scales, out),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SeededRng;

    /// A random row set: `rows` rows of `codec` with scales of kind `kind` (0 none, 1 f32,
    /// 2 table).
    struct RandomRows {
        data: Vec<Vec<u8>>,
        scales: Vec<Vec<u8>>,
        table: Box<[f32; 256]>,
    }

    fn random_rows(
        codec: Codec,
        k: usize,
        group: usize,
        kind: u8,
        rows: usize,
        seed: u64,
    ) -> RandomRows {
        let mut rng = SeededRng::new(seed);
        let data = (0..rows)
            .map(|_| match codec {
                // Random finite f32 / bf16 values (not random bits: NaN would poison the check).
                Codec::F32 => (0..k)
                    .flat_map(|_| rng.uniform(-1.0, 1.0).to_le_bytes())
                    .collect(),
                Codec::Bf16 => (0..k)
                    .flat_map(|_| ((rng.uniform(-1.0, 1.0).to_bits() >> 16) as u16).to_le_bytes())
                    .collect(),
                // Every E4M3 code but the NaNs (0x7F, 0xFF).
                Codec::E4m3 => (0..k)
                    .map(|_| rng.below(256) as u8)
                    .map(|b| if b & 0x7F == 0x7F { b - 1 } else { b })
                    .collect(),
                Codec::E2m1 => (0..k / 2).map(|_| rng.below(256) as u8).collect(),
            })
            .collect();
        let groups = k.div_ceil(group);
        let raw = if codec == Codec::E4m3 {
            E4M3_RAW_FACTOR
        } else {
            1.0
        };
        let table: Box<[f32; 256]> =
            Box::new(std::array::from_fn(|b| 2f32.powi(b as i32 % 7 - 3) * raw));
        let scales = (0..rows)
            .map(|_| match kind {
                1 => (0..groups)
                    .flat_map(|_| rng.uniform(0.5, 2.0).to_le_bytes())
                    .collect(),
                2 => (0..groups).map(|_| rng.below(256) as u8).collect(),
                _ => Vec::new(),
            })
            .collect();
        RandomRows {
            data,
            scales,
            table,
        }
    }

    fn xs(k: usize, n: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = SeededRng::new(seed);
        (0..n)
            .map(|_| (0..k).map(|_| rng.uniform(-2.0, 2.0)).collect())
            .collect()
    }

    #[test]
    fn order_index_is_a_permutation_of_each_chunk() {
        for codec in [Codec::E2m1, Codec::Bf16] {
            let mut seen = [false; 40];
            for c in 0..40 {
                let p = codec.order_index(c, 40);
                assert!(p / 16 == c / 16 && !seen[p]);
                seen[p] = true;
            }
            assert_eq!(codec.order_index(1, 40), 8);
            assert_eq!(codec.order_index(2, 40), 1);
            assert_eq!(codec.order_index(33, 40), 33, "the tail keeps its order");
        }
        assert_eq!(Codec::E4m3.order_index(1, 40), 1);
    }

    #[test]
    fn e4m3_raw_times_2_pow_120_is_the_code_value() {
        assert_eq!(e4m3_raw(0x7E) * E4M3_RAW_FACTOR, 448.0);
        assert_eq!(e4m3_raw(0x01) * E4M3_RAW_FACTOR, 2f32.powi(-9));
        assert_eq!(e4m3_raw(0x38) * E4M3_RAW_FACTOR, 1.0);
        assert_eq!(e4m3_raw(0xB8) * E4M3_RAW_FACTOR, -1.0);
        assert_eq!(e2m1_value(0xF), -6.0);
        assert_eq!(e2m1_value(0x9), -0.5);
    }

    /// Decoding and tiles of both ISAs agree: decode bit for bit, tiles to f32 rounding of the
    /// exact dot product of the decoded values.
    #[test]
    fn avx2_matches_scalar() {
        if !Isa::Avx2Fma.available() {
            eprintln!("skipped: this CPU has no AVX2+FMA");
            return;
        }
        // (codec, k, group, scale kind, out_mul)
        let cases = [
            (Codec::F32, 100, 100, 0, 1.0),
            (Codec::F32, 7, 7, 0, 1.0),
            (Codec::Bf16, 256, 256, 0, 1.0),
            (Codec::Bf16, 72, 72, 0, 1.0),
            (Codec::E4m3, 300, 128, 1, 1.0),
            (Codec::E4m3, 100, 100, 1, 1.0),
            (Codec::E4m3, 96, 32, 2, 1.0),
            (Codec::E2m1, 256, 32, 2, 1.0),
            (Codec::E2m1, 80, 16, 2, 0.375),
        ];
        for (seed, &(codec, k, group, kind, out_mul)) in cases.iter().enumerate() {
            let rr = random_rows(codec, k, group, kind, 6, seed as u64);
            let scale = match kind {
                1 => Scale::F32 {
                    mul: if codec == Codec::E4m3 {
                        E4M3_RAW_FACTOR
                    } else {
                        1.0
                    },
                },
                2 => Scale::Table(&rr.table),
                _ => Scale::None,
            };
            let fmt = RowFormat::new(codec, k, group, scale, out_mul);
            let rows: Vec<&[u8]> = rr.data.iter().map(|r| r.as_slice()).collect();
            let scales: Vec<&[u8]> = rr.scales.iter().map(|s| s.as_slice()).collect();
            let mut a = vec![0f32; 6 * k];
            let mut b = vec![1f32; 6 * k];
            decode_rows(Isa::Scalar, fmt, &rows, &scales, &mut a);
            decode_rows(Isa::Avx2Fma, fmt, &rows, &scales, &mut b);
            if let Some(i) = a
                .iter()
                .zip(&b)
                .position(|(x, y)| x.to_bits() != y.to_bits())
            {
                panic!(
                    "{fmt:?}: decode differs at row {} position {}: {} vs {}",
                    i / k,
                    i % k,
                    a[i],
                    b[i]
                );
            }
            let x = xs(k, 4, 100 + seed as u64);
            for nr in 1..=6 {
                for nt in 1..=4 {
                    let xr: Vec<&[f32]> = x[..nt].iter().map(|v| v.as_slice()).collect();
                    let mut s = vec![f32::NAN; nr * nt];
                    let mut v = vec![f32::NAN; nr * nt];
                    dot_rows(Isa::Scalar, fmt, &rows[..nr], &scales[..nr], &xr, &mut s);
                    dot_rows(Isa::Avx2Fma, fmt, &rows[..nr], &scales[..nr], &xr, &mut v);
                    for (i, (&p, &q)) in s.iter().zip(&v).enumerate() {
                        // The exact dot product of the decoded values, in f64.
                        let (r, t) = (i / nt, i % nt);
                        let m = out_mul as f64;
                        let exact: f64 = (0..k)
                            .map(|c| a[r * k + c] as f64 * x[t][c] as f64)
                            .sum::<f64>()
                            * m;
                        let mag: f64 = (0..k)
                            .map(|c| (a[r * k + c] as f64 * x[t][c] as f64).abs())
                            .sum::<f64>()
                            * m;
                        assert!((p as f64 - exact).abs() <= 1e-5 * mag && (q as f64 - exact).abs() <= 1e-5 * mag, "{fmt:?} rows {nr} tokens {nt} [{r},{t}]: scalar {p} avx2 {q} exact {exact}");
                    }
                }
            }
        }
    }
}
