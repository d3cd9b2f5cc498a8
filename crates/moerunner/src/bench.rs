//! Benchmark counting (`spec/performance.md`): bytes, FLOPs, floors, roofline fractions, ceilings.
