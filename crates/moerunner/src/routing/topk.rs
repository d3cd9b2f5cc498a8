//! Top-k selection with the spec's tie rule: larger key first, equal keys to the lower index.
//!
//! One function serves experts and DeepSeek groups alike, so both obey the same tie rule.

/// Writes into `out` the indices of the `out.len()` largest `keys`, in decreasing key order; equal
/// keys go to the lower index. Keys must not be NaN (−∞ is fine: masked experts).
///
/// `out.len()` must be ≤ `keys.len()` (guaranteed by `RoutingConfig::validate`); indices fit in
/// i32 because E is far below 2³¹.
pub(crate) fn select(keys: &[f32], out: &mut [i32]) {
    let k = out.len();
    if k == 0 {
        return;
    }
    let mut len = 0;
    // Scan in increasing index order and keep `out[..len]` sorted by decreasing key. A candidate
    // enters only if *strictly* larger than the smallest kept key, and is placed after all kept keys
    // that are ≥ it: both make an equal key lose to the lower index seen earlier.
    for (i, &key) in keys.iter().enumerate() {
        if len == k && key <= keys[out[k - 1] as usize] {
            continue;
        }
        let pos = out[..len].partition_point(|&id| keys[id as usize] >= key);
        let end = len.min(k - 1);
        out.copy_within(pos..end, pos + 1);
        out[pos] = i as i32;
        len = (len + 1).min(k);
    }
}

#[cfg(test)]
mod tests {
    use super::select;

    fn sel(keys: &[f32], k: usize) -> Vec<i32> {
        let mut out = vec![-7; k];
        select(keys, &mut out);
        out
    }

    #[test]
    fn orders_by_key_then_lower_index() {
        assert_eq!(sel(&[1.0, 3.0, 2.0, 3.0], 3), [1, 3, 2]);
        assert_eq!(sel(&[0.5; 5], 3), [0, 1, 2]);
        assert_eq!(
            sel(&[f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY], 3),
            [1, 0, 2]
        );
        assert_eq!(sel(&[-0.0, 0.0], 1), [0]);
        assert_eq!(sel(&[4.0, 3.0, 2.0, 1.0], 4), [0, 1, 2, 3]);
        assert_eq!(sel(&[1.0, 2.0, 3.0, 4.0], 2), [3, 2]);
    }
}
