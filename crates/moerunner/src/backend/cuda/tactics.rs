//! Verified autotuning: which GEMM tactic a layer runs for a call of T tokens, chosen by measurement
//! and kept on disk beside the kernel cache (docs/cuda.md, "Tactics").
//!
//! A **tactic** is everything a call may vary without changing its arithmetic: the token-tile
//! width both GEMMs use (one tile list is built per call) and, for each GEMM, whether a 128-wide
//! tile runs the warp-specialised main loop. By default a call takes the built-in choice
//! ([`Tactic::default_for`]: the narrowest width that holds the mean pairs per expert, warp
//! specialisation wherever it exists). `moerunner tune` times every candidate at each token count
//! it is given and **keeps a candidate only if its whole-layer output is bit-for-bit the default
//! tactic's** on seeded inputs — an autotuner that picks a faster tactic with other numbers (a
//! different reduction order) is how a CUDA graph freezes in a wrong result, so a tactic that
//! differs is reported and never used. Winners are stored per layer key and **shape class** (the
//! power of two of the mean pairs per expert), in `tactics.json` in the kernel cache folder; the
//! key names the device, driver, NVRTC and a hash of every kernel source, so a new build or
//! another GPU never reads a stale entry. A layer uses the table only when asked
//! (`MOERUNNER_TACTICS=use`; `tune` also tunes at load the bench's token counts whose classes the
//! table lacks); classes the table lacks keep the default.
//!
//! Plain Rust (no GPU needed): the GPU side — forcing a tactic, timing, the bit check — is
//! `layer.rs`'s `CudaLayer::tune`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::codec::Codec;
use super::kernels::moe_gemm::{self, GEMM_BN, WGMMA_BN, WS_BN};
use super::kernels::{Source, COMMON, HEADERS};
use crate::error::{MoeError, Result};

/// The variable that makes a loaded layer read the tactic table.
pub const TACTICS_VAR: &str = "MOERUNNER_TACTICS";

/// The table's file name inside the kernel cache folder.
pub const TABLE_FILE: &str = "tactics.json";

/// How one call runs its two grouped GEMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tactic {
    /// Token-tile width of both GEMMs (one of `GEMM_BN`).
    pub bn: u32,
    /// GEMM1 runs the warp-specialised loop where the width and codec have one.
    pub ws_gemm1: bool,
    /// GEMM2 likewise.
    pub ws_gemm2: bool,
}

impl Tactic {
    /// Today's built-in choice for `mean` pairs per expert: the width that holds them, warp
    /// specialisation wherever the device allows it (`ws_on`).
    pub fn default_for(mean: usize, ws_on: bool) -> Tactic {
        Tactic {
            bn: moe_gemm::tile_width(mean),
            ws_gemm1: ws_on,
            ws_gemm2: ws_on,
        }
    }

    /// Every tactic a layer of `codec` can run on a device with these switches, each once: every
    /// width, and at the widths with a warp-specialised loop each GEMM with and without it.
    pub fn candidates(codec: &Codec, wgmma_on: bool, ws_on: bool) -> Vec<Tactic> {
        let has_ws = wgmma_on && ws_on && codec.main_loops.iter().any(|l| l.is_warp_specialised());
        let mut out = Vec::new();
        for bn in GEMM_BN {
            let ws_here = has_ws && WS_BN.contains(&bn);
            let choices: &[bool] = if ws_here { &[true, false] } else { &[ws_on] };
            for &ws_gemm1 in choices {
                for &ws_gemm2 in choices {
                    out.push(Tactic {
                        bn,
                        ws_gemm1,
                        ws_gemm2,
                    });
                }
            }
        }
        // (WGMMA_BN holds every width today; a width without wgmma would fall back to mma.sync,
        // which the bit check then judges like any other candidate)
        debug_assert!(GEMM_BN.iter().all(|b| WGMMA_BN.contains(b)));
        out
    }

    /// Whether running it needs a GEMM form the layer loads only for tactics: a 128-wide tile
    /// without warp specialisation where the device has it.
    pub fn needs_plain_wide_loops(&self, ws_on: bool) -> bool {
        ws_on && WS_BN.contains(&self.bn) && !(self.ws_gemm1 && self.ws_gemm2)
    }

    /// One line: `bn 64`, `bn 128 ws 1/0` (GEMM1/GEMM2).
    pub fn label(&self) -> String {
        if WS_BN.contains(&self.bn) {
            format!(
                "bn {} ws {}/{}",
                self.bn, self.ws_gemm1 as u8, self.ws_gemm2 as u8
            )
        } else {
            format!("bn {}", self.bn)
        }
    }
}

/// Shape classes: `ceil(log2(mean pairs per expert))`, the last one holding everything above.
pub const CLASSES: usize = 15;

/// The shape class of a call of `tokens` tokens with `top_k` slots over `experts` local experts.
pub fn shape_class(tokens: usize, top_k: usize, experts: usize) -> usize {
    let mean = (tokens * top_k).div_ceil(experts.max(1)).max(1);
    (mean.next_power_of_two().trailing_zeros() as usize).min(CLASSES - 1)
}

/// Mean pairs per expert of a call (what the default choice and the shape class read).
pub fn mean_pairs(tokens: usize, top_k: usize, experts: usize) -> usize {
    (tokens * top_k).div_ceil(experts.max(1))
}

/// What a tuned class holds: the tactic and the measurement behind it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TunedClass {
    pub tactic: Tactic,
    /// The token count it was measured at.
    pub tokens: usize,
    /// Median graph-replay time of the tactic and of the default one (µs).
    pub us: f64,
    pub default_us: f64,
    /// Candidates refused because their output differed from the default tactic's.
    #[serde(default)]
    pub rejected: Vec<String>,
    /// When (UTC date).
    pub date: String,
}

/// The tactic table of one machine: layer key → shape class → tuned entry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TacticTable {
    pub version: u32,
    pub layers: BTreeMap<String, BTreeMap<usize, TunedClass>>,
}

const TABLE_VERSION: u32 = 1;

impl TacticTable {
    /// The table in `path`; an absent file is an empty table, a file that does not parse is an
    /// error naming it (it is never silently replaced: `tune` would overwrite someone's results).
    pub fn read(path: &Path) -> Result<TacticTable> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(TacticTable {
                    version: TABLE_VERSION,
                    ..Default::default()
                })
            }
            Err(e) => return Err(io_err(path, e)),
        };
        let table: TacticTable = serde_json::from_str(&text).map_err(|e| {
            MoeError::invalid(
                "tactic table",
                format!(
                    "{} is not a tactic table ({e}); delete it and run `moerunner tune` again",
                    path.display()
                ),
            )
        })?;
        if table.version != TABLE_VERSION {
            return Err(MoeError::invalid(
                "tactic table",
                format!(
                    "{} has version {}, this build reads {TABLE_VERSION}; delete it and tune again",
                    path.display(),
                    table.version
                ),
            ));
        }
        for (key, classes) in &table.layers {
            if let Some((c, t)) = classes
                .iter()
                .find(|(c, t)| **c >= CLASSES || !GEMM_BN.contains(&t.tactic.bn))
            {
                return Err(MoeError::invalid(
                    "tactic table",
                    format!(
                        "{}: layer `{key}` class {c} holds an impossible tactic ({})",
                        path.display(),
                        t.tactic.label()
                    ),
                ));
            }
        }
        Ok(table)
    }

    /// Writes the table to `path` at once (a temporary file renamed over it).
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        }
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| MoeError::invalid("tactic table", e.to_string()))?;
        super::disk_cache::write_atomic(path, text.as_bytes()).map_err(|e| io_err(path, e))
    }

    /// The tuned classes of layer `key` as a per-class choice.
    pub fn choice(&self, key: &str) -> TacticChoice {
        let mut per_class = [None; CLASSES];
        if let Some(classes) = self.layers.get(key) {
            for (&c, t) in classes {
                if c < CLASSES {
                    per_class[c] = Some(t.tactic);
                }
            }
        }
        TacticChoice { per_class }
    }
}

fn io_err(path: &Path, source: std::io::Error) -> MoeError {
    MoeError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The table's path, or None when the kernel cache is off.
pub fn table_path() -> Option<PathBuf> {
    super::disk_cache::cache_dir().map(|d| d.join(TABLE_FILE))
}

/// What a loaded layer does with the tactic table (`MOERUNNER_TACTICS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TacticMode {
    /// The built-in choice (unset, empty or `off`).
    Off,
    /// Read the table; classes it lacks keep the default (`use`).
    Use,
    /// Read the table, tune at load the classes of `TUNE_AT_LOAD_TOKENS` it lacks (verified like
    /// `moerunner tune`), store them, and use them (`tune`).
    Tune,
}

/// Token counts a layer tunes at load under `MOERUNNER_TACTICS=tune` (the bench's counts).
pub const TUNE_AT_LOAD_TOKENS: [usize; 5] = [1, 16, 128, 1024, 8192];

/// The table a layer loaded under `mode` reads: none when off; else `path` (the kernel cache's
/// `tactics.json`), and an error naming both variables when the cache is off (asked to use tuned
/// tactics with nowhere to keep them is a mistake worth saying, not a silent default).
pub fn table_to_read(mode: TacticMode, path: Option<PathBuf>) -> Result<Option<PathBuf>> {
    match (mode, path) {
        (TacticMode::Off, _) => Ok(None),
        (_, Some(p)) => Ok(Some(p)),
        (_, None) => Err(MoeError::invalid(
            TACTICS_VAR,
            "the tactic table lives in the kernel cache, which MOERUNNER_KERNEL_CACHE=off turns off",
        )),
    }
}

/// The mode `MOERUNNER_TACTICS` asks for.
pub fn mode() -> Result<TacticMode> {
    parse_switch(std::env::var(TACTICS_VAR).ok().as_deref())
}

/// `MOERUNNER_TACTICS`'s value; anything but `off`, `use`, `tune` or empty is an error naming the
/// variable (a typo must not silently run untuned).
fn parse_switch(value: Option<&str>) -> Result<TacticMode> {
    match value {
        None | Some("") | Some("off") => Ok(TacticMode::Off),
        Some("use") => Ok(TacticMode::Use),
        Some("tune") => Ok(TacticMode::Tune),
        Some(v) => Err(MoeError::invalid(
            TACTICS_VAR,
            format!(
                "`{v}`: use `use` (read the tactic table `moerunner tune` wrote), `tune` (also tune \
                 missing classes at load) or `off`"
            ),
        )),
    }
}

/// The tactics a loaded layer runs: per shape class a tuned one, else the default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TacticChoice {
    pub per_class: [Option<Tactic>; CLASSES],
}

impl TacticChoice {
    /// The tactic of a call of `tokens` tokens.
    pub fn pick(&self, tokens: usize, top_k: usize, experts: usize, ws_on: bool) -> Tactic {
        self.per_class[shape_class(tokens, top_k, experts)]
            .unwrap_or_else(|| Tactic::default_for(mean_pairs(tokens, top_k, experts), ws_on))
    }
    pub fn is_tuned(&self) -> bool {
        self.per_class.iter().any(Option::is_some)
    }
}

/// A hash of every kernel source the backend compiles (common header, pieces, `.cu` files): a
/// tactic measured on other kernels is not trusted.
pub fn sources_hash() -> u64 {
    let mut all = String::from(COMMON);
    for (name, text) in HEADERS {
        all.push_str(name);
        all.push_str(text);
    }
    for s in Source::ALL {
        all.push_str(s.name());
        all.push_str(s.text());
    }
    super::disk_cache::fnv1a64(all.as_bytes())
}

/// What a layer's table key names.
pub struct KeyParts<'a> {
    pub device: &'a str,
    pub arch: &'a str,
    pub driver: i32,
    pub nvrtc: &'a str,
    pub codec: &'a Codec,
    /// Local experts, H, I, top-k and the activation's name.
    pub experts: usize,
    pub hidden: usize,
    pub inter: usize,
    pub top_k: usize,
    pub activation: &'a str,
}

/// The table key of a layer on a device: everything a tactic's speed or arithmetic depends on.
pub fn layer_key(p: &KeyParts<'_>) -> String {
    format!(
        "{} {} driver {} nvrtc {} sources {:016x} | {} ({}) | E {} H {} I {} k {} {}",
        p.device,
        p.arch,
        p.driver,
        p.nvrtc,
        sources_hash(),
        p.codec.summary,
        p.codec.gemm.name(),
        p.experts,
        p.hidden,
        p.inter,
        p.top_k,
        p.activation
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::codec::CODECS;

    #[test]
    fn shape_classes_follow_the_mean_pairs_per_expert() {
        // 128 experts, top-8: T = 1 → 1 pair per expert (class 0); T = 16 → 1; T = 128 → 8 (3);
        // T = 8192 → 512 (9)
        assert_eq!(shape_class(1, 8, 128), 0);
        assert_eq!(shape_class(16, 8, 128), 0);
        assert_eq!(shape_class(17, 8, 128), 1);
        assert_eq!(shape_class(128, 8, 128), 3);
        assert_eq!(shape_class(8192, 8, 128), 9);
        assert_eq!(shape_class(0, 8, 128), 0);
        assert_eq!(shape_class(1 << 30, 8, 1), CLASSES - 1);
    }

    #[test]
    fn candidates_hold_the_default_and_no_duplicates() {
        for codec in CODECS {
            for (wgmma_on, ws_on) in [(true, true), (true, false), (false, false)] {
                let c = Tactic::candidates(codec, wgmma_on, ws_on);
                for mean in [1, 3, 17, 40, 100, 5000] {
                    assert!(
                        c.contains(&Tactic::default_for(mean, ws_on)),
                        "{}: default at mean {mean} missing from {c:?}",
                        codec.summary
                    );
                }
                let mut d = c.clone();
                d.dedup();
                assert_eq!(d.len(), c.len());
            }
        }
        // bf16 has a warp-specialised loop: 3 widths + 4 combinations at 128
        let bf16 = &CODECS[0];
        assert_eq!(Tactic::candidates(bf16, true, true).len(), 3 + 4);
    }

    #[test]
    fn a_table_round_trips_and_picks_by_class() {
        let dir = std::env::temp_dir().join(format!("moerunner-tactics-{}", std::process::id()));
        let path = dir.join(TABLE_FILE);
        let _ = std::fs::remove_file(&path);
        let mut table = TacticTable::read(&path).unwrap();
        assert!(table.layers.is_empty());
        let tuned = Tactic {
            bn: 64,
            ws_gemm1: false,
            ws_gemm2: true,
        };
        table.layers.entry("layer A".into()).or_default().insert(
            3,
            TunedClass {
                tactic: tuned,
                tokens: 128,
                us: 10.0,
                default_us: 12.0,
                rejected: vec!["bn 16: differs at element 5".into()],
                date: "2026-12-07".into(),
            },
        );
        table.write(&path).unwrap();
        let back = TacticTable::read(&path).unwrap();
        assert_eq!(back, table);
        let choice = back.choice("layer A");
        assert!(choice.is_tuned());
        assert_eq!(choice.pick(128, 8, 128, true), tuned);
        // another class keeps the default; another key has nothing tuned
        assert_eq!(
            choice.pick(8192, 8, 128, true),
            Tactic::default_for(512, true)
        );
        assert!(!back.choice("layer B").is_tuned());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_table_is_an_error_naming_the_file() {
        let dir =
            std::env::temp_dir().join(format!("moerunner-tactics-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(TABLE_FILE);
        for text in [
            "{ not json",
            r#"{"version": 99, "layers": {}}"#,
            r#"{"version": 1, "layers": {"k": {"3": {"tactic": {"bn": 48, "ws_gemm1": true, "ws_gemm2": true}, "tokens": 1, "us": 1.0, "default_us": 1.0, "date": "x"}}}}"#,
            r#"{"version": 1, "layers": {"k": {"99": {"tactic": {"bn": 64, "ws_gemm1": true, "ws_gemm2": true}, "tokens": 1, "us": 1.0, "default_us": 1.0, "date": "x"}}}}"#,
        ] {
            std::fs::write(&path, text).unwrap();
            let e = TacticTable::read(&path).unwrap_err().to_string();
            assert!(e.contains("tactics.json"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_key_changes_with_the_sources_device_and_shape() {
        let codec = &CODECS[0];
        let parts = |device, experts| KeyParts {
            device,
            arch: "sm_90a",
            driver: 13000,
            nvrtc: "13.0",
            codec,
            experts,
            hidden: 2048,
            inter: 768,
            top_k: 8,
            activation: "swiglu",
        };
        let a = layer_key(&parts("NVIDIA H100 80GB HBM3", 128));
        assert!(a.contains(&format!("{:016x}", sources_hash())));
        assert_ne!(a, layer_key(&parts("NVIDIA H200", 128)));
        assert_ne!(a, layer_key(&parts("NVIDIA H100 80GB HBM3", 64)));
    }

    #[test]
    fn using_tactics_without_the_kernel_cache_is_an_error() {
        let p = PathBuf::from("/tmp/k/tactics.json");
        assert_eq!(table_to_read(TacticMode::Off, None).unwrap(), None);
        assert_eq!(
            table_to_read(TacticMode::Use, Some(p.clone())).unwrap(),
            Some(p)
        );
        for mode in [TacticMode::Use, TacticMode::Tune] {
            let e = table_to_read(mode, None).unwrap_err().to_string();
            assert!(
                e.contains("MOERUNNER_KERNEL_CACHE") && e.contains(TACTICS_VAR),
                "{e}"
            );
        }
    }

    #[test]
    fn the_switch_accepts_off_use_and_tune_only() {
        assert_eq!(parse_switch(Some("use")).unwrap(), TacticMode::Use);
        assert_eq!(parse_switch(Some("tune")).unwrap(), TacticMode::Tune);
        for off in [None, Some(""), Some("off")] {
            assert_eq!(parse_switch(off).unwrap(), TacticMode::Off);
        }
        let e = parse_switch(Some("on")).unwrap_err().to_string();
        assert!(e.contains(TACTICS_VAR), "{e}");
    }
}
