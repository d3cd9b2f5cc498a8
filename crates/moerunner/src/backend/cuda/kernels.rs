//! The kernel sources embedded in the binary, and each kernel's contract on the Rust side.
//!
//! Every `kernels/<stem>.cu` has a `kernels/<stem>.rs` beside it holding, for each of its
//! `extern "C" __global__` entries, the argument struct (the signature written once on the Rust
//! side, through [`kernel_args!`]), the launch shape and, where the source is compiled in several
//! forms, its variants. `tests/kernel_contracts.rs` parses every `.cu` and checks each entry's
//! parameter list against its struct (names, C types, order), so a mismatch fails in CI, not on a
//! GPU. [`signatures`] lists every entry and [`ModuleKey::all`] every compiled form the backend may
//! load: CI compiles all of them with NVRTC for sm_90a, and `moerunner info --kernels-json` dumps
//! both for the Python kernel checks under `scripts/gpu/`.
//!
//! This module is plain Rust (no CUDA needed), so the contracts are checked on any machine.

pub mod combine;
pub mod decode;
pub mod ep;
pub mod front;
pub mod moe_gemm;
pub mod quant;
pub mod routing;
pub mod sort;
pub mod weight_quant;

use std::marker::PhantomData;

/// Pasted before every source: typedefs, number conversions and the named codes (`WFMT_*`,
/// `ARG_DTYPE_*`) shared by kernels and launchers.
pub const COMMON: &str = include_str!("kernels/common.cuh");

/// `(name, text)` of a piece of `kernels/`.
macro_rules! piece {
    ($name:literal) => {
        ($name, include_str!(concat!("kernels/", $name)))
    };
}

/// The pieces kernels include (`#include "gemm/wgmma.cuh"`), by the name they are included as.
/// `translation_unit` pastes each in place between `#line` directives, so NVRTC still sees one
/// translation unit (the cache key and the source kept beside a cached binary cover every piece)
/// while its diagnostics and line info name the real files: a `#pragma once` header at its first
/// include only, a fragment of a kernel body (no `#pragma once`) at every include. The pasting
/// ignores `#if`, so a once-header's first include must not sit under a condition that can be false
/// (until 2026-12-07 every piece was pasted once, and the WS producer fragment, included by two main
/// loops under `#if`, vanished from the one pasted second: a hang, caught by no CPU test).
/// Three whole kernel files are pieces too: `front.cu` includes them for their device functions (each
/// file's kernels come along, unlaunched, in the front's module).
pub const HEADERS: [(&str, &str); 22] = [
    piece!("routing.cu"),
    piece!("sort.cu"),
    piece!("quant.cu"),
    piece!("quant_rows.cuh"),
    piece!("decode_tiled.cuh"),
    piece!("decode_tiled_body.cuh"),
    piece!("gemm/config.cuh"),
    piece!("gemm/ptx.cuh"),
    piece!("gemm/wgmma.cuh"),
    piece!("gemm/scale_bf16.cuh"),
    piece!("gemm/scale_fp8_tensor.cuh"),
    piece!("gemm/scale_fp8_block.cuh"),
    piece!("gemm/scale_decoded.cuh"),
    piece!("gemm/epilogue.cuh"),
    piece!("gemm/loads.cuh"),
    piece!("gemm/loads_decoded.cuh"),
    piece!("gemm/mainloop_mma.cuh"),
    piece!("gemm/mainloop_wgmma.cuh"),
    piece!("gemm/ws_producer.cuh"),
    piece!("gemm/mainloop_wgmma_ws.cuh"),
    piece!("gemm/mainloop_wgmma_rs.cuh"),
    piece!("gemm/mainloop_mma_rs.cuh"),
];

/// `COMMON`, then `text` (compiled as `file`) with its `#include "..."` of `HEADERS` resolved.
/// An include that names no header is left for NVRTC to report.
pub fn translation_unit(file: &str, text: &str) -> String {
    // `seen`: the `#pragma once` headers already pasted; `open`: the pieces being pasted (a piece that
    // includes itself would never end: such an include is dropped)
    fn paste(
        out: &mut String,
        file: &str,
        text: &str,
        seen: &mut Vec<&'static str>,
        open: &mut Vec<&'static str>,
    ) {
        out.push_str(&format!("#line 1 \"{file}\"\n"));
        for (i, line) in text.split_inclusive('\n').enumerate() {
            let header = line
                .trim()
                .strip_prefix("#include \"")
                .and_then(|rest| rest.strip_suffix('"'))
                .and_then(|name| HEADERS.iter().find(|(n, _)| *n == name));
            match header {
                Some((name, _)) if seen.contains(name) || open.contains(name) => out.push('\n'),
                Some((name, body)) => {
                    if is_once(body) {
                        seen.push(name);
                    }
                    open.push(name);
                    paste(out, name, body, seen, open);
                    open.pop();
                    out.push_str(&format!("\n#line {} \"{file}\"\n", i + 2));
                }
                None => out.push_str(line),
            }
        }
    }
    let mut out = format!("{COMMON}\n");
    paste(&mut out, file, text, &mut Vec::new(), &mut Vec::new());
    out
}

/// A header pasted once per translation unit (`#pragma once`); the others are fragments of a kernel
/// body (a main loop, a stage's loads, the WS producer), pasted at every `#include` of them.
fn is_once(body: &str) -> bool {
    body.lines().any(|l| l.trim() == "#pragma once")
}

/// One `.cu` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    Routing,
    Sort,
    Quant,
    Combine,
    Gemm,
    WeightQuant,
    Decode,
    Front,
    Ep,
}

impl Source {
    pub const ALL: [Source; 9] = [
        Source::Routing,
        Source::Sort,
        Source::Quant,
        Source::Combine,
        Source::Gemm,
        Source::WeightQuant,
        Source::Decode,
        Source::Front,
        Source::Ep,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Source::Routing => "routing",
            Source::Sort => "sort",
            Source::Quant => "quant",
            Source::Combine => "combine",
            Source::Gemm => "moe_gemm",
            Source::WeightQuant => "weight_quant",
            Source::Decode => "decode",
            Source::Front => "front",
            Source::Ep => "ep",
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            Source::Routing => include_str!("kernels/routing.cu"),
            Source::Sort => include_str!("kernels/sort.cu"),
            Source::Quant => include_str!("kernels/quant.cu"),
            Source::Combine => include_str!("kernels/combine.cu"),
            Source::Gemm => include_str!("kernels/moe_gemm.cu"),
            Source::WeightQuant => include_str!("kernels/weight_quant.cu"),
            Source::Decode => include_str!("kernels/decode.cu"),
            Source::Front => include_str!("kernels/front.cu"),
            Source::Ep => include_str!("kernels/ep.cu"),
        }
    }

    /// The whole translation unit NVRTC compiles.
    pub fn full_text(self) -> String {
        translation_unit(&format!("{}.cu", self.name()), self.text())
    }
}

// ------------------------------------------------------------------------------ kernel arguments

/// One kernel argument as the driver receives it: every device pointer travels as a raw address,
/// so a kernel's nullable pointers are just 0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

/// An element type as the kernels spell it (common.cuh's typedefs).
pub trait CType {
    const NAME: &'static str;
}
/// `void`: memory whose element type is a run-time argument (hidden states, outputs).
#[derive(Clone, Copy, Debug)]
pub struct Void;
impl CType for Void {
    const NAME: &'static str = "void";
}
impl CType for f32 {
    const NAME: &'static str = "float";
}
impl CType for i32 {
    const NAME: &'static str = "int";
}
impl CType for u8 {
    const NAME: &'static str = "u8";
}
impl CType for u16 {
    const NAME: &'static str = "u16";
}
impl CType for u32 {
    const NAME: &'static str = "u32";
}
impl CType for u64 {
    const NAME: &'static str = "u64";
}

/// A device address the kernel only reads: `const T*`.
pub struct In<T: CType>(pub u64, PhantomData<T>);
/// A device address the kernel writes: `T*`.
pub struct Out<T: CType>(pub u64, PhantomData<T>);

macro_rules! pointer_param {
    ($name:ident, $prefix:literal) => {
        impl<T: CType> $name<T> {
            pub const NULL: Self = $name(0, PhantomData);
            pub fn new(address: u64) -> Self {
                $name(address, PhantomData)
            }
        }
        impl<T: CType> Clone for $name<T> {
            fn clone(&self) -> Self {
                *self
            }
        }
        impl<T: CType> Copy for $name<T> {}
        impl<T: CType> std::fmt::Debug for $name<T> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}{}* {:#x}", $prefix, T::NAME, self.0)
            }
        }
        impl<T: CType> Param for $name<T> {
            fn c_type() -> String {
                format!("{}{}*", $prefix, T::NAME)
            }
            fn arg(&self) -> Arg {
                Arg::Ptr(self.0)
            }
        }
    };
}
pointer_param!(In, "const ");
pointer_param!(Out, "");

/// A value a kernel parameter can take, with the C type it is declared with in the `.cu`.
pub trait Param: Copy {
    /// The declared type, normalised: `const float*`, `void*`, `int`, `long long`, `float`.
    fn c_type() -> String;
    fn arg(&self) -> Arg;
}
impl Param for i32 {
    fn c_type() -> String {
        "int".into()
    }
    fn arg(&self) -> Arg {
        Arg::I32(*self)
    }
}
impl Param for i64 {
    fn c_type() -> String {
        "long long".into()
    }
    fn arg(&self) -> Arg {
        Arg::I64(*self)
    }
}
impl Param for f32 {
    fn c_type() -> String {
        "float".into()
    }
    fn arg(&self) -> Arg {
        Arg::F32(*self)
    }
}

/// One `extern "C" __global__` entry as the Rust side declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    pub source: Source,
    pub entry: &'static str,
    /// Launched with programmatic dependent launch (the kernel must call `pdl_wait()`).
    pub pdl: bool,
    /// (name, normalised C type) of each parameter, in order.
    pub params: Vec<(&'static str, String)>,
}

/// The argument struct of one kernel entry.
pub trait KernelArgs {
    const SOURCE: Source;
    const ENTRY: &'static str;
    /// Whether it is launched with programmatic dependent launch.
    const PDL: bool;
    /// Whether it is launched cooperatively (every CTA resident at once: it synchronizes its grid).
    const COOPERATIVE: bool;
    fn signature() -> Signature;
    /// The values in declaration order.
    fn args(&self) -> Vec<Arg>;
}

/// Declares a kernel's argument struct: `name: Type` fields in the `.cu`'s order, the source and
/// entry it launches, and whether it is launched with PDL.
macro_rules! kernel_args {
    (
        $(#[$meta:meta])*
        pub struct $name:ident for $source:ident :: $entry:literal, pdl = $pdl:literal
            $(, cooperative = $coop:literal)? {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        ///
        /// Fields are the `.cu` parameters, named and ordered as there.
        #[derive(Clone, Copy, Debug)]
        #[allow(non_snake_case)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty ),*
        }
        impl $crate::backend::cuda::kernels::KernelArgs for $name {
            const SOURCE: $crate::backend::cuda::kernels::Source =
                $crate::backend::cuda::kernels::Source::$source;
            const ENTRY: &'static str = $entry;
            const PDL: bool = $pdl;
            const COOPERATIVE: bool = false $(|| $coop)?;
            fn signature() -> $crate::backend::cuda::kernels::Signature {
                $crate::backend::cuda::kernels::Signature {
                    source: Self::SOURCE,
                    entry: $entry,
                    pdl: $pdl,
                    params: vec![$( (stringify!($field),
                        <$ty as $crate::backend::cuda::kernels::Param>::c_type()) ),*],
                }
            }
            fn args(&self) -> Vec<$crate::backend::cuda::kernels::Arg> {
                vec![$( $crate::backend::cuda::kernels::Param::arg(&self.$field) ),*]
            }
        }
    };
}
pub(crate) use kernel_args;

/// Every kernel entry the backend launches, with its Rust-side signature.
pub fn signatures() -> Vec<Signature> {
    vec![
        routing::RouteLogits::signature(),
        routing::UnpackRoutes::signature(),
        sort::SortPairsByExpert::signature(),
        sort::SortCount::signature(),
        sort::SortScan::signature(),
        sort::SortScatter::signature(),
        quant::QuantizeRows::signature(),
        combine::CombineRows::signature(),
        moe_gemm::MoeGemm::signature(),
        decode::MoeDecode::signature(),
        front::RouteSortQuantize::signature(),
        ep::EpPlan::signature(),
        ep::EpPack::signature(),
        weight_quant::WeightAmax::signature(),
        weight_quant::QuantizeWeightRows::signature(),
        weight_quant::QuantizeWeightBlock128::signature(),
    ]
}

/// Grid, block and dynamic shared memory of one launch, and whether it may overlap its predecessor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub smem: u32,
    /// Launch with programmatic stream serialization: the kernel may start before the previous one
    /// ends, so it must call `pdl_wait()` (common.cuh) before reading what that one wrote.
    pub pdl: bool,
}

/// A grid of at most 32 blocks per SM for `items` items of `per_block` each (grid-stride kernels).
pub(crate) fn grid_cap(items: usize, per_block: usize, sms: u32) -> u32 {
    items.div_ceil(per_block).clamp(1, 32 * sms as usize) as u32
}

/// Element type codes of hidden states, logits and outputs passed to the kernels as `int`
/// (common.cuh's `ARG_DTYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum ElemCode {
    Bf16 = 0,
    F16 = 1,
    F32 = 2,
}

impl ElemCode {
    pub fn of(d: crate::tensor::DType) -> crate::error::Result<ElemCode> {
        use crate::tensor::DType;
        match d {
            DType::BF16 => Ok(ElemCode::Bf16),
            DType::F16 => Ok(ElemCode::F16),
            DType::F32 => Ok(ElemCode::F32),
            other => Err(crate::error::MoeError::Cuda(format!(
                "internal: dtype {} has no kernel element code",
                other.name()
            ))),
        }
    }
    pub fn code(self) -> i32 {
        self as i32
    }
}

// ------------------------------------------------------------------------------ modules

/// The architecture with Hopper's warpgroup MMA (wgmma): the only one the wgmma main loops compile for.
pub const WGMMA_ARCH: &str = "sm_90a";

/// A source with its defines: the unit of compilation and of the module cache.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModuleKey {
    pub source: Source,
    pub defines: Vec<String>,
}

impl ModuleKey {
    pub fn plain(source: Source) -> Self {
        ModuleKey {
            source,
            defines: Vec::new(),
        }
    }

    /// Every module the backend may load: what CI compiles.
    pub fn all() -> Vec<ModuleKey> {
        let mut all: Vec<ModuleKey> = Source::ALL
            .iter()
            .filter(|s| !matches!(**s, Source::Gemm | Source::Decode))
            .map(|s| ModuleKey::plain(*s))
            .collect();
        all.extend(
            moe_gemm::GemmVariant::all()
                .into_iter()
                .map(moe_gemm::GemmVariant::module),
        );
        all.extend(
            decode::DecodeVariant::all()
                .into_iter()
                .map(decode::DecodeVariant::module),
        );
        all
    }

    /// Every module a device of architecture `arch` may load: all of them on Hopper (`sm_90a`),
    /// elsewhere all but the wgmma main loops (what `moerunner warm-kernels` compiles ahead of time).
    pub fn all_for(arch: &str) -> Vec<ModuleKey> {
        Self::all()
            .into_iter()
            .filter(|k| arch == WGMMA_ARCH || !k.needs_wgmma())
            .collect()
    }

    /// Whether it is a GEMM with a wgmma main loop (plain, warp-specialised or register-sourced),
    /// which only `WGMMA_ARCH` runs.
    pub fn needs_wgmma(&self) -> bool {
        self.defines
            .iter()
            .any(|d| d.starts_with("-DMAINLOOP=MAINLOOP_WGMMA"))
    }

    /// A readable name for logs and cache files.
    pub fn label(&self) -> String {
        let mut s = self.source.name().to_string();
        for d in &self.defines {
            s.push('_');
            s.push_str(d.trim_start_matches("-D").replace('=', "").as_str());
        }
        s
    }
}

/// The kernels as JSON for the scripts under `scripts/gpu/` (`moerunner info --kernels-json`): per
/// source its file name, text and entries with their parameters, and every compiled form (label
/// and defines) the backend may load.
pub fn contracts_json() -> serde_json::Value {
    use serde_json::json;
    let sigs = signatures();
    let sources: Vec<serde_json::Value> = Source::ALL
        .iter()
        .map(|s| {
            let entries: Vec<serde_json::Value> = sigs
                .iter()
                .filter(|g| g.source == *s)
                .map(|g| {
                    json!({
                        "entry": g.entry,
                        "pdl": g.pdl,
                        "params": g.params.iter()
                            .map(|(n, t)| json!({"name": n, "type": t}))
                            .collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({"name": s.name(), "file": format!("{}.cu", s.name()), "entries": entries})
        })
        .collect();
    let modules: Vec<serde_json::Value> = ModuleKey::all()
        .iter()
        .map(|k| json!({"source": k.source.name(), "label": k.label(), "defines": k.defines}))
        .collect();
    let gemm: Vec<serde_json::Value> = moe_gemm::GemmVariant::all()
        .iter()
        .map(|v| {
            json!({
                "label": v.module().label(),
                "format": v.format.name(),
                "stage": format!("{:?}", v.stage),
                "bm": v.bm(), "bn": v.bn, "main_loop": v.main_loop.name(),
                "defines": v.defines(),
            })
        })
        .collect();
    json!({"common": "common.cuh", "sources": sources, "modules": modules, "gemm_variants": gemm})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fragment is pasted at every include, a `#pragma once` header at its first.
    #[test]
    fn fragments_are_pasted_at_every_include_and_headers_once() {
        let tu = translation_unit(
            "x.cu",
            "#include \"gemm/ws_producer.cuh\"\n#include \"gemm/ptx.cuh\"\n\
             #include \"gemm/ws_producer.cuh\"\n#include \"gemm/ptx.cuh\"\n",
        );
        let count = |needle: &str| tu.matches(needle).count();
        assert_eq!(count("#line 1 \"gemm/ws_producer.cuh\""), 2);
        assert_eq!(count("#line 1 \"gemm/ptx.cuh\""), 1);
        assert_eq!(count("mg_setmaxnreg_dec<WG_WS_PREGS>();"), 2);
    }

    /// Each warp-specialised main loop of moe_gemm.cu gets the producer pasted in, whatever the order
    /// in which the main loops are included.
    #[test]
    fn every_warp_specialised_loop_gets_its_producer() {
        let tu = Source::Gemm.full_text();
        for lp in ["gemm/mainloop_wgmma_ws.cuh", "gemm/mainloop_wgmma_rs.cuh"] {
            let at = tu
                .find(&format!("#line 1 \"{lp}\""))
                .unwrap_or_else(|| panic!("{lp} is not pasted"));
            let rest = &tu[at..];
            let end = rest[1..]
                .find("#line 1 \"gemm/mainloop")
                .map_or(rest.len(), |e| e + 1);
            assert!(
                rest[..end].contains("mg_setmaxnreg_dec<WG_WS_PREGS>();"),
                "{lp}: the producer fragment is missing from its pasted text"
            );
        }
    }
}
