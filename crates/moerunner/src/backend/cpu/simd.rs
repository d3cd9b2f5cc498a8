//! Weight decoding and dot-product tiles: the CPU backend's only `unsafe` code.
//!
//! Design decision: weights are decoded *in registers*. Each codec turns 16 elements (one
//! [`CHUNK`]) into two vectors of 8 f32 "raw" values; the factor of their group (block scale with
//! constants folded in, read straight from the stored scale bytes) multiplies them; FMAs dot them
//! with up to four activation rows at once, and a horizontal sum per (row, token) ends the tile.
//! Codecs whose decoder pairs elements (E2M1 nibbles, bf16 halves of a 32-bit word, E4M3 bytes
//! widened to 16-bit halves) yield a chunk as its 8 even elements then its 8 odd ones, so
//! activation rows are permuted into the same *codec order* once ([`Codec::order_index`]) instead
//! of shuffling weights in the hot loop.
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
    /// E4M3 bytes: raw = value · 2^-120 (see [`E4M3_RAW_FACTOR`]); always scaled; pair-split order.
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
    /// Elements of a whole chunk of the codec's order: E2M1 is decoded 32 at a time (16 bytes,
    /// one 128-bit lane), the others 16 at a time.
    fn chunk(self) -> usize {
        if self == Codec::E2m1 {
            32
        } else {
            CHUNK
        }
    }
    /// Position of natural element `c` of a `k`-long row in the codec's order. Inside each whole
    /// chunk: bf16 and E4M3 put the 8 even elements first (halves of 32-bit words); E2M1 follows its
    /// byte-shuffle decoder (`avx2::e2m1`): position 4q + i holds element
    /// 16·(q/2 mod 2) + 4i + 2·(q mod 2) + q/4. The tail past the last whole chunk keeps its order.
    #[inline]
    pub fn order_index(self, c: usize, k: usize) -> usize {
        if c >= k - k % self.chunk() {
            return c;
        }
        match self {
            Codec::Bf16 | Codec::E4m3 => (c & !15) | ((c & 1) << 3) | ((c & 15) >> 1),
            Codec::E2m1 => {
                let w = c & 31;
                let (half, i, rem) = (w >> 4, (w & 15) >> 2, w & 3);
                let q = ((rem & 1) << 2) | (half << 1) | (rem >> 1);
                (c & !31) | (q << 2) | i
            }
            _ => c,
        }
    }
    /// The natural element at codec-order position `pos` (the inverse of `order_index`).
    #[inline]
    fn natural(self, pos: usize, k: usize) -> usize {
        if pos >= k - k % self.chunk() {
            return pos;
        }
        match self {
            Codec::Bf16 | Codec::E4m3 => {
                let w = pos & 15;
                (pos & !15) | ((w & 7) << 1) | (w >> 3)
            }
            Codec::E2m1 => {
                let (q, i) = ((pos & 31) >> 2, pos & 3);
                (pos & !31) | (((q >> 1) & 1) << 4) | (i << 2) | ((q & 1) << 1) | (q >> 2)
            }
            _ => pos,
        }
    }
    /// Raw value of the element at codec-order position `pos` of a `k`-long row.
    #[inline]
    fn raw(self, row: &[u8], pos: usize, k: usize) -> f32 {
        let c = self.natural(pos, k);
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
                e2m1_value(if c.is_multiple_of(2) {
                    byte & 15
                } else {
                    byte >> 4
                })
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
        let aligned =
            !self.codec.scaled() || self.group.is_multiple_of(CHUNK) || self.group >= self.k;
        // E2M1 (mxfp4, nvfp4): whole bytes, 16- or 32-element groups.
        let paired = self.codec != Codec::E2m1
            || (self.k.is_multiple_of(CHUNK) && matches!(self.group, 16 | 32));
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

/// Whether [`dot_rows_fixed`] runs integer kernels for rows of `codec` on `isa` (E2M1 on
/// AVX2); callers convert activations to [`FixedRows`] only then.
pub fn has_fixed_kernel(isa: Isa, codec: Codec) -> bool {
    cfg!(target_arch = "x86_64")
        && codec == Codec::E2m1
        && isa == Isa::Avx2Fma
        && Isa::detect() == Isa::Avx2Fma
}

/// The exponent `e` with `2^(e-1) ≤ m < 2^e` for the magnitude bits `m` of a finite f32 (its bits
/// without the sign); -126 for zero and subnormals. The block exponent of the fixed-point rows and
/// of the deferred-factor tiles.
#[inline]
fn exponent_above(magnitude_bits: u32) -> i32 {
    (magnitude_bits >> 23) as i32 - 126
}

/// One 32-element block of an E2M1-ordered activation row (`x`, codec order) in fixed point
/// ([`fixed`]) by the vector conversion; `None` where there is none (another codec, or no AVX2),
/// and the caller converts element by element.
fn fixed_block(
    codec: Codec,
    x: &[f32],
    min_exponent: i32,
    vs: &mut [[i8; 32]; fixed::VECTORS_PER_BLOCK],
) -> Option<fixed::FixedBlock> {
    #[cfg(target_arch = "x86_64")]
    if codec == Codec::E2m1 && Isa::detect() == Isa::Avx2Fma {
        assert!(x.len() >= fixed::BLOCK, "fixed-point block");
        // SAFETY: AVX2 detected; 32 f32 readable (asserted).
        return Some(unsafe { avx2_e2m1::fixed_block(x.as_ptr(), min_exponent, vs) });
    }
    let _ = (codec, x, min_exponent, vs);
    None
}

/// UE8M0 scales of rows regrouped by pairs: `bytes[(p · groups + g) · 2 + i]` is the scale of
/// row 2p + i (of the rows a call reads) for group g, the second of an odd last row any byte.
#[derive(Clone, Copy, Debug)]
pub struct PairScales<'a> {
    pub bytes: &'a [u8],
    /// Least and greatest byte of the whole projection (a bound on `bytes`).
    pub range: (u8, u8),
}

impl PairScales<'_> {
    /// Whether every factor `2^(s - 127) · 2^e` of these scales and the exponents `e` of `fx`
    /// is a normal f32, so the kernel may build it from exponent bits.
    fn exponents_fit(&self, fx: &FixedRow<'_>) -> bool {
        let (lo, hi) = fx.exponent_range;
        i32::from(self.range.0) + lo >= 1 && i32::from(self.range.1) + hi <= 254
    }
}

/// `out[r] = out_mul · Σ_c W[r][c] · x[c]` for one activation row `x` (codec order) given also
/// as `fx`, its fixed-point form ([`fixed`]), and `out.len()` rows stored back to back: row `r`
/// at `data[r · row_bytes..]`, its scale bytes at `scales[r · scale_bytes..]`, and, for mxfp4,
/// optionally the same scales regrouped by pairs (`pairs`; used when their factors and the
/// activations' fit f32 exponents). The integer kernel where [`has_fixed_kernel`], else the f32
/// tiles of [`dot_rows`].
#[allow(clippy::too_many_arguments)]
pub fn dot_rows_fixed(
    isa: Isa,
    fmt: RowFormat<'_>,
    data: &[u8],
    scales: &[u8],
    pairs: Option<PairScales<'_>>,
    x: &[f32],
    fx: FixedRow<'_>,
    out: &mut [f32],
) {
    let n = out.len();
    let (rb, sb) = (fmt.row_bytes(), fmt.scale_bytes());
    assert!(
        data.len() >= n * rb && scales.len() >= n * sb && x.len() >= fmt.k,
        "fixed-point tile shape"
    );
    #[cfg(target_arch = "x86_64")]
    if has_fixed_kernel(isa, fmt.codec) {
        let blocks = fmt.k / fixed::BLOCK;
        let ok = matches!(fmt.scale, Scale::Table(_))
            && matches!(fmt.group, 16 | 32)
            && fmt.k.is_multiple_of(CHUNK)
            && fx.scales.len() >= blocks
            && fx.vectors.len() >= blocks * fixed::VECTORS_PER_BLOCK;
        assert!(ok, "bad fixed-point tile {fmt:?}");
        let factors = match pairs {
            Some(p) if fmt.group == 32 && p.exponents_fit(&fx) => {
                assert!(
                    p.bytes.len() >= n.div_ceil(2) * blocks * 2 && fx.exponents.len() >= blocks,
                    "pair scales shape"
                );
                avx2_e2m1::GroupFactors::PairExponents(p.bytes)
            }
            _ => avx2_e2m1::GroupFactors::Table(scales),
        };
        // SAFETY: AVX2 and FMA were detected; the asserts above size every row, scale run,
        // pair word, activation row and fixed-point block the kernel reads.
        unsafe { avx2_e2m1::dot_rows_fixed(&fmt, data, factors, x, fx, out) };
        return;
    }
    let _ = (fx, pairs);
    // The f32 tiles, 32 rows at a time (row slices on the stack: no allocation per call).
    const BLOCK_ROWS: usize = 32;
    for (i, o) in out.chunks_mut(BLOCK_ROWS).enumerate() {
        let first = BLOCK_ROWS * i;
        let rows: [&[u8]; BLOCK_ROWS] = std::array::from_fn(|j| {
            let r = (first + j).min(n - 1);
            &data[r * rb..(r + 1) * rb]
        });
        let srows: [&[u8]; BLOCK_ROWS] = std::array::from_fn(|j| {
            let r = (first + j).min(n - 1);
            &scales[r * sb..(r + 1) * sb]
        });
        let s: &[&[u8]] = if fmt.codec.scaled() {
            &srows[..o.len()]
        } else {
            &[]
        };
        dot_rows(isa, fmt, &rows[..o.len()], s, &[x], o);
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
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2Fma && Isa::detect() == Isa::Avx2Fma {
        if fmt.codec == Codec::E2m1 {
            // SAFETY: AVX2 detected; `check` sized rows and scales, `out` holds every row.
            unsafe { avx2_e2m1::decode_rows(&fmt, rows, scales, out) };
            return;
        }
        for (r, row) in rows.iter().enumerate() {
            let s: &[u8] = if fmt.codec.scaled() { scales[r] } else { &[] };
            // SAFETY: AVX2 detected; `check` sized the row and scales, the slice is k long.
            unsafe { avx2::decode_row(fmt, row, s, &mut out[r * fmt.k..(r + 1) * fmt.k]) };
        }
        return;
    }
    for (r, row) in rows.iter().enumerate() {
        let s: &[u8] = if fmt.codec.scaled() { scales[r] } else { &[] };
        scalar_decode_row(fmt, row, s, &mut out[r * fmt.k..(r + 1) * fmt.k]);
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

/// The weight at codec-order position `p` of a row: raw value × the factor of its element's group.
#[inline]
fn weight(fmt: &RowFormat<'_>, row: &[u8], scales: &[u8], p: usize) -> f32 {
    let raw = fmt.codec.raw(row, p, fmt.k);
    if fmt.codec.scaled() {
        raw * fmt.factor(scales, fmt.codec.natural(p, fmt.k) / fmt.group)
    } else {
        raw
    }
}

fn scalar_decode_row(fmt: RowFormat<'_>, row: &[u8], scales: &[u8], out: &mut [f32]) {
    for (p, o) in out[..fmt.k].iter_mut().enumerate() {
        *o = weight(&fmt, row, scales, p);
    }
}

/// The scalar twin of the AVX2 tiles: 8 lanes of partial sums per (row, token), chunk positions
/// p and p + 8 into lane p, the tail past the last whole chunk into a separate sum.
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
        for c in (0..vec_end).step_by(CHUNK) {
            for (p, wp) in w.iter_mut().enumerate() {
                *wp = weight(&fmt, row, s, c + p);
            }
            for (t, x) in xs.iter().enumerate() {
                let x = &x[c..c + CHUNK];
                for l in 0..8 {
                    lanes[t][l] += w[l] * x[l];
                    lanes[t][l] += w[l + 8] * x[l + 8];
                }
            }
        }
        for p in vec_end..fmt.k {
            let wp = weight(&fmt, row, s, p);
            for (t, x) in xs.iter().enumerate() {
                tail[t] += wp * x[p];
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
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_e2m1;
mod fixed;

pub use fixed::{FixedRow, FixedRows};

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
        // k = 80: two whole E2M1 chunks (32) and a 16-element tail; five bf16 chunks.
        for codec in [Codec::F32, Codec::Bf16, Codec::E4m3, Codec::E2m1] {
            let k = 80;
            let mut seen = [false; 80];
            for c in 0..k {
                let p = codec.order_index(c, k);
                assert!(
                    p / codec.chunk() == c / codec.chunk() && !seen[p],
                    "{codec:?} {c}"
                );
                assert_eq!(
                    codec.natural(p, k),
                    c,
                    "{codec:?}: natural inverts order_index"
                );
                seen[p] = true;
            }
        }
        assert_eq!(
            Codec::E2m1.order_index(70, 80),
            70,
            "the tail keeps its order"
        );
        assert_eq!(
            Codec::Bf16.order_index(81, 88),
            81,
            "the tail keeps its order"
        );
        assert_eq!(Codec::Bf16.order_index(1, 32), 8);
        // E2M1: position 4q + i, vector q = 0 holds elements 0, 4, 8, 12; q = 4 holds 1, 5, 9, 13.
        assert_eq!(Codec::E2m1.order_index(4, 32), 1);
        assert_eq!(Codec::E2m1.order_index(1, 32), 16);
        assert_eq!(Codec::E2m1.order_index(18, 32), 12);
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

    /// `out_mul · Σ w·x` in f64 and the same sum of magnitudes (the scale of f32 rounding).
    fn exact_product(w: &[f32], x: &[f32], out_mul: f64) -> (f64, f64) {
        let products = w.iter().zip(x).map(|(&a, &b)| f64::from(a) * f64::from(b));
        let (sum, magnitude) = products.fold((0.0, 0.0), |(s, m), p| (s + p, m + p.abs()));
        (sum * out_mul, magnitude * out_mul)
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
                    "{codec:?} k {k} group {group}: decode differs at row {} position {}: {} vs {}",
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
                        let (exact, mag) = exact_product(&a[r * k..(r + 1) * k], &x[t], m);
                        assert!((p as f64 - exact).abs() <= 1e-5 * mag && (q as f64 - exact).abs() <= 1e-5 * mag, "{codec:?} k {k} group {group} rows {nr} tokens {nt} [{r},{t}]: scalar {p} avx2 {q} exact {exact}");
                    }
                }
            }
        }
    }

    /// One-token E4M3 tiles sum each group raw against the activations times 2^(120 - E) and
    /// apply the group's factor once: exact to f32 rounding for activations from 2^-100 to 2^100
    /// (the lifted products stay normal); activations of 2^120 and up, and NaN, take the
    /// factor-first tile (NaN propagates).
    #[test]
    fn deferred_factor_tiles_hold_for_extreme_activations() {
        if !Isa::Avx2Fma.available() {
            eprintln!("skipped: this CPU has no AVX2+FMA");
            return;
        }
        for (seed, (k, group, kind)) in [(300, 128, 1), (100, 100, 1), (96, 32, 2)]
            .into_iter()
            .enumerate()
        {
            let seed = 500 + seed as u64;
            eprintln!("seed {seed}: k {k} group {group}");
            let rr = random_rows(Codec::E4m3, k, group, kind, 5, seed);
            let scale = if kind == 1 {
                Scale::F32 {
                    mul: E4M3_RAW_FACTOR,
                }
            } else {
                Scale::Table(&rr.table)
            };
            let fmt = RowFormat::new(Codec::E4m3, k, group, scale, 1.0);
            let rows: Vec<&[u8]> = rr.data.iter().map(|r| r.as_slice()).collect();
            let scales: Vec<&[u8]> = rr.scales.iter().map(|s| s.as_slice()).collect();
            let mut w = vec![0f32; 5 * k];
            decode_rows(Isa::Scalar, fmt, &rows, &scales, &mut w);
            let base = &xs(k, 1, seed)[0];
            for lift in [-100, -7, 0, 60, 100] {
                let x: Vec<f32> = base.iter().map(|v| v * 2f32.powi(lift)).collect();
                let mut out = vec![f32::NAN; 5];
                dot_rows(Isa::Avx2Fma, fmt, &rows, &scales, &[&x], &mut out);
                for (r, &got) in out.iter().enumerate() {
                    let wr = &w[r * k..(r + 1) * k];
                    let (exact, mag) = exact_product(wr, &x, 1.0);
                    assert!(
                        (got as f64 - exact).abs() <= 1e-5 * mag,
                        "k {k} x·2^{lift} row {r}: {got} vs {exact}"
                    );
                }
            }
            let mut x = base.clone();
            x[k / 2] = f32::NAN;
            let mut out = vec![0f32; 5];
            dot_rows(Isa::Avx2Fma, fmt, &rows, &scales, &[&x], &mut out);
            assert!(out.iter().all(|v| v.is_nan()), "{out:?}");
        }
        // SAFETY: AVX2 and FMA are available (checked above).
        let x_mul = |x: &[f32]| unsafe { avx2::deferred_x_mul(x) };
        assert_eq!(x_mul(&[1.0, -0.75]), Some(2f32.powi(119)));
        assert_eq!(x_mul(&[0.0; 20]), Some(2f32.powi(127)), "capped");
        assert_eq!(x_mul(&[3.0, -2f32.powi(119)]), Some(1.0));
        assert_eq!(x_mul(&[3.0, -2f32.powi(120)]), None, "2^120 and up");
        assert_eq!(x_mul(&[f32::NAN, 1.0]), None);
        assert_eq!(
            x_mul(
                &[1.0; 9]
                    .iter()
                    .chain(&[f32::INFINITY])
                    .copied()
                    .collect::<Vec<_>>()
            ),
            None
        );
    }

    /// The integer one-token kernel against the exact dot product of the decoded weights: within
    /// f32 rounding plus the fixed-point bound (2^-15 of each block's largest |x| per element),
    /// and within f32 rounding alone for bf16 activations narrow enough to convert exactly.
    #[test]
    fn fixed_point_kernel_matches_the_exact_product() {
        if !Isa::Avx2Fma.available() {
            eprintln!("skipped: this CPU has no AVX2+FMA");
            return;
        }
        // (k, group, out_mul): mxfp4 rows, nvfp4 rows, a 16-element tail under each group size.
        let cases = [
            (256, 32, 1.0),
            (2048, 32, 1.0),
            (80, 16, 0.375),
            (80, 32, 1.0),
            (16, 16, 1.0),
        ];
        for (seed, &(k, group, out_mul)) in cases.iter().enumerate() {
            let seed = 300 + seed as u64;
            eprintln!("seed {seed}: k {k} group {group}");
            let rr = random_rows(Codec::E2m1, k, group, 2, 7, seed);
            let fmt = RowFormat::new(Codec::E2m1, k, group, Scale::Table(&rr.table), out_mul);
            assert!(has_fixed_kernel(Isa::Avx2Fma, fmt.codec));
            let rows: Vec<&[u8]> = rr.data.iter().map(|r| r.as_slice()).collect();
            let scales: Vec<&[u8]> = rr.scales.iter().map(|s| s.as_slice()).collect();
            let mut w = vec![0f32; 7 * k];
            decode_rows(Isa::Scalar, fmt, &rows, &scales, &mut w);
            let mut rng = SeededRng::new(seed);
            // Wide f32 activations (six binades), then bf16 ones within eight binades a block.
            let wide: Vec<f32> = (0..k)
                .map(|_| rng.uniform(-2.0, 2.0) * 2f32.powi(rng.below(6) as i32 - 3))
                .collect();
            let narrow: Vec<f32> = (0..k)
                .map(|_| {
                    let v = rng.uniform(0.5, 1.0) * 2f32.powi(rng.below(8) as i32 - 2);
                    let v = if rng.below(2) == 0 { -v } else { v };
                    f32::from_bits(v.to_bits() & 0xFFFF_0000)
                })
                .collect();
            for (x, exact_input) in [(&wide, false), (&narrow, true)] {
                let mut fx = FixedRows::default();
                fx.reset(1, k);
                fx.fill_all(Codec::E2m1, |_| x);
                let fxr = fx.row(0).expect("finite activations convert");
                for nr in (1..=7).chain([40]) {
                    let mut out = vec![f32::NAN; nr];
                    let mut fallback = vec![f32::NAN; nr];
                    let rows_of = |rows: &[Vec<u8>]| -> Vec<u8> {
                        rows.iter().cycle().take(nr).flatten().copied().collect()
                    };
                    let (data, sc) = (rows_of(&rr.data), rows_of(&rr.scales));
                    dot_rows_fixed(Isa::Avx2Fma, fmt, &data, &sc, None, x, fxr, &mut out);
                    // The f32 tiles without the integer kernel (CPUs without AVX2), over more
                    // rows than one block of them.
                    dot_rows_fixed(Isa::Scalar, fmt, &data, &sc, None, x, fxr, &mut fallback);
                    for (r, (&got, &f32_path)) in out.iter().zip(&fallback).enumerate() {
                        let r = r % 7;
                        let m = f64::from(out_mul);
                        let wr = &w[r * k..(r + 1) * k];
                        let (exact, mag) = exact_product(wr, x, m);
                        // Blocks are whole chunks of codec order (a permutation inside each chunk).
                        let whole = k - k % 32;
                        let fixed_bound: f64 = if exact_input {
                            0.0
                        } else {
                            (0..whole / 32)
                                .map(|b| {
                                    let xmax = x[32 * b..32 * b + 32]
                                        .iter()
                                        .fold(0f32, |a, v| a.max(v.abs()));
                                    let wsum: f64 = wr[32 * b..32 * b + 32]
                                        .iter()
                                        .map(|v| f64::from(v.abs()))
                                        .sum();
                                    wsum * f64::from(xmax) * 2f64.powi(-15)
                                })
                                .sum::<f64>()
                                * m
                        };
                        assert!(
                            (f64::from(got) - exact).abs() <= 1e-5 * mag + fixed_bound,
                            "k {k} group {group} rows {nr} [{r}] exact input {exact_input}: {got} vs {exact} (mag {mag}, bound {fixed_bound})"
                        );
                        assert!(
                            (f64::from(f32_path) - exact).abs() <= 1e-5 * mag,
                            "f32 path: k {k} group {group} rows {nr} [{r}]: {f32_path} vs {exact}"
                        );
                    }
                }
            }
        }
    }

    /// UE8M0 rows regrouped by pairs (as `rows::ProjectionPlan` stores mxfp4 scales).
    fn pair_bytes(scales: &[Vec<u8>]) -> Vec<u8> {
        scales
            .chunks(2)
            .flat_map(|p| {
                let (a, b) = (&p[0], p.get(1).unwrap_or(&p[0]));
                a.iter()
                    .zip(b)
                    .flat_map(|(&x, &y)| [x, y])
                    .collect::<Vec<u8>>()
            })
            .collect()
    }

    /// The integer kernel's mxfp4 factors built from exponent bits (scales regrouped by pairs)
    /// give the same bits as the table lookup and multiply; and the exponent guard refuses
    /// products that would leave the normal f32 range (the table path then runs).
    #[test]
    fn pair_exponent_factors_match_the_table_bit_for_bit() {
        if !Isa::Avx2Fma.available() {
            eprintln!("skipped: this CPU has no AVX2+FMA");
            return;
        }
        let ue8m0: Box<[f32; 256]> =
            Box::new(std::array::from_fn(|b| 2f64.powi(b as i32 - 127) as f32));
        for (seed, k) in [(410u64, 64usize), (411, 2048), (412, 96)] {
            eprintln!("seed {seed}: k {k}");
            let mut rng = SeededRng::new(seed);
            let mut rr = random_rows(Codec::E2m1, k, 32, 2, 7, seed);
            // Realistic checkpoint scales (2^-27..2^8), one row with the extreme codes 0 and 254.
            for row in &mut rr.scales {
                row.iter_mut().for_each(|b| *b = 100 + rng.below(36) as u8);
            }
            let x: Vec<f32> = (0..k)
                .map(|_| rng.uniform(-4.0, 4.0) * 2f32.powi(rng.below(12) as i32 - 6))
                .collect();
            let mut fx = FixedRows::default();
            fx.reset(1, k);
            fx.fill_all(Codec::E2m1, |_| &x);
            let fxr = fx.row(0).expect("finite activations convert");
            let fmt = RowFormat::new(Codec::E2m1, k, 32, Scale::Table(&ue8m0), 1.0);
            for nr in 1..=7 {
                let (data, sc) = (rr.data[..nr].concat(), rr.scales[..nr].concat());
                let pb = pair_bytes(&rr.scales[..nr]);
                let pairs = PairScales {
                    bytes: &pb,
                    range: (100, 135),
                };
                assert!(pairs.exponents_fit(&fxr));
                let (mut by_table, mut by_pairs) = (vec![f32::NAN; nr], vec![f32::NAN; nr]);
                dot_rows_fixed(Isa::Avx2Fma, fmt, &data, &sc, None, &x, fxr, &mut by_table);
                dot_rows_fixed(
                    Isa::Avx2Fma,
                    fmt,
                    &data,
                    &sc,
                    Some(pairs),
                    &x,
                    fxr,
                    &mut by_pairs,
                );
                assert!(by_pairs.iter().all(|v| v.is_finite()), "{by_pairs:?}");
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&by_pairs), bits(&by_table), "k {k} rows {nr}");
            }
            // The guard: the least scale must lift the least activation exponent to 1, the
            // greatest keep the greatest at 254 (a subnormal or infinite factor otherwise).
            let (lo, hi) = fxr.exponent_range;
            let fits = |fx: &FixedRow<'_>, range: (u8, u8)| {
                PairScales { bytes: &[], range }.exponents_fit(fx)
            };
            let least = u8::try_from(1 - lo).expect("activations below 2^16");
            assert!(fits(&fxr, (least, least)) && !fits(&fxr, (least - 1, least)));
            assert!(hi < 0 && fits(&fxr, (least, 254)));
            // Activations of 2^20 need the greatest scale at most 254 − (21 − 16).
            let big = vec![1.5 * 2f32.powi(20); k];
            let mut fb = FixedRows::default();
            fb.reset(1, k);
            fb.fill_all(Codec::E2m1, |_| &big);
            let fbr = fb.row(0).expect("finite activations convert");
            assert_eq!(fbr.exponent_range, (5, 5));
            assert!(fits(&fbr, (100, 249)) && !fits(&fbr, (100, 250)));
        }
    }
}

#[cfg(test)]
mod kernel_bench {
    use super::*;
    use crate::rng::SeededRng;
    use std::time::Instant;

    /// Kernel-only throughput of the one-token E2M1 products, the f32 tile and the integer
    /// kernel (`cargo test --release -p moerunner kernel_bench -- --ignored --nocapture`): rows
    /// resident in L1/L2 (`rows` × k) and rows streamed from a buffer larger than the last-level
    /// cache.
    #[test]
    #[ignore]
    fn e2m1_one_token() {
        if !Isa::Avx2Fma.available() {
            return;
        }
        let k = 2048;
        let table: Box<[f32; 256]> =
            Box::new(std::array::from_fn(|b| 2f64.powi(b as i32 - 127) as f32));
        let mut rng = SeededRng::new(7);
        let x: Vec<f32> = (0..k).map(|_| rng.uniform(-1.0, 1.0)).collect();
        for total_rows in [32usize, 512, 65536] {
            let data: Vec<u8> = (0..total_rows * k / 2)
                .map(|_| rng.below(256) as u8)
                .collect();
            let sc: Vec<u8> = (0..total_rows * k / 32)
                .map(|_| 120 + rng.below(16) as u8)
                .collect();
            let fmt = RowFormat::new(Codec::E2m1, k, 32, Scale::Table(&table), 1.0);
            let paired: Vec<u8> = sc
                .chunks_exact(2 * k / 32)
                .flat_map(|p| {
                    let (a, b) = p.split_at(k / 32);
                    a.iter()
                        .zip(b)
                        .flat_map(|(&x, &y)| [x, y])
                        .collect::<Vec<u8>>()
                })
                .collect();
            let rows: Vec<&[u8]> = data.chunks_exact(k / 2).collect();
            let scales: Vec<&[u8]> = sc.chunks_exact(k / 32).collect();
            let mut out = vec![0f32; 32];
            let xs: [&[f32]; 1] = [&x];
            let mut fx = FixedRows::default();
            fx.reset(1, k);
            fx.fill_all(Codec::E2m1, |_| &x);
            let Some(fxr) = fx.row(0) else { return };
            let reps = ((1 << 26) / (total_rows * k)).max(1);
            for kernel in ["f32 tile", "integer", "integer, paired scales"] {
                let mut best = f64::MAX;
                for _ in 0..7 {
                    let t0 = Instant::now();
                    for _ in 0..reps {
                        for b in (0..total_rows).step_by(32) {
                            if kernel != "f32 tile" {
                                let (d, s) = (&data[b * k / 2..], &sc[b * k / 32..]);
                                let pairs = (kernel != "integer").then(|| PairScales {
                                    bytes: &paired[b * k / 32..],
                                    range: (120, 135),
                                });
                                dot_rows_fixed(Isa::Avx2Fma, fmt, d, s, pairs, &x, fxr, &mut out);
                            } else {
                                let (r, s) = (&rows[b..b + 32], &scales[b..b + 32]);
                                dot_rows(Isa::Avx2Fma, fmt, r, s, &xs, &mut out);
                            }
                        }
                    }
                    best = best.min(t0.elapsed().as_secs_f64());
                }
                let w = (reps * total_rows * k) as f64;
                println!(
                    "e2m1 T=1 {kernel}, {total_rows} rows x {k}: {:.2} G weights/s",
                    w / best / 1e9
                );
                std::hint::black_box(&out);
            }
        }
    }
}
