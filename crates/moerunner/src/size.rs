//! Checked size arithmetic and the memory budget. Every size that comes from a user (a flag, a
//! config key, a file header) and decides an allocation goes through these helpers: products are
//! checked (a size that does not fit `usize` is an error naming its factors, never a wrapped
//! value), and a request above the budget is refused *before* anything is allocated, with the
//! number of bytes and the flag or key that asked for them.
//!
//! Design decision: the budget is one process-wide number — `MOERUNNER_MEMORY_BUDGET` (bytes, or
//! with a K/M/G/T suffix, powers of 1024) when set, else three quarters of the machine's physical
//! memory (16 GiB where that cannot be read). The CLI's `--memory-budget` sets it with
//! [`set_budget`]. Estimates count the buffers the library itself allocates (weights, scales,
//! inputs, outputs, per-thread scratch), not the allocator's slack.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{MoeError, Result};

/// The environment variable that sets the memory budget.
pub const BUDGET_ENV: &str = "MOERUNNER_MEMORY_BUDGET";

/// 0 = not set by [`set_budget`].
static BUDGET_OVERRIDE: AtomicU64 = AtomicU64::new(0);

/// Sets the process-wide budget in bytes (the CLI's `--memory-budget`); wins over the environment.
pub fn set_budget(bytes: u64) {
    BUDGET_OVERRIDE.store(bytes.max(1), Ordering::Relaxed);
}

/// The memory budget in bytes and where it came from (for the error message).
pub fn budget() -> Result<(u64, &'static str)> {
    let set = BUDGET_OVERRIDE.load(Ordering::Relaxed);
    if set != 0 {
        return Ok((set, "--memory-budget"));
    }
    if let Ok(text) = std::env::var(BUDGET_ENV) {
        return Ok((parse_bytes(&text, BUDGET_ENV)?, BUDGET_ENV));
    }
    Ok((default_budget(), "the default, 3/4 of physical memory"))
}

/// Three quarters of `MemTotal` in `/proc/meminfo`; 16 GiB where it cannot be read.
fn default_budget() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    });
    match total_kib {
        Some(kib) => kib.saturating_mul(1024) / 4 * 3,
        None => 16 << 30,
    }
}

/// Parses `123`, `512M`, `8G`, `1.5T` (powers of 1024) into bytes; `what` names the flag or variable.
pub fn parse_bytes(text: &str, what: &str) -> Result<u64> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => 0,
            };
            (&t[..i], mult)
        }
        _ => (t, 1),
    };
    let value: f64 = num.parse().unwrap_or(f64::NAN);
    let bytes = value * mult as f64;
    if mult == 0 || !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(MoeError::invalid(
            what,
            format!("`{text}` is not a byte count (e.g. 4096, 512M, 8G)"),
        ));
    }
    Ok(bytes as u64)
}

/// The product of `dims` as a `usize`, or an error naming `what` (the flags or keys the factors
/// came from) when it does not fit.
pub fn product(what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            MoeError::invalid(
                what,
                format!(
                    "{} overflows a {}-bit size",
                    dims.iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join(" × "),
                    usize::BITS
                ),
            )
        })
}

/// A byte count built from products and sums of user sizes, in u128 so that no realistic request
/// wraps; `None` when it overflows even that (refused as too large).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bytes(pub Option<u128>);

impl Bytes {
    pub const ZERO: Bytes = Bytes(Some(0));
    /// `dims` multiplied together (the last factor is usually the element size).
    pub fn of(dims: &[usize]) -> Bytes {
        Bytes(
            dims.iter()
                .try_fold(1u128, |acc, &d| acc.checked_mul(d as u128)),
        )
    }
    pub fn plus(self, other: Bytes) -> Bytes {
        Bytes(self.0.zip(other.0).and_then(|(a, b)| a.checked_add(b)))
    }
    pub fn times(self, n: usize) -> Bytes {
        Bytes(self.0.and_then(|a| a.checked_mul(n as u128)))
    }
    /// `self · num / den`, rounded up (element bytes of packed or block-scaled formats).
    pub fn frac(self, num: u128, den: u128) -> Bytes {
        Bytes(
            self.0
                .and_then(|a| a.checked_mul(num))
                .map(|a| a.div_ceil(den.max(1))),
        )
    }
}

/// Refuses `bytes` over the budget, before anything is allocated. `what` says what would be built
/// and `asked_by` names the flags or keys that asked for it.
pub fn check(bytes: Bytes, what: &str, asked_by: &str) -> Result<()> {
    let (budget, source) = budget()?;
    match bytes.0 {
        Some(b) if b <= budget as u128 => Ok(()),
        Some(b) => Err(MoeError::TooLarge {
            what: what.to_string(),
            asked_by: asked_by.to_string(),
            bytes: format!("{b} bytes ({})", human(b)),
            budget: format!("{budget} bytes ({}, {source})", human(budget as u128)),
        }),
        None => Err(MoeError::TooLarge {
            what: what.to_string(),
            asked_by: asked_by.to_string(),
            bytes: "more than 2^128 bytes".into(),
            budget: format!("{budget} bytes ({}, {source})", human(budget as u128)),
        }),
    }
}

/// `1.5 GiB`-style rendering for messages.
pub fn human(b: u128) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}
