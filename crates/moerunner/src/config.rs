//! Immutable descriptions of a MoE layer: formats, routing, activation, experts and parallelism.
//! Names (`Display` / `FromStr`) are exactly the strings of `spec/layer-file.md`, so a printed
//! config reproduces a case and the layer file round-trips through these types.

use std::fmt;
use std::str::FromStr;

use crate::error::{MoeError, Result};

macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident, $key:literal { $($variant:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn name(self) -> &'static str { match self { $($name::$variant => $s),+ } }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.name()) }
        }
        impl FromStr for $name {
            type Err = MoeError;
            fn from_str(s: &str) -> Result<Self> {
                match s {
                    $($s => Ok($name::$variant),)+
                    _ => Err(MoeError::invalid($key, format!(
                        "unknown value `{s}`; expected one of: {}",
                        [$($s),+].join(", ")))),
                }
            }
        }
    };
}

named_enum!(
    /// How expert weights are stored (`spec/formats.md`, "The weight formats").
    WeightFormat, "weight_format" {
    Bf16 = "bf16", Fp8 = "fp8", Fp8Block = "fp8_block", Mxfp8 = "mxfp8", Mxfp4 = "mxfp4", Nvfp4 = "nvfp4",
});

named_enum!(
    /// How activations (GEMM inputs) are quantized.
    ActivationFormat, "activation_format" {
    Bf16 = "bf16", Fp8 = "fp8", Fp8Block = "fp8_block", Mxfp8 = "mxfp8", Nvfp4 = "nvfp4",
    Nvfp4PerToken = "nvfp4_per_token",
});

named_enum!(
    /// Row order of the gate and up halves inside W13 (`spec/activations.md`).
    W13Order, "w13_order" { GateUp = "gate_up", UpGate = "up_gate", Interleaved = "interleaved" });

named_enum!(
    /// The routing method's name; its parameters live in [`RoutingConfig`].
    RoutingMethod, "routing" {
    Default = "default", Renormalize = "renormalize", RenormalizeNaive = "renormalize_naive",
    DeepseekV3 = "deepseek_v3", Llama4 = "llama4", TopK = "topk", SigmoidRenorm = "sigmoid_renorm",
    Minimax2 = "minimax2", Sigmoid = "sigmoid", TopkSigmoid = "topk_sigmoid",
});

named_enum!(
    /// The activation function's name; GPT-OSS parameters live in [`Activation::SwigluOai`].
    ActivationKind, "activation" { Swiglu = "swiglu", Geglu = "geglu", SwigluOai = "swiglu_oai", Relu2 = "relu2" });

impl WeightFormat {
    /// The activation formats this weight format may be paired with (`spec/formats.md`).
    pub fn legal_activation_formats(self) -> &'static [ActivationFormat] {
        use ActivationFormat as A;
        match self {
            WeightFormat::Bf16 => &[A::Bf16],
            WeightFormat::Fp8 => &[A::Fp8],
            WeightFormat::Fp8Block => &[A::Fp8Block],
            WeightFormat::Mxfp8 => &[A::Mxfp8],
            WeightFormat::Mxfp4 => &[A::Bf16, A::Mxfp8],
            WeightFormat::Nvfp4 => &[A::Nvfp4, A::Nvfp4PerToken],
        }
    }
    /// The natural activation format (the first legal one).
    pub fn default_activation_format(self) -> ActivationFormat {
        self.legal_activation_formats()[0]
    }
    /// Elements along K that share one scale (None: no per-block scale).
    pub fn k_block(self) -> Option<usize> {
        match self {
            WeightFormat::Bf16 | WeightFormat::Fp8 => None,
            WeightFormat::Fp8Block => Some(128),
            WeightFormat::Mxfp8 | WeightFormat::Mxfp4 => Some(32),
            WeightFormat::Nvfp4 => Some(16),
        }
    }
    /// True for the 4-bit formats that pack two elements per byte.
    pub fn is_fp4(self) -> bool {
        matches!(self, WeightFormat::Mxfp4 | WeightFormat::Nvfp4)
    }
    /// Bytes per parameter as counted by `spec/performance.md`.
    pub fn bytes_per_param(self) -> f64 {
        match self {
            WeightFormat::Bf16 => 2.0,
            WeightFormat::Fp8 => 1.0,
            WeightFormat::Fp8Block => 1.0 + 4.0 / 16384.0,
            WeightFormat::Mxfp8 => 1.0 + 1.0 / 32.0,
            WeightFormat::Mxfp4 => 0.5 + 1.0 / 32.0,
            WeightFormat::Nvfp4 => 0.5 + 1.0 / 16.0,
        }
    }
}

impl ActivationFormat {
    /// Whether this format takes a static per-GEMM input scale from the layer.
    pub fn needs_input_scale(self) -> bool {
        matches!(self, ActivationFormat::Fp8 | ActivationFormat::Nvfp4)
    }
}

/// The activation between the GEMMs (`spec/activations.md`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    Swiglu,
    Geglu,
    /// GPT-OSS clamped SwiGLU: g' = min(g, limit), u' = clamp(u, -limit, limit), g'·σ(α·g')·(u' + β).
    SwigluOai {
        alpha: f32,
        beta: f32,
        limit: f32,
    },
    Relu2,
}

impl Activation {
    pub const OAI_DEFAULT: Activation = Activation::SwigluOai {
        alpha: 1.702,
        beta: 1.0,
        limit: 7.0,
    };
    pub fn kind(&self) -> ActivationKind {
        match self {
            Activation::Swiglu => ActivationKind::Swiglu,
            Activation::Geglu => ActivationKind::Geglu,
            Activation::SwigluOai { .. } => ActivationKind::SwigluOai,
            Activation::Relu2 => ActivationKind::Relu2,
        }
    }
    pub fn is_gated(&self) -> bool {
        !matches!(self, Activation::Relu2)
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Activation::SwigluOai { alpha, beta, limit } => {
                write!(f, "swiglu_oai(alpha={alpha}, beta={beta}, limit={limit})")
            }
            other => f.write_str(other.kind().name()),
        }
    }
}

/// The routing method with its parameters (`spec/routing.md`).
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingConfig {
    pub method: RoutingMethod,
    pub top_k: usize,
    /// `deepseek_v3` only: number of expert groups (≤ 1 means no grouping).
    pub n_group: usize,
    /// `deepseek_v3` only: groups kept.
    pub topk_group: usize,
    /// `deepseek_v3`, `minimax2`: multiplies the weights.
    pub routed_scaling_factor: f32,
    /// `sigmoid_renorm`: renormalize the selected weights.
    pub norm_topk_prob: bool,
}

impl RoutingConfig {
    pub fn new(method: RoutingMethod, top_k: usize) -> Self {
        RoutingConfig {
            method,
            top_k,
            n_group: 1,
            topk_group: 1,
            routed_scaling_factor: 1.0,
            norm_topk_prob: true,
        }
    }
    /// Whether the method reads the per-expert `router_bias`.
    pub fn uses_bias(&self) -> bool {
        matches!(
            self.method,
            RoutingMethod::DeepseekV3 | RoutingMethod::Minimax2
        )
    }
    /// Checks the limits of `spec/routing.md` against E global experts.
    pub fn validate(&self, num_experts: usize) -> Result<()> {
        let e = num_experts;
        if self.top_k < 1 || self.top_k > e {
            return Err(MoeError::invalid(
                "top_k",
                format!("must be in 1..={e} (E), got {}", self.top_k),
            ));
        }
        if self.method == RoutingMethod::Llama4 && self.top_k != 1 {
            return Err(MoeError::invalid(
                "top_k",
                format!("llama4 routing needs top_k = 1, got {}", self.top_k),
            ));
        }
        if !self.routed_scaling_factor.is_finite() {
            return Err(MoeError::invalid(
                "routed_scaling_factor",
                format!("must be finite, got {}", self.routed_scaling_factor),
            ));
        }
        if self.method == RoutingMethod::DeepseekV3 && self.n_group > 1 {
            let (g, tg) = (self.n_group, self.topk_group);
            if !e.is_multiple_of(g) {
                return Err(MoeError::invalid(
                    "n_group",
                    format!("E = {e} is not divisible by n_group = {g}"),
                ));
            }
            if tg < 1 || tg > g {
                return Err(MoeError::invalid(
                    "topk_group",
                    format!("must be in 1..={g} (n_group), got {tg}"),
                ));
            }
            if self.top_k > tg * (e / g) {
                return Err(MoeError::invalid(
                    "top_k",
                    format!(
                        "{} exceeds topk_group · E / n_group = {}",
                        self.top_k,
                        tg * (e / g)
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Display for RoutingConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(k={}", self.method, self.top_k)?;
        if self.method == RoutingMethod::DeepseekV3 {
            write!(
                f,
                ", n_group={}, topk_group={}",
                self.n_group, self.topk_group
            )?;
        }
        if matches!(
            self.method,
            RoutingMethod::DeepseekV3 | RoutingMethod::Minimax2
        ) {
            write!(f, ", rsf={}", self.routed_scaling_factor)?;
        }
        if self.method == RoutingMethod::SigmoidRenorm {
            write!(f, ", norm_topk_prob={}", self.norm_topk_prob)?;
        }
        f.write_str(")")
    }
}

/// Which slice of the global layer a rank holds (`spec/layer.md`, "Parallelism").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parallelism {
    pub ep_size: usize,
    pub ep_rank: usize,
    pub tp_size: usize,
    pub tp_rank: usize,
}

impl Default for Parallelism {
    fn default() -> Self {
        Parallelism {
            ep_size: 1,
            ep_rank: 0,
            tp_size: 1,
            tp_rank: 0,
        }
    }
}

impl Parallelism {
    pub fn validate(&self) -> Result<()> {
        if self.ep_size == 0 || self.ep_rank >= self.ep_size {
            return Err(MoeError::invalid(
                "ep_rank",
                format!(
                    "rank {} of size {} is out of range (ranks are 0..={})",
                    self.ep_rank,
                    self.ep_size,
                    self.ep_size.max(1) - 1
                ),
            ));
        }
        if self.tp_size == 0 || self.tp_rank >= self.tp_size {
            return Err(MoeError::invalid(
                "tp_rank",
                format!(
                    "rank {} of size {} is out of range (ranks are 0..={})",
                    self.tp_rank,
                    self.tp_size,
                    self.tp_size.max(1) - 1
                ),
            ));
        }
        Ok(())
    }
    /// Checks that E global experts split evenly over the EP ranks and I over the TP ranks
    /// (shared by in-memory sharding and checkpoint loading, so both refuse the same layers).
    pub fn check_splits(&self, num_experts: usize, intermediate: usize) -> Result<()> {
        if !num_experts.is_multiple_of(self.ep_size) {
            return Err(MoeError::invalid(
                "ep_size",
                format!(
                    "E = {num_experts} experts cannot be split evenly over {} ranks",
                    self.ep_size
                ),
            ));
        }
        if !intermediate.is_multiple_of(self.tp_size) {
            return Err(MoeError::invalid(
                "tp_size",
                format!(
                    "I = {intermediate} cannot be split evenly over {} ranks",
                    self.tp_size
                ),
            ));
        }
        Ok(())
    }
    pub fn is_single(&self) -> bool {
        self.ep_size == 1 && self.tp_size == 1
    }
}

/// Everything that describes a layer except its tensors. `intermediate` is the *local* I (after
/// TP slicing); `local_experts` is the range of global expert ids whose weights this layer holds.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerConfig {
    /// E: global number of experts (routing runs over all of them).
    pub num_experts: usize,
    /// H.
    pub hidden: usize,
    /// I per TP shard (the rows of each W13 half, the columns of W2).
    pub intermediate: usize,
    pub weight_format: WeightFormat,
    pub activation_format: ActivationFormat,
    pub activation: Activation,
    /// Meaningful for gated activations only.
    pub w13_order: W13Order,
    pub routing: RoutingConfig,
    /// Global ids `[start, start + count)` held by this layer (all of them unless EP-sliced).
    pub local_experts: std::ops::Range<usize>,
    /// Where this layer sits in the parallel group (informational; slicing already applied).
    pub parallelism: Parallelism,
}

impl LayerConfig {
    /// Rows of W13: 2I for gated activations, I otherwise (saturating: `validate` refuses a
    /// size that does not fit).
    pub fn w13_rows(&self) -> usize {
        if self.activation.is_gated() {
            self.intermediate.saturating_mul(2)
        } else {
            self.intermediate
        }
    }
    pub fn num_local_experts(&self) -> usize {
        self.local_experts.len()
    }
    /// Parameters per expert (performance.md's P).
    pub fn params_per_expert(&self) -> usize {
        (self.w13_rows() + self.intermediate) * self.hidden
    }
    /// Checks everything that can be checked without tensors: sizes, format pairing, routing limits.
    pub fn validate(&self) -> Result<()> {
        if self.num_experts == 0 {
            return Err(MoeError::invalid("num_experts", "must be at least 1"));
        }
        if self.hidden == 0 || self.intermediate == 0 {
            return Err(MoeError::invalid(
                "shape",
                format!(
                    "H = {} and I = {} must be positive",
                    self.hidden, self.intermediate
                ),
            ));
        }
        // Every tensor's element count must fit a usize (E × (M + I) × H and the scales below
        // it): a size that wraps would allocate or index the wrong amount.
        crate::size::product(
            "E × 2 × I × H (num_experts, intermediate, hidden)",
            &[self.num_experts, 2, self.intermediate, self.hidden],
        )?;
        let legal = self.weight_format.legal_activation_formats();
        if !legal.contains(&self.activation_format) {
            return Err(MoeError::invalid(
                "activation_format",
                format!(
                    "`{}` cannot be paired with weight format `{}`; legal: {}",
                    self.activation_format,
                    self.weight_format,
                    legal
                        .iter()
                        .map(|f| f.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        if let Some(block) = self.weight_format.k_block() {
            // MX and NV formats need whole blocks along K (spec: K % 32 = 0, packed nibbles).
            if block <= 32 {
                for (key, what, k) in [
                    ("hidden", "H (GEMM1's K)", self.hidden),
                    ("intermediate", "I (GEMM2's K)", self.intermediate),
                ] {
                    if k % block != 0 {
                        return Err(MoeError::invalid(
                            key,
                            format!(
                                "{what} = {k} must be a multiple of {block} for {}",
                                self.weight_format
                            ),
                        ));
                    }
                }
            }
        }
        if let Activation::SwigluOai { alpha, beta, limit } = self.activation {
            if !(alpha.is_finite() && beta.is_finite()) || limit.is_nan() {
                return Err(MoeError::invalid(
                    "swiglu_oai",
                    format!("alpha={alpha}, beta={beta}, limit={limit} must be numbers"),
                ));
            }
            // The clamp to [−limit, limit] needs limit > 0 (+inf: no clamping); the layer file
            // and every checkpoint family refuse the same values.
            if limit <= 0.0 {
                return Err(MoeError::invalid(
                    "swiglu_limit",
                    format!("must be positive (or inf), got {limit}"),
                ));
            }
        }
        if self.local_experts.end > self.num_experts || self.local_experts.is_empty() {
            return Err(MoeError::invalid(
                "local_experts",
                format!(
                    "{:?} is not a non-empty range inside 0..{}",
                    self.local_experts, self.num_experts
                ),
            ));
        }
        self.parallelism.validate()?;
        self.routing.validate(self.num_experts)
    }
}

impl fmt::Display for LayerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "E={} H={} I={} {}×{} {}",
            self.num_experts,
            self.hidden,
            self.intermediate,
            self.weight_format,
            self.activation_format,
            self.activation,
        )?;
        // W13's row order means something only when it holds gate and up rows.
        if self.activation.is_gated() {
            write!(f, " {}", self.w13_order)?;
        }
        write!(f, " {}", self.routing)?;
        if !self.parallelism.is_single() {
            let p = self.parallelism;
            write!(
                f,
                " ep={}/{} tp={}/{}",
                p.ep_rank, p.ep_size, p.tp_rank, p.tp_size
            )?;
        }
        Ok(())
    }
}

/// ‖out − ref‖₂ / ‖ref‖₂ in f64. NaN anywhere in `out` (or lengths that differ) gives NaN, which
/// passes no tolerance; an all-zero reference gives 0 for an all-zero output and ∞ otherwise.
pub fn relative_error(out: &[f64], reference: &[f64]) -> f64 {
    if out.len() != reference.len() || out.iter().any(|v| v.is_nan()) {
        return f64::NAN;
    }
    let num: f64 = out
        .iter()
        .zip(reference)
        .map(|(o, r)| (o - r) * (o - r))
        .sum();
    let den: f64 = reference.iter().map(|r| r * r).sum();
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

/// The largest relative error (‖out − ref‖₂ / ‖ref‖₂) allowed against the float64 reference
/// (`spec/formats.md`, "Tolerances").
pub fn tolerance(weight: WeightFormat, activation: ActivationFormat) -> f64 {
    match (weight, activation) {
        (WeightFormat::Bf16, _) | (WeightFormat::Mxfp4, ActivationFormat::Bf16) => 1e-2,
        (WeightFormat::Nvfp4, _) => 5e-2,
        _ => 2e-2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_reads_with_a_times_sign_and_w13_order_only_when_gated() {
        let mut c = LayerConfig {
            num_experts: 4,
            hidden: 128,
            intermediate: 64,
            weight_format: WeightFormat::Fp8Block,
            activation_format: ActivationFormat::Fp8Block,
            activation: Activation::Swiglu,
            w13_order: W13Order::Interleaved,
            routing: RoutingConfig::new(RoutingMethod::Renormalize, 2),
            local_experts: 0..4,
            parallelism: Parallelism::default(),
        };
        let gated = c.to_string();
        assert!(
            gated.contains("fp8_block×fp8_block swiglu interleaved "),
            "{gated}"
        );
        c.activation = Activation::Relu2;
        let plain = c.to_string();
        assert!(
            plain.contains("fp8_block×fp8_block relu2 renormalize"),
            "{plain}"
        );
        assert!(!plain.contains("interleaved"), "{plain}");
    }
}
