//! Random cases across the whole support matrix against the float64 reference (`moerunner check`
//! and the seeded matrix tests share this).
